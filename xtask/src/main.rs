//! Developer tasks, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! - `convert`: weights of a folder, Hub repo or single files -> a folder in one dtype.
//! - `synth-checkpoint`: a full-size synthetic model (diffusers or ComfyUI layout) for timing.
//! - `read-check`: read (or load) every tensor of a checkpoint and time it.

mod convert;
mod gguf_out;
mod kquant;
mod synth;
mod writer;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use burn::backend::NdArray;
use clap::{Parser, Subcommand};
use zimage_nn::Checkpoint;
use zimage_transformer::ZImageTransformer2DModel;

use crate::writer::OutDtype;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "zimage-rs developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Re-write a model's weights in one dtype as a folder the pipeline loads directly.
    Convert {
        /// A model folder, a Hub repo id (owner/name[@revision]), or single .safetensors files
        /// (ComfyUI/original transformer, ComfyUI Qwen3 text encoder, BFL ae.safetensors).
        #[arg(long, required = true, num_args = 1..)]
        from: Vec<String>,
        /// Folder or repo that supplies configs, tokenizer and the weights not given as files
        /// (optional for GGUF output of the published models: their configs are built in).
        #[arg(long)]
        base: Option<String>,
        /// Output folder (Hugging Face layout).
        #[arg(long)]
        out: PathBuf,
        /// bf16, f16, f32 (a safetensors folder), or a ggml type: q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1, q4_0
        /// (GGUF files: the transformer in city96's layout, Qwen3 in llama.cpp's).
        #[arg(long, default_value = "bf16", value_parser = parse_convert_dtype)]
        dtype: ConvertDtype,
        /// Largest shard, like save_pretrained's max_shard_size (e.g. 5GB, 500MB, bytes).
        #[arg(long, default_value = "5GB", value_parser = parse_size)]
        max_shard_size: u64,
        /// Write into a non-empty output folder.
        #[arg(long)]
        force: bool,
    },
    /// Write a synthetic full-size Z-Image-Turbo (the 6.15B transformer, Qwen3-4B, the VAE) with
    /// the published names and shapes and made-up values.
    SynthCheckpoint {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: OutDtype,
        /// The published fp32 transformer comes in shards of at most 10 GB.
        #[arg(long, default_value = "10GB", value_parser = parse_size)]
        max_shard_size: u64,
        /// diffusers' folder layout, or ComfyUI's three single files.
        #[arg(long, value_enum, default_value = "diffusers")]
        layout: synth::Layout,
        /// Parts to write [default: all].
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<synth::Part>,
    },
    /// Read every tensor of a checkpoint (file, index or folder) cast to a dtype, and time it;
    /// with --load, build the transformer on the ndarray backend instead.
    ReadCheck {
        /// A checkpoint, or a transformer folder for --load.
        path: PathBuf,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: OutDtype,
        #[arg(long)]
        load: bool,
    },
}

/// `5GB` -> 5_000_000_000 (decimal units, as `save_pretrained`), `512MiB`, or plain bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 5GB"))?;
    let scale = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    let bytes = number * scale;
    if bytes < 1.0 {
        return Err(format!("{text:?} is too small"));
    }
    Ok(bytes as u64)
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Convert {
            from,
            base,
            out,
            dtype,
            max_shard_size,
            force,
        } => {
            let (dtype, gguf) = match dtype {
                ConvertDtype::Float(d) => (d, None),
                ConvertDtype::Gguf(t) => (OutDtype::F32, Some(t)),
            };
            convert::convert(&convert::ConvertArgs {
                from,
                base,
                out,
                dtype,
                gguf,
                max_shard_bytes: max_shard_size,
                force,
            })?;
        }
        Command::SynthCheckpoint {
            out,
            dtype,
            max_shard_size,
            layout,
            only,
        } => {
            let parts = if only.is_empty() {
                vec![
                    synth::Part::Transformer,
                    synth::Part::TextEncoder,
                    synth::Part::Vae,
                ]
            } else {
                only
            };
            synth::synth_checkpoint(&out, dtype, max_shard_size, layout, &parts)?;
        }
        Command::ReadCheck { path, dtype, load } => read_check(&path, dtype, load)?,
    }
    Ok(())
}

/// What `convert --dtype` writes.
#[derive(Debug, Clone, Copy)]
enum ConvertDtype {
    Float(OutDtype),
    Gguf(zimage_nn::quant::GgmlType),
}

fn parse_convert_dtype(s: &str) -> Result<ConvertDtype, String> {
    use clap::ValueEnum;
    if let Ok(d) = OutDtype::from_str(s, true) {
        return Ok(ConvertDtype::Float(d));
    }
    match zimage_nn::quant::GgmlType::from_name(s) {
        Some(t) if !t.is_float() && gguf_out::can_write(t) => Ok(ConvertDtype::Gguf(t)),
        Some(t) => Err(format!(
            "{t} files are read but not written; write {}",
            gguf_out::WRITTEN
        )),
        None => Err(format!(
            "{s}: expected bf16, f16, f32, {}",
            gguf_out::WRITTEN
        )),
    }
}

fn read_check(path: &std::path::Path, dtype: OutDtype, load: bool) -> Result<()> {
    let started = Instant::now();
    if load {
        if !path.join("config.json").is_file() {
            bail!("--load needs a transformer folder with config.json");
        }
        let device = Default::default();
        let model = ZImageTransformer2DModel::<NdArray>::from_folder(path, &device, dtype.burn())?;
        eprintln!(
            "loaded the transformer ({:?}) in {:.1} s",
            model.dtype(),
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let checkpoint = Checkpoint::open(path)?;
    let names: Vec<String> = checkpoint.entries().map(|(n, _)| n.to_string()).collect();
    let mut bytes = 0usize;
    // A value from every tensor keeps the reads from being optimised away.
    let mut checksum = 0u64;
    for name in &names {
        let data = checkpoint.read(name, None, dtype.burn())?;
        let raw = data.as_bytes();
        bytes += raw.len();
        checksum = checksum.wrapping_add(raw.first().copied().unwrap_or(0) as u64);
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "read {} tensors as {:?} ({:.2} GB) in {seconds:.1} s ({:.2} GB/s), checksum {checksum}",
        names.len(),
        dtype,
        bytes as f64 / 1e9,
        bytes as f64 / 1e9 / seconds
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("1.5MB"), Ok(1_500_000));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("GB").is_err());
    }
}
