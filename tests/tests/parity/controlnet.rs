//! ControlNet (alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union, 1.0 / 2.0 / 2.1 layouts) end to
//! end against diffusers 0.42.1's `ZImageControlNetPipeline` and
//! `ZImageControlNetInpaintPipeline` on the tiny pipeline
//! (`tests/fixtures/make_controlnet_fixtures.py`), and the errors bad control inputs get.

use zimage_test_support as common;

use std::ops::ControlFlow;
use std::path::PathBuf;

use burn::tensor::{DType, Tensor};
use common::pipeline::{load_png, model_folder, psnr, LATENTS_REL_L2, MIN_PSNR_DB};
use common::{errors, fixtures, read_checkpoint, to_vec, write_safetensors, Case, B};
use serde::Deserialize;
use zimage_pipeline::{
    ControlInpaint, ControlOptions, GenerateOptions, InitImage, ModelFiles, PipelineError,
    ZImageControlNetConfig, ZImagePipeline,
};
use zimage_transformer::{TransformerError, ZImageControlNetModel, ZImageTransformer2DModel};

#[derive(Debug, Deserialize)]
struct Manifest {
    controlnets: std::collections::BTreeMap<String, ControlNetEntry>,
    cases: Vec<ControlCase>,
}

#[derive(Debug, Deserialize)]
struct ControlNetEntry {
    file: String,
    config: ZImageControlNetConfig,
    /// The transformer folder it fits, when not the tiny pipeline's.
    transformer: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ControlCase {
    name: String,
    pipeline: String,
    controlnet: String,
    args: serde_json::Value,
    expected: Vec<String>,
    latents: String,
}

fn dir() -> PathBuf {
    fixtures().join("controlnet")
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(dir().join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn pipeline() -> ZImagePipeline<B> {
    pipeline_in(model_folder())
}

fn pipeline_in(folder: PathBuf) -> ZImagePipeline<B> {
    let files = ModelFiles::open(folder).expect("model folder");
    ZImagePipeline::<B>::new(files, &Default::default(), DType::F32)
        .expect("pipeline")
        .keep_models(true)
}

/// The tiny pipeline with the transformer of `tests/fixtures/controlnet/{transformer}` (the deeper
/// one: 4 layers, 2 refiner layers).
fn pipeline_with(transformer: &str) -> ZImagePipeline<B> {
    assert_eq!(transformer, "deep_transformer", "the one other transformer");
    // Made once per test binary: tests running at once share it (a scratch folder is emptied
    // when made).
    static FOLDER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let folder = FOLDER.get_or_init(|| {
        let folder = common::scratch("controlnet-deep-pipeline");
        common::pipeline::copy_dir(&model_folder(), &folder);
        std::fs::remove_dir_all(folder.join("transformer")).unwrap();
        common::pipeline::copy_dir(&dir().join("deep_transformer"), &folder.join("transformer"));
        folder
    });
    pipeline_in(folder.clone())
}

/// The library call equivalent to a recorded diffusers call.
fn options(case: &ControlCase, pipeline: &ZImagePipeline<B>) -> GenerateOptions {
    let a = &case.args;
    let texts = |v: &serde_json::Value| -> Option<Vec<String>> {
        match v {
            serde_json::Value::String(s) => Some(vec![s.clone()]),
            serde_json::Value::Array(items) => Some(
                items
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect(),
            ),
            _ => None,
        }
    };
    let prompts = texts(&a["prompt"]).unwrap();
    let mut o = pipeline.options(prompts[0].clone());
    o.prompts = prompts;
    if let Some(negatives) = texts(&a["negative_prompt"]) {
        // One negative prompt is everyone's (diffusers repeats a string for the batch).
        o.negative_prompts = Some(if negatives.len() == 1 {
            vec![negatives[0].clone(); o.prompts.len()]
        } else {
            negatives
        });
    }
    // diffusers' `cfg_normalization=True` is a renormalisation factor of 1.
    o.cfg_normalization = match &a["cfg_normalization"] {
        serde_json::Value::Bool(b) => f32::from(u8::from(*b)),
        v => v.as_f64().unwrap_or(0.0) as f32,
    };
    o.cfg_truncation = a["cfg_truncation"].as_f64().unwrap_or(1.0);
    if let Some(n) = a["max_sequence_length"].as_u64() {
        o.max_sequence_length = n as usize;
    }
    o.width = a["width"].as_u64().unwrap() as usize;
    o.height = a["height"].as_u64().unwrap() as usize;
    o.num_inference_steps = a["num_inference_steps"].as_u64().unwrap() as usize;
    o.guidance_scale = a["guidance_scale"].as_f64().unwrap() as f32;
    o.num_images_per_prompt = a["num_images_per_prompt"].as_u64().unwrap_or(1) as usize;
    o.seed = a["seed"].as_u64().unwrap();
    let mut control =
        ControlOptions::new(load_png(&dir().join(a["control_image"].as_str().unwrap())));
    if let Some(scale) = a["controlnet_conditioning_scale"].as_f64() {
        control.scale = scale as f32;
    }
    if case.pipeline == "inpaint" {
        control.inpaint = Some(ControlInpaint {
            image: load_png(&dir().join(a["image"].as_str().unwrap())),
            mask: zimage_pipeline::resize::to_gray(
                &image::open(dir().join(a["mask"].as_str().unwrap())).unwrap(),
            ),
        });
    }
    o.control = Some(control);
    o
}

fn run(
    pipeline: &mut ZImagePipeline<B>,
    options: &GenerateOptions,
) -> zimage_pipeline::Generation<B> {
    pipeline
        .generate(options, &mut |_| ControlFlow::Continue(()))
        .unwrap()
}

#[test]
fn every_recorded_case_matches_diffusers() {
    let manifest = manifest();
    assert!(manifest.cases.len() >= 14);
    common::on_both_paths(|path| {
        let mut pipelines = std::collections::BTreeMap::new();
        let (mut worst_db, mut worst_rel) = (f64::INFINITY, 0f64);
        for case in &manifest.cases {
            let entry = &manifest.controlnets[&case.controlnet];
            let pipeline =
                pipelines
                    .entry(entry.transformer.clone())
                    .or_insert_with(|| match &entry.transformer {
                        Some(transformer) => pipeline_with(transformer),
                        None => pipeline(),
                    });
            // The config diffusers ran with, detected from the single file alone.
            let detected = pipeline
                .set_controlnet(Some(&dir().join(&entry.file)))
                .unwrap_or_else(|e| panic!("{}: {e}", case.name))
                .cloned()
                .unwrap();
            assert_eq!(detected, entry.config, "{}: detected config", case.name);
            let out = pipeline
                .generate(
                    &options(case, &pipeline),
                    &mut |_| ControlFlow::Continue(()),
                )
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let expected = Case::open(dir().join(&case.latents)).values("latents").0;
            let (rel, _) = errors(&to_vec(out.latents.clone()), &expected);
            worst_rel = worst_rel.max(rel);
            assert!(
                rel <= LATENTS_REL_L2,
                "{path:?} {}: latents rel L2 {rel:.2e}",
                case.name
            );
            assert_eq!(out.images.len(), case.expected.len(), "{}", case.name);
            for (image, file) in out.images.iter().zip(&case.expected) {
                let db = psnr(image, &load_png(&dir().join(file)));
                println!("{path:?} {file:<40} latents rel L2 {rel:.2e}, PSNR {db:.1} dB");
                worst_db = worst_db.min(db);
                assert!(db >= MIN_PSNR_DB, "{path:?} {file}: PSNR {db:.1} dB");
            }
        }
        println!("{path:?}: worst PSNR {worst_db:.1} dB, worst latents rel L2 {worst_rel:.2e}");
    });
}

/// The ControlNet changes the picture: without it (or at scale 0, which is exactly no
/// ControlNet) diffusers' controlled images are far away, so the parity above is the
/// ControlNet's.
#[test]
fn the_controlnet_is_what_makes_the_recorded_pictures() {
    let manifest = manifest();
    let mut pipeline = pipeline();
    let mut deep = pipeline_with("deep_transformer");
    for name in [
        "t2i_v1",
        "t2i_v2_1",
        "t2i_v2_0",
        "inpaint_v2_1",
        "deep_t2i_v2_0_two_prompts",
        "deep_t2i_v2_1_tall_resized",
    ] {
        let case = manifest.cases.iter().find(|c| c.name == name).unwrap();
        let entry = &manifest.controlnets[&case.controlnet];
        let pipeline = if entry.transformer.is_some() {
            &mut deep
        } else {
            &mut pipeline
        };
        pipeline
            .set_controlnet(Some(&dir().join(&entry.file)))
            .unwrap();
        let options = options(case, pipeline);
        let expected_image = load_png(&dir().join(&case.expected[0]));
        let expected = Case::open(dir().join(&case.latents)).values("latents").0;

        let mut plain = options.clone();
        plain.control = None;
        let without = run(pipeline, &plain);
        let (rel, _) = errors(&to_vec(without.latents.clone()), &expected);
        let db = psnr(&without.images[0], &expected_image);
        println!("{name}: without the ControlNet: latents rel L2 {rel:.2e}, PSNR {db:.1} dB");
        assert!(
            rel > 1e-2 && db < 40.0,
            "{name}: without the ControlNet, rel L2 {rel:.2e}, {db:.1} dB"
        );

        let mut zero = options.clone();
        zero.control.as_mut().unwrap().scale = 0.0;
        let at_zero = run(pipeline, &zero);
        assert_eq!(
            to_vec(at_zero.latents),
            to_vec(without.latents),
            "{name}: scale 0 is no ControlNet"
        );
    }
}

fn tiny_transformer_config() -> zimage_transformer::ZImageTransformerConfig {
    zimage_transformer::ZImageTransformerConfig::from_file(
        fixtures().join("pipeline/tiny/transformer/config.json"),
    )
    .unwrap()
}

fn controlnet_error(result: Result<impl std::fmt::Debug, PipelineError>) -> String {
    match result {
        Err(PipelineError::Transformer(e @ TransformerError::ControlNet { .. })) => e.to_string(),
        other => panic!("expected a ControlNet error, got {other:?}"),
    }
}

#[test]
fn files_that_are_no_controlnet_for_this_model_are_refused() {
    let mut pipeline = pipeline();
    let scratch = common::scratch("controlnet-errors");

    // A transformer given as a ControlNet.
    let transformer = fixtures().join("pipeline/tiny/transformer");
    let message = controlnet_error(pipeline.set_controlnet(Some(&transformer)));
    assert!(
        message.contains("is a Z-Image transformer, not a ControlNet"),
        "{message}"
    );

    // A ControlNet for a wider base model (the published one is 3840 wide, the tiny 32).
    let mut wide = read_checkpoint(&dir().join("v1.safetensors"));
    for (name, values, shape) in &mut wide {
        if name == "control_all_x_embedder.2-1.weight" {
            *shape = vec![48, 64];
            *values = vec![0.01; 48 * 64];
        }
    }
    let file = scratch.join("wide.safetensors");
    write_safetensors(&file, &wide, None);
    let message = controlnet_error(pipeline.set_controlnet(Some(&file)));
    assert!(
        message.contains("width 48") && message.contains("another base model"),
        "{message}"
    );
    assert!(message.contains("wide.safetensors"), "{message}");

    // Control layers that do not spread over the transformer's layers.
    let mut three = read_checkpoint(&dir().join("v1.safetensors"));
    let extra: Vec<_> = three
        .iter()
        .filter_map(|(n, v, s)| {
            n.strip_prefix("control_layers.1.")
                .map(|rest| (format!("control_layers.2.{rest}"), v.clone(), s.clone()))
        })
        .collect();
    three.extend(extra);
    let file = scratch.join("three.safetensors");
    write_safetensors(&file, &three, None);
    let message = controlnet_error(pipeline.set_controlnet(Some(&file)));
    assert!(
        message.contains("3 control layers do not spread evenly"),
        "{message}"
    );

    // Something else altogether.
    let file = scratch.join("other.safetensors");
    write_safetensors(
        &file,
        &[("encoder.weight".into(), vec![0.0; 4], vec![2, 2])],
        None,
    );
    let message = controlnet_error(pipeline.set_controlnet(Some(&file)));
    assert!(message.contains("not a Z-Image ControlNet"), "{message}");
}

#[test]
fn mismatched_layer_places_are_refused() {
    let mut pipeline = pipeline();
    let manifest = manifest();
    let file = dir().join("v1.safetensors");
    let config = manifest.controlnets["v1"].config.clone();
    for (places, expected) in [
        (
            vec![0, 5],
            "names layer 5, but the transformer has 2 layers",
        ),
        (vec![1, 0], "must start with 0"),
        (vec![0, 0], "repeats a layer"),
    ] {
        let bad = ZImageControlNetConfig {
            control_layers_places: places,
            ..config.clone()
        };
        let message = controlnet_error(pipeline.set_controlnet_with_config(&file, bad));
        assert!(message.contains(expected), "{message}");
    }
    let bad = ZImageControlNetConfig {
        control_refiner_layers_places: Some(vec![0, 1]),
        ..manifest.controlnets["v2_1"].config.clone()
    };
    let message =
        controlnet_error(pipeline.set_controlnet_with_config(&dir().join("v2_1.safetensors"), bad));
    assert!(message.contains("names refiner layer 1"), "{message}");

    // More places than the file has control layers: every missing tensor, reported at load.
    let base = tiny_transformer_config();
    let two_layers = ZImageControlNetConfig {
        control_layers_places: vec![0, 1],
        ..manifest.controlnets["v2_0"].config.clone()
    };
    let checkpoint = zimage_nn::Checkpoint::open(dir().join("v2_0.safetensors")).unwrap();
    let err = ZImageControlNetModel::<B>::load(
        &two_layers,
        &base,
        checkpoint,
        &Default::default(),
        DType::F32,
    )
    .unwrap_err();
    let report = match &err {
        TransformerError::Checkpoint(e) => e.report().expect("a mismatch report"),
        other => panic!("{other:?}"),
    };
    assert!(
        report
            .missing
            .iter()
            .any(|m| m.starts_with("control_layers.1.")),
        "{err}"
    );
}

#[test]
fn bad_control_requests_are_refused() {
    let mut pipeline = pipeline();
    let mut options = pipeline.options("a cat");
    (options.width, options.height, options.num_inference_steps) = (64, 64, 2);
    let control_image = load_png(&dir().join("inputs/control.png"));
    options.control = Some(ControlOptions::new(control_image.clone()));
    let invalid = |result: Result<zimage_pipeline::Generation<B>, PipelineError>| match result {
        Err(PipelineError::Invalid(message)) => message,
        other => panic!("expected an invalid request, got {other:?}"),
    };
    let message = invalid(pipeline.generate(&options, &mut |_| ControlFlow::Continue(())));
    assert!(message.contains("no ControlNet is set"), "{message}");

    pipeline
        .set_controlnet(Some(&dir().join("v1.safetensors")))
        .unwrap();
    let mut inpaint = options.clone();
    inpaint.control.as_mut().unwrap().inpaint = Some(ControlInpaint {
        image: load_png(&fixtures().join("pipeline/inputs/image.png")),
        mask: image::open(fixtures().join("pipeline/inputs/mask.png"))
            .unwrap()
            .to_luma8(),
    });
    let message = invalid(pipeline.generate(&inpaint, &mut |_| ControlFlow::Continue(())));
    assert!(
        message.contains("needs a 2.x ControlNet") && message.contains("1.0"),
        "{message}"
    );

    let mut with_init = options.clone();
    with_init.init_image = Some(InitImage {
        image: control_image,
        strength: 0.6,
        mask: None,
    });
    let message = invalid(pipeline.generate(&with_init, &mut |_| ControlFlow::Continue(())));
    assert!(message.contains("starts from noise"), "{message}");

    let mut nan = options.clone();
    nan.control.as_mut().unwrap().scale = f32::NAN;
    let message = invalid(pipeline.generate(&nan, &mut |_| ControlFlow::Continue(())));
    assert!(message.contains("not finite"), "{message}");
}

/// A control context of the wrong size or channel count is a typed error of the model.
#[test]
fn control_contexts_of_the_wrong_shape_are_refused() {
    let device = Default::default();
    let base = tiny_transformer_config();
    let transformer = ZImageTransformer2DModel::<B>::from_folder(
        fixtures().join("pipeline/tiny/transformer"),
        &device,
        DType::F32,
    )
    .unwrap();
    let controlnet = ZImageControlNetModel::<B>::from_file(
        dir().join("v2_1.safetensors"),
        &base,
        &device,
        DType::F32,
    )
    .unwrap();
    let latents = vec![Tensor::<B, 4>::zeros([16, 1, 8, 8], &device)];
    let captions = vec![Tensor::<B, 2>::zeros([5, base.cap_feat_dim], &device)];
    for shape in [[33, 1, 8, 6], [16, 1, 8, 8]] {
        let control = vec![Tensor::<B, 4>::zeros(shape, &device)];
        match controlnet.forward(&transformer, &latents, &[0.5], &captions, &control, 0.75) {
            Err(TransformerError::Input(message)) => {
                assert!(
                    message.contains("the ControlNet takes [33, 1, 8, 8]"),
                    "{message}"
                )
            }
            other => panic!("{shape:?}: {:?}", other.map(|r| r.len())),
        }
    }
    let control = vec![Tensor::<B, 4>::zeros([33, 1, 8, 8], &device)];
    let residuals = controlnet
        .forward(&transformer, &latents, &[0.5], &captions, &control, 0.75)
        .unwrap();
    assert_eq!(residuals.keys().copied().collect::<Vec<_>>(), [0, 1]);
}

/// The ControlNet's weights load with the transformer's, so the memory estimate counts them
/// there (and the VAE, which encodes the control image and stays loaded through the denoising,
/// when models are not kept).
#[test]
fn the_memory_estimate_counts_the_controlnet() {
    let manifest = manifest();
    let case = manifest
        .cases
        .iter()
        .find(|c| c.name == "t2i_v2_1")
        .unwrap();
    let file = dir().join(&manifest.controlnets[&case.controlnet].file);
    // The files' own sizes: bf16 ControlNet (held as bf16 or widened to f32), f32 VAE.
    let stored =
        |path: &std::path::Path| zimage_nn::Checkpoint::open(path).unwrap().weight_bytes() as u64;
    let vae = model_folder().join("vae/diffusion_pytorch_model.safetensors");
    for keep in [true, false] {
        let mut pipeline = pipeline().keep_models(keep);
        let mut plain = options(case, &pipeline);
        plain.control = None;
        let before = pipeline.estimate_memory(&plain).unwrap();
        pipeline.set_controlnet(Some(&file)).unwrap();
        let controlled = options(case, &pipeline);
        let after = pipeline.estimate_memory(&controlled).unwrap();
        let vae_bytes = if keep { 0 } else { stored(&vae) };
        let added = after.stages[1].weights - before.stages[1].weights;
        assert!(
            added >= stored(&file) + vae_bytes && added <= 2 * stored(&file) + vae_bytes,
            "keep_models {keep}: {added} bytes added for a {}-byte ControlNet file",
            stored(&file)
        );
        // Resident, every weight counts at once; staged, the peak is the largest stage (here the
        // text encoder, whose real vocabulary outweighs the tiny transformer and ControlNet).
        if keep {
            assert_eq!(after.peak() - before.peak(), added, "keep_models {keep}");
        } else {
            assert!(after.peak() >= before.peak());
        }
    }
}
