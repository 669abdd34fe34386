use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Z-Image model folder: {reason}")]
    ModelFolder { path: PathBuf, reason: String },
    /// A single file given without a config, which does not hold the published component.
    #[error(
        "{} is not the published {component} (its shapes were checked against the built-in \
         config; give --model with a folder whose config.json fits it)",
        file.display()
    )]
    NotPublished {
        component: &'static str,
        file: PathBuf,
        #[source]
        source: Box<PipelineError>,
    },
    #[error(transparent)]
    Checkpoint(#[from] zimage_nn::CheckpointError),
    #[error(transparent)]
    Transformer(#[from] zimage_transformer::TransformerError),
    #[error(transparent)]
    Vae(#[from] zimage_vae::VaeError),
    #[error(transparent)]
    Text(#[from] zimage_text::TextError),
    #[error(transparent)]
    Lora(#[from] zimage_lora::LoraError),
    #[error(transparent)]
    Scheduler(#[from] zimage_scheduler::SchedulerError),
    /// A request the pipeline cannot run (bad size, strength, counts...).
    #[error("{0}")]
    Invalid(String),
    #[error(
        "this generation needs {needed}, but the {device} has {available} available; \
         ways out: a smaller --width/--height, fewer images, --vae-tile 512, --weights-dtype bf16 \
         (for f32 files), a quantized (GGUF) file, or --force to try anyway"
    )]
    OutOfMemory {
        needed: String,
        available: String,
        device: String,
    },
    #[error("cancelled at step {step}")]
    Cancelled { step: usize },
    #[error("the latents became non-finite (NaN or infinite) at step {step} of {total}; with f16, try bf16 or f32")]
    NonFinite { step: usize, total: usize },
}
