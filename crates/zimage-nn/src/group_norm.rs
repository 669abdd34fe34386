use burn::tensor::Tensor;

use crate::{CheckpointError, Weights, ZBackend};

/// `nn.GroupNorm(groups, channels, eps, affine=True)`.
///
/// Statistics and the affine map are computed in f32 whatever the weights' dtype, as PyTorch does
/// for half-precision inputs, and in PyTorch's form: per-channel `scale = gamma / sqrt(var + eps)`
/// and `shift = beta - mean * scale`, then `x * scale + shift`.
#[derive(Debug, Clone)]
pub struct GroupNorm<B: ZBackend> {
    pub weight: Tensor<B, 1>,
    pub bias: Tensor<B, 1>,
    pub groups: usize,
    pub eps: f64,
}

impl<B: ZBackend> GroupNorm<B> {
    pub fn load(
        w: &Weights<B>,
        groups: usize,
        channels: usize,
        eps: f64,
    ) -> Result<Self, CheckpointError> {
        Ok(Self {
            weight: w.tensor("weight", [channels])?,
            bias: w.tensor("bias", [channels])?,
            groups,
            eps,
        })
    }

    /// # Shapes
    /// `[batch, channels, height, width]` -> the same
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        B::group_norm(self, x, false)
    }

    /// `silu(forward(x))` (one pass on the host).
    pub fn forward_silu(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        B::group_norm(self, x, true)
    }
}
