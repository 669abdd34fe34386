use std::path::PathBuf;

use zimage_nn::CheckpointError;

/// Everything that can go wrong loading or running the VAE.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid VAE config{}: {reason}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Config {
        path: Option<PathBuf>,
        reason: String,
    },
    /// Missing, unexpected, misshapen or unreadable tensors.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The checkpoint's tensor names are neither diffusers' nor BFL's.
    #[error("{file}: not an AutoencoderKL checkpoint in diffusers or BFL (ae.safetensors) naming; found {found}")]
    UnknownFormat { file: PathBuf, found: String },
    #[error("{what} has {actual} channels; the VAE expects {expected}")]
    Channels {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("image of {height}x{width} pixels: both sides must be positive multiples of {multiple} (2^(blocks - 1))")]
    ImageSize {
        height: usize,
        width: usize,
        multiple: usize,
    },
    #[error("{what} is empty (shape {shape:?})")]
    Empty {
        what: &'static str,
        shape: Vec<usize>,
    },
    #[error("noise of shape {actual:?} for a posterior of shape {expected:?}")]
    NoiseShape {
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("invalid tiling: {0}")]
    Tiling(String),
    #[error("an image tile of {height}x{width} pixels cannot be downsampled {downsamples} times (a side shrinks below 2 pixels before a downsampling); choose another tile size")]
    TileTooSmall {
        height: usize,
        width: usize,
        downsamples: usize,
    },
    /// An activation larger than the device holds in one tensor: decode or encode in tiles.
    #[error(transparent)]
    TooLarge(#[from] zimage_nn::device::TooLarge),
    /// Images of different sizes in one batch, tensors of an unexpected dtype or layout.
    #[error("{0}")]
    Image(String),
}
