//! Reading checkpoints: a safetensors file, a sharded set described by a
//! `*.safetensors.index.json`, or a GGUF file.
//!
//! Files are memory-mapped; a tensor is copied to the host only when it is read, one at a time,
//! and cast on the way to the dtype the model asks for (stored F32, BF16 and F16 are accepted, and
//! from GGUF files the ggml block types of [`crate::quant`], dequantized when read).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{DType, TensorData};
use half::{bf16, f16};
use memmap2::{Advice, Mmap, UncheckedAdvice};
use safetensors::{Dtype as StDtype, SafeTensors};
use serde::Deserialize;

use crate::error::{CheckpointError, MismatchReport};
use crate::gguf::{self, GgufValue};
use crate::quant::{self, GgmlType};

/// Storage type of a tensor in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    BF16,
    F16,
    /// ggml blocks (GGUF files).
    Quantized(GgmlType),
    /// Anything a model cannot take as float weights (integers, f64, fp8, ...), by its safetensors name.
    Other(&'static str),
}

impl StoredDtype {
    fn from_safetensors(dtype: StDtype) -> Self {
        match dtype {
            StDtype::F32 => Self::F32,
            StDtype::BF16 => Self::BF16,
            StDtype::F16 => Self::F16,
            StDtype::F64 => Self::Other("F64"),
            StDtype::I64 => Self::Other("I64"),
            StDtype::I32 => Self::Other("I32"),
            StDtype::I16 => Self::Other("I16"),
            StDtype::I8 => Self::Other("I8"),
            StDtype::U8 => Self::Other("U8"),
            StDtype::BOOL => Self::Other("BOOL"),
            StDtype::F8_E4M3 => Self::Other("F8_E4M3"),
            StDtype::F8_E5M2 => Self::Other("F8_E5M2"),
            _ => Self::Other("an unsupported dtype"),
        }
    }

    fn from_ggml(ty: GgmlType) -> Self {
        match ty {
            GgmlType::F32 => Self::F32,
            GgmlType::F16 => Self::F16,
            GgmlType::BF16 => Self::BF16,
            quantized => Self::Quantized(quantized),
        }
    }

    pub fn is_float(self) -> bool {
        !matches!(self, Self::Other(_))
    }
}

impl fmt::Display for StoredDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::F32 => f.write_str("F32"),
            Self::BF16 => f.write_str("BF16"),
            Self::F16 => f.write_str("F16"),
            Self::Quantized(ty) => f.write_str(ty.name()),
            Self::Other(name) => f.write_str(name),
        }
    }
}

/// Where one tensor lives: its shard, dtype, shape and byte range inside the shard's data section.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    shard: usize,
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    bytes: Range<usize>,
}

struct Shard {
    path: PathBuf,
    mmap: Arc<Mmap>,
    data_start: usize,
}

/// Bytes of one tensor inside a memory-mapped file; they keep the mapping alive, so weights can
/// be used in place after the [`Checkpoint`] is dropped.
#[derive(Clone)]
pub struct MappedBytes {
    map: Arc<Mmap>,
    range: Range<usize>,
}

impl MappedBytes {
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }

    /// Maps every page in now (from the page cache, or the disk), so that the first use does not
    /// fault them in one at a time.
    pub fn prefault(&self) {
        let len = self.range.len();
        if len == 0 {
            return;
        }
        if self
            .map
            .advise_range(Advice::PopulateRead, self.range.start, len)
            .is_err()
        {
            // Kernels before 5.14: touch one byte per page.
            let bytes = self.bytes();
            let mut sum = 0u8;
            for i in (0..len).step_by(4096) {
                sum = sum.wrapping_add(bytes[i]);
            }
            std::hint::black_box(sum);
        }
    }

    /// Drops this range's pages from the process (they stay in the page cache): after a tensor
    /// has been converted to another precision its file pages would otherwise count as resident
    /// memory until the whole file is unmapped.
    pub fn release(&self) {
        // SAFETY: the mapping is read-only and file-backed: dropped pages read back from the file
        // if touched again, so no live reference sees different data.
        let _ = unsafe {
            self.map.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                self.range.start,
                self.range.len(),
            )
        };
    }
}

