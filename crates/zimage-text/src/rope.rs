//! Qwen3's rotary position embedding: the default RoPE type, applied to halves of each head
//! (`rotate_half`), not to interleaved pairs as in the DiT.

use zimage_nn::{Rotary, RotaryLayout, RotaryTable, ZBackend};

/// Inverse frequencies and cos/sin tables, computed on the host in f32 the way transformers'
/// `Qwen3RotaryEmbedding` computes them.
#[derive(Debug, Clone)]
pub struct Qwen3RotaryEmbedding {
    inv_freq: Vec<f32>,
}

impl Qwen3RotaryEmbedding {
    /// `inv_freq[j] = 1 / theta^(2j / head_dim)`, every step in f32 as
    /// `1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))` evaluates it (the
    /// Python float base becomes an f32 scalar). PyTorch's vectorised `pow` is within an ulp of
    /// libm's; for head_dim 128 and theta 1e6 one of the 64 entries differs by that ulp.
    pub fn new(theta: f64, head_dim: usize) -> Self {
        let base = theta as f32;
        let inv_freq = (0..head_dim / 2)
            .map(|j| 1.0 / base.powf((2 * j) as f32 / head_dim as f32))
            .collect();
        Self { inv_freq }
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    pub fn head_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// cos and sin of positions `0..len`, `[len, head_dim]` each, row-major: angles
    /// `position * inv_freq` rounded to f32, repeated for both halves (`cat(freqs, freqs)`).
    pub fn table(&self, len: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * 2 * half);
        let mut sin = Vec::with_capacity(len * 2 * half);
        for pos in 0..len {
            let angles: Vec<f32> = self.inv_freq.iter().map(|f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        (cos, sin)
    }

    /// The rotation of positions `0..len`, shared by every prompt of a batch (right padding).
    /// transformers casts cos/sin to the activation dtype and rotates in that dtype.
    pub fn rotary<B: ZBackend>(&self, len: usize, device: &B::Device) -> Rotary<B> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for pos in 0..len {
            for f in &self.inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = RotaryTable {
            cos,
            sin,
            items: 1,
            tokens: len,
            pairs: half,
        };
        Rotary::new(RotaryLayout::Halves, table, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inv_freq_matches_transformers() {
        // torch: 1.0 / (1e6 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
        let rope = Qwen3RotaryEmbedding::new(1e6, 16);
        let expected: [f32; 8] = [
            1.0,
            0.177_827_94,
            0.031_622_78,
            0.005_623_413_2,
            0.001,
            0.000_177_827_94,
            3.162_277_4e-5,
            5.623_413_5e-6,
        ];
        // Bit-equal: the f32 steps are the same and libm's powf is exact on these.
        assert_eq!(rope.inv_freq(), expected);
        let (cos, sin) = rope.table(3);
        assert_eq!(cos.len(), 48);
        // Position 0: no rotation; both halves repeat the same angles.
        assert!(cos[..16].iter().all(|&c| c == 1.0) && sin[..16].iter().all(|&s| s == 0.0));
        assert_eq!(cos[16..24], cos[24..32]);
        assert_eq!(sin[32], 2f32.sin());
    }
}
