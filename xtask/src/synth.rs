//! `cargo xtask synth-checkpoint`: a full-size Z-Image-Turbo with made-up values, to measure
//! memory, load and generation times without downloading 20-33 GB.
//!
//! Names and shapes come from the models themselves (a dry run of each construction records the
//! parameters it asks for: 521 for the transformer, 398 for Qwen3-4B with its last layer and
//! final norm, 244 for the VAE), so they are exactly what a loader expects. Two layouts:
//! - `diffusers`: the published `Tongyi-MAI/Z-Image-Turbo` folder (model_index.json, configs,
//!   tokenizer, scheduler, sharded weights with their indexes);
//! - `comfy`: ComfyUI's repack (`Comfy-Org/z_image_turbo`): three single files under
//!   `split_files/`, the transformer in the original names (fused `qkv`), Qwen3 as transformers
//!   names it, the VAE in BFL's `ae.safetensors` names.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Result};
use burn::backend::NdArray;
use half::{bf16, f16};
use zimage_nn::weights::expected_tensors;
use zimage_transformer::{ZImageTransformer2DModel, ZImageTransformerConfig};

use crate::writer::{write_file, write_sharded, FileRecord, OutDtype, OutTensor};

/// How the synthetic model is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// The diffusers repo: a folder per component.
    Diffusers,
    /// ComfyUI's three single files.
    Comfy,
}

/// Which parts to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Transformer,
    TextEncoder,
    Vae,
}

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

/// `scheduler/scheduler_config.json` of Z-Image-Turbo (spec §4).
const SCHEDULER_CONFIG: &str = r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.36.0.dev0",
 "num_train_timesteps": 1000, "use_dynamic_shifting": false, "shift": 3.0}
"#;

/// `text_encoder/config.json` of Z-Image-Turbo (Qwen3-4B, spec §6).
const QWEN3_4B_CONFIG: &str = r#"{
  "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
  "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 9728,
  "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
  "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
  "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null,
  "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
  "use_cache": true, "use_sliding_window": false, "vocab_size": 151936
}
"#;

/// `vae/config.json` of Z-Image-Turbo (spec §5).
const VAE_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKL", "_diffusers_version": "0.36.0.dev0", "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "force_upcast": true, "in_channels": 3, "latent_channels": 16, "latents_mean": null,
  "latents_std": null, "layers_per_block": 2, "mid_block_add_attention": true,
  "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.3611,
  "shift_factor": 0.1159,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "use_post_quant_conv": false, "use_quant_conv": false
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

