//! The DiT's 3-D rotary position embedding: one table per axis (frame, height, width), pairs of
//! adjacent channels rotated as complex numbers (interleaved, not Qwen's half split).

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

/// cos and sin of every token's angles, `[tokens, head_dim / 2]` each, row-major, as a pass's
/// sequence is assembled.
#[derive(Debug, Clone, Default)]
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// The batch's rotation (`batch` items of `tokens` rows each; pairs of adjacent channels, as
    /// diffusers multiplies them as complex numbers).
    pub fn into_rotary<B: zimage_nn::ZBackend>(
        self,
        batch: usize,
        tokens: usize,
        pairs: usize,
        device: &B::Device,
    ) -> zimage_nn::Rotary<B> {
        let table = zimage_nn::RotaryTable {
            cos: self.cos,
            sin: self.sin,
            items: batch,
            tokens,
            pairs,
        };
        zimage_nn::Rotary::new(zimage_nn::RotaryLayout::Interleaved, table, device)
    }
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
