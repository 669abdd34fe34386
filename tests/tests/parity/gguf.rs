//! GGUF files against the reference tools (`tests/fixtures/make_gguf_fixtures.py`): every ggml
//! type dequantized bit for bit as gguf-py does it, on blocks made by ggml's own quantizer; tiny
//! Z-Image transformers in the city96 and stable-diffusion.cpp flavours against diffusers'
//! GGUF loader; a tiny Qwen3 written by llama.cpp's `convert_hf_to_gguf.py` against transformers.

use zimage_test_support as common;

use std::ops::ControlFlow;
use std::path::PathBuf;

use burn::tensor::DType;
use common::pipeline::{copy_dir, load_png, model_folder, psnr, LATENTS_REL_L2, MIN_PSNR_DB};
use common::{errors, fixtures, to_vec, Case, B};
use zimage_nn::host::gemm::RowSource;
use zimage_nn::host::{HostFormat, HostMatrix};
use zimage_nn::quant::GgmlType;
use zimage_nn::{Checkpoint, QuantizedMatrix, StoredDtype};
use zimage_pipeline::{ModelFiles, ZImagePipeline};

pub(crate) fn gguf_fixtures() -> PathBuf {
    fixtures().join("gguf")
}

/// The same bits (so -0.0 and 0.0 differ, and NaNs compare by pattern).
fn assert_bits(got: &[f32], expected: &[f32], what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert_eq!(g.to_bits(), e.to_bits(), "{what}[{i}]: {g} vs {e}");
    }
}

#[test]
fn every_ggml_type_dequantizes_as_gguf_py_does() {
    let dir = gguf_fixtures().join("quants");
    let ck = Checkpoint::open(dir.join("blocks.gguf")).expect("blocks.gguf");
    let expected = Case::open(dir.join("expected.safetensors"));
    let device = Default::default();
    for ty in GgmlType::ALL {
        let name = ty.name().to_lowercase();
        let entry = ck
            .get(&name)
            .unwrap_or_else(|| panic!("{name} in blocks.gguf"));
        let (want, shape) = expected.values(&name);
        assert_eq!(entry.shape, shape, "{name}");
        match entry.dtype {
            StoredDtype::Quantized(t) => assert_eq!(t, ty),
            other => assert!(ty.is_float(), "{name} read as {other}"),
        }
        // Read whole (what norms and biases get), and row by row through the host kernels'
        // reader, on block boundaries and off them.
        let read = ck.read(&name, None, DType::F32).unwrap();
        assert_bits(&read.to_vec::<f32>().unwrap(), &want, &name);
        let (rows, cols) = (shape[0], shape[1]);
        let raw = ck.raw(&name, None).unwrap();
        let format = HostFormat::from_stored(raw.dtype).unwrap();
        let matrix = HostMatrix::mapped(rows, cols, format, raw.bytes.clone());
        for (c0, len) in [(0, cols), (256, 256), (5, 100), (250, 20)] {
            let mut row = vec![0f32; len];
            matrix.read_row(rows - 1, c0, &mut row);
            let at = (rows - 1) * cols + c0;
            assert_bits(&row, &want[at..at + len], &format!("{name} row {c0}+{len}"));
        }
        // Rows can be taken without decoding (a fused qkv is split this way).
        let last = ck.read(&name, Some(rows - 1..rows), DType::F32).unwrap();
        assert_bits(
            &last.to_vec::<f32>().unwrap(),
            &want[(rows - 1) * cols..],
            &format!("{name} last row"),
        );
        // The device form, dequantized with tensor ops.
        if !ty.is_float() {
            let q = QuantizedMatrix::<B>::from_blocks(ty, raw.bytes.bytes(), rows, cols, &device);
            assert_bits(
                &to_vec(q.dequantize(DType::F32)),
                &want,
                &format!("{name} device"),
            );
        }
    }
}

/// The tiny pipeline's folder with the transformer's weights removed and the GGUF transformer's
/// config in their place: only the GGUF file can make the image.
pub(crate) fn folder_for_gguf_transformer() -> PathBuf {
    let dir = common::scratch("gguf-pipeline");
    copy_dir(&model_folder(), &dir);
    let transformer = dir.join("transformer");
    std::fs::remove_dir_all(&transformer).unwrap();
    std::fs::create_dir_all(&transformer).unwrap();
    std::fs::copy(
        gguf_fixtures().join("transformer/config.json"),
        transformer.join("config.json"),
    )
    .unwrap();
    dir
}

