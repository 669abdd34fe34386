//! What an image records about how it was made: the parameters the `zimage` command and the
//! server write into every PNG, so that the same record reads the same wherever it was made.

use image::RgbImage;
use serde_json::{json, Value};

use crate::{GenerateOptions, Variant};

/// What the options alone do not say about a generation.
#[derive(Debug, Clone)]
pub struct Provenance {
    /// The model as the user named it: a folder, a Hub repo id, or "single files".
    pub model: String,
    pub variant: Variant,
    /// The backend's name (`cuda`, `wgpu`, `ndarray`).
    pub backend: String,
    /// The compute dtype's name (`f32`, `bf16`, `f16`).
    pub dtype: String,
    /// Each adapter's file name (never its folder) and scale.
    pub loras: Vec<(String, f32)>,
    /// The ControlNet's file name, when one steers the generation.
    pub controlnet: Option<String>,
}

/// The parameters of a generation as JSON: the prompt (a string, or a list for a batch), every
/// knob that changes the picture, the seed, and the provenance.
pub fn parameters(options: &GenerateOptions, provenance: &Provenance) -> Value {
    let prompt = match options.prompts.as_slice() {
        [one] => json!(one),
        many => json!(many),
    };
    json!({
        "prompt": prompt,
        "negative_prompt": options.negative_prompts.as_ref().and_then(|n| n.first()),
        "width": options.width,
        "height": options.height,
        "steps": options.num_inference_steps,
        "guidance": options.guidance_scale,
        "cfg_normalization": options.cfg_normalization,
        "cfg_truncation": options.cfg_truncation,
        "seed": options.seed,
        "strength": options.init_image.as_ref().map(|i| i.strength),
        "shift": options.shift,
        "loras": provenance.loras.iter().map(|(file, scale)| json!({"file": file, "scale": scale})).collect::<Vec<_>>(),
        "controlnet": options.control.as_ref().map(|c| json!({
            "file": provenance.controlnet,
            "scale": c.scale,
            "inpaint": c.inpaint.is_some(),
        })),
        "model": provenance.model,
        "variant": provenance.variant.name(),
        "backend": provenance.backend,
        "dtype": provenance.dtype,
        "generator": format!("zimage {}", env!("CARGO_PKG_VERSION")),
    })
}

/// The name of the PNG text chunk that holds [`parameters`] (A1111's and ComfyUI's readers look
/// for `parameters`).
pub const PNG_PARAMETERS_KEY: &str = "parameters";

/// `image` as PNG bytes with `parameters` in a UTF-8 (iTXt) chunk: prompts are often not Latin-1.
pub fn png_with_parameters(
    image: &RgbImage,
    parameters: &str,
) -> Result<Vec<u8>, png::EncodingError> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.add_itxt_chunk(PNG_PARAMETERS_KEY.into(), parameters.into())?;
    let mut writer = encoder.write_header()?;
    writer.write_image_data(image.as_raw())?;
    writer.finish()?;
    Ok(bytes)
}

/// The parameters text of a PNG written by [`png_with_parameters`], if it has one.
pub fn png_parameters(bytes: &[u8]) -> Option<String> {
    let reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .ok()?;
    let info = reader.info();
    info.utf8_text
        .iter()
        .find(|chunk| chunk.keyword == PNG_PARAMETERS_KEY)
        .and_then(|chunk| chunk.get_text().ok())
        .or_else(|| {
            info.uncompressed_latin1_text
                .iter()
                .find(|chunk| chunk.keyword == PNG_PARAMETERS_KEY)
                .map(|chunk| chunk.text.clone())
        })
}
