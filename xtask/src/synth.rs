//! `cargo xtask synth-checkpoint`: a full-size Z-Image-Turbo transformer with made-up values,
//! to measure conversion and load times without downloading 25 GB.
//!
//! Names and shapes come from the model itself (a dry run of its construction records the 521
//! parameters it asks for), so they are exactly what a loader expects; the layout (fp32, shards
//! of at most 10 GB, index, config) is that of the published `transformer/` folder.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Result};
use burn::backend::NdArray;
use half::{bf16, f16};
use zimage_nn::weights::expected_tensors;
use zimage_transformer::{ZImageTransformer2DModel, ZImageTransformerConfig};

use crate::writer::{write_file, write_sharded, FileRecord, OutDtype, OutTensor};

/// `transformer/config.json` of Z-Image-Turbo (spec §1.1).
const TURBO_CONFIG: &str = r#"{
  "_class_name": "ZImageTransformer2DModel",
  "_diffusers_version": "0.36.0.dev0",
  "all_f_patch_size": [1],
  "all_patch_size": [2],
  "axes_dims": [32, 48, 48],
  "axes_lens": [1536, 512, 512],
  "cap_feat_dim": 2560,
  "dim": 3840,
  "in_channels": 16,
  "n_heads": 30,
  "n_kv_heads": 30,
  "n_layers": 30,
  "n_refiner_layers": 2,
  "norm_eps": 1e-05,
  "qk_norm": true,
  "rope_theta": 256.0,
  "t_scale": 1000.0
}
"#;

const MODEL_INDEX: &str = r#"{
  "_class_name": "ZImagePipeline",
  "_diffusers_version": "0.36.0.dev0",
  "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
  "text_encoder": ["transformers", "Qwen3Model"],
  "tokenizer": ["transformers", "Qwen2Tokenizer"],
  "transformer": ["diffusers", "ZImageTransformer2DModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}
"#;

/// Writes `out/model_index.json` and `out/transformer/` (config, shards, index).
pub fn synth_checkpoint(
    out: &Path,
    dtype: OutDtype,
    max_shard_bytes: u64,
) -> Result<Vec<FileRecord>> {
    let started = Instant::now();
    let config = ZImageTransformerConfig::from_json(TURBO_CONFIG)?;
    let device = Default::default();
    let expected =
        expected_tensors::<NdArray, _>(&device, |w| ZImageTransformer2DModel::build(&config, w))?;
    let params: usize = expected
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    eprintln!("{} tensors, {params} parameters", expected.len());
    ensure!(
        expected.len() == 521,
        "expected the 521 tensors of spec §1.2"
    );
    let tensors: Vec<OutTensor> = expected
        .into_iter()
        .map(|(name, shape)| OutTensor { name, shape })
        .collect();
    let mut records = vec![
        write_file(out, "model_index.json", |w| {
            Ok(w.write_all(MODEL_INDEX.as_bytes())?)
        })?,
        write_file(out, "transformer/config.json", |w| {
            Ok(w.write_all(TURBO_CONFIG.as_bytes())?)
        })?,
    ];
    records.extend(write_sharded(
        out,
        "transformer",
        "diffusion_pytorch_model",
        &tensors,
        dtype,
        max_shard_bytes,
        |i, w| fill(&tensors[i], dtype, w),
    )?);
    eprintln!(
        "wrote {} in {:.1} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(records)
}

/// Deterministic values: a xorshift stream seeded by the name; norm weights (1-D) near 1,
/// everything else small, like trained weights in magnitude. Written in 1M-value chunks.
fn fill(tensor: &OutTensor, dtype: OutDtype, w: &mut dyn Write) -> Result<()> {
    let count: usize = tensor.shape.iter().product();
    let mut state = tensor.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) | 1;
    let center = if tensor.shape.len() == 1 && tensor.name.ends_with(".weight") {
        1.0
    } else {
        0.0
    };
    let mut chunk: Vec<f32> = Vec::with_capacity(1 << 20);
    let mut done = 0;
    while done < count {
        let n = (count - done).min(1 << 20);
        chunk.clear();
        chunk.extend((0..n).map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // 23 random mantissa bits -> [1, 2) -> [-0.02, 0.02) around the center.
            let unit = f32::from_bits(0x3f80_0000 | ((state >> 41) as u32)) - 1.5;
            center + unit * 0.04
        }));
        match dtype {
            OutDtype::F32 => w.write_all(bytemuck::cast_slice(&chunk))?,
            OutDtype::Bf16 => {
                let v: Vec<bf16> = chunk.iter().map(|&x| bf16::from_f32(x)).collect();
                w.write_all(bytemuck::cast_slice(&v))?
            }
            OutDtype::F16 => {
                let v: Vec<f16> = chunk.iter().map(|&x| f16::from_f32(x)).collect();
                w.write_all(bytemuck::cast_slice(&v))?
            }
        }
        done += n;
    }
    Ok(())
}