#[derive(serde::Deserialize)]
struct TransformerCases {
    cases: Vec<TransformerCase>,
}

/// One diffusers call with a GGUF transformer. `dequant` says how the reference dequantized it:
/// `f32` (gguf-py's exact values, loaded as a plain f32 state dict) or `diffusers` (its GGUF
/// loader, whose CPU dequantization rounds through float16); `None` is the unquantized model.
#[derive(serde::Deserialize)]
pub(crate) struct TransformerCase {
    pub name: String,
    pub transformer: Option<String>,
    pub dequant: Option<String>,
    args: serde_json::Value,
    pub expected: Vec<String>,
    pub latents: String,
}

impl TransformerCase {
    /// The case's diffusers call as options of `pipeline`.
    pub fn options<BK: zimage_nn::ZBackend>(
        &self,
        pipeline: &ZImagePipeline<BK>,
    ) -> zimage_pipeline::GenerateOptions {
        let a = &self.args;
        let mut o = pipeline.options(a["prompt"].as_str().unwrap().to_string());
        if let Some(n) = a["negative_prompt"].as_str() {
            o.negative_prompts = Some(vec![n.to_string()]);
        }
        o.num_inference_steps = a["num_inference_steps"].as_u64().unwrap() as usize;
        o.guidance_scale = a["guidance_scale"].as_f64().unwrap() as f32;
        o.seed = a["seed"].as_u64().unwrap();
        o.width = a["width"].as_u64().unwrap() as usize;
        o.height = a["height"].as_u64().unwrap() as usize;
        o
    }
}

pub(crate) fn transformer_cases() -> Vec<TransformerCase> {
    let text = std::fs::read_to_string(gguf_fixtures().join("transformer/cases.json")).unwrap();
    serde_json::from_str::<TransformerCases>(&text)
        .unwrap()
        .cases
}

/// The bar against diffusers' own GGUF loader (its float16 dequantization is not exact).
const DIFFUSERS_GGUF_MIN_PSNR_DB: f64 = 40.0;

#[test]
fn gguf_transformers_make_diffusers_images() {
    let folder = folder_for_gguf_transformer();
    let cases = transformer_cases();
    let files: std::collections::BTreeSet<&str> = cases
        .iter()
        .filter_map(|c| c.transformer.as_deref())
        .collect();
    assert!(files.len() >= 3, "{files:?}");
    let dir = gguf_fixtures().join("transformer");
    common::on_both_paths(|path| {
        let device = Default::default();
        for gguf in &files {
            let files = ModelFiles::open(&folder)
                .unwrap()
                .with_transformer_file(dir.join(gguf))
                .unwrap();
            let mut pipeline =
                ZImagePipeline::<B>::new(files, &device, DType::F32).expect("pipeline");
            for case in cases
                .iter()
                .filter(|c| c.transformer.as_deref() == Some(gguf))
            {
                let o = case.options(&pipeline);
                let out = pipeline
                    .generate(&o, &mut |_| ControlFlow::Continue(()))
                    .unwrap_or_else(|e| panic!("{}: {e}", case.name));
                let latents = Case::open(dir.join(&case.latents));
                let (rel, _) = errors(&to_vec(out.latents.clone()), &latents.values("latents").0);
                let db = psnr(&out.images[0], &load_png(&dir.join(&case.expected[0])));
                // What quantization costs against the unquantized model, for the record.
                let unquantized = cases
                    .iter()
                    .find(|c| {
                        c.transformer.is_none()
                            && c.name.ends_with(case.name.rsplit('-').next().unwrap())
                    })
                    .map(|c| psnr(&out.images[0], &load_png(&dir.join(&c.expected[0]))));
                println!(
                    "{path:?} {}: latents rel L2 {rel:.2e}, PSNR {db:.1} dB (vs unquantized {:.1} dB)",
                    case.name,
                    unquantized.unwrap_or(f64::NAN)
                );
                match case.dequant.as_deref() {
                    Some("f32") => {
                        assert!(
                            rel <= LATENTS_REL_L2,
                            "{path:?} {}: latents rel L2 {rel:.2e}",
                            case.name
                        );
                        assert!(db >= MIN_PSNR_DB, "{path:?} {}: PSNR {db:.1} dB", case.name);
                    }
                    _ => assert!(
                        db >= DIFFUSERS_GGUF_MIN_PSNR_DB,
                        "{path:?} {}: PSNR {db:.1} dB against diffusers' GGUF loader",
                        case.name
                    ),
                }
            }
        }
    });
}

