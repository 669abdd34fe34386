//! A typed error, not a panic, for every kind of bad input to the VAE.

use zimage_test_support as common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Tensor};
use common::{fixtures, B};
use safetensors::{serialize_to_file, Dtype, View};
use zimage_nn::{Checkpoint, CheckpointError};
use zimage_vae::image_crate::RgbImage;
use zimage_vae::{
    images_to_tensor, tensor_to_images, AutoencoderKL, AutoencoderKLConfig, TilingConfig, VaeError,
};

fn fixture(config: &str) -> PathBuf {
    fixtures().join("vae").join(config)
}

fn load(config: &str) -> AutoencoderKL<B> {
    AutoencoderKL::<B>::from_folder(fixture(config).join("vae"), &Default::default(), DType::F32)
        .expect("load")
}

fn zeros(shape: [usize; 4]) -> Tensor<B, 4> {
    Tensor::zeros(shape, &Default::default())
}

/// A scratch folder removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("zimage-vae-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Raw tensor for writing test checkpoints.
struct Raw(Dtype, Vec<usize>, Vec<u8>);

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.0
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.2)
    }
    fn data_len(&self) -> usize {
        self.2.len()
    }
}

/// Copies fixture `config`'s VAE into `dir/vae`, letting `edit` change the tensors and the config
/// JSON first.
fn write_vae(
    dir: &Path,
    config: &str,
    edit: impl FnOnce(&mut BTreeMap<String, Raw>, &mut serde_json::Value),
) -> PathBuf {
    let src = fixture(config).join("vae");
    let bytes = std::fs::read(src.join("diffusion_pytorch_model.safetensors")).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut tensors: BTreeMap<String, Raw> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                Raw(view.dtype(), view.shape().to_vec(), view.data().to_vec()),
            )
        })
        .collect();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("config"))
            .expect("json");
    edit(&mut tensors, &mut json);
    let out = dir.join("vae");
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::write(out.join("config.json"), json.to_string()).expect("write config");
    serialize_to_file(
        tensors.iter().map(|(k, v)| (k.clone(), v)),
        None,
        &out.join("diffusion_pytorch_model.safetensors"),
    )
    .expect("write tensors");
    out
}

fn mismatch(result: Result<AutoencoderKL<B>, VaeError>) -> zimage_nn::MismatchReport {
    match result {
        Err(VaeError::Checkpoint(CheckpointError::Mismatch(report))) => {
            println!("{report}");
            *report
        }
        Err(other) => panic!("expected a mismatch report, got {other}"),
        Ok(_) => panic!("expected a mismatch report, the model loaded"),
    }
}

#[test]
fn image_with_wrong_channels() {
    let err = load("c").encode(zeros([1, 4, 32, 32])).unwrap_err();
    println!("{err}");
    assert!(matches!(
        err,
        VaeError::Channels {
            what: "image",
            expected: 3,
            actual: 4
        }
    ));
}

#[test]
fn image_size_not_a_multiple_of_the_downscale_factor() {
    let model = load("c");
    for shape in [[1, 3, 36, 32], [1, 3, 32, 20], [1, 3, 4, 8]] {
        let err = model.encode(zeros(shape)).unwrap_err();
        println!("{err}");
        assert!(
            matches!(err, VaeError::ImageSize { multiple: 8, .. }),
            "{shape:?}: {err}"
        );
        let err = model
            .encode_tiled(zeros(shape), &model.config().default_tiling())
            .unwrap_err();
        assert!(matches!(err, VaeError::ImageSize { .. }), "{err}");
    }
    // One block: every size is a multiple of 1.
    assert!(load("d").encode(zeros([1, 3, 5, 7])).is_ok());
}

#[test]
fn empty_inputs() {
    let model = load("a");
    let err = model.encode(zeros([0, 3, 16, 16])).unwrap_err();
    assert!(matches!(err, VaeError::Empty { .. }), "{err}");
    let err = model.encode(zeros([1, 3, 0, 16])).unwrap_err();
    assert!(matches!(err, VaeError::ImageSize { .. }), "{err}");
    let err = model.decode(zeros([1, 4, 0, 3])).unwrap_err();
    assert!(matches!(err, VaeError::Empty { .. }), "{err}");
}

#[test]
fn latents_with_wrong_channels() {
    let model = load("c");
    for result in [
        model.decode(zeros([1, 4, 4, 4])),
        model.decode_tiled(zeros([1, 4, 40, 40]), &model.config().default_tiling()),
    ] {
        let err = result.unwrap_err();
        println!("{err}");
        assert!(matches!(
            err,
            VaeError::Channels {
                what: "latent",
                expected: 16,
                actual: 4
            }
        ));
    }
}

#[test]
fn noise_of_the_wrong_shape() {
    let posterior = load("a").encode(zeros([1, 3, 16, 16])).expect("encode");
    let err = posterior.sample(zeros([1, 4, 8, 9])).unwrap_err();
    println!("{err}");
    assert!(matches!(err, VaeError::NoiseShape { .. }));
}