/// Writes the synthetic model's `parts` under `out` in `layout`.
pub fn synth_checkpoint(
    out: &Path,
    dtype: OutDtype,
    max_shard_bytes: u64,
    layout: Layout,
    parts: &[Part],
) -> Result<Vec<FileRecord>> {
    let started = Instant::now();
    let mut records = Vec::new();
    if layout == Layout::Diffusers {
        records.push(write_file(out, "model_index.json", |w| {
            Ok(w.write_all(MODEL_INDEX.as_bytes())?)
        })?);
        records.push(write_file(out, "scheduler/scheduler_config.json", |w| {
            Ok(w.write_all(SCHEDULER_CONFIG.as_bytes())?)
        })?);
        records.push(write_file(out, "tokenizer/tokenizer.json", |w| {
            Ok(w.write_all(&zimage_text::qwen3_tokenizer_json()?)?)
        })?);
    }
    let single = |folder: &str, file: &str, tensors: &[OutTensor], dtype: OutDtype| {
        write_sharded(out, folder, file, tensors, dtype, u64::MAX, |i, w| {
            fill(&tensors[i], dtype, w)
        })
    };
    if parts.contains(&Part::Transformer) {
        let tensors = transformer_tensors()?;
        match layout {
            Layout::Diffusers => {
                records.push(write_file(out, "transformer/config.json", |w| {
                    Ok(w.write_all(TURBO_CONFIG.as_bytes())?)
                })?);
                records.extend(write_sharded(
                    out,
                    "transformer",
                    "diffusion_pytorch_model",
                    &tensors,
                    dtype,
                    max_shard_bytes,
                    |i, w| fill(&tensors[i], dtype, w),
                )?);
            }
            Layout::Comfy => {
                let name = format!("z_image_turbo_{}", dtype.comfy_suffix());
                records.extend(single(
                    "split_files/diffusion_models",
                    &name,
                    &comfy_names(&tensors)?,
                    dtype,
                )?);
            }
        }
    }
    if parts.contains(&Part::TextEncoder) {
        let tensors = text_encoder_tensors()?;
        match layout {
            Layout::Diffusers => {
                records.push(write_file(out, "text_encoder/config.json", |w| {
                    Ok(w.write_all(QWEN3_4B_CONFIG.as_bytes())?)
                })?);
                records.extend(write_sharded(
                    out,
                    "text_encoder",
                    "model",
                    &tensors,
                    dtype,
                    max_shard_bytes.min(4_000_000_000),
                    |i, w| fill(&tensors[i], dtype, w),
                )?);
            }
            Layout::Comfy => records.extend(single(
                "split_files/text_encoders",
                "qwen_3_4b",
                &tensors,
                dtype,
            )?),
        }
    }
    if parts.contains(&Part::Vae) {
        let tensors = vae_tensors()?;
        match layout {
            Layout::Diffusers => {
                records.push(write_file(out, "vae/config.json", |w| {
                    Ok(w.write_all(VAE_CONFIG.as_bytes())?)
                })?);
                records.extend(single("vae", "diffusion_pytorch_model", &tensors, dtype)?);
            }
            // BFL's file is f32.
            Layout::Comfy => records.extend(single(
                "split_files/vae",
                "ae",
                &bfl_names(&tensors)?,
                OutDtype::F32,
            )?),
        }
    }
    eprintln!(
        "wrote {} in {:.1} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(records)
}

/// The 521 tensors of the published transformer, in diffusers names.
fn transformer_tensors() -> Result<Vec<OutTensor>> {
    let config = ZImageTransformerConfig::from_json(TURBO_CONFIG)?;
    let device = Default::default();
    let expected =
        expected_tensors::<NdArray, _>(&device, |w| ZImageTransformer2DModel::build(&config, w))?;
    let params: usize = expected
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    eprintln!(
        "transformer: {} tensors, {params} parameters",
        expected.len()
    );
    ensure!(
        expected.len() == 521,
        "expected the 521 tensors of spec §1.2"
    );
    Ok(expected
        .into_iter()
        .map(|(name, shape)| OutTensor { name, shape })
        .collect())
}

/// The 398 tensors of the published Qwen3-4B, `model.`-prefixed: the 35 layers the encoder runs
/// (from its dry run), the last layer and the final norm it does not.
fn text_encoder_tensors() -> Result<Vec<OutTensor>> {
    let config = zimage_text::Qwen3Config {
        // One more layer than published, so that the dry run records all 36 published ones.
        num_hidden_layers: 37,
        ..zimage_text::Qwen3Config::qwen3_4b()
    };
    let device = Default::default();
    let expected = expected_tensors::<NdArray, _>(&device, |w| {
        zimage_text::Qwen3TextEncoder::build(&config, w)
    })?;
    let mut tensors: Vec<OutTensor> = expected
        .into_iter()
        .map(|(name, shape)| OutTensor {
            name: format!("model.{name}"),
            shape,
        })
        .collect();
    tensors.push(OutTensor {
        name: "model.norm.weight".into(),
        shape: vec![config.hidden_size],
    });
    ensure!(
        tensors.len() == 398,
        "expected Qwen3-4B's 398 tensors, made {}",
        tensors.len()
    );
    Ok(tensors)
}

/// The 244 tensors of the published VAE, in diffusers names.
fn vae_tensors() -> Result<Vec<OutTensor>> {
    let config = zimage_vae::AutoencoderKLConfig::z_image();
    let device = Default::default();
    let expected =
        expected_tensors::<NdArray, _>(&device, |w| zimage_vae::AutoencoderKL::build(&config, w))?;
    ensure!(
        expected.len() == 244,
        "expected the VAE's 244 tensors, made {}",
        expected.len()
    );
    Ok(expected
        .into_iter()
        .map(|(name, shape)| OutTensor { name, shape })
        .collect())
}

/// Diffusers transformer names -> the original/ComfyUI ones (the loader's inverse mapping):
/// `qkv` fused by rows.
fn comfy_names(tensors: &[OutTensor]) -> Result<Vec<OutTensor>> {
    let config = ZImageTransformerConfig::from_json(TURBO_CONFIG)?;
    Ok(tensors
        .iter()
        .filter_map(|t| {
            let name = zimage_transformer::checkpoint::original_name(&config, &t.name)?;
            let mut shape = t.shape.clone();
            if name.ends_with(".attention.qkv.weight") {
                shape[0] *= 3;
            }
            Some(OutTensor { name, shape })
        })
        .collect())
}

/// Diffusers VAE names -> BFL's (`ae.safetensors`), through the loader's own mapping: every
/// name of BFL's scheme is generated, kept when it maps onto one of `tensors`; attention
/// projections become 1x1 convolutions.
fn bfl_names(tensors: &[OutTensor]) -> Result<Vec<OutTensor>> {
    use zimage_vae::{CheckpointFormat, Naming, ProjectionLayout};
    let format = CheckpointFormat {
        naming: Naming::Bfl,
        prefix: String::new(),
        attention: ProjectionLayout::Conv1x1,
    };
    let blocks = zimage_vae::AutoencoderKLConfig::z_image().num_blocks();
    let by_name: std::collections::HashMap<&str, &Vec<usize>> = tensors
        .iter()
        .map(|t| (t.name.as_str(), &t.shape))
        .collect();
    let mut layers: Vec<String> = Vec::new();
    for side in ["encoder", "decoder"] {
        for l in ["conv_in", "conv_out", "norm_out"] {
            layers.push(format!("{side}.{l}"));
        }
        for b in ["block_1", "block_2"] {
            for l in ["norm1", "conv1", "norm2", "conv2", "nin_shortcut"] {
                layers.push(format!("{side}.mid.{b}.{l}"));
            }
        }
        for l in ["norm", "q", "k", "v", "proj_out"] {
            layers.push(format!("{side}.mid.attn_1.{l}"));
        }
        let (level, sample) = if side == "encoder" {
            ("down", "downsample")
        } else {
            ("up", "upsample")
        };
        for i in 0..blocks {
            layers.push(format!("{side}.{level}.{i}.{sample}.conv"));
            for j in 0..3 {
                for l in ["norm1", "conv1", "norm2", "conv2", "nin_shortcut"] {
                    layers.push(format!("{side}.{level}.{i}.block.{j}.{l}"));
                }
            }
        }
    }
    let mut out = Vec::new();
    for layer in layers {
        for p in ["weight", "bias"] {
            let name = format!("{layer}.{p}");
            let Some(diffusers) = zimage_vae::checkpoint::diffusers_name(&format, blocks, &name)
            else {
                continue;
            };
            let Some(shape) = by_name.get(diffusers.as_str()) else {
                continue;
            };
            let mut shape = (*shape).clone();
            // q, k, v and proj_out weights (the norm's are 1-D).
            if layer.contains(".attn_1.") && shape.len() == 2 {
                shape.extend([1, 1]);
            }
            out.push(OutTensor { name, shape });
        }
    }
    ensure!(
        out.len() == tensors.len(),
        "BFL names for {} of the VAE's {} tensors",
        out.len(),
        tensors.len()
    );
    Ok(out)
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
