//! A model folder in the Hugging Face layout: `model_index.json` and the five component folders.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::PipelineError;

/// Which Z-Image release a folder holds; it decides the defaults a user does not give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Z-Image-Turbo: distilled, 8 steps without guidance.
    Turbo,
    /// Z-Image (the non-distilled base model): many steps with guidance.
    Base,
}

impl Variant {
    /// Number of denoising steps when the user gives none.
    pub fn default_steps(self) -> usize {
        match self {
            Variant::Turbo => 8,
            Variant::Base => 50,
        }
    }

    /// Guidance scale when the user gives none (0 turns guidance off).
    pub fn default_guidance(self) -> f32 {
        match self {
            Variant::Turbo => 0.0,
            Variant::Base => 4.0,
        }
    }
}

/// The paths of a model folder's parts, checked to exist, with optional single-file weights
/// replacing a component's folder (ComfyUI/original files; configs still come from the folder).
#[derive(Debug, Clone)]
pub struct ModelFolder {
    root: PathBuf,
    variant: Variant,
    transformer_file: Option<PathBuf>,
    text_encoder_file: Option<PathBuf>,
    vae_file: Option<PathBuf>,
}

/// Sub-folders a pipeline needs, with the file each must hold.
const PARTS: [(&str, &str); 5] = [
    ("transformer", "config.json"),
    ("text_encoder", "config.json"),
    ("tokenizer", "tokenizer.json"),
    ("vae", "config.json"),
    ("scheduler", "scheduler_config.json"),
];

impl ModelFolder {
    /// Checks `model_index.json` and that every part is present.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, PipelineError> {
        let root = root.as_ref().to_path_buf();
        let fail = |reason: String| PipelineError::ModelFolder {
            path: root.clone(),
            reason,
        };
        if !root.is_dir() {
            return Err(fail("no such folder".into()));
        }
        let index_path = root.join("model_index.json");
        let index: Value = serde_json::from_str(
            &std::fs::read_to_string(&index_path)
                .map_err(|e| fail(format!("cannot read model_index.json ({e})")))?,
        )
        .map_err(|e| fail(format!("model_index.json is not valid JSON ({e})")))?;
        if let Some(class) = index.get("_class_name").and_then(Value::as_str) {
            if !class.starts_with("ZImage") {
                return Err(fail(format!(
                    "model_index.json describes a {class}, not a ZImagePipeline"
                )));
            }
        }
        for (part, file) in PARTS {
            if !root.join(part).join(file).is_file() {
                return Err(fail(format!("{part}/{file} is missing")));
            }
        }
        // The published base model's transformer config names `siglip_feat_dim` (null); Turbo's
        // does not.
        let transformer_config: Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("transformer/config.json"))
                .map_err(|e| fail(format!("cannot read transformer/config.json ({e})")))?,
        )
        .map_err(|e| fail(format!("transformer/config.json is not valid JSON ({e})")))?;
        let variant = if transformer_config.get("siglip_feat_dim").is_some() {
            Variant::Base
        } else {
            Variant::Turbo
        };
        Ok(Self {
            root,
            variant,
            transformer_file: None,
            text_encoder_file: None,
            vae_file: None,
        })
    }

    /// Takes the transformer's weights from one file (diffusers or original/ComfyUI names).
    pub fn with_transformer_file(self, file: impl Into<PathBuf>) -> Result<Self, PipelineError> {
        Ok(Self {
            transformer_file: Some(existing(file.into())?),
            ..self
        })
    }

    /// Takes the text encoder's weights from one file (with or without the `model.` prefix).
    pub fn with_text_encoder_file(self, file: impl Into<PathBuf>) -> Result<Self, PipelineError> {
        Ok(Self {
            text_encoder_file: Some(existing(file.into())?),
            ..self
        })
    }

    /// Takes the VAE's weights from one file (diffusers or BFL `ae.safetensors` names).
    pub fn with_vae_file(self, file: impl Into<PathBuf>) -> Result<Self, PipelineError> {
        Ok(Self {
            vae_file: Some(existing(file.into())?),
            ..self
        })
    }

    /// Where the transformer's weights are: its folder, or the single file that replaces it.
    pub fn transformer_weights(&self) -> PathBuf {
        self.transformer_file
            .clone()
            .unwrap_or_else(|| self.transformer())
    }

    pub fn text_encoder_weights(&self) -> PathBuf {
        self.text_encoder_file
            .clone()
            .unwrap_or_else(|| self.text_encoder())
    }

    pub fn vae_weights(&self) -> PathBuf {
        self.vae_file.clone().unwrap_or_else(|| self.vae())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    pub fn transformer(&self) -> PathBuf {
        self.root.join("transformer")
    }

    pub fn text_encoder(&self) -> PathBuf {
        self.root.join("text_encoder")
    }

    pub fn tokenizer(&self) -> PathBuf {
        self.root.join("tokenizer")
    }

    pub fn vae(&self) -> PathBuf {
        self.root.join("vae")
    }

    pub fn scheduler_config(&self) -> PathBuf {
        self.root.join("scheduler/scheduler_config.json")
    }
}

fn existing(file: PathBuf) -> Result<PathBuf, PipelineError> {
    if file.is_file() {
        Ok(file)
    } else {
        Err(PipelineError::Io {
            path: file,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        })
    }
}
