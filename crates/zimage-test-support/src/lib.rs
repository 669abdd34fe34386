//! What the tests of several crates share: fixture paths, reading recorded tensors, error
//! metrics, running a check with and without the host kernels, the tiny pipeline folder
//! ([`pipeline`]) and a fake Hugging Face Hub ([`fake_hub`]).

pub mod fake_hub;
pub mod pipeline;

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use safetensors::SafeTensors;

pub type B = NdArray<f32>;

/// `tests/fixtures` of the workspace, from whichever package's tests ask.
pub fn fixtures() -> PathBuf {
    // The run-time value first (cargo sets it for the test being run): a test binary built by
    // another checkout sharing the target directory must read this checkout's fixtures.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .ancestors()
        .map(|dir| dir.join("tests/fixtures"))
        .find(|dir| dir.is_dir())
        .expect("tests/fixtures above the package")
}

/// The tensors of one recorded case file.
pub struct Case {
    bytes: Vec<u8>,
}

impl Case {
    pub fn open(path: PathBuf) -> Self {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes }
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("valid fixture")
    }

    pub fn has(&self, name: &str) -> bool {
        self.view().names().iter().any(|n| *n == name)
    }

    /// Values (f32) and shape of `name`.
    pub fn values(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let view = self.view();
        let t = view
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture lacks {name}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        let values = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (values, t.shape().to_vec())
    }

    pub fn tensor<const D: usize>(
        &self,
        name: &str,
        device: &burn::tensor::Device<B>,
    ) -> Tensor<B, D> {
        self.tensor_on::<B, D>(name, device)
    }

    /// [`Case::tensor`] on any backend (f32).
    pub fn tensor_on<BK: Backend, const D: usize>(
        &self,
        name: &str,
        device: &BK::Device,
    ) -> Tensor<BK, D> {
        let (values, shape) = self.values(name);
        Tensor::from_data(TensorData::new(values, shape), (device, DType::F32))
    }

    /// An int64 tensor of the case, as token ids.
    pub fn ids(&self, name: &str) -> Vec<u32> {
        let view = self.view();
        let t = view
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture lacks {name}"));
        assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
        t.data()
            .chunks_exact(8)
            .map(|b| {
                let v = i64::from_le_bytes(b.try_into().expect("8 bytes"));
                u32::try_from(v).expect("token id")
            })
            .collect()
    }

    /// Number of indexed entries `prefix.0`, `prefix.1`, ...
    pub fn count(&self, prefix: &str) -> usize {
        (0..)
            .take_while(|i| self.has(&format!("{prefix}.{i}")))
            .count()
    }
}

/// Relative L2 error and max absolute error of `actual` against `expected`.
pub fn errors(actual: &[f32], expected: &[f32]) -> (f64, f64) {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    let mut diff2 = 0f64;
    let mut ref2 = 0f64;
    let mut max_abs = 0f64;
    for (&a, &e) in actual.iter().zip(expected) {
        let d = a as f64 - e as f64;
        diff2 += d * d;
        ref2 += (e as f64) * (e as f64);
        max_abs = max_abs.max(d.abs());
    }
    ((diff2 / ref2.max(f64::MIN_POSITIVE)).sqrt(), max_abs)
}

pub fn to_vec<BK: Backend, const D: usize>(t: Tensor<BK, D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .to_vec::<f32>()
        .expect("f32 data")
}

/// A scratch folder for one test binary and `name`, under the target directory's `tmp/` (the
/// folder cargo gives integration tests), emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<binary> -> target/tmp/<binary>-<name>
    let target = exe
        .ancestors()
        .nth(3)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let stem = exe
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = target.join("tmp").join(format!("{stem}-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the scratch folder");
    dir
}

/// Which implementation of the backend seam a check ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// burn-ndarray's host kernels (what the CPU runs).
    Host,
    /// The generic path ([`zimage_nn::generic`], what GPUs run), on burn-ndarray.
    Generic,
}

/// Runs `check` twice: with the host kernels and without them, so that a CPU-only test run
/// executes the code GPUs run too. Models must be built inside `check`.
pub fn on_both_paths(mut check: impl FnMut(KernelPath)) {
    check(KernelPath::Host);
    zimage_nn::host::without_host_kernels(|| check(KernelPath::Generic));
}

/// One tensor to write: name, f32 values, shape.
pub type NamedTensor = (String, Vec<f32>, Vec<usize>);

/// Every tensor of a checkpoint (file, index or folder) as f32.
pub fn read_checkpoint(path: &std::path::Path) -> Vec<NamedTensor> {
    let checkpoint = zimage_nn::Checkpoint::open(path).expect("open the checkpoint");
    checkpoint
        .entries()
        .map(|(name, entry)| {
            let data = checkpoint.read(name, None, DType::F32).expect("read");
            (
                name.to_string(),
                data.to_vec::<f32>().expect("f32"),
                entry.shape.clone(),
            )
        })
        .collect()
}

/// Writes f32 tensors as one safetensors file, with `metadata` as its `__metadata__`.
pub fn write_safetensors(
    path: &std::path::Path,
    tensors: &[NamedTensor],
    metadata: Option<std::collections::HashMap<String, String>>,
) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, values, _)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, _, shape), data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .expect("a consistent tensor");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, metadata, path).expect("write safetensors");
}

/// A transformer in ComfyUI/original naming (the loader's inverse mapping): the
/// `model.diffusion_model.` prefix, fused `attention.qkv`, `attention.out`, `q_norm`/`k_norm`,
/// `x_embedder`, `final_layer`.
pub fn comfy_transformer(
    config: &zimage_transformer::ZImageTransformerConfig,
    diffusers: &[NamedTensor],
) -> Vec<NamedTensor> {
    let find = |name: &str| {
        diffusers
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is missing"))
    };
    let mut out = Vec::new();
    for (name, values, shape) in diffusers {
        let Some(original) = zimage_transformer::checkpoint::original_name(config, name) else {
            continue; // to_k, to_v: rows of the fused qkv
        };
        let (values, shape) = match name.strip_suffix(".attention.to_q.weight") {
            Some(block) => {
                let parts: Vec<_> = ["to_q", "to_k", "to_v"]
                    .iter()
                    .map(|p| find(&format!("{block}.attention.{p}.weight")))
                    .collect();
                let rows = parts.iter().map(|(_, _, s)| s[0]).sum();
                let fused = parts
                    .iter()
                    .flat_map(|(_, v, _)| v.iter().copied())
                    .collect();
                (fused, vec![rows, shape[1]])
            }
            None => (values.clone(), shape.clone()),
        };
        out.push((format!("model.diffusion_model.{original}"), values, shape));
    }
    out
}
