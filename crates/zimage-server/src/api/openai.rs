//! OpenAI Images: `POST /v1/images/generations`, `POST /v1/images/edits`, `GET /v1/models`,
//! with the extensions (seed, steps, guidance, negative_prompt, loras, ...) as extra fields.

use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::request::{decode_image, GenerationFields, LoraRef};
use crate::{ApiJson, AppState};

/// `GET /v1/models`.
pub async fn models(State(shared): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": shared.info.name,
            "object": "model",
            "created": 0,
            "owned_by": "zimage-rs",
        }],
    }))
}

/// What OpenAI clients send. Fields OpenAI defines that do not change a Z-Image picture
/// (quality, style, user, background, moderation) are accepted and ignored; `model` is
/// ignored too (the server has one).
#[derive(Debug, Default, Deserialize)]
pub struct GenerationRequest {
    pub prompt: Option<String>,
    pub n: Option<usize>,
    pub size: Option<String>,
    pub response_format: Option<String>,
    pub output_format: Option<String>,
    // Extensions.
    pub negative_prompt: Option<String>,
    pub seed: Option<Value>,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    pub cfg_normalization: Option<f32>,
    pub cfg_truncation: Option<f64>,
    pub shift: Option<f64>,
    #[serde(default)]
    pub loras: Vec<LoraRef>,
    pub strength: Option<f64>,
}

/// `1024x1024` (or `auto`/nothing: the default, or an input image's size).
fn parse_size(size: Option<&str>) -> Result<(Option<usize>, Option<usize>), ApiError> {
    match size {
        None | Some("auto") => Ok((None, None)),
        Some(text) => {
            let parsed = text
                .split_once('x')
                .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
            match parsed {
                Some((w, h)) => Ok((Some(w), Some(h))),
                None => Err(ApiError::invalid(format!(
                    "size {text:?} is not WIDTHxHEIGHT (e.g. 1024x1024) or auto"
                ))),
            }
        }
    }
}

impl GenerationRequest {
    fn into_fields(self) -> Result<GenerationFields, ApiError> {
        match self.response_format.as_deref() {
            None | Some("b64_json") => {}
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "response_format {other:?} is not supported: this server answers with b64_json \
                     (the native API, POST /v1/jobs, gives image URLs)"
                )))
            }
        }
        match self.output_format.as_deref() {
            None | Some("png") => {}
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "output_format {other:?} is not supported: images are PNG"
                )))
            }
        }
        let (width, height) = parse_size(self.size.as_deref())?;
        Ok(GenerationFields {
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            width,
            height,
            steps: self.steps,
            guidance: self.guidance,
            cfg_normalization: self.cfg_normalization,
            cfg_truncation: self.cfg_truncation,
            seed: self.seed,
            n: self.n,
            shift: self.shift,
            loras: self.loras,
            strength: self.strength,
            ..Default::default()
        })
    }
}

async fn respond(shared: &AppState, fields: GenerationFields) -> Result<Json<Value>, ApiError> {
    let spec = super::blocking(shared, move |s| fields.into_spec(s)).await?;
    let seed = spec.seed;
    let job = super::run_to_end(shared, spec).await?;
    let finished = job.clone();
    let data: Vec<Value> = super::blocking(shared, move |_| Ok(super::base64_images(&finished)))
        .await?
        .into_iter()
        .map(|b64| json!({"b64_json": b64, "revised_prompt": null}))
        .collect();
    Ok(Json(json!({
        "created": job.created,
        "data": data,
        "output_format": "png",
        "zimage": {"job": job.id, "seed": seed},
    })))
}

/// `POST /v1/images/generations`.
pub async fn generations(
    State(shared): State<AppState>,
    ApiJson(request): ApiJson<GenerationRequest>,
) -> Result<Json<Value>, ApiError> {
    let fields = request.into_fields()?;
    respond(&shared, fields).await
}

