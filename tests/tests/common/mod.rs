//! Helpers shared by the parity tests: fixture paths, reading recorded tensors, error metrics.
#![allow(dead_code)]

pub mod pipeline;

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use safetensors::SafeTensors;

pub type B = NdArray<f32>;

/// `tests/fixtures` of the workspace, from whichever package's tests include this module.
pub fn fixtures() -> PathBuf {
    // The run-time value first: a test binary built by another checkout sharing the target
    // directory must read this checkout's fixtures.
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