/// One tensor as stored: dtype, shape (rows already narrowed when asked) and its mapped bytes.
pub struct RawTensor {
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    pub bytes: MappedBytes,
}

/// An opened checkpoint: every tensor name of every shard, with the shards memory-mapped.
pub struct Checkpoint {
    origin: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorEntry>,
    /// The `__metadata__` strings of every shard (the first shard's value wins).
    metadata: BTreeMap<String, String>,
    /// The metadata of GGUF files.
    gguf: BTreeMap<String, GgufValue>,
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    /// Opens a `.safetensors` file, a `*.safetensors.index.json`, or a folder holding either
    /// (an index is preferred when a folder has one).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let path = path.as_ref();
        if path.is_dir() {
            return Self::open(find_in_folder(path)?);
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.ends_with(".json") {
            Self::open_index(path)
        } else {
            Self::open_files(path, &[path.to_path_buf()])
        }
    }

    /// Opens several single files as one checkpoint (their names must not collide).
    pub fn open_files(origin: &Path, files: &[PathBuf]) -> Result<Self, CheckpointError> {
        let mut checkpoint = Checkpoint {
            origin: origin.to_path_buf(),
            shards: Vec::new(),
            tensors: BTreeMap::new(),
            metadata: BTreeMap::new(),
            gguf: BTreeMap::new(),
        };
        for file in files {
            checkpoint.add_shard(file, None)?;
        }
        Ok(checkpoint)
    }

    fn open_index(index_path: &Path) -> Result<Self, CheckpointError> {
        let text = std::fs::read_to_string(index_path).map_err(|source| CheckpointError::Io {
            path: index_path.to_path_buf(),
            source,
        })?;
        let index: IndexFile =
            serde_json::from_str(&text).map_err(|e| CheckpointError::MalformedIndex {
                path: index_path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let folder = index_path.parent().unwrap_or(Path::new("."));
        // Group names per shard file, keeping a stable order.
        let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, file) in &index.weight_map {
            by_file
                .entry(file.as_str())
                .or_default()
                .push(tensor.as_str());
        }
        if by_file.is_empty() {
            return Err(CheckpointError::MalformedIndex {
                path: index_path.to_path_buf(),
                reason: "its weight_map is empty".into(),
            });
        }
        let mut checkpoint = Checkpoint {
            origin: index_path.to_path_buf(),
            shards: Vec::new(),
            tensors: BTreeMap::new(),
            metadata: BTreeMap::new(),
            gguf: BTreeMap::new(),
        };
        for (file, names) in by_file {
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(CheckpointError::MalformedIndex {
                    path: index_path.to_path_buf(),
                    reason: format!("shard name {file:?} is not a plain file name"),
                });
            }
            checkpoint.add_shard(&folder.join(file), Some(&names))?;
        }
        Ok(checkpoint)
    }

