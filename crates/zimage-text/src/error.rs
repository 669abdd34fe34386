use std::path::PathBuf;

use zimage_nn::CheckpointError;

/// Everything that can go wrong between a prompt and its features.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid tokenizer{}: {reason}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Tokenizer {
        path: Option<PathBuf>,
        reason: String,
    },
    #[error("invalid text encoder config{}: {reason}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Config {
        path: Option<PathBuf>,
        reason: String,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The tokenizer can produce ids the encoder has no embedding for.
    #[error("the tokenizer has {tokenizer} token ids but the text encoder's vocab_size is {model}: they do not belong together")]
    VocabMismatch { tokenizer: usize, model: usize },
    #[error("prompt {prompt}: token id {id} at position {position} is outside the text encoder's vocabulary of {vocab_size} ids")]
    TokenOutOfRange {
        prompt: usize,
        position: usize,
        id: u32,
        vocab_size: usize,
    },
    #[error("invalid text encoder input: {0}")]
    Input(String),
}
