//! ggml's block-quantized formats (what GGUF files store): their layouts, and dequantization that
//! is bit-exact with the reference (`gguf.quants.dequantize` of gguf-py, itself the numpy port of
//! ggml's `dequantize_row_*`).
//!
//! Every quantized type is read through one decomposition: a block of `block_size` values holds,
//! per group of `group_size` values, a `scale` and (some types) an `offset`, and per value a small
//! unsigned `code`; the value is `scale * level(code) + offset`, where `level` is the type's code
//! table (`code - 8` for Q4_0, the non-uniform IQ4 table, ...). The scales and offsets are computed
//! in f32 exactly as the reference computes its per-group factors (`d * sc`, `dmin * m`), and the
//! last multiply-add is the reference's own, so the values agree to the bit. The host kernels
//! dequantize blocks straight into their packing buffers; device backends keep the codes, scales
//! and offsets as tensors ([`crate::QuantizedMatrix`]) and run the same formula with tensor ops.

use std::fmt;

use half::{bf16, f16};

/// A ggml tensor type zimage-rs can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
}

/// IQ4_NL / IQ4_XS code table.
const KVALUES_IQ4: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// K-quants' super-block.
const QK_K: usize = 256;

impl GgmlType {
    pub const ALL: [GgmlType; 15] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::IQ4_NL,
        Self::IQ4_XS,
    ];

    /// The type with ggml's id `id` (`enum ggml_type`); `Err` with ggml's name where it has one.
    pub fn from_id(id: u32) -> Result<Self, String> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            20 => Self::IQ4_NL,
            23 => Self::IQ4_XS,
            30 => Self::BF16,
            other => {
                let name = match other {
                    9 => "Q8_1",
                    15 => "Q8_K",
                    16 => "IQ2_XXS",
                    17 => "IQ2_XS",
                    18 => "IQ3_XXS",
                    19 => "IQ1_S",
                    21 => "IQ3_S",
                    22 => "IQ2_S",
                    24 => "I8",
                    25 => "I16",
                    26 => "I32",
                    27 => "I64",
                    28 => "F64",
                    29 => "IQ1_M",
                    34 => "TQ1_0",
                    35 => "TQ2_0",
                    39 => "MXFP4",
                    _ => return Err(format!("ggml type {other}")),
                };
                return Err(name.to_string());
            }
        })
    }

    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::IQ4_NL => 20,
            Self::IQ4_XS => 23,
            Self::BF16 => 30,
        }
    }

    /// ggml's name (`Q4_K`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2_K => "Q2_K",
            Self::Q3_K => "Q3_K",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
            Self::IQ4_NL => "IQ4_NL",
            Self::IQ4_XS => "IQ4_XS",
        }
    }

    /// By name, any case (`q8_0`, `Q4_K`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Whether values are stored one by one (F32, F16, BF16).
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// Values per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::IQ4_NL => 32,
            _ => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
            Self::IQ4_NL => 18,
            Self::IQ4_XS => 136,
        }
    }

    /// Bytes of a row of `cols` values, `None` unless `cols` is a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        (cols % self.block_size() == 0).then(|| cols / self.block_size() * self.block_bytes())
    }

    /// Values sharing one scale (and offset).
    pub fn group_size(self) -> usize {
        match self {
            Self::Q2_K | Self::Q3_K | Self::Q6_K => 16,
            Self::F32 | Self::F16 | Self::BF16 => 1,
            _ => 32,
        }
    }

    /// Whether groups have an offset (`scale * level + offset`).
    pub fn has_offset(self) -> bool {
        matches!(
            self,
            Self::Q4_1 | Self::Q5_1 | Self::Q2_K | Self::Q4_K | Self::Q5_K
        )
    }

    /// Bits a code is packed in on devices (2, 4 or 8: a power of two dividing 32).
    pub fn code_bits(self) -> u32 {
        match self {
            Self::Q2_K => 2,
            Self::Q4_0 | Self::Q4_1 | Self::Q3_K | Self::Q4_K | Self::IQ4_NL | Self::IQ4_XS => 4,
            _ => 8,
        }
    }

    /// The value each code stands for before scaling (`level(code)`), for codes `0..2^bits`.
    pub fn levels(self) -> Vec<f32> {
        let n = 1usize << self.code_bits();
        (0..n)
            .map(|c| match self.level_shift() {
                Some(shift) => (c as i32 + shift) as f32,
                None => f32::from(KVALUES_IQ4[c]),
            })
            .collect()
    }

    /// `level(code) = code + shift` for the types whose levels are consecutive integers; `None`
    /// for the IQ4 types (a table of non-uniform levels).
    fn level_shift(self) -> Option<i32> {
        match self {
            Self::IQ4_NL | Self::IQ4_XS => None,
            Self::Q8_0 => Some(-128),
            Self::Q4_0 => Some(-8),
            Self::Q5_0 => Some(-16),
            Self::Q6_K => Some(-32),
            Self::Q3_K => Some(-4),
            _ => Some(0),
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[inline(always)]
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Decodes one block of a quantized type into per-value codes (`block_size` of them) and per-group
/// scales and offsets (`block_size / group_size`; offsets left as they are for types without).
#[inline(always)]
pub fn decode_block(
    ty: GgmlType,
    b: &[u8],
    codes: &mut [u8],
    scales: &mut [f32],
    offsets: &mut [f32],
) {
    debug_assert_eq!(b.len(), ty.block_bytes());
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            unreachable!("float types are not block-quantized")
        }
        GgmlType::Q8_0 => {
            scales[0] = half(b, 0);
            for (c, &q) in codes.iter_mut().zip(&b[2..34]) {
                *c = (q as i8 as i16 + 128) as u8;
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::IQ4_NL => {
            scales[0] = half(b, 0);
            let qs = if ty == GgmlType::Q4_1 {
                offsets[0] = half(b, 2);
                &b[4..20]
            } else {
                &b[2..18]
            };
            for j in 0..16 {
                codes[j] = qs[j] & 0xF;
                codes[j + 16] = qs[j] >> 4;
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            scales[0] = half(b, 0);
            let at = if ty == GgmlType::Q5_1 {
                offsets[0] = half(b, 2);
                4
            } else {
                2
            };
            let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            let qs = &b[at + 4..at + 20];
            for j in 0..16 {
                codes[j] = (qs[j] & 0xF) | ((((qh >> j) & 1) as u8) << 4);
                codes[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
        }
        GgmlType::Q2_K => {
            let (sc, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (half(b, 80), half(b, 82));
            for g in 0..16 {
                scales[g] = d * f32::from(sc[g] & 0xF);
                offsets[g] = -(dmin * f32::from(sc[g] >> 4));
                let (n, shift, half_) = (g / 8, 2 * ((g % 8) / 2), g % 2);
                for l in 0..16 {
                    codes[g * 16 + l] = (qs[32 * n + half_ * 16 + l] >> shift) & 3;
                }
            }
        }
        GgmlType::Q3_K => {
            let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
            let d = half(b, 108);
            for g in 0..16 {
                let low = if g < 8 { sc[g] & 0xF } else { sc[g - 8] >> 4 };
                let high = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
                let s = ((low | (high << 4)) as i8).wrapping_sub(32);
                scales[g] = d * f32::from(s);
                let (n, shift, half_) = (g / 8, 2 * ((g % 8) / 2), g % 2);
                for l in 0..16 {
                    let byte = half_ * 16 + l;
                    let q = (qs[32 * n + byte] >> shift) & 3;
                    let h = (hmask[byte] >> (g / 2)) & 1;
                    // Stored: q - 4 where the mask bit is clear; the code is that plus 4.
                    codes[g * 16 + l] = q + 4 * h;
                }
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (d, dmin) = (half(b, 0), half(b, 2));
            let sc = &b[4..16];
            let (qh, qs) = if ty == GgmlType::Q5_K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for g in 0..8 {
                let (s, m) = if g < 4 {
                    (sc[g] & 0x3F, sc[g + 4] & 0x3F)
                } else {
                    (
                        (sc[g + 4] & 0xF) | ((sc[g - 4] >> 2) & 0x30),
                        (sc[g + 4] >> 4) | ((sc[g] >> 2) & 0x30),
                    )
                };
                scales[g] = d * f32::from(s);
                offsets[g] = -(dmin * f32::from(m));
                let (chunk, shift) = (g / 2, 4 * (g % 2));
                for l in 0..32 {
                    let mut q = (qs[32 * chunk + l] >> shift) & 0xF;
                    if let Some(qh) = qh {
                        q |= ((qh[l] >> g) & 1) << 4;
                    }
                    codes[g * 32 + l] = q;
                }
            }
        }
        GgmlType::Q6_K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = half(b, 208);
            for (g, s) in scales.iter_mut().enumerate().take(16) {
                *s = d * f32::from(sc[g] as i8);
            }
            for c in 0..8 {
                let h = c / 4;
                let low_shift = 4 * ((c % 4) / 2);
                let high_shift = 2 * (c % 4);
                for l in 0..32 {
                    let low = (ql[64 * h + (c % 2) * 32 + l] >> low_shift) & 0xF;
                    let high = (qh[32 * h + l] >> high_shift) & 3;
                    codes[c * 32 + l] = low | (high << 4);
                }
            }
        }
        GgmlType::IQ4_XS => {
            let d = half(b, 0);
            let scales_h = u16::from_le_bytes([b[2], b[3]]);
            let (scales_l, qs) = (&b[4..8], &b[8..136]);
            for ib in 0..8 {
                let low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
                let high = ((scales_h >> (2 * ib)) & 3) as u8;
                let ls = ((low | (high << 4)) as i8).wrapping_sub(32);
                scales[ib] = d * f32::from(ls);
                for j in 0..16 {
                    codes[ib * 32 + j] = qs[ib * 16 + j] & 0xF;
                    codes[ib * 32 + j + 16] = qs[ib * 16 + j] >> 4;
                }
            }
        }
    }
}

/// [`GgmlType::levels`], computed once per type.
pub fn levels_of(ty: GgmlType) -> &'static [f32] {
    static LEVELS: std::sync::OnceLock<Vec<Vec<f32>>> = std::sync::OnceLock::new();
    let all = LEVELS.get_or_init(|| {
        GgmlType::ALL
            .iter()
            .map(|t| if t.is_float() { Vec::new() } else { t.levels() })
            .collect()
    });
    let i = GgmlType::ALL.iter().position(|&t| t == ty).expect("listed");
    &all[i]
}

/// The values of whole blocks `src` (a multiple of the block's bytes) into `out`.
pub fn dequantize_into(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    dequantize_inline(ty, src, out)
}

/// [`dequantize_into`]'s body, inlined into `host::kernels::dequantize`, which compiles it for
/// the widest vectors the CPU has (the matrix product decodes every weight on every call).
#[inline(always)]
pub(crate) fn dequantize_inline(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            return;
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
            return;
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
            return;
        }
        _ => {}
    }
    let (bs, gs) = (ty.block_size(), ty.group_size());
    debug_assert_eq!(src.len() / ty.block_bytes() * bs, out.len());
    // The two most used types straight from their bytes (the matrix product decodes every
    // weight on every call); the same products as below, so the same bits.
    match ty {
        GgmlType::Q8_0 => {
            for (b, out) in src.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = half(b, 0);
                for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                    *o = d * f32::from(q as i8);
                }
            }
            return;
        }
        GgmlType::Q4_0 => {
            for (b, out) in src.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
                let d = half(b, 0);
                let (low, high) = out.split_at_mut(16);
                for ((l, h), &q) in low.iter_mut().zip(high).zip(&b[2..18]) {
                    *l = d * f32::from((q & 0xF) as i8 - 8);
                    *h = d * f32::from((q >> 4) as i8 - 8);
                }
            }
            return;
        }
        _ => {}
    }
    let levels = levels_of(ty);
    // Consecutive integer levels are computed rather than looked up, which vectorises.
    let shift = ty.level_shift();
    let mut codes = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let mut offsets = [0f32; 16];
    for (block, out) in src
        .chunks_exact(ty.block_bytes())
        .zip(out.chunks_exact_mut(bs))
    {
        decode_block(
            ty,
            block,
            &mut codes[..bs],
            &mut scales[..bs / gs],
            &mut offsets[..bs / gs],
        );
        for (g, (out, codes)) in out
            .chunks_exact_mut(gs)
            .zip(codes[..bs].chunks_exact(gs))
            .enumerate()
        {
            let scale = scales[g];
            match (shift, ty.has_offset()) {
                (Some(shift), true) => {
                    let offset = offsets[g];
                    for (o, &c) in out.iter_mut().zip(codes) {
                        *o = scale * (i32::from(c) + shift) as f32 + offset;
                    }
                }
                (Some(shift), false) => {
                    for (o, &c) in out.iter_mut().zip(codes) {
                        *o = scale * (i32::from(c) + shift) as f32;
                    }
                }
                (None, true) => {
                    let offset = offsets[g];
                    for (o, &c) in out.iter_mut().zip(codes) {
                        *o = scale * levels[c as usize] + offset;
                    }
                }
                (None, false) => {
                    for (o, &c) in out.iter_mut().zip(codes) {
                        *o = scale * levels[c as usize];
                    }
                }
            }
        }
    }
}

