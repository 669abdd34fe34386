//! The pipelines end to end against diffusers 0.42.1 on a tiny random Z-Image
//! (`tests/fixtures/make_pipeline_fixtures.py`): the same seed gives the same picture.

mod common;

use std::ops::ControlFlow;

use burn::tensor::DType;
use common::pipeline::{cases, load_png, model_folder, psnr, PipelineCase};
use common::{errors, fixtures, to_vec, Case, B};
use zimage_pipeline::{GenerateOptions, InitImage, ModelFolder, ZImagePipeline};

/// The library call equivalent to a recorded diffusers call.
fn options(case: &PipelineCase, pipeline: &ZImagePipeline<B>) -> GenerateOptions {
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
            image::open(fixtures().join("pipeline").join(m))
                .unwrap()
                .to_luma8()
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

#[test]
fn every_recorded_case_matches_diffusers() {
    let device = Default::default();
    let folder = ModelFolder::open(model_folder()).expect("model folder");
    let mut pipeline = ZImagePipeline::<B>::new(folder, &device, DType::F32).expect("pipeline");
    let all = cases();
    assert!(all.len() >= 9);
    let mut worst = f64::INFINITY;
    for case in &all {
        let options = options(case, &pipeline);
        let out = pipeline
            .generate(&options, &mut |_| ControlFlow::Continue(()))
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let expected_latents = Case::open(fixtures().join("pipeline").join(&case.latents));
        let (rel, _) = errors(
            &to_vec(out.latents.clone()),
            &expected_latents.values("latents").0,
        );
        assert_eq!(out.images.len(), case.expected.len(), "{}", case.name);
        for (image, file) in out.images.iter().zip(&case.expected) {
            let expected = load_png(&fixtures().join("pipeline").join(file));
            let db = psnr(image, &expected);
            println!("{:<28} latents rel L2 {rel:.2e}, PSNR {db:.1} dB", file);
            worst = worst.min(db);
            assert!(db >= 40.0, "{file}: PSNR {db:.1} dB");
        }
    }
    println!("worst PSNR {worst:.1} dB");
}
