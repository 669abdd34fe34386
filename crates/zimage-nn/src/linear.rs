use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::{CheckpointError, Weights};

/// `y = x W^T + b`, loaded from a PyTorch `nn.Linear` (`weight [out, in]`, optional `bias [out]`).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// Stored transposed, `[in, out]`, so the product needs no copy.
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    pub fn load(
        w: &Weights<B>,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self, CheckpointError> {
        Ok(Self {
            weight: Param::from_tensor(w.linear_weight("weight", out_features, in_features)?),
            bias: if bias {
                Some(w.param("bias", [out_features])?)
            } else {
                None
            },
        })
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// # Shapes
    /// `[..., in]` -> `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let [k, n] = self.weight.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let y = x.reshape([rows, k]).matmul(self.weight.val());
        let y = match &self.bias {
            Some(bias) => y + bias.val().unsqueeze::<2>(),
            None => y,
        };
        dims[D - 1] = n;
        y.reshape(dims)
    }
}
