//! The seam between the model code and backend-specific kernels.
//!
//! Model code is generic over [`ZBackend`], burn's `Backend` plus the handful of layers whose best
//! implementation differs per backend. Every method's default is the generic implementation in
//! [`crate::generic`] (burn's own tensor ops: what cuda and wgpu run). burn-ndarray's
//! implementation (feature `ndarray`, in [`crate::host`]) replaces them with host kernels and
//! holds weight matrices on the host in their stored precision; [`crate::host::without_host_kernels`]
//! turns that off, so the generic path is tested on the CPU too.
//!
//! Backends get the trait from this crate: burn-ndarray with the `ndarray` feature, burn's cubecl
//! backends (cuda, wgpu, rocm, cpu) and their fusion wrapper with `cubecl`. Another backend can be
//! added here with an empty `impl` (the generic path).

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};

use crate::generic;
use crate::{Conv2d, Embedding, GroupNorm, Linear, RmsNorm, Rotary};

/// burn's `Backend` plus the layers zimage-rs implements per backend. See the module docs.
pub trait ZBackend: Backend {
    /// Whether zimage's host kernels run this device's layers, and weight matrices are held on
    /// the host ([`crate::Stored::Host`]) instead of in device tensors.
    fn host_kernels(_device: &Self::Device) -> bool {
        false
    }

    /// `x W^T + b`.
    fn project<const D: usize>(layer: &Linear<Self>, x: Tensor<Self, D>) -> Tensor<Self, D> {
        generic::linear(layer, x)
    }

    /// Rows `ids` of the table, `[ids.len(), dim]`, in `layer`'s compute dtype.
    fn embed(layer: &Embedding<Self>, ids: &[u32]) -> Tensor<Self, 2> {
        generic::embedding(layer, ids)
    }

    /// RMSNorm over the last dimension.
    fn rms_norm<const D: usize>(layer: &RmsNorm<Self>, x: Tensor<Self, D>) -> Tensor<Self, D> {
        generic::rms_norm(layer, x)
    }

    /// `rms_norm(x) * multiplier`, the multiplier `[batch, dim]` per batch item.
    fn rms_norm_scaled(
        layer: &RmsNorm<Self>,
        x: Tensor<Self, 3>,
        multiplier: &Tensor<Self, 2>,
    ) -> Tensor<Self, 3> {
        generic::rms_norm_scaled(layer, x, multiplier)
    }

    /// `residual + multiplier * rms_norm(y)`, the multiplier per batch item when given.
    fn add_rms_norm(
        layer: &RmsNorm<Self>,
        residual: Tensor<Self, 3>,
        y: Tensor<Self, 3>,
        multiplier: Option<&Tensor<Self, 2>>,
    ) -> Tensor<Self, 3> {
        generic::add_rms_norm(layer, residual, y, multiplier)
    }

    /// `silu(a) * b`.
    fn silu_mul<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> Tensor<Self, D> {
        generic::silu_mul(a, b)
    }

    /// Scaled dot-product attention (see [`crate::attention::attention`] for the contract).
    fn attend(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        key_valid: Option<&Tensor<Self, 2, Bool>>,
        causal: bool,
    ) -> Tensor<Self, 4> {
        generic::attention(q, k, v, key_valid, causal)
    }

    /// `nn.Conv2d`.
    fn convolve(layer: &Conv2d<Self>, x: Tensor<Self, 4>) -> Tensor<Self, 4> {
        generic::conv2d(layer, x)
    }

    /// `nn.GroupNorm`, followed by SiLU when `silu`.
    fn group_norm(layer: &GroupNorm<Self>, x: Tensor<Self, 4>, silu: bool) -> Tensor<Self, 4> {
        generic::group_norm(layer, x, silu)
    }

    /// Rotary position embedding of `[batch, tokens, heads, head_dim]`.
    fn rotate(rotary: &Rotary<Self>, x: Tensor<Self, 4>) -> Tensor<Self, 4> {
        generic::rotate(rotary, x)
    }

    /// `t.reshape(shape)` (burn-ndarray's own reshape always copies).
    fn reshape<const D1: usize, const D2: usize>(
        t: Tensor<Self, D1>,
        shape: [usize; D2],
    ) -> Tensor<Self, D2> {
        t.reshape(shape)
    }
}

#[cfg(feature = "cubecl")]
mod cubecl_backends {
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use burn_fusion::{Fusion, FusionBackend};

    /// cuda, wgpu, rocm and burn's cpu backend: the generic path.
    impl<R, F, I, BT> super::ZBackend for CubeBackend<R, F, I, BT>
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
        Self: burn::tensor::backend::Backend,
    {
    }

    /// The fusion wrapper burn puts around its cubecl backends by default.
    impl<B: FusionBackend> super::ZBackend for Fusion<B> where Self: burn::tensor::backend::Backend {}
}
