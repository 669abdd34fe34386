use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::Tensor;
use zimage_nn::{CheckpointError, Weights};

/// `nn.Conv2d` with bias, square kernel, symmetric zero padding (PyTorch weight layout
/// `[out, in, k, k]`).
#[derive(Module, Debug)]
pub struct Conv2d<B: Backend> {
    pub weight: Param<Tensor<B, 4>>,
    pub bias: Param<Tensor<B, 1>>,
    pub stride: usize,
    pub padding: usize,
}

impl<B: Backend> Conv2d<B> {
    pub fn load(
        w: &Weights<B>,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self, CheckpointError> {
        Ok(Self {
            weight: w.param("weight", [out_channels, in_channels, kernel, kernel])?,
            bias: w.param("bias", [out_channels])?,
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

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// # Shapes
    /// `[batch, in, height, width]` -> `[batch, out, height', width']`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if zimage_nn::host::is_host_backend::<B>(&x.device()) {
            return zimage_nn::host::conv2d(
                x,
                self.weight.val(),
                self.bias.val(),
                self.stride,
                self.padding,
            );
        }
        conv2d(
            x,
            self.weight.val(),
            Some(self.bias.val()),
            ConvOptions::new([self.stride; 2], [self.padding; 2], [1, 1], 1),
        )
    }
}
