//! Where a model's parts come from: a folder in the Hugging Face layout, single weight files
//! (ComfyUI's repack, original names), or both, with the published configs built in.

use std::path::{Path, PathBuf};

use serde_json::Value;
use zimage_scheduler::FlowMatchEulerDiscreteSchedulerConfig;
use zimage_text::{PromptTokenizer, Qwen3Config};
use zimage_transformer::ZImageTransformerConfig;
use zimage_vae::AutoencoderKLConfig;

use crate::PipelineError;

/// Which Z-Image release a model is; it decides the defaults a user does not give.
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

    pub fn name(self) -> &'static str {
        match self {
            Variant::Turbo => "turbo",
            Variant::Base => "base",
        }
    }
}

/// The variant chosen, and why (the command prints it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantChoice {
    pub variant: Variant,
    pub reason: String,
}

/// One component's weights (a safetensors file, a sharded index, or a folder holding either)
/// and its config file, if the model has one (the published config is built in otherwise).
#[derive(Debug, Clone)]
pub struct Part {
    pub weights: PathBuf,
    pub config: Option<PathBuf>,
}

/// The paths of a model's parts, checked to exist.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    root: Option<PathBuf>,
    transformer: Option<Part>,
    text_encoder: Option<Part>,
    vae: Option<Part>,
    tokenizer: Option<PathBuf>,
    scheduler_config: Option<PathBuf>,
    variant: VariantChoice,
}

/// Sub-folders of a Hugging Face layout folder, with the file each must hold.
const PARTS: [(&str, &str); 5] = [
    ("transformer", "config.json"),
    ("text_encoder", "config.json"),
    ("tokenizer", "tokenizer.json"),
    ("vae", "config.json"),
    ("scheduler", "scheduler_config.json"),
];