/// The values of `src` (whole blocks of `ty`) as f32.
pub fn dequantize(ty: GgmlType, src: &[u8]) -> Vec<f32> {
    let n = src.len() / ty.block_bytes() * ty.block_size();
    let mut out = vec![0f32; n];
    dequantize_into(ty, src, &mut out);
    out
}

/// The device form of quantized rows: per value a code (packed `32 / code_bits` to a `u32`, the
/// first in the lowest bits), per group a scale and offset. `(words, scales, offsets)` for `rows`
/// rows of `cols` values; offsets are empty for types without.
pub fn repack_rows(
    ty: GgmlType,
    src: &[u8],
    rows: usize,
    cols: usize,
) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
    let (bs, gs, bits) = (ty.block_size(), ty.group_size(), ty.code_bits() as usize);
    let per_word = 32 / bits;
    let n = rows * cols;
    let mut words = vec![0u32; n.div_ceil(per_word)];
    let mut scales = vec![0f32; n / gs];
    let mut offsets = if ty.has_offset() {
        vec![0f32; n / gs]
    } else {
        Vec::new()
    };
    let mut codes = [0u8; QK_K];
    let mut offs = [0f32; 16];
    for (b, block) in src.chunks_exact(ty.block_bytes()).enumerate() {
        let groups = b * (bs / gs)..(b + 1) * (bs / gs);
        decode_block(
            ty,
            block,
            &mut codes[..bs],
            &mut scales[groups.clone()],
            &mut offs[..bs / gs],
        );
        if ty.has_offset() {
            offsets[groups].copy_from_slice(&offs[..bs / gs]);
        }
        for (i, &c) in codes[..bs].iter().enumerate() {
            let e = b * bs + i;
            words[e / per_word] |= u32::from(c) << ((e % per_word) * bits);
        }
    }
    (words, scales, offsets)
}

