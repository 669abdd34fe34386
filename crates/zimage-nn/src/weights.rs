//! Building modules from named tensors.
//!
//! A component builds itself through [`Weights`], asking for each parameter by its module path
//! (`layers.0.attention.to_q.weight`) and shape, next to the layer that owns it. The same
//! construction code serves three purposes:
//! - a dry run that records every expected path and shape, so a checkpoint is compared with the
//!   model *before* anything is loaded and every difference is reported at once;
//! - loading from a [`WeightMap`] (a checkpoint seen through the component's key mapping);
//! - random initialisation on the device (benchmarks, nothing to download).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Display;
use std::ops::Range;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};

use crate::checkpoint::{Checkpoint, TensorEntry};
use crate::error::{CheckpointError, MismatchReport, ShapeMismatch};

/// Where one module parameter comes from: a checkpoint tensor, or some rows of one
/// (fused projections such as `attention.qkv` are split this way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    pub name: String,
    pub rows: Option<Range<usize>>,
}

/// What a checkpoint tensor becomes in a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMapping {
    /// One parameter at this module path.
    To(String),
    /// Several parameters, each taking a range of rows (first dimension).
    Split(Vec<(String, Range<usize>)>),
    /// Known and unused (leftovers of other formats).
    Ignore,
}

/// A checkpoint seen through a component's naming: module path -> tensor.
pub struct WeightMap {
    checkpoint: Checkpoint,
    by_path: BTreeMap<String, TensorRef>,
}

impl WeightMap {
    /// Module paths are the checkpoint names.
    pub fn identity(checkpoint: Checkpoint) -> Self {
        Self::new(checkpoint, |name, _| KeyMapping::To(name.to_string()))
    }

    /// Maps every checkpoint tensor with `map` (given its name and shape).
    pub fn new(checkpoint: Checkpoint, map: impl Fn(&str, &[usize]) -> KeyMapping) -> Self {
        let mut by_path = BTreeMap::new();
        for (name, entry) in checkpoint.entries() {
            match map(name, &entry.shape) {
                KeyMapping::To(path) => {
                    by_path.insert(
                        path,
                        TensorRef {
                            name: name.to_string(),
                            rows: None,
                        },
                    );
                }
                KeyMapping::Split(parts) => {
                    for (path, rows) in parts {
                        by_path.insert(
                            path,
                            TensorRef {
                                name: name.to_string(),
                                rows: Some(rows),
                            },
                        );
                    }
                }
                KeyMapping::Ignore => {}
            }
        }
        Self {
            checkpoint,
            by_path,
        }
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// Module paths this map provides.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.by_path.keys().map(String::as_str)
    }

    /// The shape a module parameter would get, and the checkpoint name it comes from.
    fn shape_of(&self, path: &str) -> Option<(Vec<usize>, &TensorRef, &TensorEntry)> {
        let tensor = self.by_path.get(path)?;
        let entry = self.checkpoint.get(&tensor.name)?;
        let mut shape = entry.shape.clone();
        if let (Some(rows), Some(first)) = (&tensor.rows, shape.first_mut()) {
            *first = rows.len();
        }
        Some((shape, tensor, entry))
    }

    /// Compares the expected `(path, shape)` list with the checkpoint; lists every difference.
    pub fn check(&self, expected: &[(String, Vec<usize>)]) -> Result<(), CheckpointError> {
        let mut report = MismatchReport {
            file: self.checkpoint.origin().to_path_buf(),
            ..Default::default()
        };
        let mut seen = std::collections::HashSet::new();
        for (path, shape) in expected {
            seen.insert(path.as_str());
            match self.shape_of(path) {
                None => report.missing.push(path.clone()),
                Some((actual, tensor, entry)) => {
                    if !entry.dtype.is_float() {
                        report
                            .wrong_dtype
                            .push((tensor.name.clone(), entry.dtype.to_string()));
                    } else if &actual != shape {
                        report.wrong_shape.push(ShapeMismatch {
                            tensor: tensor.name.clone(),
                            expected: shape.clone(),
                            actual: entry.shape.clone(),
                        });
                    }
                }
            }
        }
        let mut unexpected: Vec<String> = self
            .by_path
            .iter()
            .filter(|(path, _)| !seen.contains(path.as_str()))
            .map(|(_, tensor)| tensor.name.clone())
            .collect();
        unexpected.dedup();
        report.unexpected = unexpected;
        report.missing.sort();
        if report.is_empty() {
            Ok(())
        } else {
            Err(CheckpointError::mismatch(report))
        }
    }
}

