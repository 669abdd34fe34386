//! The one place where checkpoint names become module paths.
//!
//! Module paths are transformers' `Qwen3Model` names (`layers.0.self_attn.q_proj.weight`). The
//! published `text_encoder/` is a `Qwen3ForCausalLM` save, so its names carry a `model.` prefix;
//! both spellings load. Tensors the encoder never reads are accepted and skipped, not reported as
//! unexpected: the LM head, the final norm and the last decoder layer (`hidden_states[-2]` is the
//! output of the layer before it, without the final norm), and RoPE buffers older saves carry.
//!
//! llama.cpp's GGUF names (`token_embd`, `blk.N.attn_q`, ...; what `convert_hf_to_gguf.py` writes
//! for Qwen3, with q and k unpermuted since Qwen3 uses NeoX-style rotation) map to the same paths.

use zimage_nn::KeyMapping;

use crate::Qwen3Config;

/// Prefix of `Qwen3ForCausalLM` saves (the published checkpoint).
const CAUSAL_LM_PREFIX: &str = "model.";

/// Maps one checkpoint tensor to the module path it fills, or to nothing when unused.
pub fn map_key(config: &Qwen3Config, name: &str) -> KeyMapping {
    if name == "lm_head.weight" || name == "output.weight" {
        return KeyMapping::Ignore;
    }
    let renamed = llama_cpp_name(name);
    let name = renamed.as_deref().unwrap_or(name);
    let name = name.strip_prefix(CAUSAL_LM_PREFIX).unwrap_or(name);
    if name == "norm.weight" || name.ends_with("rotary_emb.inv_freq") {
        return KeyMapping::Ignore;
    }
    let last_layer = format!("layers.{}.", config.num_hidden_layers.saturating_sub(1));
    if name.starts_with(&last_layer) {
        return KeyMapping::Ignore;
    }
    KeyMapping::To(name.to_string())
}

