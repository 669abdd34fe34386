use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use crate::generic::rsqrt;
use crate::{CheckpointError, Weights, ZBackend};

/// RMSNorm over the last dimension, as diffusers and transformers compute it: the mean square in
/// f32, `x * rsqrt(ms + eps)`, cast back to the weight's dtype, then times the weight.
#[derive(Debug, Clone)]
pub struct RmsNorm<B: ZBackend> {
    pub weight: Tensor<B, 1>,
    pub eps: f64,
}

impl<B: ZBackend> RmsNorm<B> {
    pub fn load(w: &Weights<B>, dim: usize, eps: f64) -> Result<Self, CheckpointError> {
        Ok(Self {
            weight: w.tensor("weight", [dim])?,
            eps,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        B::rms_norm(self, x)
    }

    /// `forward(x) * multiplier`, the multiplier per batch item (the DiT's `1 + scale`).
    ///
    /// # Shapes
    /// x `[batch, tokens, dim]`, multiplier `[batch, dim]` -> `[batch, tokens, dim]`
    pub fn forward_scaled(&self, x: Tensor<B, 3>, multiplier: &Tensor<B, 2>) -> Tensor<B, 3> {
        B::rms_norm_scaled(self, x, multiplier)
    }

    /// `residual + multiplier * forward(y)`, the multiplier per batch item when given (the DiT's
    /// gated residual, `tanh(gate)`).
    ///
    /// # Shapes
    /// residual and y `[batch, tokens, dim]`, multiplier `[batch, dim]` -> `[batch, tokens, dim]`
    pub fn add_to(
        &self,
        residual: Tensor<B, 3>,
        y: Tensor<B, 3>,
        multiplier: Option<&Tensor<B, 2>>,
    ) -> Tensor<B, 3> {
        B::add_rms_norm(self, residual, y, multiplier)
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
