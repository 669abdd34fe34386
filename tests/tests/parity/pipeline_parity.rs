//! The pipelines end to end against diffusers 0.42.1 on a tiny random Z-Image
//! (`tests/fixtures/make_pipeline_fixtures.py`): the same seed gives the same picture.

use zimage_test_support as common;

use std::ops::ControlFlow;

use burn::tensor::DType;
use common::pipeline::{cases, load_png, model_folder, options, psnr, LATENTS_REL_L2, MIN_PSNR_DB};
use common::{errors, fixtures, to_vec, Case, B};
use zimage_pipeline::{ModelFiles, ZImagePipeline};

#[test]
fn every_recorded_case_matches_diffusers() {
    // With the host kernels (the CPU's) and without them (the generic path GPUs run).
    common::on_both_paths(|path| {
        let device = Default::default();
        let files = ModelFiles::open(model_folder()).expect("model folder");
        let mut pipeline = ZImagePipeline::<B>::new(files, &device, DType::F32).expect("pipeline");
        let all = cases();
        assert!(all.len() >= 9);
        let (mut worst_db, mut worst_rel) = (f64::INFINITY, 0f64);
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
            worst_rel = worst_rel.max(rel);
            assert!(
                rel <= LATENTS_REL_L2,
                "{path:?} {}: final latents rel L2 {rel:.2e}",
                case.name
            );
            assert_eq!(out.images.len(), case.expected.len(), "{}", case.name);
            for (image, file) in out.images.iter().zip(&case.expected) {
                let expected = load_png(&fixtures().join("pipeline").join(file));
                let db = psnr(image, &expected);
                println!("{path:?} {file:<28} latents rel L2 {rel:.2e}, PSNR {db:.1} dB");
                worst_db = worst_db.min(db);
                assert!(db >= MIN_PSNR_DB, "{path:?} {file}: PSNR {db:.1} dB");
            }
        }
        println!("{path:?}: worst PSNR {worst_db:.1} dB, worst latents rel L2 {worst_rel:.2e}");
    });
}

/// `shift` replaces the scheduler config's: shift S over sigmas σ is shift 1 over
/// `S σ / (1 + (S - 1) σ)`, and another shift gives another picture.
#[test]
fn shift_replaces_the_scheduler_configs() {
    let device = Default::default();
    let files = ModelFiles::open(model_folder()).expect("model folder");
    let mut pipeline = ZImagePipeline::<B>::new(files, &device, DType::F32)
        .unwrap()
        .keep_models(true);
    let mut options = pipeline.options("a cat holding a sign");
    (
        options.width,
        options.height,
        options.num_inference_steps,
        options.seed,
    ) = (64, 64, 3, 5);
    let mut run = |options: &zimage_pipeline::GenerateOptions| {
        to_vec(
            pipeline
                .generate(options, &mut |_| ControlFlow::Continue(()))
                .unwrap()
                .latents,
        )
    };
    let default = run(&options);
    let shift = 6.0f32;
    let sigmas = zimage_scheduler::z_image_sigmas(3);
    let mut shifted = options.clone();
    shifted.shift = Some(shift as f64);
    let six = run(&shifted);
    let mut by_hand = options.clone();
    by_hand.shift = Some(1.0);
    by_hand.sigmas = Some(
        sigmas
            .iter()
            .map(|&s| shift * s / (1.0 + (shift - 1.0) * s))
            .collect(),
    );
    let (rel, _) = errors(&six, &run(&by_hand));
    assert!(
        rel < 1e-5,
        "shift 6 vs shift 1 on shifted sigmas: rel L2 {rel:.2e}"
    );
    let (rel, _) = errors(&six, &default);
    assert!(rel > 1e-3, "shift 6 vs the config's 3: rel L2 {rel:.2e}");
    let mut three = options.clone();
    three.shift = Some(3.0);
    assert_eq!(run(&three), default, "shift 3 is the tiny config's");
}