    /// Maps one safetensors file and records its tensors. With `expected`, the names an index
    /// assigns to this shard must all be present (extra tensors in the shard are kept).
    fn add_shard(&mut self, path: &Path, expected: Option<&[&str]>) -> Result<(), CheckpointError> {
        let file = File::open(path).map_err(|source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the map is read-only; a checkpoint modified while it is open is outside our
        // control, as for every mmap-based loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if gguf::is_gguf(&mmap) {
            return self.add_gguf(path, mmap);
        }
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            CheckpointError::MalformedSafetensors {
                path: path.to_path_buf(),
                reason: describe_safetensors_error(&e, mmap.len()),
            }
        })?;
        let shard = self.shards.len();
        for (key, value) in metadata.metadata().iter().flatten() {
            self.metadata
                .entry(key.clone())
                .or_insert_with(|| value.clone());
        }
        for (name, info) in metadata.tensors() {
            let dtype = StoredDtype::from_safetensors(info.dtype);
            let entry = TensorEntry {
                shard,
                dtype,
                shape: info.shape.clone(),
                bytes: info.data_offsets.0..info.data_offsets.1,
            };
            if self.tensors.insert(name.clone(), entry).is_some() {
                return Err(CheckpointError::MalformedSafetensors {
                    path: path.to_path_buf(),
                    reason: format!("tensor {name} is also stored in another shard"),
                });
            }
        }
        if let Some(expected) = expected {
            for name in expected {
                match self.tensors.get(*name) {
                    Some(entry) if entry.shard == shard => {}
                    _ => {
                        return Err(CheckpointError::MalformedIndex {
                            path: self.origin.clone(),
                            reason: format!(
                                "it places {name} in {}, which does not hold it",
                                path.display()
                            ),
                        })
                    }
                }
            }
        }
        self.shards.push(Shard {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            data_start: 8 + header_len,
        });
        Ok(())
    }

    /// Records a GGUF file's tensors (byte ranges from the file's start).
    fn add_gguf(&mut self, path: &Path, mmap: Mmap) -> Result<(), CheckpointError> {
        let header = gguf::parse(&mmap).map_err(|reason| CheckpointError::MalformedGguf {
            path: path.to_path_buf(),
            reason,
        })?;
        let shard = self.shards.len();
        for tensor in header.tensors {
            let entry = TensorEntry {
                shard,
                dtype: StoredDtype::from_ggml(tensor.ty),
                shape: tensor.shape,
                bytes: tensor.bytes,
            };
            if self.tensors.insert(tensor.name.clone(), entry).is_some() {
                return Err(CheckpointError::MalformedGguf {
                    path: path.to_path_buf(),
                    reason: format!("tensor {} is also stored in another file", tensor.name),
                });
            }
        }
        for (key, value) in header.metadata {
            self.gguf.entry(key).or_insert(value);
        }
        self.shards.push(Shard {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            data_start: 0,
        });
        Ok(())
    }

    /// Whether any file of this checkpoint is a GGUF file.
    pub fn is_gguf(&self) -> bool {
        !self.gguf.is_empty()
            || self
                .tensors
                .values()
                .any(|e| matches!(e.dtype, StoredDtype::Quantized(_)))
    }

    /// A GGUF metadata value (`general.architecture`, `qwen3.block_count`, ...).
    pub fn gguf_value(&self, key: &str) -> Option<&GgufValue> {
        self.gguf.get(key)
    }

    /// A `__metadata__` string of the file(s), e.g. the `config` JSON a single file may carry.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// What was opened (file or index), for messages.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// All tensors, by name, in name order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &TensorEntry)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Bytes of every tensor, as stored.
    pub fn weight_bytes(&self) -> usize {
        self.tensors.values().map(|e| e.bytes.len()).sum()
    }

    /// The file that stores `name`.
    pub fn file_of(&self, name: &str) -> &Path {
        match self.tensors.get(name) {
            Some(entry) => &self.shards[entry.shard].path,
            None => &self.origin,
        }
    }

    /// `name` as stored (optionally only the rows `rows` of its first dimension), without a copy.
    pub fn raw(
        &self,
        name: &str,
        rows: Option<Range<usize>>,
    ) -> Result<RawTensor, CheckpointError> {
        let entry = self.tensors.get(name).ok_or_else(|| {
            CheckpointError::mismatch(MismatchReport {
                file: self.origin.clone(),
                missing: vec![name.to_string()],
                ..Default::default()
            })
        })?;
        let shard = &self.shards[entry.shard];
        if !entry.dtype.is_float() {
            return Err(CheckpointError::UnsupportedDtype {
                file: shard.path.clone(),
                tensor: name.to_string(),
                dtype: entry.dtype.to_string(),
            });
        }
        let mut shape = entry.shape.clone();
        let mut bytes = entry.bytes.clone();
        if let Some(rows) = rows {
            let total = shape.first().copied().unwrap_or(0);
            let row_bytes = if total == 0 {
                0
            } else {
                (bytes.end - bytes.start) / total
            };
            if rows.end > total || rows.start > rows.end {
                return Err(CheckpointError::MalformedSafetensors {
                    path: shard.path.clone(),
                    reason: format!("{name} has shape {shape:?}, fewer than {} rows", rows.end),
                });
            }
            bytes = bytes.start + rows.start * row_bytes..bytes.start + rows.end * row_bytes;
            shape[0] = rows.len();
        }
        Ok(RawTensor {
            dtype: entry.dtype,
            shape,
            bytes: MappedBytes {
                map: shard.mmap.clone(),
                range: shard.data_start + bytes.start..shard.data_start + bytes.end,
            },
        })
    }

    /// Reads `name` (optionally only the rows `rows` of its first dimension) and casts it to `dtype`.
    pub fn read(
        &self,
        name: &str,
        rows: Option<Range<usize>>,
        dtype: DType,
    ) -> Result<TensorData, CheckpointError> {
        let raw = self.raw(name, rows)?;
        Ok(convert(raw.bytes.bytes(), raw.dtype, raw.shape, dtype))
    }
}

