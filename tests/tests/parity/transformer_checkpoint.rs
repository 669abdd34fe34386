//! The transformer's checkpoint mapping against the published checkpoint's tensor list
//! (spec §1.2), and a typed error for every kind of bad input.

use zimage_test_support as common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use common::{fixtures, B};
use safetensors::{serialize_to_file, Dtype, View};
use zimage_nn::weights::expected_tensors;
use zimage_nn::{CheckpointError, KeyMapping};
use zimage_transformer::{
    checkpoint::map_key, TransformerError, ZImageTransformer2DModel, ZImageTransformerConfig,
};

/// The 521 tensors of `Tongyi-MAI/Z-Image-Turbo/transformer`, as spec §1.2 lists them.
fn published_tensors() -> BTreeMap<String, Vec<usize>> {
    let (d, ffn, ada) = (3840, 10240, 256);
    let mut t = BTreeMap::new();
    let mut add = |name: String, shape: &[usize]| assert!(t.insert(name, shape.to_vec()).is_none());
    add("all_x_embedder.2-1.weight".into(), &[d, 64]);
    add("all_x_embedder.2-1.bias".into(), &[d]);
    add("t_embedder.mlp.0.weight".into(), &[1024, 256]);
    add("t_embedder.mlp.0.bias".into(), &[1024]);
    add("t_embedder.mlp.2.weight".into(), &[256, 1024]);
    add("t_embedder.mlp.2.bias".into(), &[256]);
    add("cap_embedder.0.weight".into(), &[2560]);
    add("cap_embedder.1.weight".into(), &[d, 2560]);
    add("cap_embedder.1.bias".into(), &[d]);
    add("x_pad_token".into(), &[1, d]);
    add("cap_pad_token".into(), &[1, d]);
    let blocks = (0..30)
        .map(|i| (format!("layers.{i}"), true))
        .chain((0..2).map(|i| (format!("noise_refiner.{i}"), true)))
        .chain((0..2).map(|i| (format!("context_refiner.{i}"), false)));
    for (block, modulated) in blocks {
        for p in ["to_q", "to_k", "to_v", "to_out.0"] {
            add(format!("{block}.attention.{p}.weight"), &[d, d]);
        }
        add(format!("{block}.attention.norm_q.weight"), &[128]);
        add(format!("{block}.attention.norm_k.weight"), &[128]);
        for n in [
            "attention_norm1",
            "attention_norm2",
            "ffn_norm1",
            "ffn_norm2",
        ] {
            add(format!("{block}.{n}.weight"), &[d]);
        }
        add(format!("{block}.feed_forward.w1.weight"), &[ffn, d]);
        add(format!("{block}.feed_forward.w2.weight"), &[d, ffn]);
        add(format!("{block}.feed_forward.w3.weight"), &[ffn, d]);
        if modulated {
            add(format!("{block}.adaLN_modulation.0.weight"), &[4 * d, ada]);
            add(format!("{block}.adaLN_modulation.0.bias"), &[4 * d]);
        }
    }
    add(
        "all_final_layer.2-1.adaLN_modulation.1.weight".into(),
        &[d, ada],
    );
    add("all_final_layer.2-1.adaLN_modulation.1.bias".into(), &[d]);
    add("all_final_layer.2-1.linear.weight".into(), &[64, d]);
    add("all_final_layer.2-1.linear.bias".into(), &[64]);
    t
}

fn model_tensors(config: &ZImageTransformerConfig) -> BTreeMap<String, Vec<usize>> {
    let device = Default::default();
    let list =
        expected_tensors::<B, _>(&device, |w| ZImageTransformer2DModel::<B>::build(config, w))
            .expect("dry run");
    let n = list.len();
    let map: BTreeMap<_, _> = list.into_iter().collect();
    assert_eq!(map.len(), n, "a module path is requested twice");
    map
}

#[test]
fn mapping_covers_exactly_the_published_521_tensors() {
    let published = published_tensors();
    assert_eq!(published.len(), 521);
    let config = ZImageTransformerConfig::z_image_turbo();
    assert_eq!(model_tensors(&config), published);
    // The published names map to themselves.
    for (name, shape) in &published {
        assert_eq!(map_key(&config, name, shape), KeyMapping::To(name.clone()));
    }
    let params: usize = published
        .values()
        .map(|s| s.iter().product::<usize>())
        .sum();
    assert_eq!(params, 6_154_908_736, "parameter count of spec §1.1");
}

