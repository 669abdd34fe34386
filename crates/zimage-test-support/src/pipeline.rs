//! The tiny pipeline of `tests/fixtures/make_pipeline_fixtures.py`, assembled into a model folder.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use zimage_nn::ZBackend;
use zimage_pipeline::{GenerateOptions, InitImage, ZImagePipeline};

use super::fixtures;

/// The bar of every end-to-end comparison with diffusers' images. diffusers' own f32 and f64
/// runs of these tiny pipelines differ by ~2e-6; a correct port lands far above the 40 dB of
/// "visually equal" (the fixtures reach 80-90 dB), so a result near 40 dB hides a bug.
pub const MIN_PSNR_DB: f64 = 60.0;
/// The bar of the final latents against diffusers' (relative L2).
pub const LATENTS_REL_L2: f64 = 1e-4;

/// One recorded diffusers call.
#[derive(Debug, Deserialize)]
pub struct PipelineCase {
    pub name: String,
    pub pipeline: String,
    pub args: serde_json::Value,
    pub expected: Vec<String>,
    pub latents: String,
}

pub fn cases() -> Vec<PipelineCase> {
    let text = std::fs::read_to_string(fixtures().join("pipeline/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A model folder in the Hub layout under the target directory, built once per test binary:
/// the tiny transformer/VAE/scheduler, the tiny real-vocabulary Qwen3 and the tokenizer.
pub fn model_folder() -> PathBuf {
    static FOLDER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FOLDER
        .get_or_init(|| {
            // One folder per test binary in the target's scratch directory, rebuilt on each run.
            let dir = super::scratch("tiny-pipeline");
            copy_dir(&fixtures().join("pipeline/tiny"), &dir);
            copy_dir(
                &fixtures().join("text/real/text_encoder"),
                &dir.join("text_encoder"),
            );
            let tokenizer = dir.join("tokenizer");
            std::fs::create_dir_all(&tokenizer).unwrap();
            let json = zimage_text::qwen3_tokenizer_json().unwrap();
            std::fs::write(tokenizer.join("tokenizer.json"), json).unwrap();
            std::fs::copy(
                fixtures().join("text/tokenizer/tokenizer_config.json"),
                tokenizer.join("tokenizer_config.json"),
            )
            .unwrap();
            dir
        })
        .clone()
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Peak signal-to-noise ratio of two RGB8 images, in dB.
pub fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.as_raw().len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

pub fn load_png(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// The library call equivalent to a recorded diffusers call.
pub fn options<BK: ZBackend>(
    case: &PipelineCase,
    pipeline: &ZImagePipeline<BK>,
) -> GenerateOptions {
    let a = &case.args;
    let prompts: Vec<String> = match &a["prompt"] {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(v) => v.iter().map(|s| s.as_str().unwrap().to_string()).collect(),
        other => panic!("prompt {other}"),
    };
    let mut o = pipeline.options(prompts[0].clone());
    o.prompts = prompts;
    if let Some(n) = a["negative_prompt"].as_str() {
        o.negative_prompts = Some(vec![n.to_string(); o.prompts.len()]);
    }
    o.num_inference_steps = a["num_inference_steps"].as_u64().unwrap() as usize;
    o.guidance_scale = a["guidance_scale"].as_f64().unwrap() as f32;
    o.cfg_normalization = a["cfg_normalization"].as_f64().unwrap_or(0.0) as f32;
    o.cfg_truncation = a["cfg_truncation"].as_f64().unwrap_or(1.0);
    o.num_images_per_prompt = a["num_images_per_prompt"].as_u64().unwrap_or(1) as usize;
    o.seed = a["seed"].as_u64().unwrap();
    if let Some(image) = a["image"].as_str() {
        let image = load_png(&fixtures().join("pipeline").join(image));
        o.width = image.width() as usize;
        o.height = image.height() as usize;
        let mask = a["mask"].as_str().map(|m| {
            zimage_pipeline::resize::to_gray(
                &image::open(fixtures().join("pipeline").join(m)).unwrap(),
            )
        });
        o.init_image = Some(InitImage {
            image,
            strength: a["strength"].as_f64().unwrap(),
            mask,
        });
    } else {
        o.width = a["width"].as_u64().unwrap() as usize;
        o.height = a["height"].as_u64().unwrap() as usize;
    }
    o
}