#[test]
fn bad_tilings() {
    let model = load("b");
    let tiling = TilingConfig {
        tile_sample_min_size: 16,
        tile_latent_min_size: 4,
        tile_overlap_factor: 1.0,
    };
    let err = model
        .decode_tiled(zeros([1, 4, 10, 10]), &tiling)
        .unwrap_err();
    println!("{err}");
    assert!(matches!(err, VaeError::Tiling(_)));
    // Tiles of 8 pixels every 6: the last tile of a 32-pixel side is 2 pixels wide, too small for
    // two downsamplings (PyTorch would fail inside the conv).
    let tiling = TilingConfig {
        tile_sample_min_size: 8,
        tile_latent_min_size: 2,
        tile_overlap_factor: 0.25,
    };
    let err = model
        .encode_tiled(zeros([1, 3, 32, 32]), &tiling)
        .unwrap_err();
    println!("{err}");
    assert!(matches!(
        err,
        VaeError::TileTooSmall {
            width: 2,
            downsamples: 2,
            ..
        }
    ));
}

#[test]
fn image_conversion_errors() {
    let err = tensor_to_images(zeros([1, 4, 8, 8])).unwrap_err();
    assert!(matches!(err, VaeError::Channels { .. }), "{err}");
    let device = Default::default();
    let err = images_to_tensor::<B>(
        &[RgbImage::new(8, 8), RgbImage::new(8, 9)],
        &device,
        DType::F32,
    )
    .unwrap_err();
    println!("{err}");
    assert!(matches!(err, VaeError::Image(_)));
    assert!(images_to_tensor::<B>(&[], &device, DType::F32).is_err());
}

#[test]
fn malformed_and_missing_config() {
    let dir = Scratch::new("config");
    let folder = write_vae(&dir.0, "a", |_, json| json["norm_num_groups"] = 3.into());
    let err =
        AutoencoderKL::<B>::from_folder(&folder, &Default::default(), DType::F32).unwrap_err();
    println!("{err}");
    assert!(matches!(err, VaeError::Config { path: Some(_), .. }));
    std::fs::write(folder.join("config.json"), "{ not json").expect("write");
    let err =
        AutoencoderKL::<B>::from_folder(&folder, &Default::default(), DType::F32).unwrap_err();
    assert!(matches!(err, VaeError::Config { .. }), "{err}");
    std::fs::remove_file(folder.join("config.json")).expect("rm");
    let err =
        AutoencoderKL::<B>::from_folder(&folder, &Default::default(), DType::F32).unwrap_err();
    assert!(matches!(err, VaeError::Io { .. }), "{err}");
}

#[test]
fn missing_and_misshapen_tensors_are_reported_together() {
    let dir = Scratch::new("tensors");
    let folder = write_vae(&dir.0, "c", |t, _| {
        t.remove("decoder.up_blocks.1.upsamplers.0.conv.bias");
        let raw = t
            .get_mut("encoder.mid_block.attentions.0.to_k.weight")
            .expect("to_k");
        raw.1 = vec![24, 12];
        raw.2.truncate(24 * 12 * 4);
        t.insert(
            "encoder.extra.weight".into(),
            Raw(Dtype::F32, vec![1], vec![0; 4]),
        );
    });
    let report = mismatch(AutoencoderKL::<B>::from_folder(
        &folder,
        &Default::default(),
        DType::F32,
    ));
    assert_eq!(
        report.missing,
        ["decoder.up_blocks.1.upsamplers.0.conv.bias"]
    );
    assert_eq!(report.wrong_shape.len(), 1);
    assert_eq!(report.wrong_shape[0].expected, [24, 24]);
    assert_eq!(report.wrong_shape[0].actual, [24, 12]);
    assert_eq!(report.unexpected, ["encoder.extra.weight"]);
}

#[test]
fn config_that_does_not_match_the_weights() {
    let dir = Scratch::new("quant");
    // quant convs switched on, but the file has none
    let folder = write_vae(&dir.0, "c", |_, json| {
        json["use_quant_conv"] = true.into();
        json["mid_block_add_attention"] = false.into();
    });
    let report = mismatch(AutoencoderKL::<B>::from_folder(
        &folder,
        &Default::default(),
        DType::F32,
    ));
    assert_eq!(report.missing, ["quant_conv.bias", "quant_conv.weight"]);
    assert_eq!(report.unexpected.len(), 20, "{:?}", report.unexpected);

    // a BFL file read with a three-block config: `up.3` has no diffusers block
    let mut config =
        AutoencoderKLConfig::from_file(fixture("c").join("vae/config.json")).expect("config");
    config.block_out_channels.pop();
    config.down_block_types.pop();
    config.up_block_types.pop();
    let checkpoint = Checkpoint::open(fixture("c").join("ae-bfl.safetensors")).expect("open");
    let report = mismatch(AutoencoderKL::<B>::load(
        &config,
        checkpoint,
        &Default::default(),
        DType::F32,
    ));
    assert!(report
        .unexpected
        .iter()
        .any(|n| n.starts_with("decoder.up.3.")));
}

#[test]
fn not_a_vae_checkpoint() {
    let path = fixtures().join("transformer/a/transformer");
    let checkpoint = Checkpoint::open(&path).expect("open");
    let err = AutoencoderKL::<B>::load(
        &AutoencoderKLConfig::z_image(),
        checkpoint,
        &Default::default(),
        DType::F32,
    )
    .unwrap_err();
    println!("{err}");
    assert!(matches!(err, VaeError::UnknownFormat { .. }));
    assert!(err.to_string().contains("Z-Image transformer"), "{err}");
}