enum Source<'a> {
    /// Dry run: record what is asked for.
    Record(RefCell<Vec<(String, Vec<usize>)>>),
    Map(&'a WeightMap),
    /// Random normal values (std 0.02; 1-D tensors around 1), made on the device.
    Random,
}

struct Inner<'a, B: Backend> {
    source: Source<'a>,
    device: B::Device,
    dtype: DType,
}

/// A view of the parameters under one module path prefix.
pub struct Weights<'a, B: Backend> {
    inner: std::rc::Rc<Inner<'a, B>>,
    prefix: String,
}

impl<B: Backend> Clone for Weights<'_, B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            prefix: self.prefix.clone(),
        }
    }
}

impl<'a, B: Backend> Weights<'a, B> {
    fn with_source(source: Source<'a>, device: &B::Device, dtype: DType) -> Self {
        Self {
            inner: std::rc::Rc::new(Inner {
                source,
                device: device.clone(),
                dtype,
            }),
            prefix: String::new(),
        }
    }

    /// Parameters read from `map`, cast to `dtype`.
    pub fn from_map(map: &'a WeightMap, device: &B::Device, dtype: DType) -> Self {
        Self::with_source(Source::Map(map), device, dtype)
    }

    /// Random parameters made on the device (for benchmarks and tests of shapes).
    pub fn random(device: &B::Device, dtype: DType) -> Self {
        Self::with_source(Source::Random, device, dtype)
    }

    fn recorder(device: &B::Device) -> Self {
        Self::with_source(Source::Record(RefCell::new(Vec::new())), device, DType::F32)
    }

