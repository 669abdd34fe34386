//! `cargo xtask convert --dtype q8_0|q6_k|q5_k|q5_1|q5_0|q4_k|q4_1|q4_0`: GGUF files that ComfyUI-GGUF,
//! stable-diffusion.cpp and zimage-rs read.
//!
//! - The transformer in city96's layout (ComfyUI-GGUF): `general.architecture = lumina2`, the
//!   original/ComfyUI names without a prefix (fused `attention.qkv`).
//! - The text encoder in llama.cpp's layout: `general.architecture = qwen3`, its `qwen3.*`
//!   hyperparameters, `token_embd` / `blk.N.attn_q` names.
//!
//! As city96's converter does, small and sensitive tensors stay in high precision: 1-D tensors in
//! F32; norms, embedders, adaLN modulation, the final layer, pad tokens, tensors under 1024
//! values and rows that are not whole blocks in the source's float type. The VAE is not
//! quantized by anyone; it is left out (use the source's `ae.safetensors`).
//!
//! Files are written to a temporary name and renamed when complete; tensors stream one at a time.

use std::fs;
use std::io::BufWriter;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::DType;
use zimage_hub::Component;
use zimage_nn::gguf::{GgufValue, GgufWriter};
use zimage_nn::quant::{quantize, GgmlType};
use zimage_nn::StoredDtype;
use zimage_text::Qwen3Config;
use zimage_transformer::ZImageTransformerConfig;

use crate::convert::{config_file, plan_component, ComponentSource, Planned, StreamingReader};
use crate::writer::{FileRecord, HashingWriter};

/// One GGUF tensor: its name, type, shape and the planned source tensors whose rows it stacks.
struct Out {
    name: String,
    ty: GgmlType,
    shape: Vec<usize>,
    parts: Vec<usize>,
}

