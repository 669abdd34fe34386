//! Building modules from named tensors.
//!
//! A component builds itself through [`Weights`], asking for each parameter by its module path
//! (`layers.0.attention.to_q.weight`) and shape, next to the layer that owns it. The same
//! construction code serves three purposes:
//! - a dry run that records every expected path and shape, so a checkpoint is compared with the
//!   model *before* anything is loaded and every difference is reported at once;
//! - loading from a [`WeightMap`] (a checkpoint seen through the component's key mapping);
//! - random initialisation (benchmarks, nothing to download).
//!
//! Weight matrices (Linear, embedding and convolution weights: nearly all the bytes) are kept in
//! their stored precision unless asked otherwise ([`Precision`]): on backends with host kernels as
//! [`HostMatrix`]es, straight from the memory-mapped file when no conversion is needed; on the
//! device as tensors in that dtype, cast to the compute dtype per use. Everything else (norms,
//! biases, pad tokens) is created in the compute dtype.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Display;
use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorData};

use crate::checkpoint::{Checkpoint, RawTensor, StoredDtype, TensorEntry};
use crate::error::{CheckpointError, MismatchReport, ShapeMismatch};
use crate::host::{HostFormat, HostMatrix};
use crate::{QuantizedMatrix, ZBackend};

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
                    } else if squeezed(&actual) != squeezed(shape) {
                        // Unit dimensions may differ: `tensor` takes them either way.
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

/// The dtypes a model is loaded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    /// What the model computes in (activations, norms, biases).
    pub compute: DType,
    /// What weight matrices are held in; `None` keeps the checkpoint's precision where that is
    /// narrower than the compute dtype (on the host: always), else the compute dtype.
    pub weights: Option<DType>,
}

impl Precision {
    /// Weights held in `weights`.
    pub fn with_weights(self, weights: Option<DType>) -> Self {
        Self { weights, ..self }
    }

    /// The dtype a weight matrix stored as `stored` is held in: on the host (host kernels) the
    /// asked weights dtype or the stored one; on a device the asked one if `supported`, else the
    /// stored one where it is narrower than the compute dtype and `supported`, else the compute
    /// dtype.
    pub fn matrix_dtype(
        &self,
        stored: Option<StoredDtype>,
        host: bool,
        supported: impl Fn(DType) -> bool,
    ) -> DType {
        let stored = stored.and_then(stored_as_dtype);
        if host {
            return match self.weights {
                Some(d @ (DType::BF16 | DType::F16)) => d,
                Some(_) => DType::F32,
                None => stored.unwrap_or(DType::F32),
            };
        }
        if let Some(weights) = self.weights {
            return if supported(weights) {
                weights
            } else {
                self.compute
            };
        }
        match stored {
            Some(d) if d.size() < self.compute.size() && supported(d) => d,
            _ => self.compute,
        }
    }
}

impl From<DType> for Precision {
    fn from(compute: DType) -> Self {
        Self {
            compute,
            weights: None,
        }
    }
}

/// A weight matrix as the backend holds it.
#[derive(Debug, Clone)]
pub enum Stored<B: Backend, const D: usize> {
    /// A device tensor in the layout the owning layer documents, in its storage dtype.
    Device(Tensor<B, D>),
    /// `[first dimension, the others flattened]` on the host, in the stored precision.
    Host(HostMatrix),
    /// ggml blocks on the device, `[first dimension, the others flattened]`, dequantized per use.
    Quantized(QuantizedMatrix<B>),
}

impl<B: Backend, const D: usize> Stored<B, D> {
    /// Bytes the weight occupies.
    pub fn size_bytes(&self) -> usize {
        match self {
            Self::Device(t) => t.shape().num_elements() * t.dtype().size(),
            Self::Host(m) => m.size_bytes(),
            Self::Quantized(q) => q.size_bytes(),
        }
    }
}

enum Source<'a> {
    /// Dry run: record what is asked for.
    Record(RefCell<Vec<(String, Vec<usize>)>>),
    Map(&'a WeightMap),
    /// Random normal values (std 0.02; 1-D tensors around 1).
    Random,
}

struct Inner<'a, B: Backend> {
    source: Source<'a>,
    device: B::Device,
    precision: Precision,
    /// Whether matrices are held on the host (the backend's choice for this device).
    host: bool,
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

