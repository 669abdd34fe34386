//! ControlNet inputs: the control context the ControlNet sees (diffusers'
//! `ZImageControlNetPipeline` / `ZImageControlNetInpaintPipeline`), and canny edges.

use burn::tensor::{DType, Tensor, TensorData};
use image::{GrayImage, RgbImage};
use zimage_nn::ZBackend;
use zimage_transformer::ZImageControlNetConfig;
use zimage_vae::AutoencoderKL;

use crate::options::{ControlOptions, GenerateOptions};
use crate::PipelineError;

/// Checks `control` against the ControlNet's config before anything runs.
pub(crate) fn check(
    control: &ControlOptions,
    config: &ZImageControlNetConfig,
    latent_channels: usize,
) -> Result<(), PipelineError> {
    let in_dim = config.control_in_dim;
    if control.inpaint.is_some() && in_dim != 2 * latent_channels + 1 {
        return Err(PipelineError::Invalid(format!(
            "ControlNet inpainting needs a 2.x ControlNet (control_in_dim {}: control latents, mask, masked-image latents); this one is {} with control_in_dim {in_dim}",
            2 * latent_channels + 1,
            config.release()
        )));
    }
    if control.image.width() == 0 || control.image.height() == 0 {
        return Err(PipelineError::Invalid("the control image is empty".into()));
    }
    if let Some(inpaint) = &control.inpaint {
        if inpaint.image.width() == 0 || inpaint.mask.width() == 0 {
            return Err(PipelineError::Invalid(
                "the inpaint image or mask is empty".into(),
            ));
        }
    }
    Ok(())
}

/// The control context for `options`' size, `[1, control_in_dim, latent_height, latent_width]`:
/// - the control image, resized to the output size, encoded by the VAE, the posterior's mode
///   scaled as latents (`retrieve_latents(..., sample_mode="argmax")`);
/// - text-to-image: zeros past those channels up to `control_in_dim` (2.x takes 33);
/// - inpainting: then `1 - mask` at the latent size (nearest) and the latents of the image with
///   the repainted region set to 0 (mid-grey in [-1, 1]).
pub(crate) fn control_context<B: ZBackend>(
    vae: &AutoencoderKL<B>,
    control: &ControlOptions,
    options: &GenerateOptions,
    control_in_dim: usize,
    device: &B::Device,
) -> Result<Tensor<B, 4>, PipelineError> {
    let (width, height) = (options.width, options.height);
    let encode = |pixels: Tensor<B, 4>| -> Result<Tensor<B, 4>, PipelineError> {
        let posterior = vae.encode_fitted(pixels.cast(vae.dtype()), options.vae_tiling)?;
        Ok(vae.scale_latents(posterior.mode()).cast(DType::F32))
    };
    let image = resized(&control.image, width, height);
    let latents = encode(zimage_vae::image_to_tensor::<B>(&image, device, DType::F32))?;
    let [_, channels, lh, lw] = latents.dims();
    let parts = match &control.inpaint {
        None => {
            if control_in_dim > channels {
                vec![
                    latents,
                    Tensor::zeros([1, control_in_dim - channels, lh, lw], (device, DType::F32)),
                ]
            } else {
                vec![latents]
            }
        }
        Some(inpaint) => {
            let mask = binary_mask(&inpaint.mask, width, height);
            let image = resized(&inpaint.image, width, height);
            let pixels = zimage_vae::image_to_tensor::<B>(&image, device, DType::F32);
            let keep = Tensor::<B, 4>::from_data(
                TensorData::new(
                    mask.iter()
                        .map(|&m| if m < 0.5 { 1.0f32 } else { 0.0 })
                        .collect(),
                    [1, 1, height, width],
                ),
                (device, DType::F32),
            );
            let masked = encode(pixels * keep)?;
            // `F.interpolate(1 - mask, size=latents, mode="nearest")`: source floor(dst * in / out).
            let (sy, sx) = (height as f32 / lh as f32, width as f32 / lw as f32);
            let mut small = Vec::with_capacity(lh * lw);
            for y in 0..lh {
                let y0 = ((y as f32 * sy) as usize).min(height - 1);
                for x in 0..lw {
                    let x0 = ((x as f32 * sx) as usize).min(width - 1);
                    small.push(1.0 - mask[y0 * width + x0]);
                }
            }
            let small =
                Tensor::from_data(TensorData::new(small, [1, 1, lh, lw]), (device, DType::F32));
            vec![latents, small, masked]
        }
    };
    Ok(Tensor::cat(parts, 1))
}

