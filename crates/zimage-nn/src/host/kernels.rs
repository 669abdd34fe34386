//! Row-wise element kernels on f32 buffers: normalisation with the DiT's modulation and gated
//! residual fused in, SwiGLU, softmax. Each runs one pass over its rows, parallel over row
//! chunks, compiled for the widest vectors the CPU has.
//!
//! Reductions keep 16 partial sums so that they vectorise; results differ from a sequential sum
//! in the last bits only, as any two BLAS-backed frameworks do.

use rayon::prelude::*;

/// Rows handed to one task: large enough to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 32;

/// Compiles `$body` for AVX-512, for AVX2 + FMA and for the baseline target, and picks the best
/// the CPU runs.
macro_rules! vectorized {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if super::gemm::has_avx512() {
                    // SAFETY: the CPU has the features `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if super::gemm::has_avx2() {
                    // SAFETY: as above, for `avx2`.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

const LANES: usize = 16;

vectorized! {
    /// [`crate::quant::dequantize_into`] (the same values, bit for bit), compiled for the widest
    /// vectors the CPU has: the matrix product decodes each strip of quantized weights into its
    /// packing buffer on every call.
    pub fn dequantize(ty: crate::quant::GgmlType, src: &[u8], out: &mut [f32]) {
        crate::quant::dequantize_inline(ty, src, out)
    }
}

/// `exp(x)` to within 2 ulp for x in [-87, 88.3], 0 below, +inf above: Cody-Waite reduction
/// by ln 2 and Cephes' degree-5 polynomial, written without branches so that loops over it
/// vectorise (libm's `expf` is a call per element).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.0, 88.3);
    let shifted = clamped * LOG2_E + ROUND;
    let n = shifted - ROUND;
    // The integer n sits in the low mantissa bits of `shifted` (an `as` cast would not vectorise).
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    let scaled = f32::from_bits((n_int + 127).wrapping_shl(23) as u32) * y;
    if x < -87.0 {
        0.0
    } else if x > 88.3 {
        f32::INFINITY
    } else {
        scaled
    }
}

#[inline(always)]
fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v * v;
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|v| v * v).sum::<f32>()
}

/// `1 / sqrt(mean(x^2) + eps)` of one row.
#[inline(always)]
fn rms_factor(x: &[f32], eps: f32) -> f32 {
    1.0 / (sum_squares(x) / x.len() as f32 + eps).sqrt()
}

/// Runs `f(dst rows, src rows, multiplier row)` over rows of `dim` values in parallel tasks, each
/// call's rows sharing one batch item's multiplier (`per` rows each) when there is one.
fn rows_by_item<'a>(
    dst: &mut [f32],
    src: &[f32],
    dim: usize,
    multiplier: Option<(&'a [f32], usize)>,
    f: impl Fn(&mut [f32], &[f32], Option<&'a [f32]>) + Sync,
) {
    dst.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(src.par_chunks(dim * ROWS_PER_TASK))
        .enumerate()
        .for_each(|(task, (dst, src))| {
            let (first, count) = (task * ROWS_PER_TASK, src.len() / dim);
            let mut done = 0;
            while done < count {
                let (m, len) = match multiplier {
                    Some((m, per)) => {
                        let b = (first + done) / per;
                        let row = &m[b * dim..(b + 1) * dim];
                        (Some(row), (b + 1) * per - (first + done))
                    }
                    None => (None, count),
                };
                let span = done * dim..(done + len.min(count - done)) * dim;
                done = span.end / dim;
                f(&mut dst[span.clone()], &src[span], m);
            }
        });
}

vectorized! {
    fn rms_norm_rows(x: &[f32], out: &mut [f32], weight: &[f32], eps: f32, scale: Option<&[f32]>) {
        let dim = weight.len();
        for (src, dst) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let inv = rms_factor(src, eps);
            match scale {
                Some(scale) => {
                    for (((d, &s), &w), &m) in dst.iter_mut().zip(src).zip(weight).zip(scale) {
                        *d = s * inv * w * m;
                    }
                }
                None => {
                    for ((d, &s), &w) in dst.iter_mut().zip(src).zip(weight) {
                        *d = s * inv * w;
                    }
                }
            }
        }
    }
}

