//! The Flux-style variational autoencoder of Z-Image (diffusers' `AutoencoderKL`) on burn,
//! generic over the backend: encoder and decoder equal to diffusers, tiled encode and decode for
//! large images, latent scaling, and RGB8 conversions.
//!
//! ```no_run
//! # use burn::backend::NdArray;
//! # use burn::tensor::{DType, Distribution, Tensor};
//! # use zimage_vae::{tensor_to_images, AutoencoderKL};
//! let device = Default::default();
//! let vae = AutoencoderKL::<NdArray>::from_folder("Z-Image-Turbo/vae", &device, DType::F32)?;
//! let latents = Tensor::random([1, 16, 128, 128], Distribution::Normal(0.0, 1.0), &device);
//! let images = vae.decode(vae.unscale_latents(latents))?;
//! let rgb = tensor_to_images(images)?;
//! # Ok::<(), zimage_vae::VaeError>(())
//! ```

mod attention;
pub mod checkpoint;
mod config;
mod decoder;
mod distribution;
mod encoder;
mod error;
mod image;
mod mid_block;
mod model;
mod resnet;
mod sampling;
mod tiling;

pub use crate::image::{image_to_tensor, images_to_tensor, tensor_to_images};
/// The `image` crate, for [`image::RgbImage`] and saving results.
pub use ::image as image_crate;
pub use attention::Attention;
pub use checkpoint::{CheckpointFormat, Naming, ProjectionLayout};
pub use config::{AutoencoderKLConfig, DOWN_BLOCK_TYPE, UP_BLOCK_TYPE};
pub use decoder::{Decoder, UpDecoderBlock2D};
pub use distribution::DiagonalGaussianDistribution;
pub use encoder::{DownEncoderBlock2D, Encoder};
pub use error::VaeError;
pub use mid_block::UNetMidBlock2D;
pub use model::AutoencoderKL;

/// Every GroupNorm of the autoencoder uses this epsilon (`resnet_eps` and the `conv_norm_out`s).
pub const GROUP_NORM_EPS: f64 = 1e-6;
pub use resnet::ResnetBlock2D;
pub use sampling::{nearest_2x, Downsample2D, Upsample2D};
pub use tiling::TilingConfig;
pub use zimage_nn::AttentionImpl;
pub use zimage_nn::{silu, Conv2d, GroupNorm};
