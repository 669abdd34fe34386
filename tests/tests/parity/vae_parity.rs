//! AutoencoderKL against diffusers 0.42.1 on tiny random models
//! (`tests/fixtures/make_vae_fixtures.py`, described in `tests/fixtures/vae/README.md`).

use zimage_test_support as common;

use std::path::PathBuf;

use burn::tensor::{DType, Tensor, TensorData};
use common::{errors, fixtures, to_vec, Case, B};
use zimage_nn::Checkpoint;
use zimage_vae::image_crate::RgbImage;
use zimage_vae::{
    checkpoint, image_to_tensor, tensor_to_images, AttentionImpl, AutoencoderKL,
    AutoencoderKLConfig, Naming, ProjectionLayout, TilingConfig,
};

/// Every config and its cases.
const CASES: &[(&str, &[&str])] = &[
    (
        "a",
        &["square", "nonsquare_batch2", "tiled", "tiled_mismatch"],
    ),
    ("b", &["square", "nonsquare", "tiled", "tiled_odd"]),
    (
        "c",
        &["square", "nonsquare_batch2", "tiled", "tiled_overlap"],
    ),
    ("d", &["square", "nonsquare", "tiled"]),
];

/// Untiled bar: a correct f32 port lands around 1e-6 (diffusers' own f32 and f64 differ by ~4e-7).
const UNTILED_REL: f64 = 1e-5;
/// Tiled bar against diffusers' tiled output with the same tile settings.
const TILED_REL: f64 = 1e-4;

fn folder(config: &str) -> PathBuf {
    fixtures().join("vae").join(config)
}

fn case(config: &str, name: &str) -> Case {
    Case::open(
        folder(config)
            .join("cases")
            .join(format!("{name}.safetensors")),
    )
}

fn load(config: &str, sub: &str) -> AutoencoderKL<B> {
    AutoencoderKL::<B>::from_folder(folder(config).join(sub), &Default::default(), DType::F32)
        .unwrap_or_else(|e| panic!("load {config}/{sub}: {e}"))
}

/// The worst (relative L2, max abs) over several comparisons.
#[derive(Default, Clone, Copy)]
struct Worst(f64, f64);

impl Worst {
    /// Compares `actual` with the recorded `key`, prints and records the errors.
    fn check(&mut self, label: &str, actual: Tensor<B, 4>, case: &Case, key: &str) {
        let (expected, shape) = case.values(key);
        assert_eq!(actual.dims().to_vec(), shape, "{label} {key}: shape");
        let (rel, max) = errors(&to_vec(actual), &expected);
        println!("{label:<28} {key:<14} rel L2 {rel:.3e}  max abs {max:.3e}");
        self.0 = self.0.max(rel);
        self.1 = self.1.max(max);
    }
}

/// Untiled encode (mean, logvar, sample with the recorded noise) and decode of one case, against
/// the recorded outputs with suffix `suffix` (`""`, `"_bf16w"`).
fn run_untiled(model: &AutoencoderKL<B>, config: &str, name: &str, suffix: &str) -> Worst {
    let device = Default::default();
    let c = case(config, name);
    let label = format!("{config}/{name}");
    let mut worst = Worst::default();
    let posterior = model.encode(c.tensor("image", &device)).expect("encode");
    worst.check(&label, posterior.mean.clone(), &c, &format!("mean{suffix}"));
    worst.check(
        &label,
        posterior.logvar.clone(),
        &c,
        &format!("logvar{suffix}"),
    );
    if suffix.is_empty() {
        let sample = posterior
            .sample(c.tensor("noise", &device))
            .expect("sample");
        worst.check(&label, sample, &c, "sample");
    }
    let decoded = model.decode(c.tensor("latents", &device)).expect("decode");
    worst.check(&label, decoded, &c, &format!("decoded{suffix}"));
    worst
}

fn tiling_of(c: &Case) -> TilingConfig {
    let (tile, _) = c.values("tile");
    TilingConfig {
        tile_sample_min_size: tile[0] as usize,
        tile_latent_min_size: tile[1] as usize,
        tile_overlap_factor: tile[2] as f64,
    }
}

