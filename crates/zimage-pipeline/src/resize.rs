//! Pillow's `Image.resize(size, Image.LANCZOS)` and `Image.convert("L")`, bit for bit.
//!
//! diffusers' image processors resize the PIL images they are given with Pillow's Lanczos filter
//! and turn masks grey with Pillow's luma weights. `image`'s Lanczos filter runs the passes in the
//! other order and keeps floats between them, so its pixels differ from Pillow's by a level here
//! and there: enough to move the VAE latents of an input image visibly past float noise. This is
//! Pillow's resampler (`libImaging/Resample.c` of Pillow 13.0): coefficients in f64 normalised to
//! sum 1, turned into 22-bit fixed point, one pass per axis, each rounded to u8. (Pillow before 13
//! always ran the horizontal pass first; an image that 13 resizes vertically first can differ by a
//! level from what an older Pillow gives.)

use image::{GrayImage, ImageBuffer, Pixel, RgbImage};

/// Fixed-point fraction bits of the coefficients (Pillow's `PRECISION_BITS`: 32 - 8 - 2, room
/// for 8-bit values and for filter sums a little above 1 or below 0).
const PRECISION_BITS: u32 = 22;

/// Lanczos' support, in source pixels at scale 1.
const SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-SUPPORT..SUPPORT).contains(&x) {
        sinc(x) * sinc(x / SUPPORT)
    } else {
        0.0
    }
}

/// For each output position, the first source index and its fixed-point weights.
struct Taps {
    first: Vec<usize>,
    /// `ksize` weights per output position; the unused ones are 0.
    weights: Vec<i32>,
    ksize: usize,
}

impl Taps {
    fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv_filterscale = 1.0 / filterscale;
        let mut first = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut w = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin).min(ksize);
            let mut sum = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(n) {
                *wx = lanczos(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
                sum += *wx;
            }
            let row = &mut weights[xx * ksize..xx * ksize + n];
            for (k, &wx) in row.iter_mut().zip(&w) {
                let wx = if sum != 0.0 { wx / sum } else { wx };
                let scaled = wx * (1u32 << PRECISION_BITS) as f64;
                *k = if wx < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                };
            }
            first.push(xmin);
        }
        Self {
            first,
            weights,
            ksize,
        }
    }

    fn taps(&self, out: usize) -> (usize, &[i32]) {
        (
            self.first[out],
            &self.weights[out * self.ksize..(out + 1) * self.ksize],
        )
    }
}

/// Pillow's `clip8`: the sum shifted out of fixed point (flooring) and clamped to a byte.
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// One horizontal pass: `rows` rows of `in_w` pixels to rows of `out_w`, rounded to bytes.
fn horizontal(src: &[u8], channels: usize, in_w: usize, rows: usize, out_w: usize) -> Vec<u8> {
    let taps = Taps::new(in_w, out_w);
    let mut out = vec![0u8; out_w * rows * channels];
    for y in 0..rows {
        let line = &src[y * in_w * channels..(y + 1) * in_w * channels];
        let dst = &mut out[y * out_w * channels..(y + 1) * out_w * channels];
        for xx in 0..out_w {
            let (xmin, k) = taps.taps(xx);
            for c in 0..channels {
                let mut sum = HALF;
                for (x, &kx) in k.iter().enumerate() {
                    if kx != 0 {
                        sum += line[(xmin + x) * channels + c] as i32 * kx;
                    }
                }
                dst[xx * channels + c] = clip8(sum);
            }
        }
    }
    out
}

/// One vertical pass: `in_h` rows of `width` pixels to `out_h` rows, rounded to bytes.
fn vertical(src: &[u8], channels: usize, width: usize, in_h: usize, out_h: usize) -> Vec<u8> {
    let taps = Taps::new(in_h, out_h);
    let stride = width * channels;
    let mut out = vec![0u8; out_h * stride];
    for yy in 0..out_h {
        let (ymin, k) = taps.taps(yy);
        let dst = &mut out[yy * stride..(yy + 1) * stride];
        for (i, d) in dst.iter_mut().enumerate() {
            let mut sum = HALF;
            for (y, &ky) in k.iter().enumerate() {
                if ky != 0 {
                    sum += src[(ymin + y) * stride + i] as i32 * ky;
                }
            }
            *d = clip8(sum);
        }
    }
    out
}

/// `image.resize((width, height), Image.LANCZOS)` for 8-bit images of any channel count
/// (`L`, `RGB`; Pillow premultiplies `RGBA`, so give it `RGB`), as Pillow 13 does it.
pub fn resize_lanczos<P>(
    image: &ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8>,
{
    let channels = P::CHANNEL_COUNT as usize;
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if (in_w, in_h) == (out_w, out_h) {
        return image.clone();
    }
    if out_w == 0 || out_h == 0 || in_w == 0 || in_h == 0 {
        return ImageBuffer::new(width, height);
    }
    let src = image.as_raw();
    let (need_h, need_v) = (out_w != in_w, out_h != in_h);
    // Pillow 13 runs the vertical pass first when the height shrinks by more than twice what
    // the width does (`ImagingResampleInner`); each pass rounds to bytes, so the order shows.
    let (shrink_h, shrink_w) = (in_h as i64 - out_h as i64, in_w as i64 - out_w as i64);
    let vertical_first = shrink_h > 0 && shrink_h > shrink_w * 2;
    let data = match (need_h, need_v, vertical_first) {
        (true, false, _) => horizontal(src, channels, in_w, in_h, out_w),
        (false, true, _) => vertical(src, channels, in_w, in_h, out_h),
        (true, true, false) => {
            let rows = horizontal(src, channels, in_w, in_h, out_w);
            vertical(&rows, channels, out_w, in_h, out_h)
        }
        (true, true, true) => {
            let rows = vertical(src, channels, in_w, in_h, out_h);
            horizontal(&rows, channels, in_w, out_h, out_w)
        }
        (false, false, _) => unreachable!("the same size returned above"),
    };
    ImageBuffer::from_raw(width, height, data).expect("sized above")
}

/// `image.convert("L")` of an RGB image: ITU-R 601 luma in Pillow's 16-bit fixed point
/// (`image`'s `to_luma8` uses the 709 weights).
pub fn luma(image: &RgbImage) -> GrayImage {
    let data = image
        .as_raw()
        .chunks_exact(3)
        .map(|p| {
            let l = p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000;
            (l >> 16) as u8
        })
        .collect();
    GrayImage::from_raw(image.width(), image.height(), data).expect("same size")
}

/// `image.convert("L")` of any image as diffusers' mask processor does it: grey images as they
/// are, colour ones with Pillow's 601 weights (alpha ignored).
pub fn to_gray(image: &image::DynamicImage) -> GrayImage {
    use image::DynamicImage;
    match image {
        DynamicImage::ImageLuma8(gray) => gray.clone(),
        DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_) => image.to_luma8(),
        other => luma(&other.to_rgb8()),
    }
}
