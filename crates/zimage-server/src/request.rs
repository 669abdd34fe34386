//! Turning what clients send into a [`JobSpec`]: every limit checked, every default filled,
//! uploads decoded within bounds, adapters only by name.

use base64::Engine as _;
use image::{DynamicImage, GrayImage};
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::jobs::{InitSpec, JobSpec};
use crate::Shared;

/// An adapter by name (a `.safetensors` file of the server's adapter folder) and its scale.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraRef {
    pub name: String,
    #[serde(default = "one")]
    pub scale: f32,
}

fn one() -> f32 {
    1.0
}

/// Everything a generation can ask for, as the native API takes it; the OpenAI and A1111
/// routes translate their requests into this.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationFields {
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    /// diffusers' `guidance_scale`: 0 is off.
    pub guidance: Option<f32>,
    pub cfg_normalization: Option<f32>,
    pub cfg_truncation: Option<f64>,
    /// A seed, or a negative number (or nothing) for a random one.
    pub seed: Option<Value>,
    pub n: Option<usize>,
    pub shift: Option<f64>,
    #[serde(default)]
    pub loras: Vec<LoraRef>,
    /// The starting image (base64, or a `data:` URL).
    pub image: Option<String>,
    /// Inpainting mask (white repaints), base64.
    pub mask: Option<String>,
    pub strength: Option<f64>,
    /// The control image of the server's ControlNet (base64, or a `data:` URL); with `image`
    /// and `mask`, ControlNet inpainting.
    pub control_image: Option<String>,
    /// diffusers' `controlnet_conditioning_scale` (0.75).
    pub control_scale: Option<f32>,
    /// Turn the control image into canny edges first (thresholds 100, 200).
    #[serde(default)]
    pub canny: bool,
    /// Decoded images, from multipart uploads (never from JSON).
    #[serde(skip)]
    pub image_decoded: Option<DynamicImage>,
    #[serde(skip)]
    pub mask_decoded: Option<GrayImage>,
}

/// A seed users can type back: below 2^32, as the command's.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() & 0xffff_ffff
}

fn seed_of(value: Option<&Value>) -> Result<u64, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(random_seed()),
        Some(Value::Number(n)) => {
            if let Some(seed) = n.as_u64() {
                Ok(seed)
            } else if n.as_i64().is_some() || n.as_f64().is_some_and(|f| f < 0.0) {
                // A1111's -1, and any negative number: random.
                Ok(random_seed())
            } else {
                Err(ApiError::invalid(format!("seed {n} is not a whole number")))
            }
        }
        Some(other) => Err(ApiError::invalid(format!(
            "seed must be a number, not {other}"
        ))),
    }
}

/// Decodes an uploaded image within the server's limits (size per side and decoding memory).
pub fn decode_image(bytes: &[u8], what: &str, shared: &Shared) -> Result<DynamicImage, ApiError> {
    let limits = &shared.config.limits;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::invalid(format!("{what}: {e}")))?;
    if reader.format().is_none() {
        return Err(ApiError::invalid(format!(
            "{what} is not a PNG or JPEG image"
        )));
    }
    let mut bounds = image::Limits::default();
    bounds.max_image_width = Some(limits.max_upload_side);
    bounds.max_image_height = Some(limits.max_upload_side);
    bounds.max_alloc = Some(limits.max_upload_bytes);
    reader.limits(bounds);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "image_too_large",
            format!(
                "{what} is larger than {0}x{0} pixels or {1} MB decoded (the upload limits)",
                limits.max_upload_side,
                limits.max_upload_bytes / 1_000_000
            ),
        ),
        e => ApiError::invalid(format!("{what} cannot be decoded: {e}")),
    })
}

/// Base64 (plain, or a `data:image/...;base64,` URL) to bytes.
pub fn base64_bytes(text: &str, what: &str) -> Result<Vec<u8>, ApiError> {
    let payload = match text.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(",")
            .map(|(_, data)| data)
            .ok_or_else(|| ApiError::invalid(format!("{what}: a data URL without data")))?,
        None => text,
    };
    let cleaned: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .map_err(|e| ApiError::invalid(format!("{what} is not valid base64: {e}")))
}

