//! Writers of ggml's K-quants (Q6_K, Q5_K, Q4_K): 256-value super-blocks whose 16 or 8 groups
//! carry their own scales (and, for Q5_K/Q4_K, minimums), quantized once more against one f16
//! factor per super-block.
//!
//! Only the converter writes them, so they live here; reading is `zimage_nn::quant`, whose
//! decoder is bit-exact with gguf-py and defines the layouts these writers must produce (the
//! tests decode what is written with it). The group factors are chosen from each group's
//! extremes, then the codes are rounded against the factors as they will be decoded (after the
//! 6- or 8-bit quantization of the factors), which is what ggml's reference writers do minus
//! their search over candidate scales: a little more error than llama.cpp's files of the same
//! type, never a different format.

use half::f16;
use zimage_nn::quant::GgmlType;

const QK_K: usize = 256;

/// `values` (a whole number of 256-value blocks) as `ty`, for the K-quants; `None` for other
/// types or a partial block.
pub fn quantize_k(ty: GgmlType, values: &[f32]) -> Option<Vec<u8>> {
    if values.len() % QK_K != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(values.len() / QK_K * ty.block_bytes());
    for x in values.chunks_exact(QK_K) {
        match ty {
            GgmlType::Q6_K => q6_k(x, &mut out),
            GgmlType::Q5_K => q45_k(x, true, &mut out),
            GgmlType::Q4_K => q45_k(x, false, &mut out),
            _ => return None,
        }
    }
    Some(out)
}

/// The factor `f` as the decoder will see it, an f16.
fn as_f16(f: f32) -> f32 {
    f16::from_f32(f).to_f32()
}