#[test]
fn original_comfyui_names_map_onto_the_published_tensors() {
    let config = ZImageTransformerConfig::z_image_turbo();
    let published = published_tensors();
    // Build the original-format list from the published one, as ComfyUI stores it.
    let mut original: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (name, shape) in &published {
        let Some(renamed) = zimage_transformer::checkpoint::original_name(&config, name) else {
            continue;
        };
        let shape = if renamed.ends_with("qkv.weight") {
            vec![3 * 3840, 3840]
        } else {
            shape.clone()
        };
        original.insert(format!("model.diffusion_model.{renamed}"), shape);
    }
    original.insert("norm_final.weight".into(), vec![3840]);
    let mut mapped = BTreeMap::new();
    for (name, shape) in &original {
        match map_key(&config, name, shape) {
            KeyMapping::To(path) => {
                mapped.insert(path, shape.clone());
            }
            KeyMapping::Split(parts) => {
                assert_eq!(parts.len(), 3);
                for (path, rows) in parts {
                    assert_eq!(rows.len(), 3840);
                    mapped.insert(path, vec![rows.len(), shape[1]]);
                }
            }
            KeyMapping::Ignore => assert_eq!(name, "norm_final.weight"),
        }
    }
    assert_eq!(mapped, published);
}

/// A scratch folder removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("zimage-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
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