/// Quantizes `values` (a whole number of blocks) to `ty`, for the types zimage-rs writes: the
/// float types, and Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 as ggml's reference quantizers
/// (`quantize_row_*_ref`) do them.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Option<Vec<u8>> {
    let bs = ty.block_size();
    if values.len() % bs != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(values.len() / bs * ty.block_bytes());
    match ty {
        GgmlType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
        GgmlType::BF16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for x in values.chunks_exact(32) {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let (levels, bias) = if ty == GgmlType::Q4_0 {
                (-8.0, 8.5)
            } else {
                (-16.0, 16.5)
            };
            let top = if ty == GgmlType::Q4_0 { 15 } else { 31 };
            for x in values.chunks_exact(32) {
                // The value of largest magnitude, with its sign, maps to the lowest level.
                let max = x
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / levels;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<u8> = x
                    .iter()
                    .map(|&v| ((v * id + bias).trunc() as i32).clamp(0, top) as u8)
                    .collect();
                push_q4_or_q5(&mut out, ty == GgmlType::Q5_0, d, None, &q);
            }
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let top = if ty == GgmlType::Q4_1 { 15 } else { 31 };
            for x in values.chunks_exact(32) {
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / top as f32;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<u8> = x
                    .iter()
                    .map(|&v| (((v - min) * id + 0.5).trunc() as i32).clamp(0, top) as u8)
                    .collect();
                push_q4_or_q5(&mut out, ty == GgmlType::Q5_1, d, Some(min), &q);
            }
        }
        _ => return None,
    }
    Some(out)
}

