//! Conversions between RGB8 images and the VAE's [-1, 1] tensors, the way diffusers'
//! `VaeImageProcessor` does them.

use burn::tensor::{DType, Tensor, TensorData};
use image::RgbImage;
use zimage_nn::ZBackend;

use crate::VaeError;

/// An RGB8 image as the encoder takes it: `v / 255 * 2 - 1` per channel, in f32 and then cast to
/// `dtype` (diffusers' `pil_to_numpy` then `normalize`).
///
/// # Shapes
/// `height x width` RGB -> `[1, 3, height, width]`
pub fn image_to_tensor<B: ZBackend>(
    image: &RgbImage,
    device: &B::Device,
    dtype: DType,
) -> Tensor<B, 4> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let plane = width * height;
    let mut values = vec![0f32; 3 * plane];
    for (i, pixel) in image.pixels().enumerate() {
        for (c, &v) in pixel.0.iter().enumerate() {
            // Two roundings, as NumPy and PyTorch do them (no fused multiply-add).
            let unit = v as f32 / 255.0;
            values[c * plane + i] = 2.0 * unit - 1.0;
        }
    }
    Tensor::from_data(
        TensorData::new(values, [1, 3, height, width]),
        (device, dtype),
    )
}

/// Several images of one size as a batch.
///
/// # Shapes
/// `n` images of `height x width` -> `[n, 3, height, width]`
pub fn images_to_tensor<B: ZBackend>(
    images: &[RgbImage],
    device: &B::Device,
    dtype: DType,
) -> Result<Tensor<B, 4>, VaeError> {
    let Some(first) = images.first() else {
        return Err(VaeError::Image("no images to convert".into()));
    };
    if let Some(other) = images.iter().find(|i| i.dimensions() != first.dimensions()) {
        return Err(VaeError::Image(format!(
            "images of different sizes in one batch: {:?} and {:?} (width, height)",
            first.dimensions(),
            other.dimensions()
        )));
    }
    Ok(Tensor::cat(
        images
            .iter()
            .map(|image| image_to_tensor(image, device, dtype))
            .collect(),
        0,
    ))
}

/// Decoder output to RGB8 images, as diffusers' `postprocess(output_type="pil")`:
/// `clamp(x * 0.5 + 0.5, 0, 1)`, then `round(v * 255)` with ties to even (NumPy's `round`), in
/// f32.
///
/// # Shapes
/// `[batch, 3, height, width]` -> `batch` images of `height x width`
pub fn tensor_to_images<B: ZBackend>(images: Tensor<B, 4>) -> Result<Vec<RgbImage>, VaeError> {
    let [batch, channels, height, width] = images.dims();
    if channels != 3 {
        return Err(VaeError::Channels {
            what: "image tensor",
            expected: 3,
            actual: channels,
        });
    }
    let (w, h) = match (u32::try_from(width), u32::try_from(height)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => {
            return Err(VaeError::Image(format!(
                "{height}x{width} is too large for an image"
            )))
        }
    };
    let values = images
        .cast(DType::F32)
        .into_data()
        .into_vec::<f32>()
        .map_err(|e| VaeError::Image(format!("cannot read the image tensor: {e:?}")))?;
    let plane = height * width;
    (0..batch)
        .map(|b| {
            let item = &values[b * 3 * plane..(b + 1) * 3 * plane];
            let mut bytes = Vec::with_capacity(3 * plane);
            for i in 0..plane {
                for c in 0..3 {
                    bytes.push(to_u8(item[c * plane + i]));
                }
            }
            RgbImage::from_raw(w, h, bytes)
                .ok_or_else(|| VaeError::Image("pixel buffer of the wrong length".into()))
        })
        .collect()
}

/// One value of the decoder's output as a byte, as diffusers' postprocess computes it.
fn to_u8(x: f32) -> u8 {
    let unit = (x * 0.5 + 0.5).clamp(0.0, 1.0);
    // NaN becomes 0, as NumPy's cast usually does.
    (unit * 255.0).round_ties_even() as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_like_numpy() {
        assert_eq!(to_u8(-1.0), 0);
        assert_eq!(to_u8(1.0), 255);
        assert_eq!(to_u8(-7.0), 0);
        assert_eq!(to_u8(3.0), 255);
        // 0.5 * 255 = 127.5 rounds to the even 128
        assert_eq!(to_u8(0.0), 128);
        assert_eq!(to_u8(f32::NAN), 0);
    }
}