/// Q6_K (210 bytes): `ql[128]` low 4 bits, `qh[64]` high 2 bits, `scales[16]` i8, `d` f16; the
/// value is `d * scale[g] * (code - 32)` over 16 groups of 16.
fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    // Each group's own step: its value of largest magnitude maps to code 0 (level -32).
    let mut steps = [0f32; 16];
    for (g, step) in steps.iter_mut().enumerate() {
        let group = &x[g * 16..(g + 1) * 16];
        let max = group
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        *step = max / -32.0;
    }
    let max_step = steps
        .iter()
        .fold(0f32, |m, &s| if s.abs() > m.abs() { s } else { m });
    let d = as_f16(max_step / -128.0);
    // Scales rounded away from zero: a group's step never shrinks below its own, so no code of
    // it is clipped (a clipped code costs far more than a slightly coarser step).
    let scales: Vec<i8> = steps
        .iter()
        .map(|&s| {
            if d == 0.0 {
                0
            } else {
                let r = s / d;
                (r.signum() * r.abs().ceil()).clamp(-128.0, 127.0) as i8
            }
        })
        .collect();
    let mut codes = [0u8; QK_K];
    for (i, c) in codes.iter_mut().enumerate() {
        let f = d * f32::from(scales[i / 16]);
        let q = if f == 0.0 {
            0
        } else {
            (x[i] / f).round() as i32
        };
        *c = (q.clamp(-32, 31) + 32) as u8;
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for half in 0..2 {
        let (c, l_at, h_at) = (&codes[half * 128..], half * 64, half * 32);
        for l in 0..32 {
            let (q1, q2, q3, q4) = (c[l], c[l + 32], c[l + 64], c[l + 96]);
            ql[l_at + l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            ql[l_at + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            qh[h_at + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(scales.iter().map(|&s| s as u8));
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
}

/// Q5_K (176 bytes: `d`, `dmin`, `scales[12]`, `qh[32]`, `qs[128]`) or Q4_K (144 bytes: no
/// `qh`); the value is `d * sc[g] * code - dmin * m[g]` over 8 groups of 32, `sc` and `m` 6-bit.
fn q45_k(x: &[f32], five: bool, out: &mut Vec<u8>) {
    let top = if five { 31.0 } else { 15.0 };
    // Each group: step and (non-negative) offset below zero, so that min..max spans the codes.
    let mut steps = [0f32; 8];
    let mut mins = [0f32; 8];
    for g in 0..8 {
        let group = &x[g * 32..(g + 1) * 32];
        let min = group.iter().copied().fold(f32::INFINITY, f32::min).min(0.0);
        let max = group.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        steps[g] = (max - min).max(0.0) / top;
        mins[g] = -min;
    }
    let d = as_f16(steps.iter().copied().fold(0f32, f32::max) / 63.0);
    let dmin = as_f16(mins.iter().copied().fold(0f32, f32::max) / 63.0);
    let sixbit = |v: f32, f: f32| {
        if f == 0.0 {
            0u8
        } else {
            (v / f).round().clamp(0.0, 63.0) as u8
        }
    };
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for g in 0..8 {
        // Rounding the step up keeps the group's maximum within the top code.
        sc[g] = if d == 0.0 {
            0
        } else {
            (steps[g] / d).ceil().clamp(0.0, 63.0) as u8
        };
        m[g] = sixbit(mins[g], dmin);
    }
    let mut codes = [0u8; QK_K];
    for (i, c) in codes.iter_mut().enumerate() {
        let g = i / 32;
        let f = d * f32::from(sc[g]);
        let offset = dmin * f32::from(m[g]);
        let q = if f == 0.0 {
            0.0
        } else {
            ((x[i] + offset) / f).round()
        };
        *c = q.clamp(0.0, top) as u8;
    }
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&f16::from_f32(dmin).to_le_bytes());
    // ggml's `get_scale_min_k4` packing: groups 0-3 in the low 6 bits of bytes 0-3 (scales) and
    // 4-7 (mins); groups 4-7 in the nibbles of bytes 8-11, their top 2 bits in the top bits of
    // bytes 0-7.
    let mut scales = [0u8; 12];
    for j in 0..4 {
        scales[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        scales[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        scales[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
    }
    out.extend_from_slice(&scales);
    if five {
        let mut qh = [0u8; 32];
        for (i, &c) in codes.iter().enumerate() {
            // Group g's fifth bits are bit g of qh[l], l the position in the group.
            qh[i % 32] |= (c >> 4) << (i / 32);
        }
        out.extend_from_slice(&qh);
    }
    // Pairs of groups share 32 bytes: the first group in the low nibbles, the second in the high.
    for pair in 0..4 {
        let (a, b) = (
            &codes[pair * 64..pair * 64 + 32],
            &codes[pair * 64 + 32..pair * 64 + 64],
        );
        out.extend(
            a.iter()
                .zip(b)
                .map(|(&lo, &hi)| (lo & 0xF) | ((hi & 0xF) << 4)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zimage_nn::quant::dequantize;

    /// Weights as trained layers have them: mostly small, one in 97 eight times larger, some
    /// groups all positive or all negative, and one block of zeros.
    fn values(n: usize) -> Vec<f32> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        };
        (0..n)
            .map(|i| {
                let v = next() * 0.05;
                match i / 32 % 7 {
                    _ if (512..768).contains(&i) => 0.0,
                    3 => v.abs() + 0.01,
                    5 => -v.abs() * 3.0,
                    _ if i % 97 == 0 => v * 8.0,
                    _ => v,
                }
            })
            .collect()
    }

    /// Relative RMS error of the decoded values, and the largest error in units of the range of
    /// its group (`group` values: the worst a type's steps allow, as every group of a block shares
    /// the block's factor).
    fn errors(ty: GgmlType, x: &[f32], group: usize) -> (f32, f32) {
        let bytes = quantize_k(ty, x).unwrap();
        assert_eq!(bytes.len(), ty.row_bytes(x.len()).unwrap(), "{ty}: size");
        let back = dequantize(ty, &bytes);
        let (mut err, mut norm, mut worst) = (0f64, 0f64, 0f32);
        for (g, (xs, ys)) in x.chunks(group).zip(back.chunks(group)).enumerate() {
            let lo = xs.iter().copied().fold(f32::INFINITY, f32::min).min(0.0);
            let hi = xs
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max)
                .max(0.0);
            let range = (hi - lo).max(1e-12);
            for (a, b) in xs.iter().zip(ys) {
                assert!(b.is_finite(), "{ty} group {g}");
                err += f64::from(a - b).powi(2);
                norm += f64::from(*a).powi(2);
                worst = worst.max((a - b).abs() / range);
            }
        }
        ((err / norm).sqrt() as f32, worst)
    }

    #[test]
    fn k_quants_decode_to_what_was_written() {
        let x = values(QK_K * 12);
        // Bounds on the relative RMS error: a uniform rounding error of one step (a group's range
        // over 64, 32 or 16 levels) is step/sqrt(12), 1.6%, 3.2% and 6.6% of these mostly uniform
        // values' RMS, plus a little for the 8- and 6-bit factors; and on the worst error, in units
        // of the block's range: about half a step of its largest group. (A group far smaller than
        // its block's largest is quantized on the block's coarser grid: the format's limit.)
        for (ty, rel, worst) in [
            (GgmlType::Q6_K, 0.025, 0.015),
            (GgmlType::Q5_K, 0.045, 0.03),
            (GgmlType::Q4_K, 0.09, 0.06),
        ] {
            let group = QK_K;
            let (r, w) = errors(ty, &x, group);
            println!("{ty}: relative RMS error {r:.4}, worst {w:.4} of the block's range");
            assert!(r < rel && w < worst, "{ty}: {r} {w}");
        }
        // The all-zero block decodes to zeros.
        for ty in [GgmlType::Q6_K, GgmlType::Q5_K, GgmlType::Q4_K] {
            let back = dequantize(ty, &quantize_k(ty, &x).unwrap());
            assert!(back[512..768].iter().all(|&v| v == 0.0), "{ty}");
        }
    }

    #[test]
    fn every_code_and_factor_lands_where_the_decoder_reads_it() {
        // One value per position, a ramp inside every group: any misplaced bit of a code, a
        // scale or a minimum shows as a value out of order.
        let x: Vec<f32> = (0..QK_K)
            .map(|i| (i % 32) as f32 / 31.0 * (1.0 + i as f32 / 64.0) - (i / 32) as f32 * 0.1)
            .collect();
        for ty in [GgmlType::Q6_K, GgmlType::Q5_K, GgmlType::Q4_K] {
            let group = if ty == GgmlType::Q6_K { 16 } else { 32 };
            let (r, _) = errors(ty, &x, group);
            assert!(r < 0.05, "{ty}: {r}");
        }
        assert_eq!(quantize_k(GgmlType::Q8_0, &x), None);
        assert_eq!(quantize_k(GgmlType::Q4_K, &x[..100]), None);
    }
}