fn resized(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    if image.width() as usize == width && image.height() as usize == height {
        image.clone()
    } else {
        crate::resize::resize_lanczos(image, width as u32, height as u32)
    }
}

/// diffusers' mask processor (`do_binarize`, no normalisation): resized to the output size,
/// 1 where the value is >= 0.5, else 0; row-major `height x width`.
fn binary_mask(mask: &GrayImage, width: usize, height: usize) -> Vec<f32> {
    let mask = if mask.width() as usize == width && mask.height() as usize == height {
        mask.clone()
    } else {
        crate::resize::resize_lanczos(mask, width as u32, height as u32)
    };
    mask.pixels()
        .map(|p| {
            if p.0[0] as f32 / 255.0 < 0.5 {
                0.0
            } else {
                1.0
            }
        })
        .collect()
}

/// Thresholds of [`canny`] that ControlNet canny examples use with OpenCV
/// (`cv2.Canny(image, 100, 200)`).
pub const CANNY_DEFAULT_THRESHOLDS: (f32, f32) = (100.0, 200.0);

/// A canny edge map for a ControlNet control image: white edges on black, as RGB (the three
/// channels equal, as ControlNet preprocessors give it).
///
/// The image is taken to grayscale (`image`'s luma), then `imageproc::edges::canny` runs with
/// the hysteresis thresholds `low` and `high` on the gradient magnitude. This approximates what
/// users get from OpenCV's `cv2.Canny(gray, low, high)` but does not match it bit for bit:
/// imageproc smooths with a Gaussian (sigma 1.4) first and measures the gradient as
/// `sqrt(dx² + dy²)`, where OpenCV does not smooth and uses `|dx| + |dy|` by default, so the same
/// thresholds give somewhat fewer, cleaner edges here. [`CANNY_DEFAULT_THRESHOLDS`] is (100, 200).
/// Thresholds must be finite with `0 <= low <= high`.
pub fn canny(image: &RgbImage, low: f32, high: f32) -> Result<RgbImage, PipelineError> {
    if !(low.is_finite() && high.is_finite() && 0.0 <= low && low <= high) {
        return Err(PipelineError::Invalid(format!(
            "canny thresholds ({low}, {high}) must be finite with 0 <= low <= high"
        )));
    }
    if image.width() == 0 || image.height() == 0 {
        return Err(PipelineError::Invalid(
            "the image for canny is empty".into(),
        ));
    }
    let gray = crate::resize::luma(image);
    let edges = imageproc::edges::canny(&gray, low, high);
    Ok(image::DynamicImage::ImageLuma8(edges).to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canny_outlines_a_square_and_nothing_else() {
        // A bright square on a dark ground: edges along its border, none inside or far outside.
        let image = RgbImage::from_fn(64, 48, |x, y| {
            if (16..48).contains(&x) && (12..36).contains(&y) {
                image::Rgb([230, 220, 210])
            } else {
                image::Rgb([20, 30, 40])
            }
        });
        let (low, high) = CANNY_DEFAULT_THRESHOLDS;
        let edges = canny(&image, low, high).unwrap();
        assert_eq!(edges.dimensions(), (64, 48));
        assert!(edges.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
        assert!(edges.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
        let white = |x: u32, y: u32| edges.get_pixel(x, y).0[0] == 255;
        // Every side of the square has edge pixels within a pixel of its border.
        let near = |xs: std::ops::Range<u32>, ys: std::ops::Range<u32>| {
            xs.clone().any(|x| ys.clone().any(|y| white(x, y)))
        };
        assert!(near(15..18, 20..28), "left side");
        assert!(near(46..49, 20..28), "right side");
        assert!(near(24..40, 11..14), "top side");
        assert!(near(24..40, 34..37), "bottom side");
        // Flat regions have none.
        assert!(!near(22..42, 18..30), "inside");
        assert!(!near(0..10, 0..48), "outside");
        let count = edges.pixels().filter(|p| p.0[0] == 255).count();
        // Thin edges: about the perimeter (2 * (32 + 24) = 112), not filled regions.
        assert!((80..=260).contains(&count), "{count} edge pixels");
        // A flat image has no edges; bad thresholds are an error, not a panic.
        let flat = RgbImage::from_pixel(16, 16, image::Rgb([128, 128, 128]));
        assert!(canny(&flat, low, high)
            .unwrap()
            .pixels()
            .all(|p| p.0[0] == 0));
        assert!(canny(&image, 200.0, 100.0).is_err());
        assert!(canny(&image, f32::NAN, 100.0).is_err());
    }
}
