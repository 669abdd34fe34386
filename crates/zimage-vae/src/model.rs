use std::path::Path;
use zimage_nn::ZBackend;

use burn::tensor::{DType, Tensor};
use zimage_nn::{AttentionImpl, Checkpoint, CheckpointError, Precision, WeightMap, Weights};

use crate::checkpoint::{self, CheckpointFormat, ProjectionLayout};
use crate::decoder::Decoder;
use crate::encoder::Encoder;
use crate::sampling::Downsample2D;
use crate::tiling::{tiled, TilingConfig};
use crate::{AutoencoderKLConfig, DiagonalGaussianDistribution, VaeError};
use zimage_nn::Conv2d;

/// The Flux-style variational autoencoder (diffusers' `AutoencoderKL`): images in [-1, 1] to
/// latents `2^(blocks - 1)` times smaller per side, and back.
#[derive(Debug, Clone)]
pub struct AutoencoderKL<B: ZBackend> {
    pub encoder: Encoder<B>,
    pub decoder: Decoder<B>,
    /// 1x1 conv on the moments, when `use_quant_conv`.
    pub quant_conv: Option<Conv2d<B>>,
    /// 1x1 conv on the latents, when `use_post_quant_conv`.
    pub post_quant_conv: Option<Conv2d<B>>,
    config: AutoencoderKLConfig,
    attention: AttentionImpl,
}

impl<B: ZBackend> AutoencoderKL<B> {
    /// Builds the model through `w`; parameter paths are the diffusers checkpoint names.
    pub fn build(config: &AutoencoderKLConfig, w: &Weights<B>) -> Result<Self, CheckpointError> {
        Self::build_with_layout(config, w, ProjectionLayout::Linear)
    }

