use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::host::{self, gemm, gemm::MatRef, gemm::Threads};
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
        dims[D - 1] = n;
        if host::is_host_backend::<B>(&x.device()) {
            return self.forward_host(x, rows, dims);
        }
        let y = x.reshape([rows, k]).matmul(self.weight.val());
        let y = match &self.bias {
            Some(bias) => y + bias.val().unsqueeze::<2>(),
            None => y,
        };
        y.reshape(dims)
    }

    /// The product through [`host::gemm`], with the bias as the accumulator's start; the input
    /// and the weight are read in place.
    fn forward_host<const D: usize>(
        &self,
        x: Tensor<B, D>,
        rows: usize,
        dims: [usize; D],
    ) -> Tensor<B, D> {
        let (device, dtype) = (x.device(), x.dtype());
        let [k, n] = self.weight.dims();
        let mut y = match &self.bias {
            Some(bias) => host::with_f32(&bias.val(), |b| b.repeat(rows)),
            None => vec![0f32; rows * n],
        };
        host::with_f32(&x, |x| {
            host::with_f32(&self.weight.val(), |w| {
                // SAFETY: x is `rows x k`, w `k x n` and y `rows x n`, all dense.
                unsafe {
                    gemm::sgemm(
                        rows,
                        k,
                        n,
                        MatRef::row_major(x, k),
                        MatRef::row_major(w, n),
                        y.as_mut_ptr(),
                        n,
                        self.bias.is_some(),
                        Threads::Rayon,
                    )
                }
            })
        });
        host::from_f32(y, dims, &device, dtype)
    }
}
