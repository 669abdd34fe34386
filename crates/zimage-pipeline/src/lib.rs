//! Z-Image pipelines on burn, generic over the backend: text-to-image, image-to-image and
//! inpainting with diffusers' semantics, and the torch-compatible generator that makes a seed give
//! the same picture as diffusers.
//!
//! ```no_run
//! # use burn::backend::NdArray;
//! # use zimage_pipeline::{ModelFiles, ZImagePipeline};
//! let device = Default::default();
//! // A Hugging Face layout folder, or the three single files people download from ComfyUI:
//! // ModelFiles::single_files().with_transformer_file("z_image_turbo_bf16.safetensors")?...
//! let files = ModelFiles::open("Z-Image-Turbo")?;
//! let mut pipeline = ZImagePipeline::<NdArray>::new(files, &device, burn::tensor::DType::F32)?;
//! let mut options = pipeline.options("a red fox in the snow, photograph");
//! options.seed = 42;
//! let generation = pipeline.generate(&options, &mut |_event| std::ops::ControlFlow::Continue(()))?;
//! generation.images[0].save("fox.png").expect("write");
//! # Ok::<(), zimage_pipeline::PipelineError>(())
//! ```

mod control;
mod error;
mod folder;
pub mod generator;
pub mod memory;
mod options;
mod pipeline;
pub mod record;
pub mod resize;

pub use control::{canny, CANNY_DEFAULT_THRESHOLDS};
pub use error::PipelineError;
pub use folder::{ConfigSource, ModelFiles, Part, Variant, VariantChoice, CONFIG_METADATA_KEY};
pub use generator::{NoiseDtype, TorchGenerator};
pub use memory::MemoryEstimate;
pub use options::{ControlInpaint, ControlOptions, GenerateOptions, InitImage, Stage};
pub use pipeline::{Event, Generation, ZImagePipeline};
/// Adapters: read with [`zimage_lora::LoraAdapter::open`], given with [`ZImagePipeline::set_adapters`].
pub use zimage_lora;
/// ControlNet configs: detected from the file, or a diffusers `config.json`.
pub use zimage_transformer::{ControlNoiseRefiner, ZImageControlNetConfig};