/// Casts little-endian stored values to `to`. bf16/f16 -> f32 is exact, and so is ggml blocks ->
/// f32 (as gguf-py dequantizes); f32 -> bf16/f16 rounds to nearest even, as `torch.Tensor.to` does.
fn convert(raw: &[u8], from: StoredDtype, shape: Vec<usize>, to: DType) -> TensorData {
    let same = matches!(
        (from, to),
        (StoredDtype::F32, DType::F32)
            | (StoredDtype::BF16, DType::BF16)
            | (StoredDtype::F16, DType::F16)
    );
    if same {
        return TensorData::from_bytes_vec(raw.to_vec(), shape, to);
    }
    let as_f32: Vec<f32> = match from {
        StoredDtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(raw),
        StoredDtype::BF16 => bytemuck::pod_collect_to_vec::<u8, bf16>(raw)
            .into_iter()
            .map(f32::from)
            .collect(),
        StoredDtype::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(raw)
            .into_iter()
            .map(f32::from)
            .collect(),
        StoredDtype::Quantized(ty) => quant::dequantize(ty, raw),
        StoredDtype::Other(_) => unreachable!("checked by the caller"),
    };
    match to {
        DType::BF16 => TensorData::new(
            as_f32.into_iter().map(bf16::from_f32).collect::<Vec<_>>(),
            shape,
        ),
        DType::F16 => TensorData::new(
            as_f32.into_iter().map(f16::from_f32).collect::<Vec<_>>(),
            shape,
        ),
        DType::F64 => TensorData::new(as_f32.into_iter().map(f64::from).collect::<Vec<_>>(), shape),
        // Every other float target reads f32; callers never ask for integer weights.
        _ => TensorData::new(as_f32, shape),
    }
}

