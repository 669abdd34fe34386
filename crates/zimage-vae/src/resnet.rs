use burn::tensor::Tensor;
use zimage_nn::ZBackend;
use zimage_nn::{CheckpointError, Weights};

use zimage_nn::Conv2d;
use zimage_nn::GroupNorm;

use crate::GROUP_NORM_EPS;

/// diffusers' `ResnetBlock2D` as the autoencoder builds it: no time embedding, dropout 0,
/// output scale 1.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D<B: ZBackend> {
    pub norm1: GroupNorm<B>,
    pub conv1: Conv2d<B>,
    pub norm2: GroupNorm<B>,
    pub conv2: Conv2d<B>,
    /// 1x1 conv on the residual path, present when the channel count changes.
    pub conv_shortcut: Option<Conv2d<B>>,
}

impl<B: ZBackend> ResnetBlock2D<B> {
    pub fn load(
        w: &Weights<B>,
        in_channels: usize,
        out_channels: usize,
        groups: usize,
    ) -> Result<Self, CheckpointError> {
        Ok(Self {
            norm1: GroupNorm::load(&w.pp("norm1"), groups, in_channels, GROUP_NORM_EPS)?,
            conv1: Conv2d::load_3x3(&w.pp("conv1"), in_channels, out_channels)?,
            norm2: GroupNorm::load(&w.pp("norm2"), groups, out_channels, GROUP_NORM_EPS)?,
            conv2: Conv2d::load_3x3(&w.pp("conv2"), out_channels, out_channels)?,
            conv_shortcut: (in_channels != out_channels)
                .then(|| Conv2d::load(&w.pp("conv_shortcut"), in_channels, out_channels, 1, 1, 0))
                .transpose()?,
        })
    }

    /// `shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`
    ///
    /// # Shapes
    /// `[batch, in, height, width]` -> `[batch, out, height, width]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.conv1.forward(self.norm1.forward_silu(x.clone()));
        let h = self.conv2.forward(self.norm2.forward_silu(h));
        let residual = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        residual + h
    }
}
