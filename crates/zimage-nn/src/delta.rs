//! Changes to a [`Linear`](crate::Linear)'s weight made by adapters (LoRA and its relatives).
//!
//! A float weight gets the change merged in (computed in f32, stored back in the weight's own
//! precision), so the forward pass costs what it did. Quantized blocks cannot take a merge without
//! requantizing (which would change the file's weights, not just add the adapter), so there the
//! change runs beside the weight: `y = x Wᵀ + x ΔWᵀ`, low rank where it is. Either way the weight
//! as loaded is kept (for a mapped file that is only the mapping), so removing or changing
//! adapters restores it exactly.

use burn::tensor::{DType, Tensor, TensorData};

use crate::ZBackend;

/// ΔW for one `[out, in]` weight, scales folded in.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightDelta {
    out_features: usize,
    in_features: usize,
    form: DeltaForm,
}

#[derive(Debug, Clone, PartialEq)]
enum DeltaForm {
    /// ΔW = up · down: `up [out, rank]`, `down [rank, in]`, row-major.
    LowRank {
        rank: usize,
        up: Vec<f32>,
        down: Vec<f32>,
    },
    /// ΔW itself, `[out, in]` row-major (LoKr, LoHa: full rank).
    Dense(Vec<f32>),
}

impl WeightDelta {
    /// `up [out, rank] · down [rank, in]`.
    pub fn low_rank(out_features: usize, in_features: usize, up: Vec<f32>, down: Vec<f32>) -> Self {
        let rank = down.len() / in_features.max(1);
        assert_eq!(down.len(), rank * in_features, "down is [rank, in]");
        assert_eq!(up.len(), out_features * rank, "up is [out, rank]");
        Self {
            out_features,
            in_features,
            form: DeltaForm::LowRank { rank, up, down },
        }
    }

