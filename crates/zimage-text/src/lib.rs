//! Z-Image's prompt encoding: the Qwen3 tokenizer with Z-Image's chat template, and the Qwen3
//! text encoder (transformers' `Qwen3Model`, `hidden_states[-2]`) on burn, generic over the
//! backend.
//!
//! ```no_run
//! # use burn::backend::NdArray;
//! # use zimage_text::{PromptTokenizer, Qwen3TextEncoder, DEFAULT_MAX_SEQUENCE_LENGTH};
//! let device = Default::default();
//! let tokenizer = PromptTokenizer::from_folder("Z-Image-Turbo/tokenizer")?;
//! let encoder = Qwen3TextEncoder::<NdArray>::from_folder(
//!     "Z-Image-Turbo/text_encoder", &device, burn::tensor::DType::F32)?;
//! // One [tokens, 2560] tensor per prompt.
//! let features = encoder.encode_prompts(&tokenizer, &["a cat", ""], DEFAULT_MAX_SEQUENCE_LENGTH)?;
//! // The weights (8 GB in bf16, 16 GB in f32) are freed here; the features stay.
//! drop(encoder);
//! # Ok::<(), zimage_text::TextError>(())
//! ```
//!
//! Memory: loading reads one tensor at a time from the memory-mapped checkpoint and casts it, so
//! the peak is the model in the target dtype plus one tensor. The last decoder layer and the
//! final norm are never loaded. Plain ownership governs the rest: the encoder can be loaded on its
//! own, used for any number of batches, and dropped to give the memory back (on GPU backends, to
//! burn's memory pool of that device).

mod config;
mod encoder;
mod error;
mod layer;
mod rope;
mod tokenizer;

pub mod checkpoint;

pub use config::{Qwen3Config, RopeParameters};
pub use encoder::Qwen3TextEncoder;
pub use error::TextError;
pub use layer::{LayerContext, Qwen3Attention, Qwen3DecoderLayer, Qwen3Mlp};
pub use rope::Qwen3RotaryEmbedding;
pub use tokenizer::{qwen3_tokenizer_json, PromptTokenizer, DEFAULT_MAX_SEQUENCE_LENGTH};
pub use zimage_nn::AttentionImpl;
