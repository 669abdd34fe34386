use burn::tensor::Tensor;

use crate::{CheckpointError, Stored, Weights, ZBackend};

/// `y = x W^T + b`, loaded from a PyTorch `nn.Linear` (`weight [out, in]`, optional `bias [out]`).
#[derive(Debug, Clone)]
pub struct Linear<B: ZBackend> {
    /// On the device transposed to `[in, out]` (the product needs no copy); on the host as stored,
    /// `[out, in]`.
    pub weight: Stored<B, 2>,
    pub bias: Option<Tensor<B, 1>>,
    in_features: usize,
    out_features: usize,
}

impl<B: ZBackend> Linear<B> {
    pub fn load(
        w: &Weights<B>,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self, CheckpointError> {
        Self::load_stored_as(
            w,
            in_features,
            out_features,
            bias,
            &[out_features, in_features],
        )
    }

    /// A Linear whose weight the checkpoint stores under another shape of the same `[out, in]`
    /// values (a 1x1 convolution's `[out, in, 1, 1]`).
    pub fn load_stored_as(
        w: &Weights<B>,
        in_features: usize,
        out_features: usize,
        bias: bool,
        stored_shape: &[usize],
    ) -> Result<Self, CheckpointError> {
        Ok(Self {
            weight: w.linear_weight("weight", out_features, in_features, stored_shape)?,
            bias: if bias {
                Some(w.tensor("bias", [out_features])?)
            } else {
                None
            },
            in_features,
            out_features,
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// # Shapes
    /// `[..., in]` -> `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        B::project(self, x)
    }
}
