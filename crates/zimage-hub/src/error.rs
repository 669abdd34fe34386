//! Everything that can go wrong turning `--model` into a folder, with the URL or file it concerns.

use std::path::PathBuf;

/// A failed resolution or download. Each variant names what it concerns (URL, repo file or
/// local path) so that the message alone tells the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The `--model` value is neither an existing path nor `owner/name[@revision]`.
    #[error(
        "{spec:?} is not an existing folder, and not a Hugging Face repo id \
         (owner/name or owner/name@revision)"
    )]
    InvalidSpec { spec: String },

    /// HTTP 401/403: private or gated repo, or a repo that does not exist (the Hub answers 401
    /// for those too, so as not to reveal private repos).
    #[error(
        "{url}: HTTP {status}: access denied. {hint} If the repo is private or gated, set HF_TOKEN \
         to a token that can read it (https://huggingface.co/settings/tokens){}",
        if *token_sent { "; the token that was sent was refused" } else { "" }
    )]
    Unauthorized {
        url: String,
        status: u16,
        hint: String,
        token_sent: bool,
    },

    /// HTTP 404: the repo, the revision or the file does not exist.
    #[error("{url}: HTTP 404: {what} not found")]
    NotFound { url: String, what: String },

    /// Any other HTTP error status.
    #[error("{url}: HTTP {status}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Status {
        url: String,
        status: u16,
        detail: String,
    },

    /// No HTTP answer at all (DNS, connection, TLS, timeout).
    #[error("{url}: {reason}")]
    Network { url: String, reason: String },

    /// The server answered without a header a Hub always sends.
    #[error("{url}: the answer has no {header} header; is the endpoint (HF_ENDPOINT) a Hugging Face Hub?")]
    MissingHeader { url: String, header: &'static str },

    /// The connection kept breaking; what was received is kept and the next run resumes it.
    #[error(
        "download of {file} stopped at {received} of {expected} bytes after {attempts} attempt(s) \
         ({reason}); run again to resume"
    )]
    Interrupted {
        file: String,
        received: u64,
        expected: u64,
        attempts: u32,
        reason: String,
    },

    /// More bytes than announced arrived; the download was deleted.
    #[error(
        "{file}: received {actual} bytes, the Hub announced {expected}; the download was deleted"
    )]
    SizeMismatch {
        file: String,
        expected: u64,
        actual: u64,
    },

    /// The bytes do not hash to the LFS sha256 the Hub announced; the download was deleted.
    #[error(
        "{file}: the download is corrupt (sha256 {actual}, the Hub announced {expected}); \
         it was deleted, run again to download it anew"
    )]
    HashMismatch {
        file: String,
        expected: String,
        actual: String,
    },

    /// A file or folder of the cache could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Offline mode (HF_HUB_OFFLINE=1) and the cache lacks what is needed.
    #[error(
        "{repo}@{revision} is not in the Hugging Face cache {cache} ({missing}) and offline mode \
         (HF_HUB_OFFLINE) forbids downloading it"
    )]
    NotCached {
        repo: String,
        revision: String,
        cache: PathBuf,
        missing: String,
    },

    /// A `*.safetensors.index.json` that does not list its shards properly.
    #[error("{file}: {reason}")]
    MalformedIndex { file: String, reason: String },
}

impl HubError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// Whether the remote side reported that something does not exist (as opposed to access,
    /// network or disk trouble). Optional files are skipped on this error only.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }
}
