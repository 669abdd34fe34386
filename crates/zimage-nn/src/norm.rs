use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use crate::{CheckpointError, Weights};

/// RMSNorm over the last dimension, as diffusers and transformers compute it: the mean square in
/// f32, `x * rsqrt(ms + eps)`, cast back to the weight's dtype, then times the weight.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn load(w: &Weights<B>, dim: usize, eps: f64) -> Result<Self, CheckpointError> {
        Ok(Self {
            weight: w.param("weight", [dim])?,
            eps,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let weight = self.weight.val();
        let x = x.cast(DType::F32);
        let mean_square = x.clone().square().mean_dim(D - 1);
        let y = x * rsqrt(mean_square.add_scalar(self.eps));
        y.cast(weight.dtype()) * weight.unsqueeze::<D>()
    }
}

/// LayerNorm over the last dimension without affine parameters (statistics in f32, as PyTorch
/// computes them for half-precision inputs).
pub fn layer_norm<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let centered = x.clone() - x.mean_dim(D - 1);
    let var = centered.clone().square().mean_dim(D - 1);
    (centered * rsqrt(var.add_scalar(eps))).cast(dtype)
}

/// `1 / sqrt(x)` by an exact division. (`Tensor::recip` is an approximate reciprocal on
/// burn-ndarray's SIMD path, off by ~1e-5 relative: too coarse for parity.)
fn rsqrt<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let root = x.sqrt();
    root.ones_like() / root
}
