use std::path::PathBuf;

use zimage_nn::CheckpointError;

#[derive(Debug, thiserror::Error)]
pub enum TransformerError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid transformer config{}: {reason}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Config {
        path: Option<PathBuf>,
        reason: String,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("invalid transformer input: {0}")]
    Input(String),
    /// A ControlNet file or config that does not fit this transformer, or is no ControlNet.
    #[error("ControlNet{}: {reason}", file.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    ControlNet {
        file: Option<PathBuf>,
        reason: String,
    },
    #[error(transparent)]
    TooLarge(#[from] zimage_nn::device::TooLarge),
}