    /// ΔW given whole, `[out, in]`.
    pub fn dense(out_features: usize, in_features: usize, values: Vec<f32>) -> Self {
        assert_eq!(values.len(), out_features * in_features, "ΔW is [out, in]");
        Self {
            out_features,
            in_features,
            form: DeltaForm::Dense(values),
        }
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.out_features, self.in_features]
    }

    /// The rank of the low-rank form, `None` when ΔW is held whole.
    pub fn rank(&self) -> Option<usize> {
        match &self.form {
            DeltaForm::LowRank { rank, .. } => Some(*rank),
            DeltaForm::Dense(_) => None,
        }
    }

    /// The sum of several changes to one weight: still low rank (the ranks add up) when every
    /// part is, else whole.
    pub fn sum(parts: impl IntoIterator<Item = WeightDelta>) -> Option<WeightDelta> {
        let parts: Vec<WeightDelta> = parts.into_iter().collect();
        let first = parts.first()?;
        let (out, inp) = (first.out_features, first.in_features);
        assert!(
            parts.iter().all(|p| p.shape() == [out, inp]),
            "parts of one weight's change share its shape"
        );
        if parts.len() == 1 {
            return parts.into_iter().next();
        }
        if parts.iter().all(|p| p.rank().is_some()) {
            let total: usize = parts.iter().map(|p| p.rank().unwrap_or(0)).sum();
            let mut up = vec![0f32; out * total];
            let mut down = Vec::with_capacity(total * inp);
            let mut col = 0;
            for part in &parts {
                if let DeltaForm::LowRank {
                    rank,
                    up: u,
                    down: d,
                } = &part.form
                {
                    for o in 0..out {
                        up[o * total + col..o * total + col + rank]
                            .copy_from_slice(&u[o * rank..(o + 1) * rank]);
                    }
                    down.extend_from_slice(d);
                    col += rank;
                }
            }
            return Some(Self::low_rank(out, inp, up, down));
        }
        let mut values = vec![0f32; out * inp];
        for part in &parts {
            part.add_to(&mut values);
        }
        Some(Self::dense(out, inp, values))
    }

    /// ΔW, `[out, in]` row-major.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut values = vec![0f32; self.out_features * self.in_features];
        self.add_to(&mut values);
        values
    }

    /// `w += ΔW` for `w [out, in]` row-major, rows in parallel.
    pub fn add_to(&self, w: &mut [f32]) {
        use rayon::prelude::*;
        let inp = self.in_features;
        assert_eq!(w.len(), self.out_features * inp);
        if inp == 0 {
            return;
        }
        match &self.form {
            DeltaForm::Dense(values) => w
                .par_chunks_mut(inp)
                .zip(values.par_chunks(inp))
                .for_each(|(row, d)| row.iter_mut().zip(d).for_each(|(x, d)| *x += d)),
            DeltaForm::LowRank { rank, up, down } => {
                w.par_chunks_mut(inp).enumerate().for_each(|(o, row)| {
                    for (r, &u) in up[o * rank..(o + 1) * rank].iter().enumerate() {
                        let d = &down[r * inp..(r + 1) * inp];
                        row.iter_mut().zip(d).for_each(|(x, &d)| *x += u * d);
                    }
                })
            }
        }
    }

    /// ΔWᵀ, `[in, out]`, on `device` in f32 (the layout device weights are held in).
    pub(crate) fn transposed_on<B: ZBackend>(&self, device: &B::Device) -> Tensor<B, 2> {
        let (out, inp) = (self.out_features, self.in_features);
        match &self.form {
            DeltaForm::LowRank { rank, up, down } => {
                let down_t: Tensor<B, 2> = Tensor::<B, 2>::from_data(
                    TensorData::new(down.clone(), [*rank, inp]),
                    (device, DType::F32),
                )
                .transpose();
                let up_t = Tensor::<B, 2>::from_data(
                    TensorData::new(up.clone(), [out, *rank]),
                    (device, DType::F32),
                )
                .transpose();
                down_t.matmul(up_t)
            }
            DeltaForm::Dense(values) => Tensor::<B, 2>::from_data(
                TensorData::new(values.clone(), [out, inp]),
                (device, DType::F32),
            )
            .transpose(),
        }
    }

    /// The change applied beside a weight, in `dtype` on `device`.
    pub(crate) fn side_product<B: ZBackend>(
        &self,
        device: &B::Device,
        dtype: DType,
    ) -> SideProduct<B> {
        let (out, inp) = (self.out_features, self.in_features);
        let tensor = |values: &[f32], shape: [usize; 2]| {
            Tensor::<B, 2>::from_data(TensorData::new(values.to_vec(), shape), (device, dtype))
        };
        match &self.form {
            // x · downᵀ · upᵀ: two thin products.
            DeltaForm::LowRank { rank, up, down } => SideProduct {
                first: tensor(&transpose(down, *rank, inp), [inp, *rank]),
                second: Some(tensor(&transpose(up, out, *rank), [*rank, out])),
                out_features: out,
            },
            DeltaForm::Dense(values) => SideProduct {
                first: tensor(&transpose(values, out, inp), [inp, out]),
                second: None,
                out_features: out,
            },
        }
    }
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// `x ΔWᵀ` as one or two products: `first [in, rank or out]`, then `second [rank, out]`.
#[derive(Debug, Clone)]
pub(crate) struct SideProduct<B: ZBackend> {
    first: Tensor<B, 2>,
    second: Option<Tensor<B, 2>>,
    out_features: usize,
}

impl<B: ZBackend> SideProduct<B> {
    /// `[..., in]` -> `[..., out]`.
    pub(crate) fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let inp = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let x = x.cast(self.first.dtype()).reshape([rows, inp]);
        let mut y = x.matmul(self.first.clone());
        if let Some(second) = &self.second {
            y = y.matmul(second.clone());
        }
        let mut out = dims;
        out[D - 1] = self.out_features;
        y.reshape(out)
    }
}