/// A mask from an uploaded image: white (>= 0.5) repaints.
pub fn mask_from(image: DynamicImage) -> GrayImage {
    zimage_pipeline::resize::to_gray(&image)
}

/// Adapter names are file stems of the adapter folder: letters, digits, `-`, `_` and `.`,
/// never a path, never hidden.
pub fn check_lora_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "adapter name {name:?} is not a name from the server's adapter list (GET /v1/loras)"
        )))
    }
}

/// The adapters the server offers: the `.safetensors` files of its adapter folder.
pub fn available_loras(shared: &Shared) -> Vec<String> {
    let Some(dir) = &shared.config.lora_dir else {
        return Vec::new();
    };
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let stem = path.file_stem()?.to_str()?.to_string();
            (path.extension()? == "safetensors" && path.is_file() && check_lora_name(&stem).is_ok())
                .then_some(stem)
        })
        .collect();
    names.sort();
    names
}

impl GenerationFields {
    /// Checks every field against the server's limits and the model, and fills the defaults.
    pub fn into_spec(self, shared: &Shared) -> Result<JobSpec, ApiError> {
        let limits = &shared.config.limits;
        let info = &shared.info;
        let prompt = self
            .prompt
            .ok_or_else(|| ApiError::invalid("prompt is required"))?;
        if prompt.trim().is_empty() {
            return Err(ApiError::invalid("prompt is empty"));
        }
        for (name, text) in [
            ("prompt", Some(&prompt)),
            ("negative_prompt", self.negative_prompt.as_ref()),
        ] {
            if let Some(text) = text {
                let chars = text.chars().count();
                if chars > limits.max_prompt_chars {
                    return Err(ApiError::invalid(format!(
                        "{name} has {chars} characters; the limit is {}",
                        limits.max_prompt_chars
                    )));
                }
            }
        }
        // The starting image: decoded from base64 here unless the route already decoded it.
        let image = match (self.image_decoded, &self.image) {
            (Some(image), _) => Some(image),
            (None, Some(text)) => Some(decode_image(
                &base64_bytes(text, "image")?,
                "image",
                shared,
            )?),
            (None, None) => None,
        };
        let mask = match (self.mask_decoded, &self.mask) {
            (Some(mask), _) => Some(mask),
            (None, Some(text)) => Some(mask_from(decode_image(
                &base64_bytes(text, "mask")?,
                "mask",
                shared,
            )?)),
            (None, None) => None,
        };
        let control = match &self.control_image {
            None => {
                if self.control_scale.is_some() || self.canny {
                    return Err(ApiError::invalid(
                        "control_scale and canny apply only with a control_image",
                    ));
                }
                None
            }
            Some(text) => {
                if !info.controlnet {
                    return Err(ApiError::invalid(
                        "this server has no ControlNet (zimage serve --controlnet FILE)",
                    ));
                }
                if image.is_some() && mask.is_none() {
                    return Err(ApiError::invalid("a control_image with an image needs a mask (ControlNet inpainting); ControlNet image-to-image does not exist"));
                }
                if self.strength.is_some() {
                    return Err(ApiError::invalid("strength does not apply with a control_image (ControlNet inpainting starts from noise)"));
                }
                let scale = self
                    .control_scale
                    .unwrap_or(zimage_pipeline::ControlOptions::DEFAULT_SCALE);
                if !scale.is_finite() {
                    return Err(ApiError::invalid("control_scale must be a finite number"));
                }
                let mut control = decode_image(
                    &base64_bytes(text, "control_image")?,
                    "control_image",
                    shared,
                )?
                .to_rgb8();
                if self.canny {
                    let (low, high) = zimage_pipeline::CANNY_DEFAULT_THRESHOLDS;
                    control = zimage_pipeline::canny(&control, low, high)
                        .map_err(|e| ApiError::invalid(e.to_string()))?;
                }
                Some(crate::jobs::ControlSpec {
                    image: control,
                    scale,
                })
            }
        };
        if mask.is_some() && image.is_none() {
            return Err(ApiError::invalid(
                "a mask needs an image (the picture to inpaint)",
            ));
        }
        if self.strength.is_some() && image.is_none() {
            return Err(ApiError::invalid("strength applies only with an image"));
        }
        let multiple = info.size_multiple;
        // diffusers' default with an image: its own size, rounded down to the multiple; with
        // a control image, the control image's (as the command does).
        let reference = control
            .as_ref()
            .map(|c| (c.image.width(), c.image.height()))
            .or(image.as_ref().map(|i| (i.width(), i.height())));
        let (default_w, default_h) = match reference {
            Some((w, h)) => {
                // A large upload is generated at the largest size the server allows, same shape.
                let (w, h) = (w as f64, h as f64);
                let scale = (limits.max_side as f64 / w.max(h)).min(1.0);
                let fit = |v: f64| ((v * scale) as usize / multiple * multiple).max(multiple);
                (fit(w), fit(h))
            }
            None => (1024, 1024),
        };
        let width = self.width.unwrap_or(default_w);
        let height = self.height.unwrap_or(default_h);
        for (name, value) in [("width", width), ("height", height)] {
            if value == 0 || value % multiple != 0 {
                return Err(ApiError::invalid(format!(
                    "{name} {value} is not a positive multiple of {multiple}"
                )));
            }
            if value > limits.max_side {
                return Err(ApiError::invalid(format!(
                    "{name} {value} is over this server's limit of {}",
                    limits.max_side
                )));
            }
        }
        let steps = self.steps.unwrap_or(info.variant.default_steps());
        if steps == 0 || steps > limits.max_steps {
            return Err(ApiError::invalid(format!(
                "steps {steps} is outside 1..={}",
                limits.max_steps
            )));
        }
        let images = self.n.unwrap_or(1);
        if images == 0 || images > limits.max_images {
            return Err(ApiError::invalid(format!(
                "n {images} is outside 1..={}",
                limits.max_images
            )));
        }
        let guidance = self.guidance.unwrap_or(info.variant.default_guidance());
        let cfg_normalization = self.cfg_normalization.unwrap_or(0.0);
        let cfg_truncation = self.cfg_truncation.unwrap_or(1.0);
        if !guidance.is_finite() || !cfg_normalization.is_finite() || !cfg_truncation.is_finite() {
            return Err(ApiError::invalid(
                "guidance, cfg_normalization and cfg_truncation must be finite numbers",
            ));
        }
        if let Some(shift) = self.shift {
            if !(shift > 0.0 && shift.is_finite()) {
                return Err(ApiError::invalid(format!(
                    "shift {shift} is not a positive number"
                )));
            }
        }
        let init = match image {
            Some(image) => {
                // ControlNet inpainting has no strength; it is only recorded.
                let strength = self
                    .strength
                    .unwrap_or(zimage_pipeline::InitImage::default_strength(mask.is_some()));
                if !(strength > 0.0 && strength <= 1.0) {
                    return Err(ApiError::invalid(format!(
                        "strength {strength} is outside (0, 1]"
                    )));
                }
                Some(InitSpec {
                    image: image.to_rgb8(),
                    strength,
                    mask,
                })
            }
            None => None,
        };
        let max_loras = shared.config.limits.max_loras;
        if self.loras.len() > max_loras {
            return Err(ApiError::invalid(format!(
                "{} adapters asked for; at most {max_loras} per request",
                self.loras.len()
            )));
        }
        let offered = available_loras(shared);
        let mut loras: Vec<(String, f32)> = Vec::with_capacity(self.loras.len());
        for lora in self.loras {
            check_lora_name(&lora.name)?;
            if loras.iter().any(|(name, _)| *name == lora.name) {
                return Err(ApiError::invalid(format!(
                    "adapter {:?} is named twice (give it once, with the sum of the scales)",
                    lora.name
                )));
            }
            if !offered.contains(&lora.name) {
                return Err(ApiError::invalid(format!(
                    "no adapter named {:?} (GET /v1/loras lists them)",
                    lora.name
                )));
            }
            if !lora.scale.is_finite() {
                return Err(ApiError::invalid(format!(
                    "adapter {} has a scale that is not a finite number",
                    lora.name
                )));
            }
            loras.push((lora.name, lora.scale));
        }
        Ok(JobSpec {
            prompt,
            negative_prompt: self.negative_prompt,
            width,
            height,
            steps,
            guidance,
            cfg_normalization,
            cfg_truncation,
            seed: seed_of(self.seed.as_ref())?,
            images,
            shift: self.shift,
            loras,
            init,
            control,
        })
    }
}
