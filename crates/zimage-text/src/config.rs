use std::path::Path;

use serde::Deserialize;

use crate::TextError;

/// `text_encoder/config.json` (transformers' `Qwen3Config`). Absent fields take `Qwen3Config`'s defaults,
/// which are not Qwen3-4B's: use [`Qwen3Config::qwen3_4b`] for the published Z-Image encoder.
///
/// Both spellings of the RoPE base are read: `rope_theta` at the top level (transformers 4.x, the
/// published file) and `rope_parameters.rope_theta` (transformers 5.x saves).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); `null` means one per query head.
    #[serde(default = "default_heads")]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; `null` means `hidden_size / num_attention_heads`.
    #[serde(default = "default_head_dim")]
    pub head_dim: Option<usize>,
    pub hidden_act: String,
    pub rms_norm_eps: f64,
    /// Biases on the q/k/v/o projections (false for every released Qwen3).
    pub attention_bias: bool,
    /// transformers 4.x spelling of the RoPE base.
    pub rope_theta: Option<f64>,
    /// transformers 4.x RoPE scaling; only `null` (or the default type) is supported.
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5.x RoPE settings.
    pub rope_parameters: Option<RopeParameters>,
    /// Sliding-window layers are not supported (no released Qwen3 uses them).
    pub use_sliding_window: bool,
    /// transformers 5.x per-layer attention kinds; all must be `full_attention`.
    pub layer_types: Option<Vec<String>>,
    /// Informational: RoPE positions are computed for any length.
    pub max_position_embeddings: usize,
    /// The encoder has no LM head, so tying changes nothing here.
    pub tie_word_embeddings: bool,
}

/// `rope_parameters` of a transformers 5.x config.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
}

fn default_heads() -> Option<usize> {
    Some(32)
}

fn default_head_dim() -> Option<usize> {
    Some(128)
}

/// transformers' `default_theta`, used when a config names no RoPE base.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

impl Default for Qwen3Config {
    /// transformers' `Qwen3Config()` defaults.
    fn default() -> Self {
        Self {
            vocab_size: 151_936,
            hidden_size: 4096,
            intermediate_size: 22_016,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: default_heads(),
            head_dim: default_head_dim(),
            hidden_act: "silu".into(),
            rms_norm_eps: 1e-6,
            attention_bias: false,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            use_sliding_window: false,
            layer_types: None,
            max_position_embeddings: 32_768,
            tie_word_embeddings: false,
        }
    }
}

