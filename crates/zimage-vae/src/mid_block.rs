use burn::tensor::Tensor;
use zimage_nn::ZBackend;
use zimage_nn::{AttentionImpl, CheckpointError, Weights};

use crate::attention::Attention;
use crate::checkpoint::ProjectionLayout;
use crate::resnet::ResnetBlock2D;

/// diffusers' `UNetMidBlock2D` with one layer: `resnets.0`, `attentions.0` (unless
/// `mid_block_add_attention` is false), `resnets.1`, all at the same width.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2D<B: ZBackend> {
    /// `resnets.0` and `resnets.1`.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// `attentions.0`.
    pub attention: Option<Attention<B>>,
}

impl<B: ZBackend> UNetMidBlock2D<B> {
    pub fn load(
        w: &Weights<B>,
        channels: usize,
        groups: usize,
        add_attention: bool,
        layout: ProjectionLayout,
    ) -> Result<Self, CheckpointError> {
        Ok(Self {
            resnets: (0..2)
                .map(|i| ResnetBlock2D::load(&w.pp("resnets").pp(i), channels, channels, groups))
                .collect::<Result<_, _>>()?,
            attention: add_attention
                .then(|| Attention::load(&w.pp("attentions").pp(0), channels, groups, layout))
                .transpose()?,
        })
    }

    /// # Shapes
    /// `[batch, channels, height, width]` -> the same
    pub fn forward(&self, x: Tensor<B, 4>, imp: AttentionImpl) -> Tensor<B, 4> {
        let mut x = x;
        for (i, resnet) in self.resnets.iter().enumerate() {
            if i == 1 {
                if let Some(attention) = &self.attention {
                    x = attention.forward(x, imp);
                }
            }
            x = resnet.forward(x);
        }
        x
    }
}