pub fn write(
    sources: &[ComponentSource],
    base: Option<&Path>,
    out: &Path,
    ty: GgmlType,
    started: Instant,
) -> Result<Vec<FileRecord>> {
    let mut records = Vec::new();
    for source in sources {
        let (file, writer, outs, plan) = match source.component {
            Component::Transformer => {
                let plan = plan_component(source, base)?;
                let config = match config_file(base, Component::Transformer) {
                    Some(p) => ZImageTransformerConfig::from_file(&p)?,
                    None => ZImageTransformerConfig::z_image_turbo(),
                };
                let (writer, outs) = transformer(&config, source, &plan, ty)?;
                (
                    transformer_file_name(&source.path, base, ty),
                    writer,
                    outs,
                    plan,
                )
            }
            Component::TextEncoder => {
                let plan = plan_component(source, base)?;
                let config = match config_file(base, Component::TextEncoder) {
                    Some(p) => Qwen3Config::from_file(&p)?,
                    None => Qwen3Config::qwen3_4b(),
                };
                let (writer, outs) = text_encoder(&config, source, &plan, ty)?;
                (format!("qwen3-{}.gguf", ty.name()), writer, outs, plan)
            }
            Component::Vae => {
                eprintln!("vae: not quantized (no GGUF reader takes it); use the source's file");
                continue;
            }
        };
        let path = out.join(&file);
        let partial = out.join(format!("{file}.partial"));
        let mut reader = StreamingReader::new(&source.path);
        let result = (|| -> Result<(u64, String)> {
            let mut w = HashingWriter::new(BufWriter::new(fs::File::create(&partial)?));
            let mut quantized = 0usize;
            writer.write(&mut w, |i| {
                let o = &outs[i];
                let mut values = Vec::new();
                for &p in &o.parts {
                    let p = &plan[p];
                    let data = reader
                        .read(&p.source, p.rows.clone(), DType::F32)
                        .map_err(std::io::Error::other)?;
                    values.extend(
                        data.to_vec::<f32>()
                            .map_err(|e| std::io::Error::other(format!("{}: {e:?}", p.source)))?,
                    );
                }
                if !o.ty.is_float() {
                    quantized += 1;
                }
                Ok(encode(o.ty, &values).expect("the type is one we write"))
            })?;
            eprintln!(
                "{}: {} tensors, {quantized} as {ty}",
                source.component.folder(),
                outs.len()
            );
            Ok(w.finish()?)
        })();
        let (size, sha256) = match result {
            Ok(done) => done,
            Err(e) => {
                let _ = fs::remove_file(&partial);
                return Err(e.context(format!("writing {}", path.display())));
            }
        };
        fs::rename(&partial, &path).with_context(|| format!("renaming to {}", path.display()))?;
        eprintln!("wrote {} ({:.2} GB)", path.display(), size as f64 / 1e9);
        records.push(FileRecord {
            path: file,
            size,
            sha256,
        });
    }
    if records.is_empty() {
        bail!("nothing to write: give a transformer or text encoder");
    }
    eprintln!(
        "wrote {} GGUF files to {} in {:.1} s",
        records.len(),
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(records)
}

/// The ggml types `--dtype` writes.
pub const WRITTEN: &str = "q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1 or q4_0";

pub fn can_write(ty: GgmlType) -> bool {
    zimage_nn::quant::can_quantize(ty)
        || matches!(ty, GgmlType::Q6_K | GgmlType::Q5_K | GgmlType::Q4_K)
}

/// `values` in `ty`: the K-quants by [`crate::kquant`], the rest by `zimage_nn::quant`.
fn encode(ty: GgmlType, values: &[f32]) -> Option<Vec<u8>> {
    match ty {
        GgmlType::Q6_K | GgmlType::Q5_K | GgmlType::Q4_K => crate::kquant::quantize_k(ty, values),
        _ => quantize(ty, values),
    }
}

/// The type a tensor is written in: `ty`, or high precision (see the module docs).
fn choose(name: &str, shape: &[usize], stored: Option<StoredDtype>, ty: GgmlType) -> GgmlType {
    let elements: usize = shape.iter().product();
    let sensitive = [
        "norm",
        "embedder",
        "adaLN_modulation",
        "final_layer",
        "pad_token",
    ]
    .iter()
    .any(|s| name.contains(s));
    let whole_blocks = shape.len() == 2 && shape[1] % ty.block_size() == 0;
    if shape.len() < 2 {
        return GgmlType::F32;
    }
    if sensitive || elements < 1024 || !whole_blocks {
        return match stored {
            Some(StoredDtype::BF16) => GgmlType::BF16,
            Some(StoredDtype::F16) => GgmlType::F16,
            _ => GgmlType::F32,
        };
    }
    ty
}

fn stored(source: &ComponentSource, p: &Planned) -> Option<StoredDtype> {
    source.checkpoint.get(&p.source).map(|e| e.dtype)
}

/// `z_image_turbo-Q8_0.gguf` or `z_image-Q8_0.gguf`: a transformer file given alone is told
/// Turbo from the base model by its name (as in ComfyUI and city96's uploads), so a source
/// named Turbo (its file, its folder or the base's, up to three levels up) makes a Turbo name.
fn transformer_file_name(source: &Path, base: Option<&Path>, ty: GgmlType) -> String {
    let turbo = source
        .ancestors()
        .take(4)
        .chain(base.into_iter().flat_map(|b| b.ancestors().take(4)))
        .filter_map(Path::file_name)
        .any(|n| n.to_string_lossy().to_lowercase().contains("turbo"));
    let model = if turbo { "z_image_turbo" } else { "z_image" };
    format!("{model}-{}.gguf", ty.name())
}

fn transformer(
    config: &ZImageTransformerConfig,
    source: &ComponentSource,
    plan: &[Planned],
    ty: GgmlType,
) -> Result<(GgufWriter, Vec<Out>)> {
    let index = |name: &str| plan.iter().position(|p| p.out.name == name);
    let mut outs = Vec::new();
    for (i, p) in plan.iter().enumerate() {
        let Some(name) = zimage_transformer::checkpoint::original_name(config, &p.out.name) else {
            continue; // to_k / to_v: rows of the fused qkv
        };
        let (parts, shape) = match p.out.name.strip_suffix(".attention.to_q.weight") {
            Some(block) => {
                let k = index(&format!("{block}.attention.to_k.weight"));
                let v = index(&format!("{block}.attention.to_v.weight"));
                let (Some(k), Some(v)) = (k, v) else {
                    bail!("{block}: to_q without to_k and to_v");
                };
                let rows = p.out.shape[0] + plan[k].out.shape[0] + plan[v].out.shape[0];
                (vec![i, k, v], vec![rows, p.out.shape[1]])
            }
            None => (vec![i], p.out.shape.clone()),
        };
        let chosen = choose(&name, &shape, stored(source, p), ty);
        outs.push(Out {
            name,
            ty: chosen,
            shape,
            parts,
        });
    }
    let mut writer = GgufWriter::new();
    writer.metadata("general.architecture", GgufValue::String("lumina2".into()));
    writer.metadata("general.quantization_version", GgufValue::U32(2));
    writer.metadata("general.file_type", GgufValue::U32(ty.id()));
    for o in &outs {
        writer
            .tensor(&o.name, o.ty, &o.shape)
            .expect("choose() keeps whole blocks");
    }
    Ok((writer, outs))
}

/// The `qwen3.*` metadata is written from the config, so the tensors must be the model it
/// describes (a base folder's config, else Qwen3-4B's): every disagreement is reported at once.
fn check_text_encoder_config(config: &Qwen3Config, plan: &[Planned]) -> Result<()> {
    let shape = |name: &str| {
        plan.iter()
            .find(|p| p.out.name == name)
            .map(|p| p.out.shape.clone())
    };
    let heads = config.num_attention_heads;
    let head_dim = config.head_dim.unwrap_or(config.hidden_size / heads);
    let kv_heads = config.num_key_value_heads.unwrap_or(heads);
    let hidden = config.hidden_size;
    let mut problems = Vec::new();
    for (name, wanted) in [
        ("model.embed_tokens.weight", [config.vocab_size, hidden]),
        (
            "model.layers.0.self_attn.q_proj.weight",
            [heads * head_dim, hidden],
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            [kv_heads * head_dim, hidden],
        ),
        (
            "model.layers.0.mlp.gate_proj.weight",
            [config.intermediate_size, hidden],
        ),
    ] {
        match shape(name) {
            Some(actual) if actual != wanted => {
                problems.push(format!("{name} is {actual:?}, the config says {wanted:?}"))
            }
            Some(_) => {}
            None => problems.push(format!("no {name}")),
        }
    }
    let layers = plan
        .iter()
        .filter_map(|p| {
            p.out
                .name
                .strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse()
                .ok()
        })
        .map(|i: usize| i + 1)
        .max()
        .unwrap_or(0);
    if layers != config.num_hidden_layers {
        problems.push(format!(
            "{layers} layers, the config says {}",
            config.num_hidden_layers
        ));
    }
    if !problems.is_empty() {
        bail!(
            "the text encoder weights are not the model of its config (give --base with this \
             model's folder): {}",
            problems.join("; ")
        );
    }
    Ok(())
}

/// llama.cpp's name of a transformers `Qwen3Model` parameter (`model.` prefix optional).
fn llama_cpp_name(name: &str) -> Option<String> {
    let name = name.strip_prefix("model.").unwrap_or(name);
    match name {
        "embed_tokens.weight" => return Some("token_embd.weight".into()),
        "norm.weight" => return Some("output_norm.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("layers.")?;
    let (layer, tensor) = rest.split_once('.')?;
    let (module, kind) = tensor.rsplit_once('.')?;
    let module = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{module}.{kind}"))
}

fn text_encoder(
    config: &Qwen3Config,
    source: &ComponentSource,
    plan: &[Planned],
    ty: GgmlType,
) -> Result<(GgufWriter, Vec<Out>)> {
    let mut outs = Vec::new();
    for (i, p) in plan.iter().enumerate() {
        let Some(name) = llama_cpp_name(&p.out.name) else {
            bail!(
                "{}: no llama.cpp name for {}",
                source.path.display(),
                p.out.name
            );
        };
        // llama.cpp quantizes the token embeddings too; only norms stay high.
        let sensitive = name.contains("norm");
        let chosen = if sensitive {
            choose("norm", &p.out.shape, stored(source, p), ty)
        } else {
            choose(&name, &p.out.shape, stored(source, p), ty)
        };
        outs.push(Out {
            name,
            ty: chosen,
            shape: p.out.shape.clone(),
            parts: vec![i],
        });
    }
    let heads = config.num_attention_heads;
    let head_dim = config.head_dim.unwrap_or(config.hidden_size / heads);
    check_text_encoder_config(config, plan)?;
    let u32v = |v: usize| GgufValue::U32(v as u32);
    let mut writer = GgufWriter::new();
    writer.metadata("general.architecture", GgufValue::String("qwen3".into()));
    writer.metadata("general.quantization_version", GgufValue::U32(2));
    writer.metadata("general.file_type", GgufValue::U32(ty.id()));
    writer.metadata("qwen3.block_count", u32v(config.num_hidden_layers));
    writer.metadata("qwen3.context_length", u32v(config.max_position_embeddings));
    writer.metadata("qwen3.embedding_length", u32v(config.hidden_size));
    writer.metadata("qwen3.feed_forward_length", u32v(config.intermediate_size));
    writer.metadata("qwen3.attention.head_count", u32v(heads));
    writer.metadata(
        "qwen3.attention.head_count_kv",
        u32v(config.num_key_value_heads.unwrap_or(heads)),
    );
    writer.metadata("qwen3.attention.key_length", u32v(head_dim));
    writer.metadata("qwen3.attention.value_length", u32v(head_dim));
    writer.metadata(
        "qwen3.attention.layer_norm_rms_epsilon",
        GgufValue::F32(config.rms_norm_eps as f32),
    );
    writer.metadata(
        "qwen3.rope.freq_base",
        GgufValue::F32(config.rope_theta() as f32),
    );
    for o in &outs {
        writer
            .tensor(&o.name, o.ty, &o.shape)
            .expect("choose() keeps whole blocks");
    }
    Ok((writer, outs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_and_odd_tensors_stay_in_high_precision_and_names_follow_llama_cpp_and_city96() {
        let q = GgmlType::Q4_0;
        let bf16 = Some(StoredDtype::BF16);
        assert_eq!(
            choose("layers.0.attention.qkv.weight", &[96, 64], bf16, q),
            q
        );
        assert_eq!(
            choose("layers.0.attention.qkv.weight", &[96, 48], bf16, q),
            GgmlType::BF16
        );
        assert_eq!(
            choose("layers.0.adaLN_modulation.0.weight", &[256, 64], bf16, q),
            GgmlType::BF16
        );
        assert_eq!(
            choose("cap_embedder.1.weight", &[64, 64], None, q),
            GgmlType::F32
        );
        assert_eq!(
            choose("layers.0.attention.out.bias", &[64], bf16, q),
            GgmlType::F32
        );
        assert_eq!(
            choose("layers.0.feed_forward.w1.weight", &[16, 32], bf16, q),
            GgmlType::BF16
        );
        let name = |source: &str, base: Option<&str>| {
            transformer_file_name(Path::new(source), base.map(Path::new), GgmlType::Q8_0)
        };
        assert_eq!(
            name("/m/z_image_turbo_bf16.safetensors", None),
            "z_image_turbo-Q8_0.gguf"
        );
        assert_eq!(
            name(
                "/hub/models--Tongyi-MAI--Z-Image-Turbo/snapshots/abc/transformer",
                None
            ),
            "z_image_turbo-Q8_0.gguf"
        );
        assert_eq!(
            name("/m/t.safetensors", Some("/hub/Z-Image-Turbo")),
            "z_image_turbo-Q8_0.gguf"
        );
        assert_eq!(
            name("/m/z_image_bf16.safetensors", None),
            "z_image-Q8_0.gguf"
        );
        assert_eq!(
            llama_cpp_name("model.layers.3.self_attn.o_proj.weight").as_deref(),
            Some("blk.3.attn_output.weight")
        );
    }
}
