//! The pipelines end to end against diffusers 0.42.1 on a tiny random Z-Image
//! (`tests/fixtures/make_pipeline_fixtures.py`): the same seed gives the same picture.

mod common;

use std::ops::ControlFlow;

use burn::tensor::DType;
use common::pipeline::{cases, load_png, model_folder, options, psnr};
use common::{errors, fixtures, to_vec, Case, B};
use zimage_pipeline::{ModelFolder, ZImagePipeline};

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
