//! Shared building blocks of zimage-rs.
//!
//! - [`checkpoint`]: safetensors files and sharded sets (index json), memory-mapped, cast per tensor.
//! - [`weights`]: building modules from named tensors, with the complete mismatch report.
//! - [`host`]: host kernels for burn-ndarray (matrix product, convolution, fused row kernels).
//! - [`device`]: per-device tensor size limits, checked before anything is uploaded.
//! - layers several components use: [`Linear`], [`RmsNorm`], [`attention`], [`silu_mul`].

pub mod activation;
pub mod attention;
pub mod checkpoint;
pub mod device;
mod error;
pub mod host;
mod linear;
mod norm;
pub mod weights;

pub use activation::silu_mul;
pub use attention::AttentionImpl;
pub use checkpoint::{Checkpoint, StoredDtype, TensorEntry};
pub use error::{CheckpointError, MismatchReport, ShapeMismatch};
pub use host::reshape;
pub use linear::Linear;
pub use norm::{layer_norm, RmsNorm};
pub use weights::{load_module, KeyMapping, TensorRef, WeightMap, Weights};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Element};

/// The backend's default float dtype (`f32` on ndarray, the chosen element on cubecl backends).
pub fn float_dtype<B: Backend>() -> DType {
    <B::FloatElem as Element>::dtype()
}
