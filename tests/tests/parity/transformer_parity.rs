//! ZImageTransformer2DModel against diffusers 0.42.1 on tiny random models
//! (`tests/fixtures/make_transformer_fixtures.py`).

use zimage_test_support as common;

use std::path::Path;

use burn::tensor::DType;
use common::{errors, fixtures, to_vec, Case, B};
use zimage_nn::{AttentionImpl, Checkpoint};
use zimage_transformer::{LayerResiduals, ZImageTransformer2DModel, ZImageTransformerConfig};

const CASES: &[(&str, &[&str])] = &[
    (
        "a",
        &[
            "batch1",
            "batch2_caption_lengths",
            "nonsquare",
            "mixed_sizes",
            "exact32",
            "residuals",
        ],
    ),
    ("b", &["batch1", "mixed_sizes", "nonsquare"]),
    ("c", &["batch2_caption_lengths", "exact32"]),
];

fn folder(config: &str) -> std::path::PathBuf {
    fixtures().join("transformer").join(config)
}

/// Runs every case of `config` through `model`, comparing with `key` outputs; returns the worst
/// (relative L2, max abs) error.
fn run_cases(
    config: &str,
    model: &ZImageTransformer2DModel<B>,
    key: &str,
    cases: &[&str],
) -> (f64, f64) {
    let device = Default::default();
    let mut worst = (0f64, 0f64);
    for case_name in cases {
        let case = Case::open(
            folder(config)
                .join("cases")
                .join(format!("{case_name}.safetensors")),
        );
        let n = case.count("latent");
        let latents: Vec<_> = (0..n)
            .map(|i| case.tensor::<4>(&format!("latent.{i}"), &device))
            .collect();
        let captions: Vec<_> = (0..n)
            .map(|i| case.tensor::<2>(&format!("caption.{i}"), &device))
            .collect();
        let (timesteps, _) = case.values("timesteps");
        // ControlNet-style residuals after chosen main layers, when the case has them.
        let residuals: LayerResiduals<B> = (0..)
            .map_while(|k| {
                let name = format!("residual.{k}");
                case.has(&name)
                    .then(|| (k, case.tensor::<3>(&name, &device)))
            })
            .collect();
        let out = model
            .forward_with_residuals(&latents, &timesteps, &captions, &residuals)
            .expect("forward");
        assert_eq!(out.len(), n);
        for (i, o) in out.into_iter().enumerate() {
            let (expected, shape) = case.values(&format!("{key}.{i}"));
            assert_eq!(
                o.dims().to_vec(),
                shape,
                "{config}/{case_name} item {i} shape"
            );
            let (rel, max) = errors(&to_vec(o), &expected);
            println!("{config}/{case_name}[{i}] vs {key}: rel L2 {rel:.3e}, max abs {max:.3e}");
            worst = (worst.0.max(rel), worst.1.max(max));
        }
    }
    worst
}

#[test]
fn f32_matches_diffusers() {
    // With the host kernels (the CPU's) and without them (the generic path GPUs run).
    common::on_both_paths(|path| {
        let device = Default::default();
        for (config, cases) in CASES {
            let model = ZImageTransformer2DModel::<B>::from_folder(
                folder(config).join("transformer"),
                &device,
                DType::F32,
            )
            .expect("load");
            let (rel, max) = run_cases(config, &model, "out", cases);
            println!("{path:?} config {config}: rel L2 {rel:.3e}, max abs {max:.3e}");
            assert!(
                rel <= 1e-5 && max <= 1e-4,
                "{path:?} config {config}: rel L2 {rel:.3e}, max abs {max:.3e}"
            );
        }
    });
}

#[test]
fn every_attention_path_matches() {
    // The default (`Auto`) is the host path on ndarray; burn's own op and the reference too.
    let device = Default::default();
    for imp in [
        AttentionImpl::Backend,
        AttentionImpl::Reference,
        AttentionImpl::Auto,
    ] {
        let model = ZImageTransformer2DModel::<B>::from_folder(
            folder("a").join("transformer"),
            &device,
            DType::F32,
        )
        .expect("load")
        .with_attention(imp);
        let (rel, max) = run_cases("a", &model, "out", CASES[0].1);
        assert!(
            rel <= 1e-5 && max <= 1e-4,
            "{imp:?}: rel L2 {rel:.3e}, max abs {max:.3e}"
        );
    }
}

#[test]
fn bf16_checkpoint_loads_into_f32() {
    let device = Default::default();
    for (config, cases) in &CASES[..2] {
        let model = ZImageTransformer2DModel::<B>::from_folder(
            folder(config).join("transformer-bf16"),
            &device,
            DType::F32,
        )
        .expect("load bf16");
        // Exact cast: equal to diffusers run on the same bf16-rounded weights.
        let (rel, max) = run_cases(config, &model, "out_bf16w", cases);
        assert!(
            rel <= 1e-5 && max <= 1e-4,
            "config {config}: rel L2 {rel:.3e}, max abs {max:.3e}"
        );
        // And within bf16 rounding of the f32 model.
        let (rel, _) = run_cases(config, &model, "out", cases);
        assert!(
            rel <= 2e-2,
            "config {config}: rel L2 {rel:.3e} against the f32 weights"
        );
    }
}

#[test]
fn original_single_file_matches() {
    common::on_both_paths(|path| {
        let device = Default::default();
        let dir = folder("a");
        let config = ZImageTransformerConfig::from_file(dir.join("transformer/config.json"))
            .expect("config");
        let checkpoint = Checkpoint::open(dir.join("original-bf16.safetensors")).expect("open");
        assert!(checkpoint.contains("model.diffusion_model.layers.0.attention.qkv.weight"));
        let model = ZImageTransformer2DModel::<B>::load(&config, checkpoint, &device, DType::F32)
            .expect("load");
        let (rel, max) = run_cases("a", &model, "out_bf16w", &["batch1", "mixed_sizes"]);
        assert!(
            rel <= 1e-5 && max <= 1e-4,
            "{path:?}: rel L2 {rel:.3e}, max abs {max:.3e}"
        );
    });
}

#[test]
fn float64_reference_is_close_to_f32() {
    // Sanity of the fixtures: diffusers' own f32 and f64 runs agree far below the bar.
    let case = Case::open(Path::new(&folder("a")).join("cases/batch1.safetensors"));
    let (rel, _) = errors(&case.values("out.0").0, &case.values("out64.0").0);
    println!("diffusers f32 vs f64: rel L2 {rel:.3e}");
    assert!(rel < 1e-5);
}