#[test]
fn f32_matches_diffusers() {
    // With the host kernels (the CPU's) and without them (the generic path GPUs run).
    common::on_both_paths(|path| {
        let mut all = Worst::default();
        for (config, cases) in CASES {
            let model = load(config, "vae");
            let mut worst = Worst::default();
            for name in cases.iter() {
                let w = run_untiled(&model, config, name, "");
                worst = Worst(worst.0.max(w.0), worst.1.max(w.1));
            }
            println!(
                "{path:?} config {config}: worst rel L2 {:.3e}, max abs {:.3e}",
                worst.0, worst.1
            );
            assert!(
                worst.0 <= UNTILED_REL,
                "{path:?} config {config}: rel L2 {:.3e}",
                worst.0
            );
            all = Worst(all.0.max(worst.0), all.1.max(worst.1));
        }
        println!(
            "{path:?} untiled, all configs: worst rel L2 {:.3e}, max abs {:.3e}",
            all.0, all.1
        );
    });
}

#[test]
fn tiled_matches_diffusers_tiled() {
    let device = Default::default();
    let mut all = Worst::default();
    for (config, cases) in CASES {
        let model = load(config, "vae");
        for name in cases.iter().filter(|n| n.starts_with("tiled")) {
            let c = case(config, name);
            let tiling = tiling_of(&c);
            let label = format!(
                "{config}/{name} {}/{}/{}",
                tiling.tile_sample_min_size,
                tiling.tile_latent_min_size,
                tiling.tile_overlap_factor
            );
            let mut worst = Worst::default();
            let posterior = model
                .encode_tiled(c.tensor("image", &device), &tiling)
                .expect("tiled encode");
            worst.check(&label, posterior.mean, &c, "tiled_mean");
            worst.check(&label, posterior.logvar, &c, "tiled_logvar");
            let decoded = model
                .decode_tiled(c.tensor("latents", &device), &tiling)
                .expect("tiled decode");
            worst.check(&label, decoded, &c, "tiled_decoded");
            assert!(worst.0 <= TILED_REL, "{label}: rel L2 {:.3e}", worst.0);
            all = Worst(all.0.max(worst.0), all.1.max(worst.1));
        }
    }
    println!(
        "tiled, all configs: worst rel L2 {:.3e}, max abs {:.3e}",
        all.0, all.1
    );
}

#[test]
fn tiled_calls_on_small_inputs_are_untiled() {
    // Config c's default tiles (its sample_size, 64 pixels) hold the 32x32 case whole.
    let device = Default::default();
    let model = load("c", "vae");
    let tiling = model.config().default_tiling();
    assert_eq!(tiling.tile_sample_min_size, 64);
    let c = case("c", "square");
    let mut worst = Worst::default();
    let posterior = model
        .encode_tiled(c.tensor("image", &device), &tiling)
        .expect("encode");
    worst.check("c/square default tiling", posterior.mean, &c, "mean");
    let decoded = model
        .decode_tiled(c.tensor("latents", &device), &tiling)
        .expect("decode");
    worst.check("c/square default tiling", decoded, &c, "decoded");
    assert!(worst.0 <= UNTILED_REL);
}

#[test]
fn reference_attention_matches_too() {
    let model = load("c", "vae").with_attention(AttentionImpl::Reference);
    let w = run_untiled(&model, "c", "square", "");
    assert!(w.0 <= UNTILED_REL, "rel L2 {:.3e}", w.0);
    let model = load("a", "vae").with_attention(AttentionImpl::Backend);
    let w = run_untiled(&model, "a", "nonsquare_batch2", "");
    assert!(w.0 <= UNTILED_REL, "rel L2 {:.3e}", w.0);
}

#[test]
fn bf16_checkpoint_loads_into_f32() {
    let model = load("c", "vae-bf16");
    for name in ["square", "nonsquare_batch2"] {
        // Exact cast: equal to diffusers run on the same bf16-rounded weights.
        let w = run_untiled(&model, "c", name, "_bf16w");
        assert!(w.0 <= UNTILED_REL, "rel L2 {:.3e}", w.0);
    }
}