/// `POST /v1/images/edits` (multipart): `image` (or `image[]`, the first), optional `mask`
/// (OpenAI's convention: transparent pixels are repainted; a mask without alpha is read as
/// white repaints), `prompt` and the other fields as text parts (`loras` as a JSON list).
/// Without a mask the image is the start of an image-to-image run.
pub async fn edits(
    State(shared): State<AppState>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let mut multipart =
        multipart.map_err(|e| ApiError::new(e.status(), "invalid_multipart", e.body_text()))?;
    let mut request = GenerationRequest::default();
    let mut image = None;
    let mut mask = None;
    let multipart_error = |e: axum::extract::multipart::MultipartError| {
        ApiError::new(e.status(), "invalid_multipart", e.body_text())
    };
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "image" | "image[]" => {
                let bytes = field.bytes().await.map_err(multipart_error)?;
                if image.is_none() {
                    image = Some(bytes);
                }
            }
            "mask" => {
                mask = Some(field.bytes().await.map_err(multipart_error)?);
            }
            _ => {
                let text = field.text().await.map_err(multipart_error)?;
                set_text_field(&mut request, &name, text)?;
            }
        }
    }
    let image =
        image.ok_or_else(|| ApiError::invalid("image is required (a multipart file part)"))?;
    let (image, mask) = super::blocking(&shared, move |shared| {
        decode_edit(&image, mask.as_deref(), shared)
    })
    .await?;
    let mut fields = request.into_fields()?;
    fields.image_decoded = Some(image);
    fields.mask_decoded = mask;
    respond(&shared, fields).await
}

/// The uploaded image and mask, decoded within the limits; the mask of the image's size.
fn decode_edit(
    image: &[u8],
    mask: Option<&[u8]>,
    shared: &crate::Shared,
) -> Result<(image::DynamicImage, Option<image::GrayImage>), ApiError> {
    let image = decode_image(image, "image", shared)?;
    let mask = mask.map(|m| decode_image(m, "mask", shared)).transpose()?;
    let mask = match mask {
        None => None,
        Some(mask) => {
            if mask.width() != image.width() || mask.height() != image.height() {
                return Err(ApiError::invalid(format!(
                    "the mask is {}x{} and the image {}x{}: they must be the same size",
                    mask.width(),
                    mask.height(),
                    image.width(),
                    image.height()
                )));
            }
            Some(openai_mask(mask))
        }
    };
    Ok((image, mask))
}

/// OpenAI's masks mark with transparency what is edited. A mask whose alpha is the same
/// everywhere (an opaque black-and-white PNG, as most painting tools export one) says nothing by
/// it, so it is read by brightness, as masks without alpha are (white repaints).
fn openai_mask(mask: image::DynamicImage) -> image::GrayImage {
    if mask.color().has_alpha() {
        let rgba = mask.to_rgba8();
        let first = rgba.pixels().next().map_or(255, |p| p.0[3]);
        if rgba.pixels().any(|p| p.0[3] != first) {
            return image::GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                image::Luma([if rgba.get_pixel(x, y).0[3] < 128 {
                    255
                } else {
                    0
                }])
            });
        }
    }
    crate::request::mask_from(mask)
}

fn set_text_field(
    request: &mut GenerationRequest,
    name: &str,
    text: String,
) -> Result<(), ApiError> {
    fn parse<T: std::str::FromStr>(name: &str, text: &str) -> Result<T, ApiError> {
        text.trim()
            .parse()
            .map_err(|_| ApiError::invalid(format!("{name} {text:?} is not a valid value")))
    }
    match name {
        "prompt" => request.prompt = Some(text),
        "negative_prompt" => request.negative_prompt = Some(text),
        "n" => request.n = Some(parse(name, &text)?),
        "size" => request.size = Some(text),
        "response_format" => request.response_format = Some(text),
        "output_format" => request.output_format = Some(text),
        "seed" => request.seed = Some(Value::Number(parse(name, &text)?)),
        "steps" => request.steps = Some(parse(name, &text)?),
        "guidance" => request.guidance = Some(parse(name, &text)?),
        "cfg_normalization" => request.cfg_normalization = Some(parse(name, &text)?),
        "cfg_truncation" => request.cfg_truncation = Some(parse(name, &text)?),
        "shift" => request.shift = Some(parse(name, &text)?),
        "strength" => request.strength = Some(parse(name, &text)?),
        "loras" => {
            request.loras = serde_json::from_str(&text).map_err(|e| {
                ApiError::invalid(format!(
                    "loras must be a JSON list of {{\"name\", \"scale\"}}: {e}"
                ))
            })?
        }
        // OpenAI fields that do not change the picture.
        "model" | "quality" | "style" | "user" | "background" | "moderation" | "input_fidelity"
        | "output_compression" => {}
        other => {
            return Err(ApiError::invalid(format!("unknown field {other:?}")));
        }
    }
    Ok(())
}