/// One Q4_0/Q4_1/Q5_0/Q5_1 block from its 32 codes.
fn push_q4_or_q5(out: &mut Vec<u8>, five: bool, d: f32, m: Option<f32>, q: &[u8]) {
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    if let Some(m) = m {
        out.extend_from_slice(&f16::from_f32(m).to_le_bytes());
    }
    if five {
        let qh = q
            .iter()
            .enumerate()
            .fold(0u32, |h, (j, &c)| h | (u32::from(c >> 4) << j));
        out.extend_from_slice(&qh.to_le_bytes());
    }
    out.extend((0..16).map(|j| (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4)));
}

/// The types [`quantize`] writes.
pub fn can_quantize(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * if i % 97 == 0 { 8.0 } else { 1.0 })
            .collect()
    }

    #[test]
    fn quantizers_round_trip_within_their_step() {
        let x = values(32 * 64);
        for (ty, bound) in [
            (GgmlType::Q8_0, 0.04),
            (GgmlType::Q5_1, 0.3),
            (GgmlType::Q5_0, 0.3),
            (GgmlType::Q4_1, 0.6),
            (GgmlType::Q4_0, 0.6),
            (GgmlType::BF16, 0.04),
        ] {
            let bytes = quantize(ty, &x).unwrap();
            assert_eq!(bytes.len(), ty.row_bytes(x.len()).unwrap());
            let back = dequantize(ty, &bytes);
            let worst = x
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < bound, "{ty}: {worst}");
        }
    }

    #[test]
    fn repacked_codes_give_the_same_values() {
        let x = values(256 * 2);
        for ty in [GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q5_0] {
            let bytes = quantize(ty, &x).unwrap();
            let (words, scales, offsets) = repack_rows(ty, &bytes, 2, 256);
            let (bits, gs) = (ty.code_bits() as usize, ty.group_size());
            let levels = ty.levels();
            let per_word = 32 / bits;
            let again: Vec<f32> = (0..x.len())
                .map(|e| {
                    let c = (words[e / per_word] >> ((e % per_word) * bits)) & ((1 << bits) - 1);
                    let v = scales[e / gs] * levels[c as usize];
                    if ty.has_offset() {
                        v + offsets[e / gs]
                    } else {
                        v
                    }
                })
                .collect();
            assert_eq!(again, dequantize(ty, &bytes), "{ty}");
        }
    }

    #[test]
    fn ids_and_names_round_trip() {
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()), Ok(ty));
            assert_eq!(GgmlType::from_name(&ty.name().to_lowercase()), Some(ty));
            assert_eq!(ty.block_size() % ty.group_size(), 0);
        }
        assert_eq!(GgmlType::from_id(16), Err("IQ2_XXS".to_string()));
    }
}