/// The memory estimate counts GGUF weights as they are held: on the host the file's own blocks
/// (quantized and f16 matrices as stored, vectors in the compute dtype), on the generic path
/// packed codes and per-group scales; never as the f32 matrices they decode to (which made a Q4_K
/// model look 5x its size and set off the f32-to-bf16 fallback on the published model).
#[test]
fn the_memory_estimate_counts_gguf_weights_at_their_quantized_size() {
    let folder = folder_for_gguf_transformer();
    let dir = gguf_fixtures().join("transformer");
    common::on_both_paths(|path| {
        for gguf in [
            "z_image_q8_0.gguf",
            "z_image_q4_k.gguf",
            "z_image_q4_0.gguf",
        ] {
            let file = dir.join(gguf);
            let files = ModelFiles::open(&folder)
                .unwrap()
                .with_transformer_file(&file)
                .unwrap();
            let pipeline = ZImagePipeline::<B>::new(files, &Default::default(), DType::F32)
                .unwrap()
                .keep_models(false);
            let estimate = pipeline.estimate_memory(&pipeline.options("")).unwrap();
            let held = estimate.stages[1].weights;
            let checkpoint = Checkpoint::open(&file).unwrap();
            let as_f32: u64 = checkpoint
                .entries()
                .map(|(_, e)| 4 * e.shape.iter().product::<usize>() as u64)
                .sum();
            // On the host every matrix stays as stored (quantized blocks, f16 kept tensors);
            // vectors (norms, biases) are held in the compute dtype, f32 here.
            let host_expected: u64 = checkpoint
                .entries()
                .map(|(_, e)| {
                    let elements = e.shape.iter().product::<usize>();
                    if e.shape.len() >= 2 {
                        let format = HostFormat::from_stored(e.dtype).unwrap();
                        format.bytes_for(elements) as u64
                    } else {
                        4 * elements as u64
                    }
                })
                .sum();
            match path {
                common::KernelPath::Host => {
                    assert_eq!(held, host_expected, "{gguf}");
                    assert!(held < as_f32 / 2, "{gguf}: {held} bytes of {as_f32} as f32");
                }
                // On the generic path float tensors may widen to the compute dtype (f32 at
                // most); the quantized ones take at most 1.25 bytes a value (8-bit codes and
                // per-32 f32 scales), not the 4 of the f32 matrices they decode to.
                common::KernelPath::Generic => {
                    let (quantized, others): (Vec<_>, Vec<_>) = checkpoint
                        .entries()
                        .map(|(_, e)| (e.dtype, e.shape.iter().product::<usize>() as u64))
                        .partition(|(dtype, _)| matches!(dtype, StoredDtype::Quantized(_)));
                    let quantized: u64 = quantized.iter().map(|(_, n)| n).sum();
                    let others_as_f32: u64 = others.iter().map(|(_, n)| 4 * n).sum();
                    assert!(quantized > 0, "{gguf}");
                    assert!(
                        held <= others_as_f32 + quantized * 5 / 4,
                        "{gguf}: {held} bytes estimated for {quantized} quantized values \
                         and {others_as_f32} bytes of others as f32"
                    );
                }
            }
        }
    });
}

/// The weights stay quantized: on the host as the file's blocks, on the generic path as packed
/// codes; nowhere as a float matrix.
#[test]
fn gguf_weights_stay_quantized() {
    use zimage_transformer::{ZImageTransformer2DModel, ZImageTransformerConfig};
    let dir = gguf_fixtures().join("transformer");
    let config = ZImageTransformerConfig::from_file(dir.join("config.json")).unwrap();
    common::on_both_paths(|path| {
        let device = Default::default();
        let ck = Checkpoint::open(dir.join("z_image_q4_k.gguf")).unwrap();
        let model = ZImageTransformer2DModel::<B>::load(&config, ck, &device, DType::F32).unwrap();
        let weight = &model.layers[0].attention.to_q.weight;
        match (path, weight) {
            (common::KernelPath::Host, zimage_nn::Stored::Host(m)) => {
                assert_eq!(m.format(), HostFormat::Quantized(GgmlType::Q4_K));
                assert!(m.is_mapped(), "the file's own pages");
            }
            (common::KernelPath::Generic, zimage_nn::Stored::Quantized(q)) => {
                assert_eq!(q.ty(), GgmlType::Q4_K);
            }
            (path, other) => panic!("{path:?}: to_q held as {other:?}"),
        }
    });
}

