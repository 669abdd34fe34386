//! Step previews: the latents projected to RGB by a fixed linear map, at the latents' own
//! resolution (1/8 of the image). Cheap enough for every step; no VAE involved.

use base64::Engine as _;

/// The 16-channel Flux VAE latent (Z-Image's) to RGB: the factors ComfyUI publishes for this
/// latent space (`comfy/latent_formats.py`, class `Flux`), applied to the model-space latents
/// and mapped from [-1, 1] to [0, 255].
const FACTORS: [[f32; 3]; 16] = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
];
const BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// `latents` (`[channels, height, width]`, row-major) as an RGB image.
pub fn project(
    latents: &[f32],
    channels: usize,
    height: usize,
    width: usize,
) -> Option<image::RgbImage> {
    if channels != FACTORS.len()
        || latents.len() != channels * height * width
        || height == 0
        || width == 0
    {
        return None;
    }
    let plane = height * width;
    let mut pixels = vec![0u8; plane * 3];
    for p in 0..plane {
        for (rgb, bias) in BIAS.iter().enumerate() {
            let value: f32 = (0..channels)
                .map(|c| latents[c * plane + p] * FACTORS[c][rgb])
                .sum::<f32>()
                + bias;
            pixels[p * 3 + rgb] = (((value + 1.0) * 127.5).clamp(0.0, 255.0)) as u8;
        }
    }
    image::RgbImage::from_raw(width as u32, height as u32, pixels)
}

/// [`project`] as a `data:image/png;base64,...` URL, for events and the page.
pub fn data_url(latents: &[f32], channels: usize, height: usize, width: usize) -> Option<String> {
    let image = project(latents, channels, height, width)?;
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .ok()?;
    Some(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latent_along_one_factor_gives_that_colour() {
        // Channel 12's factors are positive and alike: a large value there is a light grey,
        // its negation a dark one; other channels at zero leave the bias.
        let (h, w) = (2, 3);
        let mut latents = vec![0.0f32; 16 * h * w];
        latents[12 * h * w] = 5.0;
        latents[12 * h * w + 1] = -5.0;
        let image = project(&latents, 16, h, w).unwrap();
        assert_eq!(image.dimensions(), (3, 2));
        let light = image.get_pixel(0, 0).0;
        let dark = image.get_pixel(1, 0).0;
        let rest = image.get_pixel(2, 1).0;
        for c in 0..3 {
            assert!(
                light[c] > rest[c] && rest[c] > dark[c],
                "{light:?} {rest:?} {dark:?}"
            );
            let expected = ((BIAS[c] + 1.0) * 127.5) as u8;
            assert_eq!(rest[c], expected);
        }
        assert!(
            project(&latents, 4, h, w).is_none(),
            "only the 16-channel latent"
        );
        assert!(data_url(&latents, 16, h, w)
            .unwrap()
            .starts_with("data:image/png;base64,"));
    }
}
