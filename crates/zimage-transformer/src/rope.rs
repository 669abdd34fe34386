//! The DiT's 3-D rotary position embedding: one table per axis (frame, height, width), pairs of
//! adjacent channels rotated as complex numbers (interleaved, not Qwen's half split).

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use crate::TransformerError;

/// Per-axis angle tables, as diffusers' `RopeEmbedder.precompute_freqs_cis` builds them:
/// frequencies and angles in f64, angles rounded to f32, cos/sin evaluated in f32.
#[derive(Debug, Clone)]
pub struct RopeEmbedder {
    axes_dims: Vec<usize>,
    axes_lens: Vec<usize>,
    /// `angles[axis][pos * dim/2 + j]`
    angles: Vec<Vec<f32>>,
}

/// cos and sin of every token's angles, `[tokens, head_dim / 2]` each, row-major.
#[derive(Debug, Clone, Default)]
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeEmbedder {
    pub fn new(theta: f64, axes_dims: &[usize], axes_lens: &[usize]) -> Self {
        let angles = axes_dims
            .iter()
            .zip(axes_lens)
            .map(|(&dim, &len)| {
                let freqs: Vec<f64> = (0..dim / 2)
                    .map(|j| 1.0 / theta.powf((2 * j) as f64 / dim as f64))
                    .collect();
                (0..len)
                    .flat_map(|pos| freqs.iter().map(move |f| (pos as f64 * f) as f32))
                    .collect()
            })
            .collect();
        Self {
            axes_dims: axes_dims.to_vec(),
            axes_lens: axes_lens.to_vec(),
            angles,
        }
    }

    /// Pairs per head (`head_dim / 2`).
    pub fn pairs(&self) -> usize {
        self.axes_dims.iter().sum::<usize>() / 2
    }

    /// Appends the cos/sin rows of tokens with position ids `ids` (frame, height, width).
    pub fn extend(
        &self,
        table: &mut RopeTable,
        ids: impl IntoIterator<Item = [usize; 3]>,
    ) -> Result<(), TransformerError> {
        for id in ids {
            for (axis, &pos) in id.iter().enumerate() {
                if pos >= self.axes_lens[axis] {
                    return Err(TransformerError::Input(format!(
                        "position {pos} on RoPE axis {axis} exceeds axes_lens[{axis}] = {} (caption too long or image too large)",
                        self.axes_lens[axis]
                    )));
                }
                let half = self.axes_dims[axis] / 2;
                let row = &self.angles[axis][pos * half..(pos + 1) * half];
                table.cos.extend(row.iter().map(|a| a.cos()));
                table.sin.extend(row.iter().map(|a| a.sin()));
            }
        }
        Ok(())
    }

    /// Appends `count` rows of zeros (batch padding: the rotation is multiplied by zero there).
    pub fn extend_zeros(&self, table: &mut RopeTable, count: usize) {
        let n = count * self.pairs();
        table.cos.extend(std::iter::repeat(0.0).take(n));
        table.sin.extend(std::iter::repeat(0.0).take(n));
    }
}

/// A batch's rotation on the device, f32, `[batch, tokens, 1, pairs, 1]` so that it broadcasts
/// over heads. On burn-ndarray the rotation runs on the host from the table instead: there the
/// device version's strided slices and concatenation cost more than the attention's products.
#[derive(Debug, Clone)]
pub struct Rope<B: Backend> {
    cos: Tensor<B, 5>,
    sin: Tensor<B, 5>,
    host: Option<std::sync::Arc<RopeTable>>,
}

impl<B: Backend> Rope<B> {
    pub fn new(
        table: RopeTable,
        batch: usize,
        tokens: usize,
        pairs: usize,
        device: &B::Device,
    ) -> Self {
        let upload = |values: Vec<f32>| {
            Tensor::<B, 5>::from_data(
                TensorData::new(values, [batch, tokens, 1, pairs, 1]),
                (device, DType::F32),
            )
        };
        let host = zimage_nn::host::is_host_backend::<B>(device)
            .then(|| std::sync::Arc::new(table.clone()));
        Self {
            cos: upload(table.cos),
            sin: upload(table.sin),
            host,
        }
    }

    /// Rotates `x` in f32 and casts back.
    ///
    /// # Shapes
    /// `[batch, tokens, heads, head_dim]`
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let dtype = x.dtype();
        let [batch, tokens, heads, head_dim] = x.dims();
        if let Some(table) = &self.host {
            let device = x.device();
            let mut values = zimage_nn::host::host_f32(x);
            let pairs = head_dim / 2;
            // One token's heads per chunk; its cos/sin row is shared by every head.
            values
                .par_chunks_mut(heads * head_dim)
                .enumerate()
                .for_each(|(token, row)| {
                    let cos = &table.cos[token * pairs..(token + 1) * pairs];
                    let sin = &table.sin[token * pairs..(token + 1) * pairs];
                    for head in row.chunks_mut(head_dim) {
                        for ((pair, &c), &s) in head.chunks_mut(2).zip(cos).zip(sin) {
                            let (re, im) = (pair[0], pair[1]);
                            pair[0] = re * c - im * s;
                            pair[1] = re * s + im * c;
                        }
                    }
                });
            return zimage_nn::host::from_f32(
                values,
                [batch, tokens, heads, head_dim],
                &device,
                dtype,
            );
        }
        let x = x
            .cast(DType::F32)
            .reshape([batch, tokens, heads, head_dim / 2, 2]);
        let re = x.clone().narrow(4, 0, 1);
        let im = x.narrow(4, 1, 1);
        let out_re = re.clone() * self.cos.clone() - im.clone() * self.sin.clone();
        let out_im = re * self.sin.clone() + im * self.cos.clone();
        Tensor::cat(vec![out_re, out_im], 4)
            .reshape([batch, tokens, heads, head_dim])
            .cast(dtype)
    }
}
