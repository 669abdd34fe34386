use burn::tensor::Tensor;
use zimage_nn::ZBackend;
use zimage_nn::{AttentionImpl, CheckpointError, Weights};

use crate::checkpoint::ProjectionLayout;
use crate::mid_block::UNetMidBlock2D;
use zimage_nn::Conv2d;
use zimage_nn::GroupNorm;

use crate::resnet::ResnetBlock2D;
use crate::sampling::Upsample2D;
use crate::AutoencoderKLConfig;
use crate::GROUP_NORM_EPS;

/// diffusers' `UpDecoderBlock2D`: `layers_per_block + 1` resnets, then (but in the last block) an
/// upsampler.
#[derive(Debug, Clone)]
pub struct UpDecoderBlock2D<B: ZBackend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// `upsamplers.0`.
    pub upsampler: Option<Upsample2D<B>>,
}

impl<B: ZBackend> UpDecoderBlock2D<B> {
    /// # Shapes
    /// `[batch, in, height, width]` -> `[batch, out, 2 height, 2 width]` (or the same size
    /// without upsampler)
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = self.resnets.iter().fold(x, |x, resnet| resnet.forward(x));
        match &self.upsampler {
            Some(up) => up.forward(x),
            None => x,
        }
    }
}

/// The decoder (`decoder.*`): latents to an image in about [-1, 1].
#[derive(Debug, Clone)]
pub struct Decoder<B: ZBackend> {
    pub conv_in: Conv2d<B>,
    pub mid_block: UNetMidBlock2D<B>,
    /// Widest first: block `i` has `block_out_channels[blocks - 1 - i]` channels.
    pub up_blocks: Vec<UpDecoderBlock2D<B>>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
}

impl<B: ZBackend> Decoder<B> {
    pub fn load(
        w: &Weights<B>,
        config: &AutoencoderKLConfig,
        layout: ProjectionLayout,
    ) -> Result<Self, CheckpointError> {
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let groups = config.norm_num_groups;
        let last = reversed.len() - 1;
        let top = reversed[0];
        let mut input = top;
        let mut up_blocks = Vec::with_capacity(reversed.len());
        for (i, &output) in reversed.iter().enumerate() {
            let w = w.pp("up_blocks").pp(i);
            up_blocks.push(UpDecoderBlock2D {
                resnets: (0..config.layers_per_block + 1)
                    .map(|j| {
                        let from = if j == 0 { input } else { output };
                        ResnetBlock2D::load(&w.pp("resnets").pp(j), from, output, groups)
                    })
                    .collect::<Result<_, _>>()?,
                upsampler: (i != last)
                    .then(|| Upsample2D::load(&w.pp("upsamplers").pp(0), output))
                    .transpose()?,
            });
            input = output;
        }
        let bottom = reversed[last];
        Ok(Self {
            conv_in: Conv2d::load_3x3(&w.pp("conv_in"), config.latent_channels, top)?,
            mid_block: UNetMidBlock2D::load(
                &w.pp("mid_block"),
                top,
                groups,
                config.mid_block_add_attention,
                layout,
            )?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), groups, bottom, GROUP_NORM_EPS)?,
            conv_out: Conv2d::load_3x3(&w.pp("conv_out"), bottom, config.out_channels)?,
        })
    }

    /// # Shapes
    /// `[batch, latent_channels, h, w]` -> `[batch, out_channels, h * f, w * f]` with
    /// `f = 2^(blocks - 1)`
    pub fn forward(&self, z: Tensor<B, 4>, imp: AttentionImpl) -> Tensor<B, 4> {
        let x = self.conv_in.forward(z);
        let x = self.mid_block.forward(x, imp);
        let x = self.up_blocks.iter().fold(x, |x, block| block.forward(x));
        self.conv_out.forward(self.conv_norm_out.forward_silu(x))
    }
}
