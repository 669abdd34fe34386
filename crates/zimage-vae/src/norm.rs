use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use zimage_nn::host::{self, kernels};
use zimage_nn::{CheckpointError, Weights};

/// Every GroupNorm of the autoencoder uses this epsilon (`resnet_eps` and the `conv_norm_out`s).
pub const GROUP_NORM_EPS: f64 = 1e-6;

/// `nn.GroupNorm(groups, channels, eps, affine=True)`.
///
/// Statistics and the affine map are computed in f32 whatever the weights' dtype, as PyTorch does
/// for half-precision inputs, and in PyTorch's form: per-channel `scale = gamma / sqrt(var + eps)`
/// and `shift = beta - mean * scale`, then `x * scale + shift` (two passes over `x` after the
/// statistics, and no normalised copy of `x` kept alongside).
#[derive(Module, Debug)]
pub struct GroupNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub groups: usize,
    pub eps: f64,
}

impl<B: Backend> GroupNorm<B> {
    pub fn load(
        w: &Weights<B>,
        groups: usize,
        channels: usize,
        eps: f64,
    ) -> Result<Self, CheckpointError> {
        Ok(Self {
            weight: w.param("weight", [channels])?,
            bias: w.param("bias", [channels])?,
            groups,
            eps,
        })
    }

    /// # Shapes
    /// `[batch, channels, height, width]` -> the same
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if host::is_host_backend::<B>(&x.device()) {
            return self.forward_host(x, false);
        }
        let [batch, channels, height, width] = x.dims();
        let groups = self.groups;
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let grouped = x
            .clone()
            .reshape([batch, groups, (channels / groups) * height * width]);
        let mean = grouped.clone().mean_dim(2);
        let var = (grouped - mean.clone()).square().mean_dim(2);
        let std = var.add_scalar(self.eps).sqrt();
        // [batch, groups, 1] -> per channel [batch, groups, channels / groups]
        let gamma = self
            .weight
            .val()
            .cast(DType::F32)
            .reshape([1, groups, channels / groups]);
        let beta = self
            .bias
            .val()
            .cast(DType::F32)
            .reshape([1, groups, channels / groups]);
        // Exact division (`recip` is approximate on some backends).
        let scale = gamma / std;
        let shift = beta - mean * scale.clone();
        let scale = scale.reshape([batch, channels, 1, 1]);
        let shift = shift.reshape([batch, channels, 1, 1]);
        (x * scale + shift).cast(dtype)
    }

    /// `silu(forward(x))`, one pass on the host.
    pub fn forward_silu(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if host::is_host_backend::<B>(&x.device()) {
            return self.forward_host(x, true);
        }
        silu(self.forward(x))
    }

    /// In place in `x`'s buffer when burn-ndarray hands it over (a full-resolution feature map is
    /// the decoder's largest tensor).
    fn forward_host(&self, x: Tensor<B, 4>, silu: bool) -> Tensor<B, 4> {
        let (device, dtype, dims) = (x.device(), x.dtype(), x.dims());
        let [_, channels, height, width] = dims;
        let mut values = host::host_f32(x);
        host::with_f32(&self.weight.val(), |gamma| {
            host::with_f32(&self.bias.val(), |beta| {
                kernels::group_norm(
                    &mut values,
                    [channels, height * width],
                    self.groups,
                    [gamma, beta],
                    self.eps as f32,
                    silu,
                )
            })
        });
        host::from_f32(values, dims, &device, dtype)
    }
}

/// `x * sigmoid(x)`, computed as `x / (1 + exp(-x))` in f32 like PyTorch (burn's `sigmoid` goes
/// through `exp(-log(1 + exp(-x)))`, a few ulps further off and two passes longer).
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    (x.clone() / x.neg().exp().add_scalar(1.0)).cast(dtype)
}