fn find_in_folder(folder: &Path) -> Result<PathBuf, CheckpointError> {
    let read = std::fs::read_dir(folder).map_err(|source| CheckpointError::Io {
        path: folder.to_path_buf(),
        source,
    })?;
    let mut indexes = Vec::new();
    let mut files = Vec::new();
    for entry in read.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors.index.json") {
            indexes.push(entry.path());
        } else if name.ends_with(".safetensors") {
            files.push(entry.path());
        }
    }
    indexes.sort();
    files.sort();
    match (indexes.as_slice(), files.as_slice()) {
        ([index], _) => Ok(index.clone()),
        ([], [file]) => Ok(file.clone()),
        ([], []) => Err(CheckpointError::NotFound {
            path: folder.to_path_buf(),
        }),
        _ => Err(CheckpointError::Ambiguous {
            path: folder.to_path_buf(),
            candidates: indexes
                .iter()
                .chain(&files)
                .map(|p| p.display().to_string())
                .collect(),
        }),
    }
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError, len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!("the file is {len} bytes, too short for a safetensors header"),
        E::InvalidHeaderLength => {
            format!("the header length runs past the end of the file ({len} bytes): truncated?")
        }
        E::MetadataIncompleteBuffer => format!(
            "the tensors it declares do not match the {len} bytes of data present: truncated or padded?"
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::{serialize_to_file, View};
    use std::borrow::Cow;

    struct Raw(StDtype, Vec<usize>, Vec<u8>);

    impl View for &Raw {
        fn dtype(&self) -> StDtype {
            self.0
        }
        fn shape(&self) -> &[usize] {
            &self.1
        }
        fn data(&self) -> Cow<'_, [u8]> {
            Cow::Borrowed(&self.2)
        }
        fn data_len(&self) -> usize {
            self.2.len()
        }
    }

    fn f32_raw(values: &[f32], shape: &[usize]) -> Raw {
        Raw(
            StDtype::F32,
            shape.to_vec(),
            bytemuck::cast_slice(values).to_vec(),
        )
    }

    fn bf16_raw(values: &[f32], shape: &[usize]) -> Raw {
        let v: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
        Raw(
            StDtype::BF16,
            shape.to_vec(),
            bytemuck::cast_slice(&v).to_vec(),
        )
    }

    fn write(path: &Path, tensors: Vec<(&str, Raw)>) {
        serialize_to_file(tensors.iter().map(|(k, v)| (k.to_string(), v)), None, path).unwrap();
    }

    #[test]
    fn casts_between_float_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let values = [1.0f32, -2.5, 3.140625, 1e-3, 65504.0, 0.1];
        write(
            &path,
            vec![
                ("a", f32_raw(&values, &[2, 3])),
                ("b", bf16_raw(&values, &[6])),
            ],
        );
        let ck = Checkpoint::open(&path).unwrap();
        assert_eq!(ck.len(), 2);
        assert_eq!(
            ck.read("a", None, DType::F32)
                .unwrap()
                .to_vec::<f32>()
                .unwrap(),
            values
        );
        // bf16 -> f32 is exact (f32 -> bf16: `narrowing_rounds_as_torch`).
        let as_bf16 = ck
            .read("a", None, DType::BF16)
            .unwrap()
            .to_vec::<bf16>()
            .unwrap();
        let expected: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
        assert_eq!(as_bf16, expected);
        let back = ck
            .read("b", None, DType::F32)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(
            back,
            expected.iter().map(|x| x.to_f32()).collect::<Vec<_>>()
        );
        let as_f16 = ck
            .read("b", None, DType::F16)
            .unwrap()
            .to_vec::<f16>()
            .unwrap();
        assert_eq!(as_f16[1], f16::from_f32(-2.5));
    }

    /// f32 -> bf16 / f16 as torch rounds, against bit patterns torch made (torch 2.15:
    /// `torch.tensor(VALUES).to(torch.bfloat16).view(torch.int16)`, likewise float16): ties to
    /// even, f32 subnormals, overflow to f16 infinity.
    #[test]
    fn narrowing_rounds_as_torch() {
        let values: [f32; 14] = [
            1.0,
            -2.5,
            3.140625,
            1e-3,
            65504.0,
            0.1,
            1.003_906_25,
            1.011_718_75,
            3.389_531_4e38,
            -1e-40,
            1e-45,
            0.333_333_34,
            255.5,
            7.0e-39,
        ];
        let torch_bf16: [u16; 14] = [
            0x3f80, 0xc020, 0x4049, 0x3a83, 0x4780, 0x3dcd, 0x3f80, 0x3f82, 0x7f7f, 0x8001, 0x0000,
            0x3eab, 0x4380, 0x004c,
        ];
        let torch_f16: [u16; 14] = [
            0x3c00, 0xc100, 0x4248, 0x1419, 0x7bff, 0x2e66, 0x3c04, 0x3c0c, 0x7c00, 0x8000, 0x0000,
            0x3555, 0x5bfc, 0x0000,
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write(&path, vec![("a", f32_raw(&values, &[14]))]);
        let ck = Checkpoint::open(&path).unwrap();
        let bits = |dtype| -> Vec<u16> {
            bytemuck::pod_collect_to_vec(ck.read("a", None, dtype).unwrap().as_bytes())
        };
        assert_eq!(bits(DType::BF16), torch_bf16);
        assert_eq!(bits(DType::F16), torch_f16);
        // The host matrices' conversion rounds the same way.
        let raw = ck.raw("a", None).unwrap();
        for (format, torch) in [
            (crate::host::HostFormat::BF16, torch_bf16),
            (crate::host::HostFormat::F16, torch_f16),
        ] {
            let m = crate::host::HostMatrix::convert(
                1,
                14,
                raw.bytes.bytes(),
                crate::host::HostFormat::F32,
                format,
            );
            let widened = m.to_f32();
            let expected: Vec<f32> = torch
                .iter()
                .map(|&b| match format {
                    crate::host::HostFormat::BF16 => bf16::from_bits(b).to_f32(),
                    _ => f16::from_bits(b).to_f32(),
                })
                .collect();
            assert_eq!(widened, expected, "{format:?}");
        }
    }

    #[test]
    fn reads_row_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let values: Vec<f32> = (0..12).map(|x| x as f32).collect();
        write(&path, vec![("qkv", f32_raw(&values, &[6, 2]))]);
        let ck = Checkpoint::open(&path).unwrap();
        let mid = ck.read("qkv", Some(2..4), DType::F32).unwrap();
        assert_eq!(mid.shape.to_vec(), vec![2, 2]);
        assert_eq!(mid.to_vec::<f32>().unwrap(), vec![4.0, 5.0, 6.0, 7.0]);
        assert!(matches!(
            ck.read("qkv", Some(4..8), DType::F32),
            Err(CheckpointError::MalformedSafetensors { .. })
        ));
    }

    #[test]
    fn opens_shards_through_the_index_and_finds_it_in_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("m-1.safetensors"),
            vec![("a", f32_raw(&[1.0], &[1]))],
        );
        write(
            &dir.path().join("m-2.safetensors"),
            vec![("b", bf16_raw(&[2.0, 3.0], &[2]))],
        );
        std::fs::write(
            dir.path().join("m.safetensors.index.json"),
            r#"{"metadata": {"total_size": 8}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}"#,
        )
        .unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ck.len(), 2);
        assert!(ck.file_of("b").ends_with("m-2.safetensors"));
        assert_eq!(ck.get("b").unwrap().dtype, StoredDtype::BF16);
        assert_eq!(
            ck.read("b", None, DType::F32)
                .unwrap()
                .to_vec::<f32>()
                .unwrap(),
            vec![2.0, 3.0]
        );
    }

    #[test]
    fn folder_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Checkpoint::open(dir.path()),
            Err(CheckpointError::NotFound { .. })
        ));
        write(
            &dir.path().join("x.safetensors"),
            vec![("a", f32_raw(&[1.0], &[1]))],
        );
        write(
            &dir.path().join("y.safetensors"),
            vec![("a", f32_raw(&[1.0], &[1]))],
        );
        assert!(matches!(
            Checkpoint::open(dir.path()),
            Err(CheckpointError::Ambiguous { .. })
        ));
        let both = Checkpoint::open_files(
            dir.path(),
            &[
                dir.path().join("x.safetensors"),
                dir.path().join("y.safetensors"),
            ],
        );
        assert!(
            matches!(both, Err(CheckpointError::MalformedSafetensors { .. })),
            "duplicate names"
        );
    }

    #[test]
    fn integer_tensors_are_not_read_as_weights() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write(&path, vec![("ids", Raw(StDtype::I64, vec![1], vec![0; 8]))]);
        let ck = Checkpoint::open(&path).unwrap();
        let err = ck.read("ids", None, DType::F32).unwrap_err();
        assert!(
            matches!(err, CheckpointError::UnsupportedDtype { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("ids") && err.to_string().contains("I64"));
    }
}