#[test]
fn llama_cpp_qwen3_ggufs_give_transformers_features() {
    let dir = gguf_fixtures().join("qwen3");
    common::on_both_paths(|path| {
        let device = Default::default();
        for (file, key) in [
            ("qwen3_f32.gguf", "features_f32"),
            ("qwen3_q8_0.gguf", "features_q8_0"),
        ] {
            let ck = Checkpoint::open(dir.join(file)).unwrap();
            // The config comes from the GGUF's own metadata.
            let config = zimage_text::Qwen3Config::from_gguf(&ck)
                .expect("a qwen3 GGUF")
                .unwrap();
            let model =
                zimage_text::Qwen3TextEncoder::<B>::load(&config, ck, &device, DType::F32).unwrap();
            let mut cases: Vec<PathBuf> = std::fs::read_dir(dir.join("cases"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            cases.sort();
            assert!(!cases.is_empty());
            for case_path in cases {
                let case = Case::open(case_path.clone());
                let n = case.count("ids");
                let batch: Vec<Vec<u32>> = (0..n).map(|i| case.ids(&format!("ids.{i}"))).collect();
                let out = model.encode(&batch).unwrap();
                for (i, features) in out.into_iter().enumerate() {
                    let (expected, shape) = case.values(&format!("{key}.{i}"));
                    assert_eq!(features.dims().to_vec(), shape);
                    let (rel, max) = errors(&to_vec(features), &expected);
                    println!(
                        "{path:?} {file} {}[{i}]: rel L2 {rel:.2e}, max abs {max:.2e}",
                        case_path.display()
                    );
                    assert!(rel < 1e-5, "{path:?} {file}: rel L2 {rel:.2e}");
                }
            }
        }
    });
}

/// gguf-py's metadata of every value type reads back as written, and a version-2 file with a
/// 64-byte alignment holds the same tensors.
#[test]
fn gguf_metadata_and_version_2_files_read_as_gguf_py_wrote_them() {
    use zimage_nn::gguf::GgufValue as V;
    let dir = gguf_fixtures().join("quants");
    let v3 = Checkpoint::open(dir.join("blocks.gguf")).unwrap();
    let v2 = Checkpoint::open(dir.join("blocks_v2_align64.gguf")).unwrap();
    for ck in [&v3, &v2] {
        assert!(ck.is_gguf());
        let value = |key: &str| {
            ck.gguf_value(key)
                .unwrap_or_else(|| panic!("{key}"))
                .clone()
        };
        assert_eq!(value("fixture.uint8"), V::U8(200));
        assert_eq!(value("fixture.int8"), V::I8(-100));
        assert_eq!(value("fixture.uint16"), V::U16(60000));
        assert_eq!(value("fixture.int16"), V::I16(-30000));
        assert_eq!(value("fixture.uint32"), V::U32(4_000_000_000));
        assert_eq!(value("fixture.int32"), V::I32(-2_000_000_000));
        assert_eq!(value("fixture.float32"), V::F32(0.25));
        assert_eq!(value("fixture.bool"), V::Bool(true));
        assert_eq!(
            value("fixture.string"),
            V::String("zimage-rs ✓ 造相".into())
        );
        assert_eq!(value("fixture.uint64"), V::U64((1 << 40) + 1));
        assert_eq!(value("fixture.int64"), V::I64(-(1 << 40) - 1));
        assert_eq!(value("fixture.float64"), V::F64(1.0 / 3.0));
        assert_eq!(
            value("fixture.array_int32"),
            V::Array(vec![V::I32(1), V::I32(-2), V::I32(3)])
        );
        assert_eq!(
            value("fixture.array_string"),
            V::Array(vec![
                V::String("a".into()),
                V::String("".into()),
                V::String("bc".into())
            ])
        );
        assert_eq!(
            value("fixture.array_float32"),
            V::Array(vec![V::F32(0.5), V::F32(-1.5)])
        );
        assert_eq!(value("general.name").as_str(), Some("ggml quant blocks"));
    }
    assert_eq!(
        v2.gguf_value("general.alignment").and_then(|v| v.as_u64()),
        Some(64)
    );
    for ty in GgmlType::ALL {
        let name = ty.name().to_lowercase();
        let (a, b) = (v3.raw(&name, None).unwrap(), v2.raw(&name, None).unwrap());
        assert_eq!(a.dtype, b.dtype, "{name}");
        assert_eq!(
            a.bytes.bytes(),
            b.bytes.bytes(),
            "{name}: the same blocks at another alignment"
        );
    }
}
