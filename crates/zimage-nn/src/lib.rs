//! Shared building blocks of zimage-rs.
//!
//! - [`ZBackend`]: the seam between model code and backend-specific kernels; [`generic`] holds
//!   the implementation every backend gets by default, [`host`] the CPU kernels burn-ndarray uses.
//! - [`checkpoint`]: safetensors files and sharded sets (index json), and GGUF files ([`gguf`],
//!   ggml block types in [`quant`]), memory-mapped.
//! - [`weights`]: building modules from named tensors, with the complete mismatch report; weight
//!   matrices in their stored precision ([`Stored`], [`Precision`]).
//! - [`device`]: per-device tensor size limits, checked before anything is uploaded.
//! - layers several components use: [`Linear`], [`Embedding`], [`RmsNorm`], [`Conv2d`],
//!   [`GroupNorm`], [`Rotary`], [`attention`], [`silu_mul`].

pub mod activation;
pub mod attention;
mod backend;
pub mod checkpoint;
mod conv;
mod delta;
pub mod device;
mod embedding;
mod error;
pub mod generic;
pub mod gguf;
mod group_norm;
pub mod host;
mod linear;
mod norm;
pub mod quant;
mod quantized;
mod rotary;
pub mod weights;

pub use activation::{silu, silu_mul};
pub use attention::AttentionImpl;
pub use backend::ZBackend;
pub use checkpoint::{Checkpoint, StoredDtype, TensorEntry};
pub use conv::Conv2d;
pub use delta::WeightDelta;
pub use embedding::Embedding;
pub use error::{CheckpointError, MismatchReport, ShapeMismatch};
pub use group_norm::GroupNorm;
pub use linear::Linear;
pub use norm::{layer_norm, RmsNorm};
pub use quantized::QuantizedMatrix;
pub use rotary::{Rotary, RotaryLayout, RotaryTable};
pub use weights::{load_module, KeyMapping, Precision, Stored, TensorRef, WeightMap, Weights};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Element, Tensor};

/// The backend's default float dtype (`f32` on ndarray, the chosen element on cubecl backends).
pub fn float_dtype<B: Backend>() -> DType {
    <B::FloatElem as Element>::dtype()
}

/// `t.reshape(shape)`, without the copy some backends make ([`ZBackend::reshape`]).
pub fn reshape<B: ZBackend, const D1: usize, const D2: usize>(
    t: Tensor<B, D1>,
    shape: [usize; D2],
) -> Tensor<B, D2> {
    B::reshape(t, shape)
}
