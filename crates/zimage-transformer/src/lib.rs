//! The Z-Image S3-DiT ("single-stream diffusion transformer", `ZImageTransformer2DModel` in
//! diffusers) on burn, generic over the backend.
//!
//! ```no_run
//! # use burn::backend::NdArray;
//! # use zimage_transformer::ZImageTransformer2DModel;
//! let device = Default::default();
//! let model = ZImageTransformer2DModel::<NdArray>::from_folder(
//!     "Z-Image-Turbo/transformer", &device, burn::tensor::DType::F32)?;
//! # Ok::<(), zimage_transformer::TransformerError>(())
//! ```

mod adapters;
mod block;
pub mod checkpoint;
mod config;
mod controlnet;
mod embedders;
mod error;
mod model;
mod rope;

pub use block::{Attention, FeedForward, FinalLayer, SequenceContext, ZImageTransformerBlock};
pub use config::{ZImageTransformerConfig, SEQ_MULTI_OF};
pub use controlnet::{
    ControlNoiseRefiner, ControlRefinerBlocks, ZImageControlNetConfig, ZImageControlNetModel,
    ZImageControlTransformerBlock,
};
pub use embedders::{timestep_embedding, CaptionEmbedder, TimestepEmbedder};
pub use error::TransformerError;
pub use model::{LayerResiduals, ZImageTransformer2DModel};
pub use rope::{RopeEmbedder, RopeTable};
pub use zimage_nn::AttentionImpl;
