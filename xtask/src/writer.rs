//! Writing safetensors files one tensor at a time, split into shards with a Hugging Face index,
//! hashing every byte on its way to disk for the manifest.
//!
//! The format is small enough to write by hand: an 8-byte little-endian header length, a JSON
//! header (`{name: {dtype, shape, data_offsets}}`, padded with spaces to a multiple of 8), then
//! the tensors' bytes back to back. Because the header is known before any data, tensors can be
//! streamed from their source without holding a component in memory.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::tensor::DType;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// The dtypes a conversion writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutDtype {
    Bf16,
    F16,
    F32,
}

impl OutDtype {
    pub fn burn(self) -> DType {
        match self {
            OutDtype::Bf16 => DType::BF16,
            OutDtype::F16 => DType::F16,
            OutDtype::F32 => DType::F32,
        }
    }

    /// The safetensors header name.
    pub fn safetensors(self) -> &'static str {
        match self {
            OutDtype::Bf16 => "BF16",
            OutDtype::F16 => "F16",
            OutDtype::F32 => "F32",
        }
    }

    /// The name `torch_dtype` uses in a transformers config.
    pub fn torch(self) -> &'static str {
        match self {
            OutDtype::Bf16 => "bfloat16",
            OutDtype::F16 => "float16",
            OutDtype::F32 => "float32",
        }
    }

    /// How ComfyUI names the precision in a file name (`z_image_turbo_bf16.safetensors`).
    pub fn comfy_suffix(self) -> &'static str {
        match self {
            OutDtype::Bf16 => "bf16",
            OutDtype::F16 => "fp16",
            OutDtype::F32 => "fp32",
        }
    }

    pub fn size(self) -> u64 {
        match self {
            OutDtype::Bf16 | OutDtype::F16 => 2,
            OutDtype::F32 => 4,
        }
    }
}

/// One tensor to write: its output name and shape.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub shape: Vec<usize>,
}

impl OutTensor {
    pub fn bytes(&self, dtype: OutDtype) -> u64 {
        self.shape.iter().product::<usize>() as u64 * dtype.size()
    }
}

/// A written file, for the manifest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileRecord {
    /// Relative to the output folder, `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// A writer that hashes and counts what passes through.