impl ModelFiles {
    /// A folder in the Hugging Face layout (`model_index.json` and the five component folders).
    /// Component folders whose weights are missing are allowed when single files will replace
    /// them ([`Self::with_transformer_file`] and its siblings); loading fails otherwise.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, PipelineError> {
        let root = root.as_ref().to_path_buf();
        let fail = |reason: String| PipelineError::ModelFolder {
            path: root.clone(),
            reason,
        };
        if !root.is_dir() {
            return Err(fail("no such folder".into()));
        }
        let index: Value = read_json(&root.join("model_index.json")).map_err(fail)?;
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
        let variant = detect_variant(&root).map_err(fail)?;
        let part = |name: &str| Part {
            weights: root.join(name),
            config: Some(root.join(name).join("config.json")),
        };
        Ok(Self {
            transformer: Some(part("transformer")),
            text_encoder: Some(part("text_encoder")),
            vae: Some(part("vae")),
            tokenizer: Some(root.join("tokenizer/tokenizer.json")),
            scheduler_config: Some(root.join("scheduler/scheduler_config.json")),
            root: Some(root),
            variant,
        })
    }

    /// No folder at all: every part must come from a single file, with the configs the files
    /// carry in their metadata or the published ones, the built-in Qwen3 tokenizer and Turbo's
    /// scheduler. The variant is guessed from the
    /// transformer file's name (ComfyUI names the base model's `z_image_bf16.safetensors`).
    pub fn single_files() -> Self {
        Self {
            root: None,
            transformer: None,
            text_encoder: None,
            vae: None,
            tokenizer: None,
            scheduler_config: None,
            variant: VariantChoice {
                variant: Variant::Turbo,
                reason: "the default".into(),
            },
        }
    }

    /// Takes the transformer's weights from one file (diffusers or original/ComfyUI names).
    pub fn with_transformer_file(
        mut self,
        file: impl Into<PathBuf>,
    ) -> Result<Self, PipelineError> {
        let file = existing(file.into())?;
        if self.root.is_none() {
            self.variant = variant_from_file_name(&file);
        }
        self.transformer = Some(Part {
            weights: file,
            config: self.transformer.and_then(|p| p.config),
        });
        Ok(self)
    }

    /// Takes the text encoder's weights from one file (with or without the `model.` prefix).
    pub fn with_text_encoder_file(
        mut self,
        file: impl Into<PathBuf>,
    ) -> Result<Self, PipelineError> {
        self.text_encoder = Some(Part {
            weights: existing(file.into())?,
            config: self.text_encoder.and_then(|p| p.config),
        });
        Ok(self)
    }

    /// Takes the VAE's weights from one file (diffusers or BFL `ae.safetensors` names).
    pub fn with_vae_file(mut self, file: impl Into<PathBuf>) -> Result<Self, PipelineError> {
        self.vae = Some(Part {
            weights: existing(file.into())?,
            config: self.vae.and_then(|p| p.config),
        });
        Ok(self)
    }

    /// Overrides the variant (and with it the default steps and guidance).
    pub fn with_variant(mut self, variant: Variant) -> Self {
        self.variant = VariantChoice {
            variant,
            reason: "as asked".into(),
        };
        self
    }

    /// The folder, when the model has one.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    pub fn variant(&self) -> Variant {
        self.variant.variant
    }

    pub fn variant_choice(&self) -> &VariantChoice {
        &self.variant
    }

    /// Where the transformer's weights are: its folder, or the single file that replaces it.
    pub fn transformer(&self) -> Result<&Part, PipelineError> {
        self.transformer
            .as_ref()
            .ok_or_else(|| missing("transformer", "--transformer"))
    }

    pub fn text_encoder(&self) -> Result<&Part, PipelineError> {
        self.text_encoder
            .as_ref()
            .ok_or_else(|| missing("text encoder", "--text-encoder"))
    }

    pub fn vae(&self) -> Result<&Part, PipelineError> {
        self.vae.as_ref().ok_or_else(|| missing("VAE", "--vae"))
    }

    /// Whether every part has weights to load.
    pub fn check_complete(&self) -> Result<(), PipelineError> {
        self.transformer()?;
        self.text_encoder()?;
        self.vae().map(|_| ())
    }

    /// The transformer's config: its folder's `config.json`, else the JSON a single file carries
    /// in its safetensors metadata (`config`), else the published Z-Image one.
    pub fn transformer_config(
        &self,
    ) -> Result<(ZImageTransformerConfig, ConfigSource), PipelineError> {
        Ok(match config_source(self.transformer.as_ref())? {
            ConfigSource::File(path) => (
                ZImageTransformerConfig::from_file(&path)?,
                ConfigSource::File(path),
            ),
            ConfigSource::Embedded(json) => (
                ZImageTransformerConfig::from_json(&json)?,
                ConfigSource::Embedded(json),
            ),
            ConfigSource::Gguf | ConfigSource::Published => (
                ZImageTransformerConfig::z_image_turbo(),
                ConfigSource::Published,
            ),
        })
    }

    /// The text encoder's config, found as [`Self::transformer_config`] finds its (Qwen3-4B's
    /// when published).
    /// A llama.cpp GGUF's own metadata (`qwen3.*`) counts as the file's config.
    pub fn text_encoder_config(&self) -> Result<(Qwen3Config, ConfigSource), PipelineError> {
        Ok(match config_source(self.text_encoder.as_ref())? {
            ConfigSource::File(path) => (Qwen3Config::from_file(&path)?, ConfigSource::File(path)),
            ConfigSource::Embedded(json) => {
                (Qwen3Config::from_json(&json)?, ConfigSource::Embedded(json))
            }
            ConfigSource::Gguf => {
                let part = self.text_encoder.as_ref().expect("a GGUF source is a file");
                let checkpoint = zimage_nn::Checkpoint::open(&part.weights)?;
                match Qwen3Config::from_gguf(&checkpoint) {
                    Some(config) => (config?, ConfigSource::Gguf),
                    None => (Qwen3Config::qwen3_4b(), ConfigSource::Published),
                }
            }
            ConfigSource::Published => (Qwen3Config::qwen3_4b(), ConfigSource::Published),
        })
    }

    /// The VAE's config, found as [`Self::transformer_config`] finds its (the Flux VAE's when
    /// published).
    pub fn vae_config(&self) -> Result<(AutoencoderKLConfig, ConfigSource), PipelineError> {
        Ok(match config_source(self.vae.as_ref())? {
            ConfigSource::File(path) => (
                AutoencoderKLConfig::from_file(&path)?,
                ConfigSource::File(path),
            ),
            ConfigSource::Embedded(json) => (
                AutoencoderKLConfig::from_json(&json)?,
                ConfigSource::Embedded(json),
            ),
            ConfigSource::Gguf | ConfigSource::Published => {
                (AutoencoderKLConfig::z_image(), ConfigSource::Published)
            }
        })
    }

    pub fn scheduler_config(&self) -> Result<FlowMatchEulerDiscreteSchedulerConfig, PipelineError> {
        Ok(match &self.scheduler_config {
            Some(path) => FlowMatchEulerDiscreteSchedulerConfig::from_file(path)?,
            None => FlowMatchEulerDiscreteSchedulerConfig::z_image_turbo(),
        })
    }

    pub fn tokenizer(&self) -> Result<PromptTokenizer, PipelineError> {
        Ok(match &self.tokenizer {
            Some(path) => PromptTokenizer::from_file(path)?,
            None => PromptTokenizer::qwen3()?,
        })
    }
}

