use burn::tensor::Tensor;

use crate::{CheckpointError, Stored, Weights, ZBackend};

/// `nn.Conv2d` with bias, square kernel, symmetric zero padding (PyTorch weight layout
/// `[out, in, k, k]`).
#[derive(Debug, Clone)]
pub struct Conv2d<B: ZBackend> {
    /// On the device `[out, in, k, k]`; on the host as stored, `[out, in * k * k]`.
    pub weight: Stored<B, 4>,
    pub bias: Tensor<B, 1>,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl<B: ZBackend> Conv2d<B> {
    pub fn load(
        w: &Weights<B>,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self, CheckpointError> {
        Ok(Self {
            weight: w.matrix("weight", [out_channels, in_channels, kernel, kernel])?,
            bias: w.tensor("bias", [out_channels])?,
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
        })
    }

    /// 3x3, stride 1, padding 1: the size-keeping conv used everywhere.
    pub fn load_3x3(
        w: &Weights<B>,
        in_channels: usize,
        out_channels: usize,
    ) -> Result<Self, CheckpointError> {
        Self::load(w, in_channels, out_channels, 3, 1, 1)
    }

    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    pub fn kernel(&self) -> usize {
        self.kernel
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    pub fn padding(&self) -> usize {
        self.padding
    }

    /// # Shapes
    /// `[batch, in, height, width]` -> `[batch, out, height', width']`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        B::convolve(self, x)
    }
}
