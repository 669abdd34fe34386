//! One parity fixture per component and two end-to-end pipeline cases (one with a GGUF
//! transformer) on the GPU backends.
//!
//! - wgpu in f32, always built: CI runs it on Mesa's software Vulkan driver (lavapipe, installed by
//!   `.ci/run`, which then sets `ZIMAGE_REQUIRE_WGPU=1`), with the CPU parity tests' bars
//!   (components 1e-5 relative L2, final latents 1e-4, images PSNR >= 60 dB; lavapipe measured
//!   3e-7..2e-6 and identical images on 2026-12-02).
//! - cuda in f32 and bf16, with `--features cuda` (`scripts/device-check.sh` on a GPU machine;
//!   `ZIMAGE_REQUIRE_CUDA=1` there). bf16 is compared with diffusers' f32 outputs, within bf16's
//!   rounding. The cuda bars are estimates: no GPU has run them yet.
//!
//! Without the variable, a machine where the backend has no device skips with a message; with it, a
//! missing device is a failure.

use zimage_test_support as common;

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use common::pipeline::{cases, load_png, model_folder, options, psnr, LATENTS_REL_L2, MIN_PSNR_DB};
use common::{errors, fixtures, to_vec, Case};
use zimage_pipeline::{ModelFiles, ZImagePipeline};
use zimage_text::Qwen3TextEncoder;
use zimage_transformer::ZImageTransformer2DModel;
use zimage_vae::AutoencoderKL;

/// What one backend and dtype is held to.
#[derive(Clone, Copy)]
struct Bar {
    /// Components: relative L2 against diffusers/transformers.
    rel_l2: f64,
    /// End to end: the final latents' relative L2 against diffusers'.
    latents_rel_l2: f64,
    /// End to end: PSNR against diffusers' image.
    psnr_db: f64,
}

/// The bars of the CPU parity tests.
const F32: Bar = Bar {
    rel_l2: 1e-5,
    latents_rel_l2: LATENTS_REL_L2,
    psnr_db: MIN_PSNR_DB,
};

/// The default device of `BK`, if it answers; `require` names the variable that makes a missing
/// device a failure.
fn device<BK: Backend>(require: &str) -> Option<BK::Device> {
    let device = BK::Device::default();
    let probe = std::panic::catch_unwind(AssertUnwindSafe(|| {
        Tensor::<BK, 1>::from_floats([1.0, 2.0], &device)
            .sum()
            .into_scalar()
            .to_string()
    }));
    match probe {
        Ok(sum) => {
            assert_eq!(sum, "3", "1 + 2 on {}", BK::name(&device));
            Some(device)
        }
        Err(_) if std::env::var_os(require).is_some() => {
            panic!("{require} is set, but the backend's device did not answer")
        }
        Err(_) => {
            eprintln!("skipped: no device answered ({require}=1 makes this a failure)");
            None
        }
    }
}

fn check(label: &str, actual: Vec<f32>, expected: &[f32], bar: Bar) {
    let (rel, max) = errors(&actual, expected);
    println!("{label}: rel L2 {rel:.3e}, max abs {max:.3e}");
    assert!(rel <= bar.rel_l2, "{label}: rel L2 {rel:.3e}");
}

fn transformer<BK: zimage_nn::ZBackend>(device: &BK::Device, dtype: DType, bar: Bar) {
    let dir = fixtures().join("transformer/a");
    let model = ZImageTransformer2DModel::<BK>::from_folder(dir.join("transformer"), device, dtype)
        .expect("load");
    // Two items with different caption lengths: the key-padding mask is exercised too.
    let case = Case::open(dir.join("cases/batch2_caption_lengths.safetensors"));
    let n = case.count("latent");
    let latents: Vec<Tensor<BK, 4>> = (0..n)
        .map(|i| case.tensor_on(&format!("latent.{i}"), device))
        .collect();
    let captions: Vec<Tensor<BK, 2>> = (0..n)
        .map(|i| case.tensor_on(&format!("caption.{i}"), device))
        .collect();
    let (timesteps, _) = case.values("timesteps");
    let out = model
        .forward(&latents, &timesteps, &captions)
        .expect("forward");
    for (i, o) in out.into_iter().enumerate() {
        let label = format!("{} {dtype:?} transformer a[{i}]", BK::name(device));
        check(&label, to_vec(o), &case.values(&format!("out.{i}")).0, bar);
    }
}

fn vae<BK: zimage_nn::ZBackend>(device: &BK::Device, dtype: DType, bar: Bar) {
    let dir = fixtures().join("vae/a");
    let model = AutoencoderKL::<BK>::from_folder(dir.join("vae"), device, dtype).expect("load");
    let case = Case::open(dir.join("cases/square.safetensors"));
    let label = format!("{} {dtype:?} vae", BK::name(device));
    let posterior = model
        .encode(case.tensor_on("image", device))
        .expect("encode");
    check(
        &format!("{label} encode mean"),
        to_vec(posterior.mean),
        &case.values("mean").0,
        bar,
    );
    let decoded = model
        .decode(case.tensor_on("latents", device))
        .expect("decode");
    check(
        &format!("{label} decode"),
        to_vec(decoded),
        &case.values("decoded").0,
        bar,
    );
}

fn text_encoder<BK: zimage_nn::ZBackend>(device: &BK::Device, dtype: DType, bar: Bar) {
    let dir = fixtures().join("text/a");
    let model =
        Qwen3TextEncoder::<BK>::from_folder(dir.join("text_encoder"), device, dtype).expect("load");
    let case = Case::open(dir.join("cases/batch3.safetensors"));
    let batch: Vec<Vec<u32>> = (0..case.count("ids"))
        .map(|i| case.ids(&format!("ids.{i}")))
        .collect();
    let features = model.encode(&batch).expect("encode");
    for (i, f) in features.into_iter().enumerate() {
        let label = format!("{} {dtype:?} text encoder batch3[{i}]", BK::name(device));
        check(
            &label,
            to_vec(f),
            &case.values(&format!("features.{i}")).0,
            bar,
        );
    }
}

