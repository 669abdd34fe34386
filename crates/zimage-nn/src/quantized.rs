//! Quantized weight matrices on a device: ggml blocks kept at roughly their stored size and
//! dequantized with burn's tensor ops each time they are used (what cuda and wgpu run; on the
//! CPU the host kernels read the blocks directly instead).

use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};

use crate::quant::{repack_rows, GgmlType};

/// A `[rows, cols]` matrix of ggml blocks in the device form of [`crate::quant::repack_rows`]:
/// codes packed in 32-bit words, f32 scales and offsets per group, and the type's code table.
/// A Q4_K matrix takes 6 bits per value (4.5 in the file), Q8_0 9 bits, against 16 for bf16.
#[derive(Debug, Clone)]
pub struct QuantizedMatrix<B: Backend> {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    /// `[rows, cols / codes per word]`.
    words: Tensor<B, 2, Int>,
    /// `[rows, cols / group_size]`.
    scales: Tensor<B, 2>,
    offsets: Option<Tensor<B, 2>>,
    levels: Tensor<B, 1>,
}

impl<B: Backend> QuantizedMatrix<B> {
    /// From `rows` rows of `cols` values stored as `ty` blocks.
    pub fn from_blocks(
        ty: GgmlType,
        blocks: &[u8],
        rows: usize,
        cols: usize,
        device: &B::Device,
    ) -> Self {
        let (words, scales, offsets) = repack_rows(ty, blocks, rows, cols);
        let per_word = 32 / ty.code_bits() as usize;
        let groups = cols / ty.group_size();
        let words: Vec<i32> = words.into_iter().map(|w| w as i32).collect();
        let float = |values: Vec<f32>| {
            Tensor::<B, 2>::from_data(
                TensorData::new(values, [rows, groups]),
                (device, DType::F32),
            )
        };
        Self {
            ty,
            rows,
            cols,
            words: Tensor::from_data(TensorData::new(words, [rows, cols / per_word]), device),
            scales: float(scales),
            offsets: ty.has_offset().then(|| float(offsets)),
            levels: Tensor::from_data(
                TensorData::new(ty.levels(), [1 << ty.code_bits()]),
                (device, DType::F32),
            ),
        }
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held on the device (words as 4-byte ints, scales and offsets as f32).
    pub fn size_bytes(&self) -> usize {
        let words = self.rows * self.cols * self.ty.code_bits() as usize / 8;
        let groups = self.rows * self.cols / self.ty.group_size();
        words + groups * 4 * (1 + usize::from(self.offsets.is_some()))
    }

    /// Only the rows `ids` (an embedding lookup), still quantized.
    pub fn select_rows(&self, ids: Tensor<B, 1, Int>) -> Self {
        let rows = ids.dims()[0];
        Self {
            ty: self.ty,
            rows,
            cols: self.cols,
            words: self.words.clone().select(0, ids.clone()),
            scales: self.scales.clone().select(0, ids.clone()),
            offsets: self.offsets.as_ref().map(|o| o.clone().select(0, ids)),
            levels: self.levels.clone(),
        }
    }

    /// The values, `[rows, cols]` in `dtype`: `scale * level(code) + offset`, in f32 as the
    /// reference computes them, then cast.
    pub fn dequantize(&self, dtype: DType) -> Tensor<B, 2> {
        let bits = self.ty.code_bits() as usize;
        let per_word = 32 / bits;
        let mask = (1i64 << bits) - 1;
        // Code k of a word sits at bits k * bits (the mask also clears what an arithmetic shift
        // of a negative word brings in).
        let codes: Vec<Tensor<B, 2, Int>> = (0..per_word)
            .map(|k| {
                self.words
                    .clone()
                    .bitwise_right_shift_scalar(((k * bits) as i64).elem())
                    .bitwise_and_scalar(mask.elem())
            })
            .collect();
        let n = self.rows * self.cols;
        let codes = Tensor::stack::<3>(codes, 2).reshape([n]);
        let gs = self.ty.group_size();
        let values = self
            .levels
            .clone()
            .select(0, codes)
            .reshape([self.rows, self.cols / gs, gs]);
        let mut values = values * self.scales.clone().unsqueeze_dim::<3>(2);
        if let Some(offsets) = &self.offsets {
            values = values + offsets.clone().unsqueeze_dim::<3>(2);
        }
        let values = values.reshape([self.rows, self.cols]);
        if dtype == DType::F32 {
            values
        } else {
            values.cast(dtype)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize, quantize};
    use burn::backend::NdArray;

    #[test]
    fn device_dequantization_equals_the_host_one() {
        let device = Default::default();
        let (rows, cols) = (3, 256);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
        ] {
            let blocks = quantize(ty, &x).unwrap();
            let q = QuantizedMatrix::<NdArray>::from_blocks(ty, &blocks, rows, cols, &device);
            let got = q
                .dequantize(DType::F32)
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            assert_eq!(got, dequantize(ty, &blocks), "{ty}");
            let ids =
                Tensor::<NdArray, 1, Int>::from_data(TensorData::new(vec![2i64, 0], [2]), &device);
            let picked = q
                .select_rows(ids)
                .dequantize(DType::F32)
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let all = dequantize(ty, &blocks);
            assert_eq!(&picked[..cols], &all[2 * cols..], "{ty}");
            assert_eq!(&picked[cols..], &all[..cols], "{ty}");
        }
    }
}