/// RMSNorm over rows of `weight.len()` values: `x * rsqrt(mean(x^2) + eps) * weight`, times the
/// multiplier of the row's batch item when given as (`[items, dim]` values, rows per item): the
/// DiT's `1 + scale`.
pub fn rms_norm(
    x: &[f32],
    weight: &[f32],
    eps: f32,
    multiplier: Option<(&[f32], usize)>,
) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    rows_by_item(&mut out, x, weight.len(), multiplier, |dst, src, m| {
        rms_norm_rows(src, dst, weight, eps, m)
    });
    out
}

vectorized! {
    fn add_rms_norm_rows(residual: &mut [f32], y: &[f32], weight: &[f32], eps: f32, gate: Option<&[f32]>) {
        let dim = weight.len();
        for (r, src) in residual.chunks_exact_mut(dim).zip(y.chunks_exact(dim)) {
            let inv = rms_factor(src, eps);
            match gate {
                Some(gate) => {
                    for (((r, &s), &w), &g) in r.iter_mut().zip(src).zip(weight).zip(gate) {
                        *r += g * (s * inv * w);
                    }
                }
                None => {
                    for ((r, &s), &w) in r.iter_mut().zip(src).zip(weight) {
                        *r += s * inv * w;
                    }
                }
            }
        }
    }
}

/// `residual += gate * rms_norm(y)` in place, the gate per batch item as in [`rms_norm`] (the
/// DiT's gated residual; the caller applies tanh to the gate).
pub fn add_rms_norm(
    residual: &mut [f32],
    y: &[f32],
    weight: &[f32],
    eps: f32,
    gate: Option<(&[f32], usize)>,
) {
    rows_by_item(residual, y, weight.len(), gate, |dst, src, g| {
        add_rms_norm_rows(dst, src, weight, eps, g)
    });
}

vectorized! {
    fn silu_mul_chunk(a: &mut [f32], b: &[f32]) {
        for (a, &b) in a.iter_mut().zip(b) {
            *a = *a / (1.0 + exp(-*a)) * b;
        }
    }
}

/// `a = silu(a) * b` (SwiGLU's gate), in place.
pub fn silu_mul(a: &mut [f32], b: &[f32]) {
    const CHUNK: usize = 1 << 14;
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(a, b)| silu_mul_chunk(a, b));
}

vectorized! {
    /// Mean and variance of one group, accumulated in f64.
    fn group_stats(x: &[f32]) -> (f64, f64) {
        const W: usize = 8;
        let mut acc = [0f64; W];
        let chunks = x.chunks_exact(W);
        let tail = chunks.remainder();
        for chunk in chunks {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                *a += v as f64;
            }
        }
        let n = x.len() as f64;
        let mean = (acc.iter().sum::<f64>() + tail.iter().map(|&v| v as f64).sum::<f64>()) / n;
        let mut acc = [0f64; W];
        for chunk in x.chunks_exact(W) {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                let d = v as f64 - mean;
                *a += d * d;
            }
        }
        let tail: f64 = tail.iter().map(|&v| (v as f64 - mean).powi(2)).sum();
        (mean, (acc.iter().sum::<f64>() + tail) / n)
    }
}

vectorized! {
    fn scale_shift(x: &mut [f32], scale: f32, shift: f32, silu: bool) {
        if silu {
            for v in x.iter_mut() {
                let y = *v * scale + shift;
                *v = y / (1.0 + exp(-y));
            }
        } else {
            for v in x.iter_mut() {
                *v = *v * scale + shift;
            }
        }
    }
}

