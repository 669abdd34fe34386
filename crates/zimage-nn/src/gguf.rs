//! GGUF files (versions 2 and 3): the header, metadata and tensor directory, read with the same
//! discipline as safetensors: every count and offset is checked against the file's length before
//! anything is allocated, so a truncated or absurd file gets an error naming what is wrong, never
//! a panic or a huge allocation. Also a small writer (`cargo xtask convert`).
//!
//! GGUF lists a tensor's dimensions innermost first (`ne[0]` is the row length); [`GgufTensor`]
//! gives them in PyTorch's order, outermost first, so a `Linear` weight reads `[out, in]` as in a
//! safetensors file. Quantized blocks run along the row, so rows can be taken without decoding.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::ops::Range;

use crate::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::String(_) => 8,
            Self::Array(_) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }
}

impl fmt::Display for GgufValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::String(s) => f.write_str(s),
            Self::Array(v) => write!(f, "[{} values]", v.len()),
            Self::Bool(b) => write!(f, "{b}"),
            Self::F32(v) => write!(f, "{v}"),
            Self::F64(v) => write!(f, "{v}"),
            other => write!(f, "{}", other.as_u64().map_or(-1i128, i128::from)),
        }
    }
}

/// One tensor of the directory.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    pub ty: GgmlType,
    /// PyTorch order: outermost first.
    pub shape: Vec<usize>,
    /// Byte range in the file.
    pub bytes: Range<usize>,
}

/// A GGUF file's header, metadata and tensors (offsets into the file; the caller maps it).
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensor>,
}