    /// The view one level down: `w.pp("attention").pp("to_q")`.
    pub fn pp(&self, name: impl Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            inner: self.inner.clone(),
            prefix,
        }
    }

    pub fn device(&self) -> &B::Device {
        &self.inner.device
    }

    /// The dtype parameters are created in.
    pub fn dtype(&self) -> DType {
        self.inner.dtype
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Refuses a parameter the device cannot hold in one tensor (instead of computing on zeros).
    fn check_fits(&self, path: &str, shape: &[usize]) -> Result<(), CheckpointError> {
        let inner = &*self.inner;
        if matches!(inner.source, Source::Record(_)) {
            return Ok(());
        }
        crate::device::check_fits::<B>(&inner.device, || path.to_string(), shape, inner.dtype)
            .map_err(|source| CheckpointError::TooLarge {
                file: match &inner.source {
                    Source::Map(map) => map.checkpoint.origin().to_path_buf(),
                    _ => "random weights".into(),
                },
                source,
            })
    }

    /// The tensor `name` under this prefix, which must have `shape`.
    pub fn tensor<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<B, D>, CheckpointError> {
        let path = self.path(name);
        self.check_fits(&path, &shape)?;
        let inner = &*self.inner;
        let options = (&inner.device, inner.dtype);
        match &inner.source {
            Source::Record(list) => {
                list.borrow_mut().push((path, shape.to_vec()));
                Ok(Tensor::zeros([1; D], options))
            }
            Source::Random => {
                let noise = Tensor::random(shape, Distribution::Normal(0.0, 0.02), options);
                Ok(if D == 1 { noise.add_scalar(1.0) } else { noise })
            }
            Source::Map(map) => {
                let Some((actual, tensor, _)) = map.shape_of(&path) else {
                    return Err(CheckpointError::mismatch(MismatchReport {
                        file: map.checkpoint.origin().to_path_buf(),
                        missing: vec![path],
                        ..Default::default()
                    }));
                };
                if actual != shape {
                    return Err(CheckpointError::mismatch(MismatchReport {
                        file: map.checkpoint.origin().to_path_buf(),
                        wrong_shape: vec![ShapeMismatch {
                            tensor: tensor.name.clone(),
                            expected: shape.to_vec(),
                            actual,
                        }],
                        ..Default::default()
                    }));
                }
                let data = map
                    .checkpoint
                    .read(&tensor.name, tensor.rows.clone(), inner.dtype)?;
                Ok(Tensor::from_data(data, options))
            }
        }
    }

    /// A PyTorch `Linear` weight stored `[out, in]`, returned transposed to `[in, out]` so that
    /// `x.matmul(w)` needs no copy of the weight on any backend.
    pub fn linear_weight(
        &self,
        name: &str,
        out_features: usize,
        in_features: usize,
    ) -> Result<Tensor<B, 2>, CheckpointError> {
        let path = self.path(name);
        self.check_fits(&path, &[out_features, in_features])?;
        let inner = &*self.inner;
        match &inner.source {
            Source::Map(map) => {
                // Validate shape through the common path, then read and transpose on the host.
                let (actual, tensor, _) = map.shape_of(&path).ok_or_else(|| {
                    CheckpointError::mismatch(MismatchReport {
                        file: map.checkpoint.origin().to_path_buf(),
                        missing: vec![path.clone()],
                        ..Default::default()
                    })
                })?;
                if actual != [out_features, in_features] {
                    return Err(CheckpointError::mismatch(MismatchReport {
                        file: map.checkpoint.origin().to_path_buf(),
                        wrong_shape: vec![ShapeMismatch {
                            tensor: tensor.name.clone(),
                            expected: vec![out_features, in_features],
                            actual,
                        }],
                        ..Default::default()
                    }));
                }
                let data = map
                    .checkpoint
                    .read(&tensor.name, tensor.rows.clone(), inner.dtype)?;
                Ok(Tensor::from_data(
                    transpose_2d(data),
                    (&inner.device, inner.dtype),
                ))
            }
            // Recorded under the checkpoint's [out, in] shape.
            Source::Record(_) => Ok(self.tensor(name, [out_features, in_features])?.transpose()),
            // Made directly as [in, out]: a transposed view would be copied by every matmul on
            // some backends (2.5x slower on ndarray).
            Source::Random => Ok(Tensor::random(
                [in_features, out_features],
                Distribution::Normal(0.0, 0.02),
                (&inner.device, inner.dtype),
            )),
        }
    }

    /// Like [`Weights::tensor`], wrapped as a module parameter.
    pub fn param<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Param<Tensor<B, D>>, CheckpointError> {
        self.tensor(name, shape).map(Param::from_tensor)
    }
}

/// Builds a module from `map`: a dry run of `build` lists the expected tensors, the checkpoint is
/// compared with it (every missing, unexpected, misshapen or non-float tensor is reported at
/// once), then `build` runs for real, reading one tensor at a time.
pub fn load_module<B: Backend, M>(
    map: &WeightMap,
    device: &B::Device,
    dtype: DType,
    build: impl Fn(&Weights<'_, B>) -> Result<M, CheckpointError>,
) -> Result<M, CheckpointError> {
    map.check(&expected_tensors::<B, M>(device, &build)?)?;
    build(&Weights::from_map(map, device, dtype))
}

/// Every `(module path, shape)` that `build` asks for, in order.
pub fn expected_tensors<B: Backend, M>(
    device: &B::Device,
    build: impl Fn(&Weights<'_, B>) -> Result<M, CheckpointError>,
) -> Result<Vec<(String, Vec<usize>)>, CheckpointError> {
    let recorder = Weights::<B>::recorder(device);
    drop(build(&recorder)?);
    match &recorder.inner.source {
        Source::Record(list) => Ok(list.take()),
        _ => unreachable!("recorder is built with a record source"),
    }
}

/// Transposes a row-major 2-D tensor on the host, whatever its element size.
fn transpose_2d(data: burn::tensor::TensorData) -> burn::tensor::TensorData {
    let [rows, cols] = [data.shape[0], data.shape[1]];
    let dtype = data.dtype;
    let bytes = data.as_bytes();
    let size = dtype.size();
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let src = (r * cols + c) * size;
            let dst = (c * rows + r) * size;
            out[dst..dst + size].copy_from_slice(&bytes[src..src + size]);
        }
    }
    burn::tensor::TensorData::from_bytes_vec(out, [cols, rows], dtype)
}
