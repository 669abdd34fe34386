use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use crate::ZBackend;

/// `silu(a) * b`, the gate of a SwiGLU feed-forward.
pub fn silu_mul<B: ZBackend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    B::silu_mul(a, b)
}

/// `x * sigmoid(x)`, computed as `x / (1 + exp(-x))` in f32 like PyTorch (burn's `sigmoid` goes
/// through `exp(-log(1 + exp(-x)))`, a few ulps further off and two passes longer).
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    (x.clone() / x.neg().exp().add_scalar(1.0)).cast(dtype)
}