impl Qwen3Config {
    /// The config a llama.cpp GGUF of a Qwen3 describes in its metadata (`qwen3.block_count`,
    /// `qwen3.embedding_length`, ...; the vocabulary from `token_embd`'s rows). `None` when the
    /// checkpoint is not one (no `general.architecture = qwen3`).
    pub fn from_gguf(checkpoint: &zimage_nn::Checkpoint) -> Option<Result<Self, TextError>> {
        let arch = checkpoint.gguf_value("general.architecture")?.as_str()?;
        if arch != "qwen3" {
            return None;
        }
        let int = |key: &str| -> Result<usize, TextError> {
            checkpoint
                .gguf_value(&format!("qwen3.{key}"))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| TextError::Config {
                    path: Some(checkpoint.origin().to_path_buf()),
                    reason: format!("the GGUF file has no qwen3.{key}"),
                })
        };
        let float = |key: &str, default: f64| {
            checkpoint
                .gguf_value(&format!("qwen3.{key}"))
                .and_then(|v| v.as_f64())
                .unwrap_or(default)
        };
        Some((|| {
            let hidden_size = int("embedding_length")?;
            let heads = int("attention.head_count")?;
            let vocab_size = checkpoint
                .get("token_embd.weight")
                .map(|e| e.shape[0])
                .ok_or_else(|| TextError::Config {
                    path: Some(checkpoint.origin().to_path_buf()),
                    reason: "the GGUF file has no token_embd.weight".into(),
                })?;
            Ok(Self {
                vocab_size,
                hidden_size,
                intermediate_size: int("feed_forward_length")?,
                num_hidden_layers: int("block_count")?,
                num_attention_heads: heads,
                num_key_value_heads: Some(int("attention.head_count_kv").unwrap_or(heads)),
                head_dim: Some(int("attention.key_length").unwrap_or(hidden_size / heads)),
                rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-6),
                rope_theta: Some(float("rope.freq_base", 1_000_000.0)),
                max_position_embeddings: int("context_length").unwrap_or(40960),
                ..Self::default()
            })
        })())
    }

    /// Qwen3-4B, the text encoder of Z-Image (`text_encoder/config.json` of Z-Image-Turbo).
    pub fn qwen3_4b() -> Self {
        Self {
            hidden_size: 2560,
            intermediate_size: 9728,
            num_hidden_layers: 36,
            num_attention_heads: 32,
            num_key_value_heads: Some(8),
            head_dim: Some(128),
            rope_theta: Some(1_000_000.0),
            max_position_embeddings: 40_960,
            tie_word_embeddings: true,
            ..Self::default()
        }
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TextError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TextError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            TextError::Config { reason, .. } => TextError::Config {
                path: Some(path.to_path_buf()),
                reason,
            },
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self, TextError> {
        let config: Self = serde_json::from_str(text).map_err(|e| TextError::Config {
            path: None,
            reason: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The RoPE base: `rope_parameters.rope_theta`, else `rope_theta`, else transformers' default.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(DEFAULT_ROPE_THETA)
    }

    /// Decoder layers that run: all but the last, whose output `hidden_states[-2]` does not include.
    pub fn layers_used(&self) -> usize {
        self.num_hidden_layers.saturating_sub(1)
    }

    /// Checks what transformers would refuse and what this implementation does not support.
    // `is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    pub fn validate(&self) -> Result<(), TextError> {
        let fail = |reason: String| Err(TextError::Config { path: None, reason });
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads()),
            ("head_dim", self.head_dim()),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return fail(format!("{name} must be positive"));
        }
        if self.num_attention_heads % self.num_key_value_heads() != 0 {
            return fail(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_key_value_heads()
            ));
        }
        if self.head_dim() % 2 != 0 {
            return fail(format!(
                "head_dim {} must be even (RoPE rotates halves)",
                self.head_dim()
            ));
        }
        if self.hidden_act != "silu" {
            return fail(format!(
                "hidden_act {:?} is not supported (Qwen3 uses \"silu\")",
                self.hidden_act
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return fail(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        let theta = self.rope_theta();
        if !(theta.is_finite() && theta > 0.0) {
            return fail(format!("rope_theta {theta} must be positive"));
        }
        let rope_type = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_type.clone())
            .or_else(|| {
                let scaling = self.rope_scaling.as_ref()?;
                if scaling.is_null() {
                    return None;
                }
                let kind = scaling.get("rope_type").or_else(|| scaling.get("type"));
                Some(
                    kind.and_then(|k| k.as_str())
                        .unwrap_or("unknown")
                        .to_string(),
                )
            });
        if let Some(kind) = rope_type.filter(|k| k != "default") {
            return fail(format!(
                "RoPE type {kind:?} is not supported (only the default)"
            ));
        }
        if self.use_sliding_window {
            return fail(
                "use_sliding_window is true: sliding-window attention is not supported".into(),
            );
        }
        if let Some(types) = &self.layer_types {
            if let Some(other) = types.iter().find(|t| *t != "full_attention") {
                return fail(format!(
                    "layer type {other:?} is not supported (only full_attention)"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published `text_encoder/config.json` of Z-Image-Turbo (spec §6).
    const PUBLISHED: &str = r#"{"architectures": ["Qwen3ForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 9728,
        "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
        "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null, "tie_word_embeddings": true,
        "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true,
        "use_sliding_window": false, "vocab_size": 151936}"#;

    #[test]
    fn published_config_is_qwen3_4b() {
        let config = Qwen3Config::from_json(PUBLISHED).unwrap();
        assert_eq!(config, Qwen3Config::qwen3_4b());
        assert_eq!(config.rope_theta(), 1e6);
        assert_eq!(config.num_key_value_heads(), 8);
        assert_eq!(config.layers_used(), 35);
    }

    #[test]
    fn transformers_5_rope_parameters() {
        let config = Qwen3Config::from_json(
            r#"{"rope_parameters": {"rope_theta": 5000000.0, "rope_type": "default"},
                "layer_types": ["full_attention"], "num_hidden_layers": 1}"#,
        )
        .unwrap();
        assert_eq!(config.rope_theta(), 5e6);
        let config = Qwen3Config::from_json("{}").unwrap();
        assert_eq!(config.rope_theta(), 10_000.0);
        assert_eq!((config.head_dim(), config.num_key_value_heads()), (128, 32));
        let config = Qwen3Config::from_json(
            r#"{"head_dim": null, "num_key_value_heads": null, "hidden_size": 64, "num_attention_heads": 4}"#,
        )
        .unwrap();
        assert_eq!((config.head_dim(), config.num_key_value_heads()), (16, 4));
    }

    #[test]
    fn unsupported_configs_are_refused() {
        for bad in [
            r#"{"num_key_value_heads": 5}"#,
            r#"{"hidden_act": "gelu"}"#,
            r#"{"head_dim": 7}"#,
            r#"{"num_hidden_layers": 0}"#,
            r#"{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
            r#"{"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6}}"#,
            r#"{"use_sliding_window": true}"#,
            r#"{"layer_types": ["sliding_attention"]}"#,
            r#"{"rms_norm_eps": -1.0}"#,
            r#"{"hidden_size": "big"}"#,
            "not json",
        ] {
            let err = Qwen3Config::from_json(bad).unwrap_err();
            assert!(matches!(err, TextError::Config { .. }), "{bad}: {err}");
        }
    }
}