pub struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Flushes and returns `(size, sha256 hex)`.
    pub fn finish(mut self) -> std::io::Result<(u64, String)> {
        self.inner.flush()?;
        Ok((self.written, hex(&self.hasher.finalize())))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `out_dir/rel` through a `.partial` name (so an interrupted run never leaves a file
/// that looks finished), hashing it; `body` produces the contents.
pub fn write_file(
    out_dir: &Path,
    rel: &str,
    body: impl FnOnce(&mut HashingWriter<BufWriter<File>>) -> Result<()>,
) -> Result<FileRecord> {
    let path = out_dir.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let partial = path.with_extension("partial");
    let file = File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut writer = HashingWriter::new(BufWriter::with_capacity(8 << 20, file));
    body(&mut writer).with_context(|| format!("writing {}", path.display()))?;
    let (size, sha256) = writer
        .finish()
        .with_context(|| format!("writing {}", partial.display()))?;
    fs::rename(&partial, &path).with_context(|| format!("renaming {}", partial.display()))?;
    Ok(FileRecord {
        path: rel.to_string(),
        size,
        sha256,
    })
}

/// Groups tensors into shards of at most `max_bytes` of data (a tensor bigger than that gets a
/// shard of its own), in order, as `save_pretrained` does.
pub fn plan_shards(tensors: &[OutTensor], dtype: OutDtype, max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current = 0u64;
    for (i, tensor) in tensors.iter().enumerate() {
        let size = tensor.bytes(dtype);
        match shards.last_mut() {
            Some(shard) if current + size <= max_bytes => {
                shard.push(i);
                current += size;
            }
            _ => {
                shards.push(vec![i]);
                current = size;
            }
        }
    }
    shards
}

/// The safetensors header for `tensors`, padded to a multiple of 8 bytes.
fn header(tensors: &[&OutTensor], dtype: OutDtype) -> Result<Vec<u8>> {
    let mut map = Map::new();
    map.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for tensor in tensors {
        let end = offset + tensor.bytes(dtype);
        map.insert(
            tensor.name.clone(),
            json!({"dtype": dtype.safetensors(), "shape": tensor.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text = serde_json::to_string(&Value::Object(map))?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    Ok(text.into_bytes())
}

/// Writes `tensors` under `out_dir/rel_dir/` as `{stem}.safetensors`, or as
/// `{stem}-0000i-of-0000n.safetensors` shards with `{stem}.safetensors.index.json` when they
/// exceed `max_shard_bytes`. `fill(i, writer)` writes the bytes of tensor `i` in `dtype`.
pub fn write_sharded(
    out_dir: &Path,
    rel_dir: &str,
    stem: &str,
    tensors: &[OutTensor],
    dtype: OutDtype,
    max_shard_bytes: u64,
    mut fill: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<Vec<FileRecord>> {
    let shards = plan_shards(tensors, dtype, max_shard_bytes);
    let n = shards.len();
    let mut records = Vec::new();
    let mut weight_map = Map::new();
    let mut total = 0u64;
    for (k, shard) in shards.iter().enumerate() {
        let name = if n == 1 {
            format!("{stem}.safetensors")
        } else {
            format!("{stem}-{:05}-of-{n:05}.safetensors", k + 1)
        };
        let members: Vec<&OutTensor> = shard.iter().map(|&i| &tensors[i]).collect();
        let data: u64 = members.iter().map(|t| t.bytes(dtype)).sum();
        eprintln!(
            "  writing {rel_dir}/{name}: {} tensors, {:.2} GB",
            members.len(),
            data as f64 / 1e9
        );
        let header = header(&members, dtype)?;
        let record = write_file(out_dir, &format!("{rel_dir}/{name}"), |w| {
            w.write_all(&(header.len() as u64).to_le_bytes())?;
            w.write_all(&header)?;
            for &i in shard {
                let before = w.written();
                fill(i, w)?;
                let wrote = w.written() - before;
                let expected = tensors[i].bytes(dtype);
                if wrote != expected {
                    bail!(
                        "{}: wrote {wrote} bytes, its shape {:?} in {dtype:?} needs {expected}",
                        tensors[i].name,
                        tensors[i].shape
                    );
                }
            }
            Ok(())
        })?;
        for tensor in &members {
            weight_map.insert(tensor.name.clone(), Value::String(name.clone()));
        }
        total += data;
        records.push(record);
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index)?;
        records.push(write_file(
            out_dir,
            &format!("{rel_dir}/{stem}.safetensors.index.json"),
            |w| Ok(w.write_all(text.as_bytes())?),
        )?);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zimage_nn::Checkpoint;

    fn tensor(name: &str, shape: &[usize]) -> OutTensor {
        OutTensor {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn shards_are_planned_in_order_up_to_the_limit() {
        let t = [
            tensor("a", &[10]),
            tensor("b", &[10]),
            tensor("c", &[30]),
            tensor("d", &[5]),
        ];
        // 40, 40, 120, 20 bytes in f32, limit 100.
        assert_eq!(
            plan_shards(&t, OutDtype::F32, 100),
            vec![vec![0, 1], vec![2], vec![3]]
        );
        assert_eq!(
            plan_shards(&t, OutDtype::Bf16, 100),
            vec![vec![0, 1, 2], vec![3]]
        );
        assert_eq!(plan_shards(&t, OutDtype::Bf16, 110), vec![vec![0, 1, 2, 3]]);
    }

    #[test]
    fn written_shards_open_as_one_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = vec![tensor("x.weight", &[2, 3]), tensor("y", &[4])];
        let records = write_sharded(
            dir.path(),
            "part",
            "m",
            &tensors,
            OutDtype::F32,
            24,
            |i, w| {
                let values: Vec<f32> = (0..tensors[i].shape.iter().product::<usize>())
                    .map(|v| (i * 100 + v) as f32)
                    .collect();
                Ok(w.write_all(bytemuck::cast_slice(&values))?)
            },
        )
        .unwrap();
        let names: Vec<&str> = records.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            names,
            [
                "part/m-00001-of-00002.safetensors",
                "part/m-00002-of-00002.safetensors",
                "part/m.safetensors.index.json"
            ]
        );
        for record in &records {
            let bytes = fs::read(dir.path().join(&record.path)).unwrap();
            assert_eq!(record.size, bytes.len() as u64);
            assert_eq!(record.sha256, hex(&Sha256::digest(&bytes)));
        }
        let ck = Checkpoint::open(dir.path().join("part")).unwrap();
        assert_eq!(ck.len(), 2);
        let y = ck.read("y", None, DType::F32).unwrap();
        assert_eq!(y.to_vec::<f32>().unwrap(), vec![100.0, 101.0, 102.0, 103.0]);
        // The safetensors crate itself accepts the files.
        let bytes = fs::read(dir.path().join(&records[0].path)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("x.weight").unwrap().shape(), &[2, 3]);
    }
}
