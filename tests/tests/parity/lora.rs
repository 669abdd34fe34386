//! LoRA-family adapters against diffusers 0.42.1 / PEFT and the LyCORIS formulas on the tiny
//! pipeline (`tests/fixtures/make_lora_fixtures.py`, `tests/fixtures/lora/README.md`).

use zimage_test_support as common;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use burn::tensor::DType;
use common::pipeline::{
    load_png, model_folder, options, psnr, PipelineCase, LATENTS_REL_L2, MIN_PSNR_DB,
};
use common::{errors, fixtures, to_vec, Case, B};
use zimage_lora::{LoraAdapter, LoraError};
use zimage_pipeline::{ModelFiles, ZImagePipeline};
use zimage_transformer::{ZImageTransformer2DModel, ZImageTransformerConfig};

fn lora_dir() -> PathBuf {
    fixtures().join("lora")
}

fn cases_json() -> serde_json::Value {
    let text = std::fs::read_to_string(lora_dir().join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tiny_config() -> ZImageTransformerConfig {
    ZImageTransformerConfig::from_file(fixtures().join("pipeline/tiny/transformer/config.json"))
        .unwrap()
}

fn open(file: &str) -> Arc<LoraAdapter> {
    Arc::new(LoraAdapter::open(lora_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}")))
}

#[test]
fn every_adapter_format_gives_the_reference_weight_changes() {
    let device = Default::default();
    let targets = ZImageTransformer2DModel::<B>::adapter_targets(&tiny_config(), &device).unwrap();
    let all = cases_json();
    let adapters = all["adapters"].as_array().unwrap();
    assert!(adapters.len() >= 10, "every format has a fixture");
    for entry in adapters {
        let file = entry["file"].as_str().unwrap();
        let resolved = zimage_lora::resolve(&[(open(file), 1.0)], &targets)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let expected = common::read_checkpoint(&lora_dir().join(entry["deltas"].as_str().unwrap()));
        let mut want: Vec<String> = expected
            .iter()
            .map(|(name, _, _)| name.trim_end_matches(".weight").to_string())
            .collect();
        want.sort();
        let got: Vec<String> = resolved.layers().map(str::to_string).collect();
        assert_eq!(got, want, "{file}: the layers it changes");
        for (name, values, shape) in &expected {
            let layer = name.trim_end_matches(".weight");
            let delta = resolved.delta(layer).unwrap();
            assert_eq!(&delta.shape().to_vec(), shape, "{file} {layer}");
            let (rel, max) = errors(&delta.to_dense(), values);
            assert!(
                rel < 1e-5,
                "{file} {layer}: ΔW rel L2 {rel:.2e} (max abs {max:.2e})"
            );
        }
        println!("{file}: {} layers match", expected.len());
    }
}

#[test]
fn adapter_pipelines_make_diffusers_images_and_come_off_exactly() {
    let all = cases_json();
    let cases: Vec<&serde_json::Value> = all["cases"].as_array().unwrap().iter().collect();
    assert!(cases.len() >= 15);
    common::on_both_paths(|path| {
        let device = Default::default();
        let files = ModelFiles::open(model_folder()).expect("model folder");
        // One pipeline for every case: adapters change between generations, nothing reloads.
        let mut pipeline = ZImagePipeline::<B>::new(files, &device, DType::F32)
            .unwrap()
            .keep_models(true);
        let mut first_plain: Option<Vec<f32>> = None;
        let mut worst = f64::INFINITY;
        for case in &cases {
            let name = case["name"].as_str().unwrap();
            let adapters: Vec<(Arc<LoraAdapter>, f32)> = case["adapters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| {
                    (
                        open(a["file"].as_str().unwrap()),
                        a["scale"].as_f64().unwrap() as f32,
                    )
                })
                .collect();
            pipeline
                .set_adapters(adapters)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let recorded = PipelineCase {
                name: name.to_string(),
                pipeline: "ZImagePipeline".into(),
                args: case["args"].clone(),
                expected: serde_json::from_value(case["expected"].clone()).unwrap(),
                latents: case["latents"].as_str().unwrap().to_string(),
            };
            let out = pipeline
                .generate(&options(&recorded, &pipeline), &mut |_| {
                    ControlFlow::Continue(())
                })
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let latents = to_vec(out.latents);
            let expected = Case::open(lora_dir().join(&recorded.latents))
                .values("latents")
                .0;
            let (rel, _) = errors(&latents, &expected);
            let image = &out.images[0];
            let db = psnr(image, &load_png(&lora_dir().join(&recorded.expected[0])));
            println!("{path:?} {name:<22} latents rel L2 {rel:.2e}, PSNR {db:.1} dB");
            worst = worst.min(db);
            assert!(
                rel <= LATENTS_REL_L2,
                "{path:?} {name}: latents rel L2 {rel:.2e}"
            );
            assert!(db >= MIN_PSNR_DB, "{path:?} {name}: PSNR {db:.1} dB");
            if name == "no_lora" {
                first_plain = Some(latents);
            }
        }
        // Every adapter set came and went on the same weights: without adapters the model
        // is bit for bit what it was before any.
        pipeline.set_adapters(Vec::new()).unwrap();
        let plain = cases.iter().find(|c| c["name"] == "no_lora").unwrap();
        let recorded = PipelineCase {
            name: "no_lora".into(),
            pipeline: "ZImagePipeline".into(),
            args: plain["args"].clone(),
            expected: Vec::new(),
            latents: String::new(),
        };
        let again = pipeline
            .generate(&options(&recorded, &pipeline), &mut |_| {
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(
            Some(to_vec(again.latents)),
            first_plain,
            "{path:?}: weights restored exactly"
        );
        println!("{path:?}: worst PSNR {worst:.1} dB");
    });
}

#[test]
fn files_that_do_not_fit_get_errors_naming_the_keys() {
    let err = LoraAdapter::open(lora_dir().join("not_a_lora.safetensors")).unwrap_err();
    assert!(matches!(err, LoraError::NotALora { .. }), "{err}");
    assert!(err.to_string().contains("is not a LoRA"), "{err}");

    let device = Default::default();
    let targets = ZImageTransformer2DModel::<B>::adapter_targets(&tiny_config(), &device).unwrap();
    let err = zimage_lora::resolve(&[(open("mismatched.safetensors"), 1.0)], &targets).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("layers.0.attention.to_q")
            && text.contains("[32, 31]")
            && text.contains("[32, 32]"),
        "{text}"
    );

    // An adapter for another model: every module that names no layer is listed.
    let mut wrong = Vec::new();
    for (name, shape) in [
        (
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
            [4, 32],
        ),
        (
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
            [96, 4],
        ),
        (
            "lora_unet_layers_0_attention_to_q.lora_down.weight",
            [4, 32],
        ),
        ("lora_unet_layers_0_attention_to_q.lora_up.weight", [32, 4]),
        (
            "lora_unet_single_blocks_1_linear1.lora_down.weight",
            [4, 32],
        ),
        ("lora_unet_single_blocks_1_linear1.lora_up.weight", [32, 4]),
    ] {
        wrong.push((
            name.to_string(),
            vec![0.01f32; shape[0] * shape[1]],
            shape.to_vec(),
        ));
    }
    let file = common::scratch("lora-errors").join("flux.safetensors");
    common::write_safetensors(&file, &wrong, None);
    let err = zimage_lora::resolve(
        &[(Arc::new(LoraAdapter::open(&file).unwrap()), 1.0)],
        &targets,
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("2 modules name no layer"), "{text}");
    assert!(
        text.contains("double_blocks_0_img_attn_qkv") && text.contains("single_blocks_1_linear1"),
        "{text}"
    );

    // Half a module.
    let file = common::scratch("lora-errors").join("half.safetensors");
    common::write_safetensors(&file, &wrong[2..3], None);
    let err = LoraAdapter::open(&file).unwrap_err();
    assert!(matches!(err, LoraError::Incomplete { .. }), "{err}");
}

/// On quantized (GGUF) weights the change runs beside the blocks, which stay as they are; the
/// result equals merging it into the same weights dequantized.
#[test]
fn adapters_on_gguf_weights_run_beside_the_blocks() {
    use burn::tensor::{Distribution, Tensor};
    use zimage_nn::{Checkpoint, Precision, Stored};
    let dir = fixtures().join("gguf/transformer");
    let config = ZImageTransformerConfig::from_file(dir.join("config.json")).unwrap();
    let (dim, hidden) = (config.dim, config.ffn_hidden_dim());
    // A kohya-named adapter on ComfyUI's fused qkv (split into q, k, v rows) and on w2.
    let mut seed = 1u32;
    let mut noise = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    let rank = 4;
    let tensors = vec![
        (
            "lora_unet_layers_0_attention_qkv.lora_down.weight".to_string(),
            noise(rank * dim),
            vec![rank, dim],
        ),
        (
            "lora_unet_layers_0_attention_qkv.lora_up.weight".to_string(),
            noise(3 * dim * rank),
            vec![3 * dim, rank],
        ),
        (
            "lora_unet_layers_0_attention_qkv.alpha".to_string(),
            vec![2.0],
            vec![],
        ),
        (
            "lora_unet_layers_0_feed_forward_w2.lora_down.weight".to_string(),
            noise(rank * hidden),
            vec![rank, hidden],
        ),
        (
            "lora_unet_layers_0_feed_forward_w2.lora_up.weight".to_string(),
            noise(dim * rank),
            vec![dim, rank],
        ),
    ];
    let file = common::scratch("lora-gguf").join("kohya.safetensors");
    common::write_safetensors(&file, &tensors, None);
    let adapter = Arc::new(LoraAdapter::open(&file).unwrap());
    common::on_both_paths(|path| {
        let device = Default::default();
        let targets = ZImageTransformer2DModel::<B>::adapter_targets(&config, &device).unwrap();
        let resolved = zimage_lora::resolve(&[(adapter.clone(), 0.8)], &targets).unwrap();
        let load = |precision: Precision| {
            let ck = Checkpoint::open(dir.join("z_image_q4_k.gguf")).unwrap();
            ZImageTransformer2DModel::<B>::load(&config, ck, &device, precision).unwrap()
        };
        let mut quantized = load(DType::F32.into());
        let mut dequantized = load(Precision::from(DType::F32).with_weights(Some(DType::F32)));
        let x = Tensor::<B, 3>::random([1, 5, dim], Distribution::Normal(0.0, 1.0), &device);
        let h = Tensor::<B, 3>::random([1, 5, hidden], Distribution::Normal(0.0, 1.0), &device);
        let before = to_vec(quantized.layers[0].attention.to_k.forward(x.clone()));
        quantized.set_adapters(&resolved);
        // The reference: the same change merged into the dequantized weights.
        let dtype = dequantized.dtype();
        dequantized.for_each_linear(&mut |path, linear| {
            linear.apply_delta(resolved.delta(path).as_ref(), true, &device, dtype)
        });
        let layer = &quantized.layers[0];
        match &layer.attention.to_k.weight {
            Stored::Host(m) => assert!(
                matches!(m.format(), zimage_nn::host::HostFormat::Quantized(_)) && m.is_mapped(),
                "{path:?}: the blocks stay quantized, in the file's pages"
            ),
            Stored::Quantized(_) => {}
            other => panic!("{path:?}: to_k held as {other:?}"),
        }
        for (name, q, d, input) in [
            (
                "to_q",
                &layer.attention.to_q,
                &dequantized.layers[0].attention.to_q,
                &x,
            ),
            (
                "to_k",
                &layer.attention.to_k,
                &dequantized.layers[0].attention.to_k,
                &x,
            ),
            (
                "to_v",
                &layer.attention.to_v,
                &dequantized.layers[0].attention.to_v,
                &x,
            ),
        ] {
            assert_eq!(
                q.delta_merged(),
                Some(false),
                "{path:?} {name}: beside the blocks"
            );
            assert_eq!(d.delta_merged(), Some(true), "{path:?} {name}: merged");
            let (rel, _) = errors(
                &to_vec(q.forward(input.clone())),
                &to_vec(d.forward(input.clone())),
            );
            assert!(
                rel < 1e-5,
                "{path:?} {name}: beside vs merged rel L2 {rel:.2e}"
            );
        }
        // w2 (682 columns, not whole Q4_K blocks) is stored in F16 and is a float weight: the
        // change is merged into it, and where it is held in f16 rounded to f16.
        let w2 = (
            &layer.feed_forward.w2,
            &dequantized.layers[0].feed_forward.w2,
        );
        assert!(!matches!(w2.0.weight, Stored::Quantized(_)));
        let (rel, _) = errors(
            &to_vec(w2.0.forward(h.clone())),
            &to_vec(w2.1.forward(h.clone())),
        );
        assert!(
            rel < 2e-3,
            "{path:?} w2: merged in f16 vs in f32 rel L2 {rel:.2e}"
        );
        assert_eq!(layer.feed_forward.w1.delta_merged(), None);
        // The change is real, and comes off exactly.
        let with = to_vec(layer.attention.to_k.forward(x.clone()));
        assert!(
            errors(&with, &before).0 > 1e-3,
            "{path:?}: the adapter changes to_k"
        );
        quantized.set_adapters(&zimage_lora::Resolved::none());
        assert_eq!(
            to_vec(quantized.layers[0].attention.to_k.forward(x.clone())),
            before
        );
    });
}