    /// [`AutoencoderKL::build`] for checkpoints whose attention projections are 1x1 convs.
    pub fn build_with_layout(
        config: &AutoencoderKLConfig,
        w: &Weights<B>,
        layout: ProjectionLayout,
    ) -> Result<Self, CheckpointError> {
        let latent = config.latent_channels;
        Ok(Self {
            encoder: Encoder::load(&w.pp("encoder"), config, layout)?,
            decoder: Decoder::load(&w.pp("decoder"), config, layout)?,
            quant_conv: config
                .use_quant_conv
                .then(|| Conv2d::load(&w.pp("quant_conv"), 2 * latent, 2 * latent, 1, 1, 0))
                .transpose()?,
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| Conv2d::load(&w.pp("post_quant_conv"), latent, latent, 1, 1, 0))
                .transpose()?,
            config: config.clone(),
            attention: AttentionImpl::default(),
        })
    }

    /// Loads from a checkpoint in diffusers or BFL (`ae.safetensors`) naming (see
    /// [`checkpoint`]). A BFL file comes without a config: the
    /// published Z-Image (FLUX.1) layout is [`AutoencoderKLConfig::z_image`]. Weight matrices
    /// are held as `precision` says ([`Precision`]).
    pub fn load(
        config: &AutoencoderKLConfig,
        checkpoint: Checkpoint,
        device: &B::Device,
        precision: impl Into<Precision>,
    ) -> Result<Self, VaeError> {
        config.validate()?;
        let format = checkpoint::detect(&checkpoint)?;
        Self::load_format(config, checkpoint, &format, device, precision)
    }

    /// [`AutoencoderKL::load`] with the naming given rather than detected.
    pub fn load_format(
        config: &AutoencoderKLConfig,
        checkpoint: Checkpoint,
        format: &CheckpointFormat,
        device: &B::Device,
        precision: impl Into<Precision>,
    ) -> Result<Self, VaeError> {
        config.validate()?;
        let map = WeightMap::new(checkpoint, |name, shape| {
            checkpoint::map_key(format, config, name, shape)
        });
        Ok(zimage_nn::load_module(&map, device, precision, |w| {
            Self::build_with_layout(config, w, format.attention)
        })?)
    }

    /// Loads a diffusers `vae/` folder: `config.json` and the safetensors file.
    pub fn from_folder(
        folder: impl AsRef<Path>,
        device: &B::Device,
        precision: impl Into<Precision>,
    ) -> Result<Self, VaeError> {
        let folder = folder.as_ref();
        let config = AutoencoderKLConfig::from_file(folder.join("config.json"))?;
        Self::load(&config, Checkpoint::open(folder)?, device, precision)
    }

    /// Random weights made on the device (benchmarks).
    pub fn random(
        config: &AutoencoderKLConfig,
        device: &B::Device,
        precision: impl Into<Precision>,
    ) -> Result<Self, VaeError> {
        config.validate()?;
        Ok(Self::build(config, &Weights::random(device, precision))?)
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Chooses how the mid-block attention is computed (`AttentionImpl::default()` otherwise).
    pub fn with_attention(mut self, attention: AttentionImpl) -> Self {
        self.attention = attention;
        self
    }

    /// The compute dtype; inputs are cast to it and outputs come in it.
    pub fn dtype(&self) -> DType {
        self.encoder.conv_in.bias.dtype()
    }

    /// Image pixels per latent pixel along each side.
    pub fn downscale_factor(&self) -> usize {
        self.config.downscale_factor()
    }

    /// Encodes images into the latent posterior (`vae.encode(x).latent_dist`). Latents for the
    /// diffusion model are `scale_latents(posterior.mode())` or of `posterior.sample(noise)`.
    ///
    /// # Shapes
    /// `[batch, in_channels, H, W]` in [-1, 1], `H` and `W` multiples of `2^(blocks - 1)` ->
    /// a posterior of `[batch, latent_channels, H / f, W / f]`
    pub fn encode(
        &self,
        images: Tensor<B, 4>,
    ) -> Result<DiagonalGaussianDistribution<B>, VaeError> {
        self.check_images(&images)?;
        let [batch, _, height, width] = images.dims();
        self.check_fits(batch, height, width, false)?;
        Ok(DiagonalGaussianDistribution::new(
            self.encode_moments(images.cast(self.dtype())),
        ))
    }

    /// [`AutoencoderKL::encode`] in overlapping tiles when the image is larger than a tile
    /// (what diffusers does after `enable_tiling()`); smaller images are encoded whole.
    /// Tiling changes the result slightly (each tile sees only its own pixels), and when the
    /// tile stride is not a multiple of `2^(blocks - 1)` the latent size differs from `H / f`,
    /// exactly as in diffusers. Border tiles too small to downsample are a
    /// [`VaeError::TileTooSmall`] (PyTorch fails inside the conv there).
    pub fn encode_tiled(
        &self,
        images: Tensor<B, 4>,
        tiling: &TilingConfig,
    ) -> Result<DiagonalGaussianDistribution<B>, VaeError> {
        self.check_images(&images)?;
        let plan = tiling.encode_plan()?;
        let [batch, _, height, width] = images.dims();
        let tile = tiling.tile_sample_min_size;
        self.check_fits(batch, height.min(tile), width.min(tile), false)?;
        let images = images.cast(self.dtype());
        if height.max(width) <= tiling.tile_sample_min_size {
            return Ok(DiagonalGaussianDistribution::new(
                self.encode_moments(images),
            ));
        }
        let downsamples = self.config.num_blocks() - 1;
        let moments = tiled(images, plan, |tile| {
            let [_, _, h, w] = tile.dims();
            // Border tiles can be small; every downsampling needs at least 2 pixels.
            let (mut th, mut tw) = (h, w);
            for _ in 0..downsamples {
                if th < 2 || tw < 2 {
                    return Err(VaeError::TileTooSmall {
                        height: h,
                        width: w,
                        downsamples,
                    });
                }
                th = Downsample2D::<B>::output_size(th);
                tw = Downsample2D::<B>::output_size(tw);
            }
            Ok(self.encode_moments(tile))
        })?;
        Ok(DiagonalGaussianDistribution::new(moments))
    }

    /// Decodes latents (already unscaled: see [`AutoencoderKL::unscale_latents`]) into images
    /// in about [-1, 1] (`vae.decode(z).sample`).
    ///
    /// # Shapes
    /// `[batch, latent_channels, h, w]` -> `[batch, out_channels, h * f, w * f]`
    pub fn decode(&self, latents: Tensor<B, 4>) -> Result<Tensor<B, 4>, VaeError> {
        self.check_latents(&latents)?;
        let [batch, _, height, width] = latents.dims();
        let f = self.downscale_factor();
        self.check_fits(batch, height * f, width * f, true)?;
        Ok(self.decode_whole(latents.cast(self.dtype())))
    }

    /// [`AutoencoderKL::decode`] in overlapping tiles when the latents are larger than a tile
    /// (what diffusers does after `enable_tiling()`), so that the decoder's activations are
    /// only ever as large as one tile's. Smaller latents are decoded whole. The result differs
    /// slightly from an untiled decode (each tile sees only its own latents), and when the tile
    /// sizes do not correspond (`tile_sample_min_size != tile_latent_min_size * f`) its size is
    /// not `h * f`, exactly as in diffusers.
    pub fn decode_tiled(
        &self,
        latents: Tensor<B, 4>,
        tiling: &TilingConfig,
    ) -> Result<Tensor<B, 4>, VaeError> {
        self.check_latents(&latents)?;
        let plan = tiling.decode_plan()?;
        let [batch, _, height, width] = latents.dims();
        let (tile, f) = (tiling.tile_latent_min_size, self.downscale_factor());
        self.check_fits(batch, height.min(tile) * f, width.min(tile) * f, true)?;
        let latents = latents.cast(self.dtype());
        if height.max(width) <= tiling.tile_latent_min_size {
            return Ok(self.decode_whole(latents));
        }
        tiled(latents, plan, |tile| Ok(self.decode_whole(tile)))
    }

    /// Latents as the diffusion model sees them: `(z - shift_factor) * scaling_factor`.
    pub fn scale_latents(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        latents
            .sub_scalar(self.config.shift())
            .mul_scalar(self.config.scaling_factor)
    }

    /// The inverse of [`AutoencoderKL::scale_latents`], before decoding:
    /// `z / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        latents
            .div_scalar(self.config.scaling_factor)
            .add_scalar(self.config.shift())
    }

    /// Encoder and `quant_conv`.
    fn encode_moments(&self, images: Tensor<B, 4>) -> Tensor<B, 4> {
        let moments = self.encoder.forward(images, self.attention);
        match &self.quant_conv {
            Some(conv) => conv.forward(moments),
            None => moments,
        }
    }

    /// `post_quant_conv` and decoder.
    fn decode_whole(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let latents = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents),
            None => latents,
        };
        self.decoder.forward(latents, self.attention)
    }

    /// [`AutoencoderKL::encode_tiled`] with `tiling` when given, else [`AutoencoderKL::encode`],
    /// tiled to fit (see [`AutoencoderKL::tiling_to_fit`]) when the whole pass would not.
    pub fn encode_fitted(
        &self,
        images: Tensor<B, 4>,
        tiling: Option<TilingConfig>,
    ) -> Result<DiagonalGaussianDistribution<B>, VaeError> {
        let [batch, _, height, width] = images.dims();
        match self.fitted(tiling, [batch, height, width], false)? {
            Some(tiling) => self.encode_tiled(images, &tiling),
            None => self.encode(images),
        }
    }

    /// [`AutoencoderKL::decode_tiled`] with `tiling` when given, else [`AutoencoderKL::decode`],
    /// tiled to fit (see [`AutoencoderKL::tiling_to_fit`]) when the whole pass would not.
    pub fn decode_fitted(
        &self,
        latents: Tensor<B, 4>,
        tiling: Option<TilingConfig>,
    ) -> Result<Tensor<B, 4>, VaeError> {
        let [batch, _, height, width] = latents.dims();
        let f = self.downscale_factor();
        match self.fitted(tiling, [batch, height * f, width * f], true)? {
            Some(tiling) => self.decode_tiled(latents, &tiling),
            None => self.decode(latents),
        }
    }

    fn fitted(
        &self,
        asked: Option<TilingConfig>,
        [batch, height, width]: [usize; 3],
        decode: bool,
    ) -> Result<Option<TilingConfig>, VaeError> {
        match asked {
            Some(tiling) => Ok(Some(tiling)),
            None => self.tiling_to_fit(batch, height, width, decode),
        }
    }

    /// Whether an untiled pass over `height x width` pixels fits the device
    /// (see [`zimage_nn::device`]).
    pub fn check_fits(
        &self,
        batch: usize,
        height: usize,
        width: usize,
        decode: bool,
    ) -> Result<(), VaeError> {
        let shape = self.config.largest_activation(batch, height, width, decode);
        let what = || {
            let pass = if decode { "decode" } else { "encode" };
            format!("the largest VAE activation of a {height}x{width} {pass}")
        };
        let device = self.encoder.conv_in.bias.device();
        zimage_nn::device::check_fits::<B>(&device, what, &shape, self.dtype())?;
        Ok(())
    }

    /// The tiling, if any, that lets a `height x width` pass fit the device: `None` when the
    /// whole image fits, else the largest tile of 512, 256, 128... pixels that does.
    pub fn tiling_to_fit(
        &self,
        batch: usize,
        height: usize,
        width: usize,
        decode: bool,
    ) -> Result<Option<TilingConfig>, VaeError> {
        let Err(too_large) = self.check_fits(batch, height, width, decode) else {
            return Ok(None);
        };
        let f = self.downscale_factor();
        std::iter::successors(Some(512usize), |&tile| Some(tile / 2))
            .take_while(|&tile| tile >= 2 * f)
            .map(|tile| TilingConfig::for_sample_size(tile, &self.config))
            .find(|tiling| {
                let side = tiling.tile_sample_min_size;
                self.check_fits(batch, height.min(side), width.min(side), decode)
                    .is_ok()
            })
            .map(Some)
            .ok_or(too_large)
    }

    fn check_images(&self, images: &Tensor<B, 4>) -> Result<(), VaeError> {
        let [batch, channels, height, width] = images.dims();
        if channels != self.config.in_channels {
            return Err(VaeError::Channels {
                what: "image",
                expected: self.config.in_channels,
                actual: channels,
            });
        }
        if batch == 0 {
            return Err(VaeError::Empty {
                what: "image batch",
                shape: images.dims().to_vec(),
            });
        }
        let multiple = self.downscale_factor();
        if height == 0 || width == 0 || height % multiple != 0 || width % multiple != 0 {
            return Err(VaeError::ImageSize {
                height,
                width,
                multiple,
            });
        }
        Ok(())
    }

    fn check_latents(&self, latents: &Tensor<B, 4>) -> Result<(), VaeError> {
        let [batch, channels, height, width] = latents.dims();
        if channels != self.config.latent_channels {
            return Err(VaeError::Channels {
                what: "latent",
                expected: self.config.latent_channels,
                actual: channels,
            });
        }
        if batch == 0 || height == 0 || width == 0 {
            return Err(VaeError::Empty {
                what: "latent",
                shape: latents.dims().to_vec(),
            });
        }
        Ok(())
    }
}