/// `nn.GroupNorm` over `[batch, channels, plane]` values in place, followed by SiLU when `silu`;
/// statistics in f64, then PyTorch's per-channel form `x * scale + shift` with
/// `scale = gamma / sqrt(var + eps)` and `shift = beta - mean * scale`.
pub fn group_norm(
    x: &mut [f32],
    [channels, plane]: [usize; 2],
    groups: usize,
    [gamma, beta]: [&[f32]; 2],
    eps: f32,
    silu: bool,
) {
    let per_group = channels / groups;
    if x.is_empty() {
        return;
    }
    x.par_chunks_mut(per_group * plane)
        .enumerate()
        .for_each(|(i, group)| {
            let (mean, var) = group_stats(group);
            let std = (var as f32 + eps).sqrt();
            let first = (i % groups) * per_group;
            for (c, values) in group.chunks_mut(plane).enumerate() {
                let scale = gamma[first + c] / std;
                let shift = beta[first + c] - mean as f32 * scale;
                scale_shift(values, scale, shift, silu);
            }
        });
}

vectorized! {
    /// `softmax(scale * row)` in place; `-inf` entries (masked keys) get 0, and a row with
    /// nothing but `-inf` becomes all 0.
    pub fn softmax(row: &mut [f32], scale: f32) {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for chunk in chunks {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                *a = if v > *a { v } else { *a };
            }
        }
        let max = acc.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            return;
        }
        let shift = max * scale;
        let mut sums = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (s, v) in sums.iter_mut().zip(chunk.iter_mut()) {
                *v = exp(*v * scale - shift);
                *s += *v;
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp(*v * scale - shift);
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// Rotary embedding in place on `[batch, tokens, heads, head_dim]` values: each token's heads
/// turn by that token's `pairs` angles (`cos`/`sin` rows of `[items, tokens, pairs]`, `items`
/// 1 when the batch shares them). `halves`: the pairs are `(x[j], x[j + d/2])` (Qwen3's
/// `rotate_half`), else `(x[2j], x[2j + 1])` (the DiT).
pub fn rotate(
    x: &mut [f32],
    [tokens, heads, head_dim]: [usize; 3],
    [cos, sin]: [&[f32]; 2],
    items: usize,
    halves: bool,
) {
    let pairs = head_dim / 2;
    x.par_chunks_mut(heads * head_dim)
        .enumerate()
        .for_each(|(row, values)| {
            let t = if items == 1 { row % tokens } else { row };
            let cos = &cos[t * pairs..(t + 1) * pairs];
            let sin = &sin[t * pairs..(t + 1) * pairs];
            for head in values.chunks_mut(head_dim) {
                if halves {
                    let (first, second) = head.split_at_mut(pairs);
                    for (((a, b), &c), &s) in first.iter_mut().zip(second).zip(cos).zip(sin) {
                        let (x1, x2) = (*a, *b);
                        // transformers: x * cos + rotate_half(x) * sin, two roundings per term.
                        *a = x1 * c + -x2 * s;
                        *b = x2 * c + x1 * s;
                    }
                } else {
                    for ((pair, &c), &s) in head.chunks_mut(2).zip(cos).zip(sin) {
                        let (re, im) = (pair[0], pair[1]);
                        pair[0] = re * c - im * s;
                        pair[1] = re * s + im * c;
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_and_saturates() {
        let mut x = -87.0f32;
        while x < 88.3 {
            let (got, want) = (exp(x), (x as f64).exp());
            let err = ((got as f64 - want) / want).abs();
            assert!(err < 2.5e-7, "exp({x}) = {got}, want {want}: {err}");
            x += 0.0137;
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(200.0), f32::INFINITY);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn softmax_matches_a_plain_one_and_handles_masks() {
        for len in [1, 15, 16, 37, 300] {
            let row: Vec<f32> = (0..len).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
            let mut masked = row.clone();
            masked
                .iter_mut()
                .skip(1)
                .step_by(3)
                .for_each(|v| *v = f32::NEG_INFINITY);
            for input in [row, masked] {
                let mut got: Vec<f32> = input.iter().map(|v| v * 4.0).collect();
                softmax(&mut got, 0.25);
                let max = input.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f64> = input.iter().map(|&v| ((v - max) as f64).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (g, e) in got.iter().zip(&e) {
                    assert!(
                        (*g as f64 - e / sum).abs() < 1e-6,
                        "len {len}: {g} vs {}",
                        e / sum
                    );
                }
            }
        }
        let mut hidden = vec![f32::NEG_INFINITY; 5];
        softmax(&mut hidden, 1.0);
        assert_eq!(hidden, vec![0.0; 5]);
    }

    #[test]
    fn norms_and_gates_match_their_definitions() {
        let (dim, rows, per) = (40, 70, 35);
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 250.0) - 2.0;
        let x: Vec<f32> = (0..rows * dim).map(value).collect();
        let y: Vec<f32> = (0..rows * dim).map(|i| value(i + 11)).collect();
        let weight: Vec<f32> = (0..dim).map(|i| value(i + 5)).collect();
        let factor: Vec<f32> = (0..2 * dim).map(|i| value(i + 3)).collect();
        let normed = |v: &[f32], r: usize| -> Vec<f64> {
            let row = &v[r * dim..(r + 1) * dim];
            let ms = row.iter().map(|&a| (a as f64).powi(2)).sum::<f64>() / dim as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            (0..dim)
                .map(|j| row[j] as f64 * inv * weight[j] as f64)
                .collect()
        };
        let close =
            |a: f32, b: f64| assert!((a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        for multiplier in [None, Some((&factor[..], per))] {
            let got = rms_norm(&x, &weight, 1e-5, multiplier);
            for r in 0..rows {
                for (j, n) in normed(&x, r).into_iter().enumerate() {
                    let m = multiplier.map_or(1.0, |(f, _)| f[(r / per) * dim + j] as f64);
                    close(got[r * dim + j], n * m);
                }
            }
            let mut residual = x.clone();
            add_rms_norm(&mut residual, &y, &weight, 1e-5, multiplier);
            for r in 0..rows {
                for (j, n) in normed(&y, r).into_iter().enumerate() {
                    let g = multiplier.map_or(1.0, |(f, _)| f[(r / per) * dim + j] as f64);
                    close(residual[r * dim + j], x[r * dim + j] as f64 + g * n);
                }
            }
        }
        // GroupNorm over [2, 4, 35] in 2 groups, with and without SiLU.
        let (channels, plane) = (4, 35);
        let gamma = [0.5f32, -1.0, 2.0, 1.5];
        let beta = [0.1f32, 0.0, -0.3, 0.7];
        for silu in [false, true] {
            let mut got = x[..2 * channels * plane].to_vec();
            group_norm(&mut got, [channels, plane], 2, [&gamma, &beta], 1e-6, silu);
            for (g, chunk) in x[..2 * channels * plane].chunks(2 * plane).enumerate() {
                let n = chunk.len() as f64;
                let mean = chunk.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = chunk
                    .iter()
                    .map(|&v| (v as f64 - mean).powi(2))
                    .sum::<f64>()
                    / n;
                for (i, &v) in chunk.iter().enumerate() {
                    let c = (g % 2) * 2 + i / plane;
                    let y =
                        (v as f64 - mean) / (var + 1e-6).sqrt() * gamma[c] as f64 + beta[c] as f64;
                    let want = if silu { y / (1.0 + (-y).exp()) } else { y };
                    close(got[g * 2 * plane + i], want);
                }
            }
        }
        let mut a = x.clone();
        silu_mul(&mut a, &y);
        for ((got, &a), &b) in a.iter().zip(&x).zip(&y) {
            let a = a as f64;
            close(*got, a / (1.0 + (-a).exp()) * b as f64);
        }
    }
}