/// transformers' name of a llama.cpp tensor name, `None` for other names.
fn llama_cpp_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("embed_tokens.weight".into()),
        "output_norm.weight" => return Some("norm.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tensor) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (module, kind) = tensor.rsplit_once('.')?;
    let module = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("layers.{layer}.{module}.{kind}"))
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use zimage_nn::weights::expected_tensors;

    use super::*;
    use crate::Qwen3TextEncoder;

    /// Every tensor of the published Z-Image `text_encoder/` (spec §6): 398 names.
    fn published_names() -> Vec<(String, Vec<usize>)> {
        let mut names = vec![
            ("model.embed_tokens.weight".to_string(), vec![151_936, 2560]),
            ("model.norm.weight".to_string(), vec![2560]),
        ];
        for i in 0..36 {
            let layer = |suffix: &str, shape: &[usize]| {
                (format!("model.layers.{i}.{suffix}"), shape.to_vec())
            };
            names.extend([
                layer("input_layernorm.weight", &[2560]),
                layer("self_attn.q_proj.weight", &[4096, 2560]),
                layer("self_attn.k_proj.weight", &[1024, 2560]),
                layer("self_attn.v_proj.weight", &[1024, 2560]),
                layer("self_attn.o_proj.weight", &[2560, 4096]),
                layer("self_attn.q_norm.weight", &[128]),
                layer("self_attn.k_norm.weight", &[128]),
                layer("post_attention_layernorm.weight", &[2560]),
                layer("mlp.gate_proj.weight", &[9728, 2560]),
                layer("mlp.up_proj.weight", &[9728, 2560]),
                layer("mlp.down_proj.weight", &[2560, 9728]),
            ]);
        }
        names
    }

    #[test]
    fn published_checkpoint_maps_onto_the_model() {
        let config = Qwen3Config::qwen3_4b();
        let names = published_names();
        assert_eq!(names.len(), 398);
        let mut mapped = Vec::new();
        let mut ignored = Vec::new();
        for (name, shape) in &names {
            match map_key(&config, name) {
                KeyMapping::To(path) => mapped.push((path, shape.clone())),
                KeyMapping::Ignore => ignored.push(name.as_str()),
                KeyMapping::Split(_) => panic!("{name} is split"),
            }
        }
        // The final norm and layer 35 (11 tensors) are skipped.
        assert_eq!(ignored.len(), 12, "{ignored:?}");
        assert!(ignored.contains(&"model.norm.weight"));
        assert!(ignored
            .iter()
            .all(|n| *n == "model.norm.weight" || n.starts_with("model.layers.35.")));

        let device = Default::default();
        let mut expected =
            expected_tensors::<NdArray, _>(&device, |w| Qwen3TextEncoder::build(&config, w))
                .unwrap();
        expected.sort();
        mapped.sort();
        assert_eq!(mapped, expected);
    }

    #[test]
    fn bare_names_and_leftovers() {
        let config = Qwen3Config {
            num_hidden_layers: 4,
            ..Qwen3Config::qwen3_4b()
        };
        let to = |s: &str| KeyMapping::To(s.to_string());
        assert_eq!(
            map_key(&config, "embed_tokens.weight"),
            to("embed_tokens.weight")
        );
        assert_eq!(
            map_key(&config, "model.layers.2.mlp.up_proj.weight"),
            to("layers.2.mlp.up_proj.weight")
        );
        // Layers past the configured count are not silently dropped: they stay unexpected.
        assert_eq!(
            map_key(&config, "layers.4.mlp.up_proj.weight"),
            to("layers.4.mlp.up_proj.weight")
        );
        for unused in [
            "lm_head.weight",
            "norm.weight",
            "model.norm.weight",
            "layers.3.self_attn.q_proj.weight",
            "model.layers.3.input_layernorm.weight",
            "model.layers.0.self_attn.rotary_emb.inv_freq",
            "model.rotary_emb.inv_freq",
        ] {
            assert_eq!(map_key(&config, unused), KeyMapping::Ignore, "{unused}");
        }
    }

    /// The published model under llama.cpp's names (what `convert_hf_to_gguf.py` writes) maps
    /// onto exactly the same module paths.
    #[test]
    fn llama_cpp_names_map_like_transformers_names() {
        let config = Qwen3Config::qwen3_4b();
        let llama = |name: &str| -> String {
            let name = name.strip_prefix("model.").unwrap_or(name);
            if name == "embed_tokens.weight" {
                return "token_embd.weight".into();
            }
            if name == "norm.weight" {
                return "output_norm.weight".into();
            }
            let rest = name.strip_prefix("layers.").unwrap();
            let (layer, tensor) = rest.split_once('.').unwrap();
            let tensor = tensor
                .replace("self_attn.q_proj", "attn_q")
                .replace("self_attn.k_proj", "attn_k")
                .replace("self_attn.v_proj", "attn_v")
                .replace("self_attn.o_proj", "attn_output")
                .replace("self_attn.q_norm", "attn_q_norm")
                .replace("self_attn.k_norm", "attn_k_norm")
                .replace("post_attention_layernorm", "ffn_norm")
                .replace("input_layernorm", "attn_norm")
                .replace("mlp.gate_proj", "ffn_gate")
                .replace("mlp.up_proj", "ffn_up")
                .replace("mlp.down_proj", "ffn_down");
            format!("blk.{layer}.{tensor}")
        };
        for (name, _) in published_names() {
            assert_eq!(
                map_key(&config, &llama(&name)),
                map_key(&config, &name),
                "{name}"
            );
        }
        assert_eq!(map_key(&config, "output.weight"), KeyMapping::Ignore);
        // Unknown llama.cpp-looking names stay unexpected, never silently dropped.
        assert_eq!(
            map_key(&config, "blk.0.attn_qkv.weight"),
            KeyMapping::To("blk.0.attn_qkv.weight".into())
        );
    }
}