fn pipeline<BK: zimage_nn::ZBackend>(device: &BK::Device, dtype: DType, bar: Bar) {
    let folder = ModelFiles::open(model_folder()).expect("model folder");
    let mut pipeline = ZImagePipeline::<BK>::new(folder, device, dtype).expect("pipeline");
    // Text-to-image with guidance, a negative prompt, cfg normalization and truncation: every
    // stage and the batch-of-two transformer path.
    let all = cases();
    let case = all
        .iter()
        .find(|c| c.name == "t2i_guidance")
        .expect("the t2i_guidance case");
    let out = pipeline
        .generate(
            &options(case, &pipeline),
            &mut |_| ControlFlow::Continue(()),
        )
        .expect("generate");
    let expected_latents = Case::open(fixtures().join("pipeline").join(&case.latents));
    check(
        &format!("{} {dtype:?} {} final latents", BK::name(device), case.name),
        to_vec(out.latents.clone()),
        &expected_latents.values("latents").0,
        Bar {
            rel_l2: bar.latents_rel_l2,
            ..bar
        },
    );
    for (image, file) in out.images.iter().zip(&case.expected) {
        let db = psnr(image, &load_png(&fixtures().join("pipeline").join(file)));
        println!("{} {dtype:?} {file}: PSNR {db:.1} dB", BK::name(device));
        assert!(db >= bar.psnr_db, "{file}: PSNR {db:.1} dB");
    }
}

/// A Q4_K GGUF transformer, held on the device as packed codes and dequantized per use, against
/// diffusers' image from gguf-py's exact values (the CPU parity test's case and bars).
fn gguf_pipeline<BK: zimage_nn::ZBackend>(device: &BK::Device, dtype: DType, bar: Bar) {
    use super::gguf::{folder_for_gguf_transformer, gguf_fixtures, transformer_cases};
    let cases = transformer_cases();
    let case = cases
        .iter()
        .find(|c| c.name == "z_image_q4_k.f32-fox_guidance")
        .expect("the Q4_K case with guidance");
    let dir = gguf_fixtures().join("transformer");
    let files = ModelFiles::open(folder_for_gguf_transformer())
        .expect("model folder")
        .with_transformer_file(dir.join(case.transformer.as_deref().unwrap()))
        .expect("GGUF transformer");
    let mut pipeline = ZImagePipeline::<BK>::new(files, device, dtype).expect("pipeline");
    let out = pipeline
        .generate(&case.options(&pipeline), &mut |_| ControlFlow::Continue(()))
        .expect("generate");
    check(
        &format!("{} {dtype:?} {} final latents", BK::name(device), case.name),
        to_vec(out.latents.clone()),
        &Case::open(dir.join(&case.latents)).values("latents").0,
        Bar {
            rel_l2: bar.latents_rel_l2,
            ..bar
        },
    );
    let db = psnr(&out.images[0], &load_png(&dir.join(&case.expected[0])));
    println!(
        "{} {dtype:?} {}: PSNR {db:.1} dB",
        BK::name(device),
        case.name
    );
    assert!(db >= bar.psnr_db, "{}: PSNR {db:.1} dB", case.name);
}

/// The five checks of one backend and dtype, each its own test.
macro_rules! backend_tests {
    ($module:ident, $backend:ty, $require:literal, $dtype:expr, $bar:expr) => {
        mod $module {
            use super::*;
            type BK = $backend;

            #[test]
            fn transformer_matches_diffusers() {
                if let Some(device) = device::<BK>($require) {
                    transformer::<BK>(&device, $dtype, $bar);
                }
            }

            #[test]
            fn vae_matches_diffusers() {
                if let Some(device) = device::<BK>($require) {
                    vae::<BK>(&device, $dtype, $bar);
                }
            }

            #[test]
            fn text_encoder_matches_transformers() {
                if let Some(device) = device::<BK>($require) {
                    text_encoder::<BK>(&device, $dtype, $bar);
                }
            }

            #[test]
            fn pipeline_reproduces_diffusers_image() {
                if let Some(device) = device::<BK>($require) {
                    pipeline::<BK>(&device, $dtype, $bar);
                }
            }

            #[test]
            fn gguf_pipeline_reproduces_diffusers_image() {
                if let Some(device) = device::<BK>($require) {
                    gguf_pipeline::<BK>(&device, $dtype, $bar);
                }
            }
        }
    };
}

backend_tests!(
    wgpu_f32,
    burn::backend::Wgpu,
    "ZIMAGE_REQUIRE_WGPU",
    DType::F32,
    F32
);

#[cfg(feature = "cuda")]
backend_tests!(
    cuda_f32,
    burn::backend::Cuda,
    "ZIMAGE_REQUIRE_CUDA",
    DType::F32,
    // Other kernels, another summation order than PyTorch's CPU ones.
    Bar {
        rel_l2: 1e-3,
        latents_rel_l2: 1e-3,
        psnr_db: 40.0
    }
);

#[cfg(feature = "cuda")]
backend_tests!(
    cuda_bf16,
    burn::backend::Cuda,
    "ZIMAGE_REQUIRE_CUDA",
    DType::BF16,
    // bf16 keeps 8 bits of mantissa: ~4e-3 per rounding, compounded through the layers.
    Bar {
        rel_l2: 3e-2,
        latents_rel_l2: 1e-1,
        psnr_db: 25.0
    }
);