/// Whether `bytes` start like a GGUF file.
pub fn is_gguf(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && &bytes[..4] == MAGIC
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.at..end];
                self.at = end;
                Ok(s)
            }
            None => Err(format!(
                "{what} at byte {} runs past the end of the file ({} bytes): truncated?",
                self.at,
                self.bytes.len()
            )),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_size` bytes: refused when the rest of the file could
    /// not hold them (so an absurd count never becomes an allocation).
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize, String> {
        let n = self.u64(what)?;
        let room = (self.bytes.len() - self.at) as u64;
        if n.saturating_mul(min_size as u64) > room {
            return Err(format!(
                "{what} is {n}, more than the {room} bytes left in the file can hold"
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.count(1, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue, String> {
        let what = format!("the value of {key}");
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(&what)?[0]),
            1 => GgufValue::I8(self.array::<1>(&what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => GgufValue::U32(self.u32(&what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => GgufValue::Bool(self.array::<1>(&what)?[0] != 0),
            8 => GgufValue::String(self.string(&what)?),
            9 if depth < 4 => {
                let item = self.u32(&what)?;
                let n = self.count(1, &format!("the length of {key}"))?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(&what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(&what)?)),
            9 => return Err(format!("{key} nests arrays more than 4 deep")),
            other => return Err(format!("{key} has an unknown value type {other}")),
        })
    }
}

/// Parses the header and tensor directory of a GGUF file held in `bytes`, and checks that every
/// tensor lies inside the file with the size its type and shape need. Unsupported tensor types
/// are an error naming the tensor.
pub fn parse(bytes: &[u8]) -> Result<GgufHeader, String> {
    let mut r = Reader { bytes, at: 0 };
    if &r.array::<4>("the magic number")? != MAGIC {
        return Err("it does not start with \"GGUF\"".into());
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} (versions 2 and 3 are read)"
        ));
    }
    // A tensor entry is at least 8 (name length) + 4 + 8 + 4 + 8 bytes; a key-value at least 12.
    let n_tensors = r.count(32, "the tensor count")?;
    let n_kv = r.count(12, "the metadata count")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string("a metadata key")?;
        let ty = r.u32(&format!("the type of {key}"))?;
        let value = r.value(ty, &key, 0)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
            _ => return Err(format!("general.alignment is {v}, not a power of two")),
        },
    };
    let mut infos = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = r.string("a tensor name")?;
        let n_dims = r.u32(&format!("the rank of {name}"))?;
        if n_dims > 8 {
            return Err(format!("{name} has {n_dims} dimensions"));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(r.u64(&format!("the shape of {name}"))?);
        }
        let ty_id = r.u32(&format!("the type of {name}"))?;
        let offset = r.u64(&format!("the offset of {name}"))?;
        infos.push((name, ne, ty_id, offset));
    }
    let data_start = (r.at as u64).div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(infos.len());
    let mut seen = std::collections::HashSet::new();
    for (name, ne, ty_id, offset) in infos {
        if !seen.insert(name.clone()) {
            return Err(format!("tensor {name} is listed twice"));
        }
        let ty = GgmlType::from_id(ty_id)
            .map_err(|t| format!("tensor {name} is stored as {t}, which zimage-rs cannot read"))?;
        let elements = ne
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("{name} has an absurd shape {ne:?}"))?;
        let row = ne.first().copied().unwrap_or(1);
        if row % ty.block_size() as u64 != 0 {
            return Err(format!(
                "{name} has rows of {row} values, not a whole number of {ty} blocks ({})",
                ty.block_size()
            ));
        }
        let size = (elements / ty.block_size() as u64)
            .checked_mul(ty.block_bytes() as u64)
            .ok_or_else(|| format!("{name} has an absurd shape {ne:?}"))?;
        let start = data_start.checked_add(offset);
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(start), Some(end)) if end <= bytes.len() as u64 => {
                if offset % alignment != 0 {
                    return Err(format!(
                        "{name} starts at offset {offset}, not a multiple of the alignment {alignment}"
                    ));
                }
                tensors.push(GgufTensor {
                    name,
                    ty,
                    shape: ne.iter().rev().map(|&d| d as usize).collect(),
                    bytes: start as usize..end as usize,
                });
            }
            _ => {
                return Err(format!(
                    "{name} ({ty}, {} bytes at offset {offset}) runs past the end of the file \
                     ({} bytes): truncated?",
                    size,
                    bytes.len()
                ))
            }
        }
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
    })
}

/// Writes a GGUF v3 file: metadata, then tensors (PyTorch-order shapes), each tensor's data
/// (already encoded in its type) fetched only when it is written, so a converter holds one
/// tensor at a time.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, GgmlType, Vec<usize>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn metadata(&mut self, key: &str, value: GgufValue) {
        self.metadata.push((key.to_string(), value));
    }

    /// A tensor of `shape` (outermost first) stored as `ty`; `None` when its rows are not whole
    /// blocks of `ty`.
    pub fn tensor(&mut self, name: &str, ty: GgmlType, shape: &[usize]) -> Option<()> {
        ty.row_bytes(shape.last().copied().unwrap_or(1))?;
        self.tensors.push((name.to_string(), ty, shape.to_vec()));
        Some(())
    }

    fn data_len(ty: GgmlType, shape: &[usize]) -> usize {
        ty.row_bytes(shape.iter().product())
            .expect("checked by tensor()")
    }

    /// Writes the file; `data(i)` gives tensor `i`'s encoded bytes, asked for in order.
    pub fn write(
        &self,
        out: &mut impl Write,
        mut data: impl FnMut(usize) -> std::io::Result<Vec<u8>>,
    ) -> std::io::Result<()> {
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut head, key);
            head.extend_from_slice(&value.type_id().to_le_bytes());
            put_value(&mut head, value);
        }
        let align = DEFAULT_ALIGNMENT as usize;
        let mut offset = 0usize;
        for (name, ty, shape) in &self.tensors {
            put_string(&mut head, name);
            head.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            for &d in shape.iter().rev() {
                head.extend_from_slice(&(d as u64).to_le_bytes());
            }
            head.extend_from_slice(&ty.id().to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + Self::data_len(*ty, shape)).div_ceil(align) * align;
        }
        head.resize(head.len().div_ceil(align) * align, 0);
        out.write_all(&head)?;
        for (i, (name, ty, shape)) in self.tensors.iter().enumerate() {
            let bytes = data(i)?;
            let len = Self::data_len(*ty, shape);
            if bytes.len() != len {
                return Err(std::io::Error::other(format!(
                    "{name}: {} bytes given, {ty} {shape:?} takes {len}",
                    bytes.len()
                )));
            }
            out.write_all(&bytes)?;
            out.write_all(&vec![0u8; len.div_ceil(align) * align - len])?;
        }
        Ok(())
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => out.push(*v),
        GgufValue::I8(v) => out.push(*v as u8),
        GgufValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(s) => put_string(out, s),
        GgufValue::Array(items) => {
            let item = items.first().map_or(4, GgufValue::type_id);
            out.extend_from_slice(&item.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for v in items {
                put_value(out, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.metadata("general.architecture", GgufValue::String("lumina2".into()));
        w.metadata("n", GgufValue::U32(7));
        w.metadata(
            "list",
            GgufValue::Array(vec![GgufValue::String("a".into()); 3]),
        );
        let values: Vec<f32> = (0..64).map(|i| i as f32 / 8.0 - 4.0).collect();
        w.tensor("w", GgmlType::Q8_0, &[2, 32]).unwrap();
        w.tensor("b", GgmlType::F32, &[3]).unwrap();
        assert!(w.tensor("odd", GgmlType::Q8_0, &[2, 20]).is_none());
        let data = [
            crate::quant::quantize(GgmlType::Q8_0, &values).unwrap(),
            crate::quant::quantize(GgmlType::F32, &[1.0, 2.0, 3.0]).unwrap(),
        ];
        let mut out = Vec::new();
        w.write(&mut out, |i| Ok(data[i].clone())).unwrap();
        out
    }

    #[test]
    fn written_files_read_back() {
        let bytes = sample();
        let h = parse(&bytes).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.metadata["general.architecture"].as_str(), Some("lumina2"));
        assert_eq!(h.metadata["n"].as_u64(), Some(7));
        let w = &h.tensors[0];
        assert_eq!(
            (w.name.as_str(), w.ty, w.shape.clone()),
            ("w", GgmlType::Q8_0, vec![2, 32])
        );
        assert_eq!(w.bytes.len(), 2 * 34);
        let b = &h.tensors[1];
        assert_eq!(b.bytes.start % 32, 0);
        assert_eq!(
            crate::quant::dequantize(GgmlType::F32, &bytes[b.bytes.clone()]),
            vec![1.0, 2.0, 3.0]
        );
    }

    #[test]
    fn damaged_files_get_errors_not_panics() {
        let bytes = sample();
        let end = parse(&bytes).unwrap().tensors[1].bytes.end;
        // Every truncation is an error (never a panic, never a huge allocation).
        for len in 0..end {
            let err = parse(&bytes[..len]).unwrap_err();
            assert!(!err.is_empty());
        }
        let mut absurd = bytes.clone();
        absurd[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&absurd).unwrap_err().contains("tensor count"));
        let mut wrong = bytes.clone();
        wrong[4] = 1;
        assert!(parse(&wrong).unwrap_err().contains("version 1"));
        assert!(parse(b"GGML....").unwrap_err().contains("GGUF"));
    }
}
