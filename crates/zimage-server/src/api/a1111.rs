//! The subset of AUTOMATIC1111's API that clients use: `txt2img`, `img2img`, and the lookups
//! (`sd-models`, `samplers`, `options`, `progress`, `interrupt`) they make around them.
//!
//! A1111's `cfg_scale` s blends `neg + s (pos - neg)`, which is diffusers' guidance `s - 1`
//! (`pos + g (pos - neg)`): cfg_scale 1 is no guidance, as in A1111.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::request::{base64_bytes, decode_image, mask_from, GenerationFields, LoraRef};
use crate::{ApiJson, AppState};

/// Everything else A1111 takes (sampler, scheduler, hires fix, scripts...) is accepted and
/// ignored: Z-Image has one sampler.
#[derive(Debug, Deserialize)]
pub struct A1111Request {
    #[serde(default)]
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: Option<Value>,
    pub steps: Option<usize>,
    pub cfg_scale: Option<f32>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub batch_size: Option<usize>,
    pub n_iter: Option<usize>,
    pub denoising_strength: Option<f64>,
    #[serde(default)]
    pub init_images: Vec<String>,
    pub mask: Option<String>,
    pub inpainting_mask_invert: Option<u8>,
    /// An extension: adapters by name, as in the native API.
    #[serde(default)]
    pub loras: Vec<LoraRef>,
}

impl A1111Request {
    fn fields(&self, shared: &crate::Shared, img2img: bool) -> Result<GenerationFields, ApiError> {
        let images = self
            .batch_size
            .unwrap_or(1)
            .max(1)
            .checked_mul(self.n_iter.unwrap_or(1).max(1))
            .ok_or_else(|| ApiError::invalid("batch_size x n_iter is too large"))?;
        let mut fields = GenerationFields {
            prompt: Some(self.prompt.clone()),
            negative_prompt: self.negative_prompt.clone().filter(|n| !n.is_empty()),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance: self.cfg_scale.map(|s| (s - 1.0).max(0.0)),
            seed: self.seed.clone(),
            n: Some(images),
            loras: self.loras.clone(),
            ..Default::default()
        };
        if img2img {
            let first = self
                .init_images
                .first()
                .ok_or_else(|| ApiError::invalid("init_images needs one image"))?;
            let image = decode_image(
                &base64_bytes(first, "init_images[0]")?,
                "init_images[0]",
                shared,
            )?;
            let mask = match &self.mask {
                Some(text) if !text.is_empty() => {
                    let mut mask =
                        mask_from(decode_image(&base64_bytes(text, "mask")?, "mask", shared)?);
                    if self.inpainting_mask_invert == Some(1) {
                        image::imageops::invert(&mut mask);
                    }
                    Some(mask)
                }
                _ => None,
            };
            // A1111's default denoising strength.
            fields.strength = Some(self.denoising_strength.unwrap_or(0.75));
            fields.image_decoded = Some(image);
            fields.mask_decoded = mask;
        }
        Ok(fields)
    }
}

async fn run(
    shared: AppState,
    request: A1111Request,
    img2img: bool,
) -> Result<Json<Value>, ApiError> {
    let parameters = json!({
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": request.seed,
        "steps": request.steps,
        "cfg_scale": request.cfg_scale,
        "width": request.width,
        "height": request.height,
        "batch_size": request.batch_size,
        "n_iter": request.n_iter,
        "denoising_strength": request.denoising_strength,
    });
    let spec = super::blocking(&shared, move |s| request.fields(s, img2img)?.into_spec(s)).await?;
    let info = json!({
        "prompt": spec.prompt,
        "all_prompts": vec![spec.prompt.clone(); spec.images],
        "negative_prompt": spec.negative_prompt.clone().unwrap_or_default(),
        "seed": spec.seed,
        "all_seeds": vec![spec.seed; spec.images],
        "subseed": -1,
        "width": spec.width,
        "height": spec.height,
        "sampler_name": "Euler",
        "cfg_scale": spec.guidance + 1.0,
        "steps": spec.steps,
        "batch_size": spec.images,
        "denoising_strength": spec.init.as_ref().map(|i| i.strength),
        "sd_model_name": shared.info.name,
    });
    let images = match super::run_to_end(&shared, spec).await {
        Ok(job) => super::blocking(&shared, move |_| Ok(super::base64_images(&job))).await?,
        // A1111 answers an interrupted generation with what it has: here, no image.
        Err(e) if e.code == "cancelled" => Vec::new(),
        Err(e) => return Err(e),
    };
    Ok(Json(json!({
        "images": images,
        "parameters": parameters,
        "info": info.to_string(),
    })))
}

/// `POST /sdapi/v1/txt2img`.
pub async fn txt2img(
    State(shared): State<AppState>,
    ApiJson(request): ApiJson<A1111Request>,
) -> Result<Json<Value>, ApiError> {
    run(shared, request, false).await
}

/// `POST /sdapi/v1/img2img` (with `mask`: inpainting, white repaints).
pub async fn img2img(
    State(shared): State<AppState>,
    ApiJson(request): ApiJson<A1111Request>,
) -> Result<Json<Value>, ApiError> {
    run(shared, request, true).await
}

/// `GET /sdapi/v1/sd-models`.
pub async fn sd_models(State(shared): State<AppState>) -> Json<Value> {
    let name = &shared.info.name;
    Json(json!([{
        "title": name, "model_name": name, "hash": null, "sha256": null, "filename": name, "config": null,
    }]))
}

/// `GET /sdapi/v1/samplers`.
pub async fn samplers() -> Json<Value> {
    Json(json!([{"name": "Euler", "aliases": ["euler", "flow_match_euler"], "options": {}}]))
}

/// `GET /sdapi/v1/options`.
pub async fn options(State(shared): State<AppState>) -> Json<Value> {
    Json(json!({"sd_model_checkpoint": shared.info.name}))
}

/// `GET /sdapi/v1/progress`: the running job's steps.
pub async fn progress(State(shared): State<AppState>) -> Json<Value> {
    let (waiting, _) = shared.queue.depth();
    let running = shared.queue.running().map(|job| job.status());
    let (step, total) = running
        .as_ref()
        .map(|s| (s.step, s.total))
        .unwrap_or((0, 0));
    let fraction = if total > 0 {
        step as f64 / total as f64
    } else {
        0.0
    };
    Json(json!({
        "progress": fraction,
        "eta_relative": 0.0,
        "state": {
            "skipped": false,
            "interrupted": false,
            "job": "",
            "job_count": waiting + running.is_some() as usize,
            "job_timestamp": "",
            "job_no": 0,
            "sampling_step": step,
            "sampling_steps": total,
        },
        "current_image": null,
        "textinfo": null,
    }))
}

/// `POST /sdapi/v1/interrupt`: stops the running job after its current step.
pub async fn interrupt(State(shared): State<AppState>) -> Json<Value> {
    if let Some(job) = shared.queue.running() {
        shared.queue.cancel(&job);
    }
    Json(json!({}))
}
