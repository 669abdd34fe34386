//! PyTorch's CPU random number generator, so that a seed gives the same noise as
//! `torch.Generator("cpu").manual_seed(seed)` gives diffusers.
//!
//! Engine: MT19937 seeded with the low 32 bits of the seed. Normal samples follow ATen's
//! `normal_kernel`: tensors of at least 16 elements are filled with uniforms first, then
//! Box-Muller is applied to blocks of 16 (the last block redrawn when the size is not a multiple
//! of 16); smaller tensors take double-precision Box-Muller pairs one value at a time, with the
//! second value of each pair cached in the generator. Float32 tensors use the AVX2 formulation
//! (`2pi` rounded to f32); its vectorised log/sincos can differ from libm in the last ulp, which is
//! the only difference left.

use std::f64::consts::PI;

use half::bf16;

const N: usize = 624;
const M: usize = 397;

/// `torch.Generator("cpu")`: MT19937 plus the cached second normal of Box-Muller pairs.
#[derive(Clone)]
pub struct TorchGenerator {
    state: [u32; N],
    index: usize,
    next_double_normal: Option<f64>,
    next_float_normal: Option<f64>,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// Element type of a noise tensor: each draws differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoiseDtype {
    F32,
    F64,
    BF16,
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`.
    pub fn manual_seed(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for j in 1..N {
            state[j] = 1_812_433_253u32
                .wrapping_mul(state[j - 1] ^ (state[j - 1] >> 30))
                .wrapping_add(j as u32);
        }
        Self {
            state,
            index: N,
            next_double_normal: None,
            next_float_normal: None,
        }
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mut next = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    /// One 32-bit draw.
    pub fn random(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// One 64-bit draw: the first 32-bit draw is the high half.
    pub fn random64(&mut self) -> u64 {
        let hi = self.random() as u64;
        let lo = self.random() as u64;
        (hi << 32) | lo
    }

    /// Uniform in [0, 1) with `digits` bits of mantissa, from one draw (`uniform_real`).
    fn uniform_f32(&mut self) -> f32 {
        ((self.random() & ((1 << 24) - 1)) as f64 * (1.0 / (1u64 << 24) as f64)) as f32
    }

    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `at::normal_distribution<double>` with its cached second sample.
    fn normal_f64(&mut self, float_cache: bool) -> f64 {
        let cache = if float_cache {
            &mut self.next_float_normal
        } else {
            &mut self.next_double_normal
        };
        if let Some(value) = cache.take() {
            return value;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * PI * u1;
        let cache = if float_cache {
            &mut self.next_float_normal
        } else {
            &mut self.next_double_normal
        };
        *cache = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(numel, dtype=float32, generator=self)` (contiguous).
    pub fn randn_f32(&mut self, numel: usize) -> Vec<f32> {
        if numel < 16 {
            return (0..numel).map(|_| self.normal_f64(false) as f32).collect();
        }
        let mut data: Vec<f32> = (0..numel).map(|_| self.uniform_f32()).collect();
        let fill = |block: &mut [f32]| {
            let two_pi = (2.0 * PI) as f32;
            for j in 0..8 {
                let u1 = 1.0 - block[j];
                let u2 = block[j + 8];
                let radius = (-2.0 * u1.ln()).sqrt();
                let theta = two_pi * u2;
                block[j] = radius * theta.cos();
                block[j + 8] = radius * theta.sin();
            }
        };
        self.fill_blocks(&mut data, fill, Self::uniform_f32);
        data
    }

    /// `torch.randn(numel, dtype=float64, generator=self)`.
    pub fn randn_f64(&mut self, numel: usize) -> Vec<f64> {
        if numel < 16 {
            return (0..numel).map(|_| self.normal_f64(false)).collect();
        }
        let mut data: Vec<f64> = (0..numel).map(|_| self.uniform_f64()).collect();
        let fill = |block: &mut [f64]| {
            for j in 0..8 {
                let u1 = 1.0 - block[j];
                let u2 = block[j + 8];
                let radius = (-2.0 * u1.ln()).sqrt();
                let theta = 2.0 * PI * u2;
                block[j] = radius * theta.cos();
                block[j + 8] = radius * theta.sin();
            }
        };
        self.fill_blocks(&mut data, fill, Self::uniform_f64);
        data
    }

    /// `torch.randn(numel, dtype=bfloat16, generator=self)`: 24-bit uniforms and Box-Muller in
    /// float (ATen's `normal_fill` computes in the op-math type), each result rounded to bf16.
    /// Equal to torch when `numel` is below 16 or a multiple of 16 (latent noise always is: 16
    /// channels); for other sizes ATen places the last, ragged block differently.
    pub fn randn_bf16(&mut self, numel: usize) -> Vec<bf16> {
        if numel < 16 {
            return (0..numel)
                .map(|_| bf16::from_f32(self.normal_f64(false) as f32))
                .collect();
        }
        let mut data: Vec<f32> = (0..numel).map(|_| self.uniform_f32()).collect();
        let fill = |block: &mut [f32]| {
            for j in 0..8 {
                let u1 = 1.0 - block[j];
                let u2 = block[j + 8];
                let radius = (-2.0 * u1.ln()).sqrt();
                let theta = (2.0 * PI * u2 as f64) as f32;
                block[j] = radius * theta.cos();
                block[j + 8] = radius * theta.sin();
            }
        };
        self.fill_blocks(&mut data, fill, Self::uniform_f32);
        data.into_iter().map(bf16::from_f32).collect()
    }

    /// Box-Muller over full blocks of 16, then the last 16 redrawn if the size is ragged.
    fn fill_blocks<T: Copy>(
        &mut self,
        data: &mut [T],
        fill: impl Fn(&mut [T]),
        uniform: fn(&mut Self) -> T,
    ) {
        let numel = data.len();
        let mut i = 0;
        while i + 16 <= numel {
            fill(&mut data[i..i + 16]);
            i += 16;
        }
        if numel % 16 != 0 {
            let tail = &mut data[numel - 16..];
            for value in tail.iter_mut() {
                *value = uniform(self);
            }
            fill(tail);
        }
    }

    /// Normal noise of `numel` elements drawn as `dtype`, returned as f32 values.
    pub fn randn(&mut self, numel: usize, dtype: NoiseDtype) -> Vec<f32> {
        match dtype {
            NoiseDtype::F32 => self.randn_f32(numel),
            NoiseDtype::F64 => self
                .randn_f64(numel)
                .into_iter()
                .map(|x| x as f32)
                .collect(),
            NoiseDtype::BF16 => self.randn_bf16(numel).into_iter().map(f32::from).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_reference_sequence() {
        // std::mt19937 with the default seed 5489: the 10000th draw is 4123659995 (C++ standard).
        let mut g = TorchGenerator::manual_seed(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = g.random();
        }
        assert_eq!(last, 4_123_659_995);
    }
}
