use burn::tensor::Tensor;
use zimage_nn::ZBackend;
use zimage_nn::{AttentionImpl, CheckpointError, Weights};

use crate::checkpoint::ProjectionLayout;
use crate::mid_block::UNetMidBlock2D;
use zimage_nn::Conv2d;
use zimage_nn::GroupNorm;

use crate::resnet::ResnetBlock2D;
use crate::sampling::Downsample2D;
use crate::AutoencoderKLConfig;
use crate::GROUP_NORM_EPS;

/// diffusers' `DownEncoderBlock2D`: `layers_per_block` resnets, then (but in the last block) a
/// downsampler.
#[derive(Debug, Clone)]
pub struct DownEncoderBlock2D<B: ZBackend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// `downsamplers.0`.
    pub downsampler: Option<Downsample2D<B>>,
}

impl<B: ZBackend> DownEncoderBlock2D<B> {
    /// # Shapes
    /// `[batch, in, height, width]` -> `[batch, out, height / 2, width / 2]` (or the same size
    /// without downsampler)
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = self.resnets.iter().fold(x, |x, resnet| resnet.forward(x));
        match &self.downsampler {
            Some(down) => down.forward(x),
            None => x,
        }
    }
}

/// The encoder (`encoder.*`): image to the moments (mean and log-variance) of the latent
/// posterior.
#[derive(Debug, Clone)]
pub struct Encoder<B: ZBackend> {
    pub conv_in: Conv2d<B>,
    pub down_blocks: Vec<DownEncoderBlock2D<B>>,
    pub mid_block: UNetMidBlock2D<B>,
    pub conv_norm_out: GroupNorm<B>,
    /// To `2 * latent_channels` (mean, then log-variance).
    pub conv_out: Conv2d<B>,
}

impl<B: ZBackend> Encoder<B> {
    pub fn load(
        w: &Weights<B>,
        config: &AutoencoderKLConfig,
        layout: ProjectionLayout,
    ) -> Result<Self, CheckpointError> {
        let channels = &config.block_out_channels;
        let groups = config.norm_num_groups;
        let last = channels.len() - 1;
        let mut input = channels[0];
        let mut down_blocks = Vec::with_capacity(channels.len());
        for (i, &output) in channels.iter().enumerate() {
            let w = w.pp("down_blocks").pp(i);
            down_blocks.push(DownEncoderBlock2D {
                resnets: (0..config.layers_per_block)
                    .map(|j| {
                        let from = if j == 0 { input } else { output };
                        ResnetBlock2D::load(&w.pp("resnets").pp(j), from, output, groups)
                    })
                    .collect::<Result<_, _>>()?,
                downsampler: (i != last)
                    .then(|| Downsample2D::load(&w.pp("downsamplers").pp(0), output))
                    .transpose()?,
            });
            input = output;
        }
        let top = channels[last];
        Ok(Self {
            conv_in: Conv2d::load_3x3(&w.pp("conv_in"), config.in_channels, channels[0])?,
            down_blocks,
            mid_block: UNetMidBlock2D::load(
                &w.pp("mid_block"),
                top,
                groups,
                config.mid_block_add_attention,
                layout,
            )?,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), groups, top, GROUP_NORM_EPS)?,
            conv_out: Conv2d::load_3x3(&w.pp("conv_out"), top, 2 * config.latent_channels)?,
        })
    }

    /// # Shapes
    /// `[batch, in_channels, H, W]` -> `[batch, 2 * latent_channels, H / f, W / f]` with
    /// `f = 2^(blocks - 1)` (sides rounded down at each downsampling)
    pub fn forward(&self, x: Tensor<B, 4>, imp: AttentionImpl) -> Tensor<B, 4> {
        let x = self.conv_in.forward(x);
        let x = self.down_blocks.iter().fold(x, |x, block| block.forward(x));
        let x = self.mid_block.forward(x, imp);
        self.conv_out.forward(self.conv_norm_out.forward_silu(x))
    }
}