impl<'a, B: ZBackend> Weights<'a, B> {
    fn with_source(source: Source<'a>, device: &B::Device, precision: Precision) -> Self {
        Self {
            inner: std::rc::Rc::new(Inner {
                source,
                device: device.clone(),
                precision,
                host: B::host_kernels(device),
            }),
            prefix: String::new(),
        }
    }

    /// Parameters read from `map`.
    pub fn from_map(
        map: &'a WeightMap,
        device: &B::Device,
        precision: impl Into<Precision>,
    ) -> Self {
        Self::with_source(Source::Map(map), device, precision.into())
    }

    /// Random parameters (for benchmarks and tests of shapes).
    pub fn random(device: &B::Device, precision: impl Into<Precision>) -> Self {
        Self::with_source(Source::Random, device, precision.into())
    }

    fn recorder(device: &B::Device) -> Self {
        Self::with_source(
            Source::Record(RefCell::new(Vec::new())),
            device,
            DType::F32.into(),
        )
    }

    /// The view one level down: `w.pp("attention").pp("to_q")`.
    pub fn pp(&self, name: impl Display) -> Self {
        Self {
            inner: self.inner.clone(),
            prefix: self.path(&name.to_string()),
        }
    }

    pub fn device(&self) -> &B::Device {
        &self.inner.device
    }