/// Where a component's config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// The model folder's `config.json`.
    File(PathBuf),
    /// The `config` entry of the single file's safetensors metadata.
    Embedded(String),
    /// The metadata of a GGUF file (llama.cpp's `qwen3.*` keys); for components whose GGUF
    /// files carry no config (the transformer), the published one is used.
    Gguf,
    /// Built in: the published Z-Image-Turbo component.
    Published,
}

/// The metadata key a single file may carry its component's config JSON under.
pub const CONFIG_METADATA_KEY: &str = "config";

fn config_source(part: Option<&Part>) -> Result<ConfigSource, PipelineError> {
    let Some(part) = part else {
        return Ok(ConfigSource::Published);
    };
    if let Some(path) = &part.config {
        return Ok(ConfigSource::File(path.clone()));
    }
    let checkpoint = zimage_nn::Checkpoint::open(&part.weights)?;
    Ok(match checkpoint.metadata(CONFIG_METADATA_KEY) {
        Some(json) => ConfigSource::Embedded(json.to_string()),
        None if checkpoint.gguf_value("general.architecture").is_some() => ConfigSource::Gguf,
        None => ConfigSource::Published,
    })
}

fn missing(what: &str, flag: &str) -> PipelineError {
    PipelineError::Invalid(format!(
        "no {what} weights: give a model folder (--model) or the file ({flag} FILE)"
    ))
}

fn read_json(path: &Path) -> Result<Value, String> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {name} ({e})"))?;
    serde_json::from_str(&text).map_err(|e| format!("{name} is not valid JSON ({e})"))
}

/// Turbo or base, from what a Hugging Face layout folder says.
///
/// - The published Turbo transformer config has no `siglip_feat_dim`; the base model's names it
///   (null). But diffusers' `save_pretrained` writes every field, so a re-saved Turbo has it too.
/// - A config written by a diffusers release (anything but the `0.36.0.dev0` both were published
///   with) is therefore told apart by the scheduler: Turbo's has a static shift of 3.
/// - Failing both, a name containing "turbo" (the folder, or the Hub repo it is a snapshot of).
fn detect_variant(root: &Path) -> Result<VariantChoice, String> {
    let config = read_json(&root.join("transformer/config.json"))?;
    let choice = |variant, reason: &str| {
        Ok(VariantChoice {
            variant,
            reason: reason.to_string(),
        })
    };
    if config.get("siglip_feat_dim").is_none() {
        return choice(
            Variant::Turbo,
            "its transformer config has no siglip_feat_dim (Turbo's)",
        );
    }
    let version = config
        .get("_diffusers_version")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let republished = !version.starts_with("0.36");
    if !republished {
        return choice(Variant::Base, "its transformer config is the base model's");
    }
    let scheduler = read_json(&root.join("scheduler/scheduler_config.json"))?;
    let shift = scheduler
        .get("shift")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    let dynamic = scheduler
        .get("use_dynamic_shifting")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !dynamic && shift == 3.0 {
        return choice(
            Variant::Turbo,
            "its scheduler has Turbo's static shift of 3",
        );
    }
    if name_says_turbo(root) {
        return choice(Variant::Turbo, "its name says Turbo");
    }
    choice(Variant::Base, "its scheduler is not Turbo's")
}

/// Whether the folder, or the Hub repo whose cache snapshot it is, is named "...turbo...".
fn name_says_turbo(root: &Path) -> bool {
    root.ancestors()
        .take(4)
        .filter_map(Path::file_name)
        .any(|n| n.to_string_lossy().to_lowercase().contains("turbo"))
}

fn variant_from_file_name(file: &Path) -> VariantChoice {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if !name.contains("turbo") && (name.starts_with("z_image") || name.starts_with("z-image")) {
        VariantChoice {
            variant: Variant::Base,
            reason: format!("{name} is named as the base model is (no \"turbo\")"),
        }
    } else {
        VariantChoice {
            variant: Variant::Turbo,
            reason: if name.contains("turbo") {
                format!("{name} is named Turbo")
            } else {
                "the default for a single file".into()
            },
        }
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