#[test]
fn bfl_checkpoint_matches() {
    let dir = folder("c");
    let config = AutoencoderKLConfig::from_file(dir.join("vae/config.json")).expect("config");
    let checkpoint = Checkpoint::open(dir.join("ae-bfl.safetensors")).expect("open");
    assert!(checkpoint.contains("decoder.up.3.upsample.conv.weight"));
    let format = checkpoint::detect(&checkpoint).expect("format");
    assert_eq!(format.naming, Naming::Bfl);
    assert_eq!(format.attention, ProjectionLayout::Conv1x1);
    let model = AutoencoderKL::<B>::load(&config, checkpoint, &Default::default(), DType::F32)
        .expect("load");
    for name in ["square", "nonsquare_batch2"] {
        let w = run_untiled(&model, "c", name, "_bf16w");
        assert!(w.0 <= UNTILED_REL, "rel L2 {:.3e}", w.0);
    }
}

#[test]
fn float64_reference_is_close_to_f32() {
    // Sanity of the fixtures: diffusers' own f32 and f64 runs agree far below the bar.
    for config in ["a", "b", "c", "d"] {
        let c = case(config, "square");
        for key in ["mean", "logvar", "decoded"] {
            let (rel, _) = errors(&c.values(key).0, &c.values(&format!("{key}64")).0);
            println!("{config}/square diffusers f32 vs f64 {key}: rel L2 {rel:.3e}");
            assert!(rel < 2e-6);
        }
    }
}

#[test]
fn image_conversions_match_diffusers() {
    let device = Default::default();
    // preprocess: RGB8 -> [-1, 1], bit for bit
    let c = case("a", "square");
    let (rgb, shape) = c.values("rgb");
    let (h, w) = (shape[0], shape[1]);
    let bytes: Vec<u8> = rgb.iter().map(|&v| v as u8).collect();
    let image = RgbImage::from_raw(w as u32, h as u32, bytes).expect("image");
    let tensor = image_to_tensor::<B>(&image, &device, DType::F32);
    let (expected, shape) = c.values("rgb_tensor");
    assert_eq!(tensor.dims().to_vec(), shape);
    assert_eq!(to_vec(tensor), expected, "preprocess differs");

    // postprocess: diffusers' decoded tensor -> the same bytes; ours -> the same but for values
    // that f32 rounding moves across a .5 boundary
    for (config, name) in [("a", "square"), ("b", "nonsquare"), ("c", "square")] {
        let c = case(config, name);
        let (pixels, shape) = c.values("pixels");
        let decoded: Tensor<B, 4> = c.tensor("decoded", &device);
        let images = tensor_to_images(decoded).expect("postprocess");
        let ours: Vec<f32> = images
            .iter()
            .flat_map(|i| i.as_raw().iter().map(|&v| v as f32))
            .collect();
        assert_eq!(images.len(), shape[0]);
        assert_eq!(ours, pixels, "{config}/{name}: postprocess differs");

        let model = load(config, "vae");
        let decoded = model.decode(c.tensor("latents", &device)).expect("decode");
        let ours: Vec<f32> = tensor_to_images(decoded)
            .expect("postprocess")
            .iter()
            .flat_map(|i| i.as_raw().iter().map(|&v| v as f32))
            .collect();
        let off: Vec<f32> = ours
            .iter()
            .zip(&pixels)
            .map(|(a, b)| (a - b).abs())
            .filter(|d| *d > 0.0)
            .collect();
        println!(
            "{config}/{name}: {} of {} bytes differ from diffusers' (max {})",
            off.len(),
            pixels.len(),
            off.iter().cloned().fold(0.0, f32::max)
        );
        assert!(off.iter().all(|&d| d <= 1.0) && off.len() * 100 <= pixels.len());
    }
}

#[test]
fn latent_scaling_round_trips() {
    let device = Default::default();
    let model = load("a", "vae");
    let config = model.config().clone();
    assert_eq!((config.scaling_factor, config.shift()), (0.5, 0.1));
    let z: Tensor<B, 4> = Tensor::from_data(
        TensorData::new(vec![0.1f32, -2.0, 3.5, 0.0], [1, 4, 1, 1]),
        (&device, DType::F32),
    );
    let scaled = to_vec(model.scale_latents(z.clone()));
    let expected: Vec<f32> = [0.1f32, -2.0, 3.5, 0.0]
        .iter()
        .map(|v| (v - 0.1) * 0.5)
        .collect();
    assert_eq!(scaled, expected);
    let back = to_vec(model.unscale_latents(model.scale_latents(z.clone())));
    let (rel, _) = errors(&back, &to_vec(z));
    assert!(rel < 1e-7);
}