    /// The compute dtype (what non-matrix parameters are created in).
    pub fn dtype(&self) -> DType {
        self.inner.precision.compute
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    fn file(&self) -> std::path::PathBuf {
        match &self.inner.source {
            Source::Map(map) => map.checkpoint.origin().to_path_buf(),
            _ => "random weights".into(),
        }
    }

    /// Refuses a tensor the device cannot hold in one allocation (instead of computing on zeros).
    fn check_fits(&self, path: &str, shape: &[usize], dtype: DType) -> Result<(), CheckpointError> {
        crate::device::check_fits::<B>(&self.inner.device, || path.to_string(), shape, dtype)
            .map_err(|source| CheckpointError::TooLarge {
                file: self.file(),
                source,
            })
    }

    /// The checkpoint tensor behind `path`, checked to have `shape`.
    fn lookup(
        &self,
        map: &'a WeightMap,
        path: &str,
        shape: &[usize],
    ) -> Result<&'a TensorRef, CheckpointError> {
        let Some((actual, tensor, _)) = map.shape_of(path) else {
            return Err(CheckpointError::mismatch(MismatchReport {
                file: map.checkpoint.origin().to_path_buf(),
                missing: vec![path.to_string()],
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
        Ok(tensor)
    }

    /// The dtype a matrix stored as `stored` is held in on the device.
    fn device_dtype(&self, stored: Option<StoredDtype>) -> DType {
        let Precision { compute, weights } = self.inner.precision;
        let supported = |d: DType| B::supports_dtype(&self.inner.device, d);
        if let Some(weights) = weights {
            return if supported(weights) { weights } else { compute };
        }
        match stored.and_then(stored_as_dtype) {
            Some(d) if d.size() < compute.size() && supported(d) => d,
            _ => compute,
        }
    }

    /// The format a matrix stored as `stored` is held in on the host (quantized blocks stay
    /// quantized unless a weights dtype is asked for).
    fn host_format(&self, stored: Option<StoredDtype>) -> HostFormat {
        match self.inner.precision.weights {
            Some(DType::BF16) => HostFormat::BF16,
            Some(DType::F16) => HostFormat::F16,
            Some(_) => HostFormat::F32,
            None => stored
                .and_then(HostFormat::from_stored)
                .unwrap_or(HostFormat::F32),
        }
    }

    /// The tensor `name` under this prefix, which must have `shape`, in the compute dtype.
    pub fn tensor<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<B, D>, CheckpointError> {
        let path = self.path(name);
        let inner = &*self.inner;
        let options = (&inner.device, self.dtype());
        match &inner.source {
            Source::Record(list) => {
                list.borrow_mut().push((path, shape.to_vec()));
                Ok(Tensor::zeros([1; D], options))
            }
            Source::Random => {
                self.check_fits(&path, &shape, self.dtype())?;
                let noise = Tensor::random(shape, Distribution::Normal(0.0, 0.02), options);
                Ok(if D == 1 { noise.add_scalar(1.0) } else { noise })
            }
            Source::Map(map) => {
                self.check_fits(&path, &shape, self.dtype())?;
                // Vectors and tokens are taken with unit dimensions added or dropped
                // (stable-diffusion.cpp stores `x_pad_token`, `[1, dim]`, as `[dim]`).
                let tensor = match map.shape_of(&path) {
                    Some((actual, tensor, _)) if squeezed(&actual) == squeezed(&shape) => tensor,
                    _ => self.lookup(map, &path, &shape)?,
                };
                let mut data =
                    map.checkpoint
                        .read(&tensor.name, tensor.rows.clone(), self.dtype())?;
                data.shape = burn::tensor::Shape::from(shape);
                Ok(Tensor::from_data(data, options))
            }
        }
    }

    /// A weight matrix of `shape` (an embedding table, a convolution kernel): on the device as a
    /// tensor of that shape, on the host as `[shape[0], the rest]` rows.
    pub fn matrix<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Stored<B, D>, CheckpointError> {
        let path = self.path(name);
        let rows = shape[0];
        let cols = shape[1..].iter().product();
        let inner = &*self.inner;
        match &inner.source {
            Source::Record(list) => {
                list.borrow_mut().push((path, shape.to_vec()));
                Ok(Stored::Device(Tensor::zeros(
                    [1; D],
                    (&inner.device, DType::F32),
                )))
            }
            Source::Random if inner.host => Ok(Stored::Host(random_host(
                rows,
                cols,
                self.host_format(None),
            ))),
            Source::Random => {
                let dtype = self.device_dtype(None);
                self.check_fits(&path, &shape, dtype)?;
                Ok(Stored::Device(Tensor::random(
                    shape,
                    Distribution::Normal(0.0, 0.02),
                    (&inner.device, dtype),
                )))
            }
            Source::Map(map) => {
                let tensor = self.lookup(map, &path, &shape)?;
                if inner.host {
                    let raw = map.checkpoint.raw(&tensor.name, tensor.rows.clone())?;
                    return Ok(Stored::Host(self.host_matrix(raw, rows, cols)));
                }
                if D == 2 {
                    if let Some(q) = self.device_quantized(map, tensor, &path, rows, cols)? {
                        return Ok(Stored::Quantized(q));
                    }
                }
                let stored = map.checkpoint.get(&tensor.name).map(|e| e.dtype);
                let dtype = self.device_dtype(stored);
                self.check_fits(&path, &shape, dtype)?;
                let data = map
                    .checkpoint
                    .read(&tensor.name, tensor.rows.clone(), dtype)?;
                Ok(Stored::Device(Tensor::from_data(
                    data,
                    (&inner.device, dtype),
                )))
            }
        }
    }

    /// A PyTorch `Linear` weight `[out, in]` (stored under `stored_shape`, the same values): on
    /// the device transposed to `[in, out]` so that `x.matmul(w)` needs no copy of the weight on
    /// any backend; on the host as stored.
    pub fn linear_weight(
        &self,
        name: &str,
        out_features: usize,
        in_features: usize,
        stored_shape: &[usize],
    ) -> Result<Stored<B, 2>, CheckpointError> {
        debug_assert_eq!(
            stored_shape.iter().product::<usize>(),
            out_features * in_features
        );
        let path = self.path(name);
        let inner = &*self.inner;
        match &inner.source {
            Source::Record(list) => {
                list.borrow_mut().push((path, stored_shape.to_vec()));
                Ok(Stored::Device(Tensor::zeros(
                    [1, 1],
                    (&inner.device, DType::F32),
                )))
            }
            Source::Random if inner.host => Ok(Stored::Host(random_host(
                out_features,
                in_features,
                self.host_format(None),
            ))),
            // Made directly as [in, out]: a transposed view would be copied by every matmul on
            // some backends.
            Source::Random => {
                let dtype = self.device_dtype(None);
                self.check_fits(&path, &[in_features, out_features], dtype)?;
                Ok(Stored::Device(Tensor::random(
                    [in_features, out_features],
                    Distribution::Normal(0.0, 0.02),
                    (&inner.device, dtype),
                )))
            }
            Source::Map(map) => {
                let tensor = self.lookup(map, &path, stored_shape)?;
                if inner.host {
                    let raw = map.checkpoint.raw(&tensor.name, tensor.rows.clone())?;
                    return Ok(Stored::Host(self.host_matrix(
                        raw,
                        out_features,
                        in_features,
                    )));
                }
                if let Some(q) =
                    self.device_quantized(map, tensor, &path, out_features, in_features)?
                {
                    return Ok(Stored::Quantized(q));
                }
                let stored = map.checkpoint.get(&tensor.name).map(|e| e.dtype);
                let dtype = self.device_dtype(stored);
                self.check_fits(&path, &[in_features, out_features], dtype)?;
                let data = map
                    .checkpoint
                    .read(&tensor.name, tensor.rows.clone(), dtype)?;
                Ok(Stored::Device(Tensor::from_data(
                    transpose_2d(&data, out_features, in_features),
                    (&inner.device, dtype),
                )))
            }
        }
    }

    /// A quantized tensor kept quantized on the device (unless a weights dtype was asked for).
    fn device_quantized(
        &self,
        map: &WeightMap,
        tensor: &TensorRef,
        path: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<QuantizedMatrix<B>>, CheckpointError> {
        let Some(StoredDtype::Quantized(ty)) = map.checkpoint.get(&tensor.name).map(|e| e.dtype)
        else {
            return Ok(None);
        };
        if self.inner.precision.weights.is_some() {
            return Ok(None);
        }
        // Each use makes the whole matrix in the compute dtype: that must fit too.
        self.check_fits(path, &[rows, cols], DType::F32)?;
        let raw = map.checkpoint.raw(&tensor.name, tensor.rows.clone())?;
        let q = QuantizedMatrix::from_blocks(ty, raw.bytes.bytes(), rows, cols, self.device());
        raw.bytes.release();
        Ok(Some(q))
    }

    /// A host matrix from the file's bytes: mapped in place when the format is the file's,
    /// converted otherwise (and the file's pages let go).
    fn host_matrix(&self, raw: RawTensor, rows: usize, cols: usize) -> HostMatrix {
        let stored = HostFormat::from_stored(raw.dtype).expect("the map checks weights are float");
        let format = self.host_format(Some(raw.dtype));
        if format == stored {
            raw.bytes.prefault();
            return HostMatrix::mapped(rows, cols, format, raw.bytes);
        }
        let matrix = HostMatrix::convert(rows, cols, raw.bytes.bytes(), stored, format);
        raw.bytes.release();
        matrix
    }
}

fn stored_as_dtype(stored: StoredDtype) -> Option<DType> {
    match stored {
        StoredDtype::F32 => Some(DType::F32),
        StoredDtype::BF16 => Some(DType::BF16),
        StoredDtype::F16 => Some(DType::F16),
        StoredDtype::Quantized(_) | StoredDtype::Other(_) => None,
    }
}

/// Random values of standard deviation 0.02 (uniform, from a counter hash: benchmarks need
/// realistic magnitudes fast, not a particular distribution).
fn random_host(rows: usize, cols: usize, format: HostFormat) -> HostMatrix {
    use rayon::prelude::*;
    let mut values = vec![0f32; rows * cols];
    values
        .par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (i, v) in chunk.iter_mut().enumerate() {
                let mut x = ((c << 16) + i) as u64 ^ 0x9e37_79b9_7f4a_7c15;
                x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                x ^= x >> 31;
                // Uniform on [-a, a] has standard deviation a / sqrt(3).
                *v = ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 0.02 * 3f32.sqrt();
            }
        });
    HostMatrix::from_f32(rows, cols, &values, format)
}

/// Builds a module from `map`: a dry run of `build` lists the expected tensors, the checkpoint is
/// compared with it (every missing, unexpected, misshapen or non-float tensor is reported at
/// once), then `build` runs for real, reading one tensor at a time.
pub fn load_module<B: ZBackend, M>(
    map: &WeightMap,
    device: &B::Device,
    precision: impl Into<Precision>,
    build: impl Fn(&Weights<'_, B>) -> Result<M, CheckpointError>,
) -> Result<M, CheckpointError> {
    map.check(&expected_tensors::<B, M>(device, &build)?)?;
    build(&Weights::from_map(map, device, precision))
}

/// Every `(module path, shape)` that `build` asks for, in order.
pub fn expected_tensors<B: ZBackend, M>(
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

/// The `[rows, cols]` row-major values of `data` transposed, whatever their element size.
fn transpose_2d(data: &TensorData, rows: usize, cols: usize) -> TensorData {
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
    TensorData::from_bytes_vec(out, [cols, rows], dtype)
}

/// `shape` without its unit dimensions.
fn squeezed(shape: &[usize]) -> Vec<usize> {
    shape.iter().copied().filter(|&d| d != 1).collect()
}
