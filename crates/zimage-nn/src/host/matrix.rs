//! Weight matrices held on the host in their stored form, read as f32 only inside the kernels.

use std::fmt;
use std::sync::Arc;

use half::{bf16, f16};

use super::gemm::RowSource;
use super::kernels::dequantize;
use crate::checkpoint::{MappedBytes, StoredDtype};
use crate::quant::GgmlType;

/// How a [`HostMatrix`] stores its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFormat {
    F32,
    BF16,
    F16,
    /// ggml blocks along each row (a GGUF file's quantized tensor).
    Quantized(GgmlType),
}

impl HostFormat {
    /// Bytes of `n` values (for quantized formats `n` is a whole number of blocks).
    pub fn bytes_for(self, n: usize) -> usize {
        match self {
            Self::F32 => 4 * n,
            Self::BF16 | Self::F16 => 2 * n,
            Self::Quantized(ty) => n / ty.block_size() * ty.block_bytes(),
        }
    }

    pub fn from_stored(dtype: StoredDtype) -> Option<Self> {
        match dtype {
            StoredDtype::F32 => Some(Self::F32),
            StoredDtype::BF16 => Some(Self::BF16),
            StoredDtype::F16 => Some(Self::F16),
            StoredDtype::Quantized(ty) => Some(Self::Quantized(ty)),
            StoredDtype::Other(_) => None,
        }
    }
}

#[derive(Clone)]
enum Storage {
    /// Straight from the memory-mapped checkpoint: no copy at all.
    Mapped(MappedBytes),
    /// Converted at load (another precision than the file's) or made here.
    Owned(Arc<[u8]>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m.bytes(),
            Self::Owned(v) => v,
        }
    }
}

/// A `[rows, cols]` row-major matrix (a PyTorch `nn.Linear` weight is `[out, in]`) in f32, bf16,
/// f16 or ggml blocks, memory-mapped from its file when it is held in the file's precision. Clones share the
/// storage.
#[derive(Clone)]
pub struct HostMatrix {
    rows: usize,
    cols: usize,
    format: HostFormat,
    storage: Storage,
}

impl fmt::Debug for HostMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HostMatrix([{}, {}], {:?}, {})",
            self.rows,
            self.cols,
            self.format,
            match self.storage {
                Storage::Mapped(_) => "mapped",
                Storage::Owned(_) => "owned",
            }
        )
    }
}

impl HostMatrix {
    /// The checkpoint's bytes as they are (`bytes` hold `rows * cols` values of `format`).
    pub fn mapped(rows: usize, cols: usize, format: HostFormat, bytes: MappedBytes) -> Self {
        assert_eq!(
            bytes.bytes().len(),
            rows * format.bytes_for(cols),
            "matrix bytes"
        );
        Self {
            rows,
            cols,
            format,
            storage: Storage::Mapped(bytes),
        }
    }

    /// Values given as f32, stored in `format` (rounded to nearest even, as `torch.Tensor.to`).
    pub fn from_f32(rows: usize, cols: usize, values: &[f32], format: HostFormat) -> Self {
        assert_eq!(values.len(), rows * cols, "matrix values");
        let bytes: Vec<u8> = match format {
            HostFormat::F32 => bytemuck::cast_slice(values).to_vec(),
            HostFormat::BF16 => {
                let v: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
                bytemuck::cast_slice(&v).to_vec()
            }
            HostFormat::F16 => {
                let v: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
                bytemuck::cast_slice(&v).to_vec()
            }
            HostFormat::Quantized(ty) => crate::quant::quantize(ty, values)
                .unwrap_or_else(|| panic!("zimage-rs does not quantize to {ty}")),
        };
        Self::owned(rows, cols, format, bytes)
    }

    /// Stored values (little-endian) converted from `from` to the float `format`, in parallel
    /// chunks of whole rows.
    pub fn convert(
        rows: usize,
        cols: usize,
        raw: &[u8],
        from: HostFormat,
        format: HostFormat,
    ) -> Self {
        use rayon::prelude::*;
        assert!(
            !matches!(format, HostFormat::Quantized(_)),
            "conversion to ggml blocks"
        );
        assert_eq!(raw.len(), rows * from.bytes_for(cols), "matrix bytes");
        let mut out = vec![0u8; rows * format.bytes_for(cols)];
        let chunk_rows = ((1 << 16) / cols.max(1)).max(1);
        out.par_chunks_mut(chunk_rows * format.bytes_for(cols).max(1))
            .zip(raw.par_chunks(chunk_rows * from.bytes_for(cols).max(1)))
            .for_each(|(dst, src)| {
                let mut values = vec![0f32; dst.len() / format.bytes_for(1)];
                widen(from, src, &mut values);
                narrow(format, &values, dst);
            });
        Self::owned(rows, cols, format, out)
    }

    fn owned(rows: usize, cols: usize, format: HostFormat, bytes: Vec<u8>) -> Self {
        Self {
            rows,
            cols,
            format,
            storage: Storage::Owned(bytes.into()),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> HostFormat {
        self.format
    }

    /// Whether the values are the checkpoint's own bytes (no copy was made).
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped(_))
    }