/// Copies fixture "a" into `dir/transformer`, letting `edit` change the tensors first.
fn write_model(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, Raw>)) -> PathBuf {
    let src = fixtures().join("transformer/a/transformer");
    let bytes = std::fs::read(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
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
    edit(&mut tensors);
    let out = dir.join("transformer");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(src.join("config.json"), out.join("config.json")).unwrap();
    serialize_to_file(
        tensors.iter().map(|(k, v)| (k.clone(), v)),
        None,
        &out.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    out
}

fn load(folder: &Path) -> Result<ZImageTransformer2DModel<B>, TransformerError> {
    ZImageTransformer2DModel::<B>::from_folder(folder, &Default::default(), DType::F32)
}

fn mismatch(
    result: Result<ZImageTransformer2DModel<B>, TransformerError>,
) -> zimage_nn::MismatchReport {
    match result {
        Err(TransformerError::Checkpoint(CheckpointError::Mismatch(report))) => {
            println!("{report}");
            *report
        }
        Err(other) => panic!("expected a mismatch report, got {other}"),
        Ok(_) => panic!("expected a mismatch report, the model loaded"),
    }
}

#[test]
fn wrong_shape_is_reported_with_both_shapes() {
    let dir = Scratch::new("wrong-shape");
    let folder = write_model(&dir.0, |t| {
        let raw = t.get_mut("layers.1.ffn_norm2.weight").unwrap();
        raw.1 = vec![32];
        raw.2.truncate(32 * 4);
    });
    let report = mismatch(load(&folder));
    assert_eq!(report.wrong_shape.len(), 1);
    assert_eq!(report.wrong_shape[0].tensor, "layers.1.ffn_norm2.weight");
    assert_eq!(report.wrong_shape[0].expected, vec![64]);
    assert_eq!(report.wrong_shape[0].actual, vec![32]);
    assert!(report.file.ends_with("diffusion_pytorch_model.safetensors"));
    assert!(report.missing.is_empty() && report.unexpected.is_empty());
}

#[test]
fn missing_and_unexpected_tensors_are_all_named() {
    let dir = Scratch::new("missing");
    let folder = write_model(&dir.0, |t| {
        t.remove("x_pad_token");
        t.remove("context_refiner.0.attention.to_k.weight");
        t.insert(
            "layers.7.extra.weight".into(),
            Raw(Dtype::F32, vec![2], vec![0; 8]),
        );
    });
    let report = mismatch(load(&folder));
    assert_eq!(
        report.missing,
        vec!["context_refiner.0.attention.to_k.weight", "x_pad_token"]
    );
    assert_eq!(report.unexpected, vec!["layers.7.extra.weight"]);
    let message = CheckpointError::mismatch(report).to_string();
    assert!(
        message.contains("x_pad_token") && message.contains("layers.7.extra.weight"),
        "{message}"
    );
}

#[test]
fn non_float_dtype_is_refused() {
    let dir = Scratch::new("dtype");
    let folder = write_model(&dir.0, |t| {
        let raw = t.get_mut("cap_pad_token").unwrap();
        raw.0 = Dtype::I32;
    });
    let report = mismatch(load(&folder));
    assert_eq!(
        report.wrong_dtype,
        vec![("cap_pad_token".to_string(), "I32".to_string())]
    );
}

#[test]
fn malformed_index_is_reported() {
    let dir = Scratch::new("index");
    let folder = write_model(&dir.0, |_| {});
    std::fs::write(
        folder.join("diffusion_pytorch_model.safetensors.index.json"),
        "{\"weight_map\": [1, 2]",
    )
    .unwrap();
    match load(&folder) {
        Err(TransformerError::Checkpoint(CheckpointError::MalformedIndex { path, reason })) => {
            assert!(path.ends_with("diffusion_pytorch_model.safetensors.index.json"));
            println!("{reason}");
        }
        other => panic!("expected MalformedIndex, got {:?}", other.err()),
    }
    // An index that points at a shard lacking the tensor.
    std::fs::write(
        folder.join("diffusion_pytorch_model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"x_pad_token": "diffusion_pytorch_model.safetensors", "ghost": "diffusion_pytorch_model.safetensors"}}"#,
    )
    .unwrap();
    match load(&folder) {
        Err(TransformerError::Checkpoint(e @ CheckpointError::MalformedIndex { .. })) => {
            assert!(e.to_string().contains("ghost"), "{e}")
        }
        other => panic!("expected MalformedIndex, got {:?}", other.err()),
    }
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = Scratch::new("truncated");
    let folder = write_model(&dir.0, |_| {});
    let file = folder.join("diffusion_pytorch_model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len - 1000).unwrap();
    match load(&folder) {
        Err(TransformerError::Checkpoint(CheckpointError::MalformedSafetensors {
            path,
            reason,
        })) => {
            assert_eq!(path, file);
            assert!(reason.contains("truncated"), "{reason}");
        }
        other => panic!("expected MalformedSafetensors, got {:?}", other.err()),
    }
    // Cut inside the header too.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(100)
        .unwrap();
    assert!(matches!(
        load(&folder),
        Err(TransformerError::Checkpoint(
            CheckpointError::MalformedSafetensors { .. }
        ))
    ));
}

#[test]
fn inconsistent_config_is_refused() {
    let dir = Scratch::new("config");
    let folder = write_model(&dir.0, |_| {});
    let path = folder.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["axes_dims"] = serde_json::json!([8, 12, 16]);
    std::fs::write(&path, json.to_string()).unwrap();
    match load(&folder) {
        Err(e @ TransformerError::Config { .. }) => {
            let message = e.to_string();
            println!("{message}");
            assert!(
                message.contains("head_dim 32") && message.contains("config.json"),
                "{message}"
            );
        }
        other => panic!("expected a config error, got {:?}", other.err()),
    }
    std::fs::write(&path, "{\"dim\": \"wide\"}").unwrap();
    assert!(matches!(
        load(&folder),
        Err(TransformerError::Config { .. })
    ));
}

#[test]
fn missing_folder_and_bad_inputs_are_errors() {
    assert!(matches!(
        load(Path::new("/nonexistent/transformer")),
        Err(TransformerError::Io { .. })
    ));
    let model = load(&fixtures().join("transformer/a/transformer")).unwrap();
    let device = Default::default();
    let latent = burn::tensor::Tensor::<B, 4>::zeros([16, 1, 8, 8], &device);
    let caption = burn::tensor::Tensor::<B, 2>::zeros([5, 32], &device);
    let bad = |r: Result<_, TransformerError>| match r {
        Err(TransformerError::Input(m)) => println!("{m}"),
        other => panic!("expected an input error, got {:?}", other.err()),
    };
    bad(model.forward(&[latent.clone()], &[0.5, 0.5], &[caption.clone()]));
    bad(model.forward(
        &[burn::tensor::Tensor::zeros([4, 1, 8, 8], &device)],
        &[0.5],
        &[caption.clone()],
    ));
    bad(model.forward(
        &[burn::tensor::Tensor::zeros([16, 1, 7, 8], &device)],
        &[0.5],
        &[caption.clone()],
    ));
    bad(model.forward(
        &[latent.clone()],
        &[0.5],
        &[burn::tensor::Tensor::zeros([5, 31], &device)],
    ));
    // Caption + image frame ids beyond axes_lens[0] = 96.
    bad(model.forward(
        &[latent],
        &[0.5],
        &[burn::tensor::Tensor::zeros([100, 32], &device)],
    ));
}
