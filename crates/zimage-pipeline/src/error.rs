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
    #[error(transparent)]
    Transformer(#[from] zimage_transformer::TransformerError),
    #[error(transparent)]
    Vae(#[from] zimage_vae::VaeError),
    #[error(transparent)]
    Text(#[from] zimage_text::TextError),
    #[error(transparent)]
    Scheduler(#[from] zimage_scheduler::SchedulerError),
    /// A request the pipeline cannot run (bad size, strength, counts...).
    #[error("{0}")]
    Invalid(String),
    #[error("cancelled at step {step}")]
    Cancelled { step: usize },
    #[error("the latents became non-finite (NaN or infinite) at step {step} of {total}; with f16, try bf16 or f32")]
    NonFinite { step: usize, total: usize },
}
