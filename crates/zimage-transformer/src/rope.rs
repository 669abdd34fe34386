//! The DiT's 3-D rotary position embedding: one table per axis (frame, height, width), pairs of
//! adjacent channels rotated as complex numbers (interleaved, not Qwen's half split).

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

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
/// over heads.
#[derive(Debug, Clone)]
pub struct Rope<B: Backend> {
    cos: Tensor<B, 5>,
    sin: Tensor<B, 5>,
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
        Self {
            cos: upload(table.cos),
            sin: upload(table.sin),
        }
    }

    /// Rotates `x` in f32 and casts back.
    ///
    /// # Shapes
    /// `[batch, tokens, heads, head_dim]`
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let dtype = x.dtype();
        let [batch, tokens, heads, head_dim] = x.dims();
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
