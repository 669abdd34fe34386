use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::host::{self, kernels};

/// `silu(a) * b`, the gate of a SwiGLU feed-forward; one pass on the host, reusing `a`'s buffer.
pub fn silu_mul<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    if host::is_host_backend::<B>(&a.device()) {
        let (device, dtype, dims) = (a.device(), a.dtype(), a.dims());
        let mut out = host::host_f32(a);
        host::with_f32(&b, |b| kernels::silu_mul(&mut out, b));
        return host::from_f32(out, dims, &device, dtype);
    }
    silu(a) * b
}
