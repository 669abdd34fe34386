use burn::tensor::ops::PadMode;
use burn::tensor::Tensor;
use zimage_nn::ZBackend;
use zimage_nn::{CheckpointError, Conv2d, Weights};

/// diffusers' `Downsample2D` with `padding=0`: zero-pad one column on the right and one row at
/// the bottom, then a 3x3 conv with stride 2 (`conv`). Odd sizes round down, as in PyTorch.
#[derive(Debug, Clone)]
pub struct Downsample2D<B: ZBackend> {
    pub conv: Conv2d<B>,
}

impl<B: ZBackend> Downsample2D<B> {
    pub fn load(w: &Weights<B>, channels: usize) -> Result<Self, CheckpointError> {
        Ok(Self {
            conv: Conv2d::load(&w.pp("conv"), channels, channels, 3, 2, 0)?,
        })
    }

    /// The output side for an input side (the input needs at least 2).
    pub fn output_size(size: usize) -> usize {
        size / 2
    }

    /// # Shapes
    /// `[batch, channels, height, width]` -> `[batch, channels, height / 2, width / 2]`
    /// (both sides at least 2)
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        // padding (left, right, top, bottom) = (0, 1, 0, 1), then the unpadded stride-2 conv.
        self.conv
            .forward(x.pad((0, 1, 0, 1), PadMode::Constant(0.0)))
    }
}

/// diffusers' `Upsample2D` with a conv: nearest-neighbour x2, then a 3x3 conv (`conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D<B: ZBackend> {
    pub conv: Conv2d<B>,
}

impl<B: ZBackend> Upsample2D<B> {
    pub fn load(w: &Weights<B>, channels: usize) -> Result<Self, CheckpointError> {
        Ok(Self {
            conv: Conv2d::load_3x3(&w.pp("conv"), channels, channels)?,
        })
    }

    /// # Shapes
    /// `[batch, channels, height, width]` -> `[batch, channels, 2 height, 2 width]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv.forward(nearest_2x(x))
    }
}

/// `F.interpolate(x, scale_factor=2.0, mode="nearest")`: every pixel repeated into a 2x2 block.
/// Done by broadcasting (exact and the same on every backend) rather than by an index-computing
/// interpolation kernel.
///
/// # Shapes
/// `[batch, channels, height, width]` -> `[batch, channels, 2 height, 2 width]`
pub fn nearest_2x<B: ZBackend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [batch, channels, height, width] = x.dims();
    x.reshape([batch, channels, height, 1, width, 1])
        .expand([batch, channels, height, 2, width, 2])
        .reshape([batch, channels, 2 * height, 2 * width])
}
