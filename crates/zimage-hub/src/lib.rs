//! Turns a `--model` value into a local model folder in the Hugging Face layout.
//!
//! - An existing path is used as it is.
//! - `owner/name` or `owner/name@revision` is a Hub repo: the files a Z-Image pipeline needs
//!   (configs, tokenizer, and the weights of the transformer, text encoder and VAE, the shards
//!   found through each `*.safetensors.index.json`) are downloaded into the standard Hugging Face
//!   cache (`$HF_HOME/hub/models--owner--name/`, the layout `huggingface_hub` uses, so Python and
//!   Rust share one copy), and the snapshot folder is returned.
//!
//! A repo without `model_index.json` in ComfyUI's layout (`Comfy-Org/z_image_turbo`:
//! `split_files/diffusion_models/`, `split_files/text_encoders/`, `split_files/vae/`) resolves to
//! its single files; only those are downloaded.
//!
//! Downloads resume after an interruption (the `.incomplete` file is continued with an HTTP
//! `Range`), are verified by size and, for LFS files, by sha256, and never leave a partial file
//! in `snapshots/`. `HF_HUB_OFFLINE=1` uses the cache only.
//!
//! ```no_run
//! use zimage_hub::{resolve_model, HubOptions};
//! let folder = resolve_model("Tongyi-MAI/Z-Image-Turbo", &HubOptions::from_env())?;
//! # Ok::<(), zimage_hub::HubError>(())
//! ```

mod cache;
mod error;
mod http;
mod options;
mod repo;

use std::path::{Path, PathBuf};

pub use cache::RepoCache;
pub use error::HubError;
pub use options::{HubOptions, DEFAULT_ENDPOINT};
pub use repo::{comfy_files, Component, HubRepo, RepoSpec, Resolved};

/// The model the command uses when none is given.
pub const DEFAULT_MODEL: &str = "Tongyi-MAI/Z-Image-Turbo";

/// Everything the pipeline needs for `spec`: `spec` itself when it is an existing path, else
/// the cached snapshot of the repo `spec` names, downloaded as needed.
pub fn resolve_model(spec: &str, options: &HubOptions) -> Result<Resolved, HubError> {
    resolve_model_with(spec, options, &Component::ALL)
}

/// Like [`resolve_model`], fetching only the weights of `weights` (a diffusers layout's configs
/// and tokenizer are always fetched). An existing folder in ComfyUI's layout gives its single
/// files; any other existing path is returned as it is, whatever it holds.
pub fn resolve_model_with(
    spec: &str,
    options: &HubOptions,
    weights: &[Component],
) -> Result<Resolved, HubError> {
    let path = Path::new(spec);
    if path.exists() {
        if path.join("split_files").is_dir() && !path.join("model_index.json").exists() {
            let paths = cache::files_under(path);
            if let Some(files) = comfy_files(&paths, weights) {
                return Ok(Resolved::SingleFiles(
                    files.into_iter().map(|(c, p)| (c, path.join(p))).collect(),
                ));
            }
        }
        return Ok(Resolved::Folder(PathBuf::from(spec)));
    }
    let repo = RepoSpec::parse(spec).ok_or_else(|| HubError::InvalidSpec {
        spec: spec.to_string(),
    })?;
    HubRepo::new(repo, options.clone()).resolve(weights)
}
