use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use crate::host::{self, kernels};
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
        if host::is_host_backend::<B>(&x.device()) {
            let (device, dtype, dims) = (x.device(), x.dtype(), x.dims());
            let y = host::with_f32(&x, |x| {
                host::with_f32(&self.weight.val(), |w| {
                    kernels::rms_norm(x, w, self.eps as f32, None)
                })
            });
            return host::from_f32(y, dims, &device, dtype);
        }
        let weight = self.weight.val();
        let x = x.cast(DType::F32);
        let mean_square = x.clone().square().mean_dim(D - 1);
        let y = x * rsqrt(mean_square.add_scalar(self.eps));
        y.cast(weight.dtype()) * weight.unsqueeze::<D>()
    }

    /// `forward(x) * multiplier`, the multiplier per batch item (the DiT's `1 + scale`).
    ///
    /// # Shapes
    /// x `[batch, tokens, dim]`, multiplier `[batch, dim]` -> `[batch, tokens, dim]`
    pub fn forward_scaled(&self, x: Tensor<B, 3>, multiplier: &Tensor<B, 2>) -> Tensor<B, 3> {
        if host::is_host_backend::<B>(&x.device()) {
            let (device, dtype, dims) = (x.device(), x.dtype(), x.dims());
            let y = host::with_f32(&x, |x| {
                host::with_f32(&self.weight.val(), |w| {
                    host::with_f32(multiplier, |m| {
                        kernels::rms_norm(x, w, self.eps as f32, Some((m, dims[1])))
                    })
                })
            });
            return host::from_f32(y, dims, &device, dtype);
        }
        self.forward(x) * multiplier.clone().unsqueeze_dim::<3>(1)
    }

    /// `residual + multiplier * forward(y)`, the multiplier per batch item when given (the DiT's
    /// gated residual, `tanh(gate)`); on the host `residual`'s buffer is reused.
    ///
    /// # Shapes
    /// residual and y `[batch, tokens, dim]`, multiplier `[batch, dim]` -> `[batch, tokens, dim]`
    pub fn add_to(
        &self,
        residual: Tensor<B, 3>,
        y: Tensor<B, 3>,
        multiplier: Option<&Tensor<B, 2>>,
    ) -> Tensor<B, 3> {
        if host::is_host_backend::<B>(&residual.device()) {
            let (device, dtype, dims) = (residual.device(), residual.dtype(), residual.dims());
            let mut out = host::host_f32(residual);
            host::with_f32(&y, |y| {
                host::with_f32(&self.weight.val(), |w| match multiplier {
                    Some(m) => host::with_f32(m, |m| {
                        kernels::add_rms_norm(&mut out, y, w, self.eps as f32, Some((m, dims[1])))
                    }),
                    None => kernels::add_rms_norm(&mut out, y, w, self.eps as f32, None),
                })
            });
            return host::from_f32(out, dims, &device, dtype);
        }
        let normed = self.forward(y);
        match multiplier {
            Some(m) => residual + m.clone().unsqueeze_dim::<3>(1) * normed,
            None => residual + normed,
        }
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
