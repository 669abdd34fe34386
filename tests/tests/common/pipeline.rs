//! The tiny pipeline of `tests/fixtures/make_pipeline_fixtures.py`, assembled into a model folder.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::fixtures;

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
            let dir =
                std::env::temp_dir().join(format!("zimage-tiny-pipeline-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            copy_dir(&fixtures().join("pipeline/tiny"), &dir);
            copy_dir(
                &fixtures().join("text/real/text_encoder"),
                &dir.join("text_encoder"),
            );
            let tokenizer = dir.join("tokenizer");
            std::fs::create_dir_all(&tokenizer).unwrap();
            let mut json = Vec::new();
            let gz =
                std::fs::File::open(fixtures().join("text/tokenizer/tokenizer.json.gz")).unwrap();
            flate2::read::GzDecoder::new(gz)
                .read_to_end(&mut json)
                .unwrap();
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

fn copy_dir(from: &Path, to: &Path) {
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