    /// Bytes held (mapped or owned).
    pub fn size_bytes(&self) -> usize {
        self.rows * self.format.bytes_for(self.cols)
    }

    /// The stored bytes (`rows` rows of `format.bytes_for(cols)`).
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// Every value as f32, row-major (tests and the generic path; the kernels read rows).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        widen(self.format, self.storage.bytes(), &mut out);
        out
    }
}

impl RowSource for HostMatrix {
    fn read_row(&self, i: usize, c0: usize, out: &mut [f32]) {
        debug_assert!(i < self.rows && c0 + out.len() <= self.cols);
        if let HostFormat::Quantized(ty) = self.format {
            let (bs, bb) = (ty.block_size(), ty.block_bytes());
            let row_bytes = self.format.bytes_for(self.cols);
            let row = &self.storage.bytes()[i * row_bytes..(i + 1) * row_bytes];
            let (first, last) = (c0 / bs, (c0 + out.len()).div_ceil(bs));
            if c0 % bs == 0 && out.len() % bs == 0 {
                dequantize(ty, &row[first * bb..last * bb], out);
            } else {
                // Not on block boundaries (the kernels always are): decode the covering blocks.
                let mut blocks = vec![0f32; (last - first) * bs];
                dequantize(ty, &row[first * bb..last * bb], &mut blocks);
                let len = out.len();
                out.copy_from_slice(&blocks[c0 - first * bs..][..len]);
            }
            return;
        }
        let size = self.format.bytes_for(1);
        let start = (i * self.cols + c0) * size;
        widen(
            self.format,
            &self.storage.bytes()[start..start + out.len() * size],
            out,
        );
    }
}

/// Little-endian stored values to f32 (exact for every format; whole blocks when quantized).
pub(crate) fn widen(format: HostFormat, src: &[u8], out: &mut [f32]) {
    match format {
        HostFormat::Quantized(ty) => dequantize(ty, src, out),
        HostFormat::F32 => bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(src),
        HostFormat::BF16 => match bytemuck::try_cast_slice::<u8, u16>(src) {
            Ok(bits) => {
                for (o, &b) in out.iter_mut().zip(bits) {
                    *o = f32::from_bits(u32::from(b) << 16);
                }
            }
            Err(_) => {
                for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
                }
            }
        },
        HostFormat::F16 => match bytemuck::try_cast_slice::<u8, f16>(src) {
            Ok(values) => {
                use half::slice::HalfFloatSliceExt;
                values.convert_to_f32_slice(out);
            }
            Err(_) => {
                for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        },
    }
}

/// f32 to stored values, rounding to nearest even.
fn narrow(format: HostFormat, values: &[f32], dst: &mut [u8]) {
    match format {
        HostFormat::Quantized(_) => unreachable!("checked by the caller"),
        HostFormat::F32 => dst.copy_from_slice(bytemuck::cast_slice(values)),
        HostFormat::BF16 => {
            for (d, &v) in dst.chunks_exact_mut(2).zip(values) {
                d.copy_from_slice(&bf16::from_f32(v).to_le_bytes());
            }
        }
        HostFormat::F16 => {
            for (d, &v) in dst.chunks_exact_mut(2).zip(values) {
                d.copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_back_in_every_format() {
        let values: Vec<f32> = (0..6 * 5).map(|i| i as f32 * 0.37 - 4.0).collect();
        for format in [HostFormat::F32, HostFormat::BF16, HostFormat::F16] {
            let m = HostMatrix::from_f32(6, 5, &values, format);
            let all = m.to_f32();
            let mut row = [0f32; 3];
            m.read_row(4, 1, &mut row);
            assert_eq!(row, all[21..24], "{format:?}");
            for (&got, &v) in all.iter().zip(&values) {
                let bound = if format == HostFormat::F32 {
                    0.0
                } else {
                    v.abs() / 128.0
                };
                assert!((got - v).abs() <= bound, "{format:?}: {got} vs {v}");
            }
            // Converting from another precision keeps what the format can hold.
            let f32_bytes: Vec<u8> = bytemuck::cast_slice(&values).to_vec();
            let converted = HostMatrix::convert(6, 5, &f32_bytes, HostFormat::F32, format);
            assert_eq!(converted.to_f32(), all, "{format:?} converted");
        }
    }

    /// Unaligned bytes (a tensor after an odd-sized one in a safetensors file) read the same.
    #[test]
    fn unaligned_storage_reads_the_same() {
        let values: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        let bits: Vec<u8> = values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
        let mut shifted = vec![0u8; bits.len() + 1];
        shifted[1..].copy_from_slice(&bits);
        let mut out = vec![0f32; 8];
        widen(HostFormat::BF16, &shifted[1..], &mut out);
        assert_eq!(out, values);
        let halves: Vec<u8> = values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        shifted[1..].copy_from_slice(&halves);
        widen(HostFormat::F16, &shifted[1..], &mut out);
        assert_eq!(out, values);
    }
}
