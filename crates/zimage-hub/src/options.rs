//! Where the cache is, which server to ask, with which token: the `huggingface_hub` environment
//! variables, so that Python and Rust users share one cache and one configuration.

use std::fmt;
use std::path::PathBuf;

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How to reach the Hub and where to keep what it sends.
#[derive(Clone)]
pub struct HubOptions {
    /// Base URL of the Hub, without trailing slash (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The hub cache folder holding `models--owner--name/` (`HF_HUB_CACHE`, else `$HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// Sent as `Authorization: Bearer` to the endpoint (`HF_TOKEN`, else `$HF_HOME/token`).
    pub token: Option<String>,
    /// Use the cache only, never the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Draw a progress bar per downloaded file on stderr (off with
    /// `HF_HUB_DISABLE_PROGRESS_BARS=1`, and for tests through [`HubOptions::quiet`]).
    pub progress: bool,
    /// How many times a broken download is resumed within one call before giving up.
    pub retries: u32,
}

impl HubOptions {
    /// Options from the process environment (see [`HubOptions::from_vars`]).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Options from environment variables read through `var`, as `huggingface_hub` reads them:
    /// `HF_HOME` (default `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`),
    /// `HF_HUB_CACHE` (default `$HF_HOME/hub`), `HF_ENDPOINT`, `HF_TOKEN` (else the file
    /// `$HF_HOME/token` written by `huggingface-cli login`), `HF_HUB_OFFLINE`,
    /// `HF_HUB_DISABLE_PROGRESS_BARS`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let hf_home = set("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = set("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                let home = set("HOME").or_else(|| set("USERPROFILE"));
                home.map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."))
                    .join(".cache")
            });
            cache.join("huggingface")
        });
        let cache_dir = set("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let endpoint = set("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let token = set("HF_TOKEN")
            .or_else(|| std::fs::read_to_string(hf_home.join("token")).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        Self {
            endpoint,
            cache_dir,
            token,
            offline: set("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v)),
            progress: !set("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| is_true(&v)),
            retries: 5,
        }
    }

    /// Options for a given cache and endpoint, nothing read from the environment.
    pub fn new(cache_dir: impl Into<PathBuf>, endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into().trim_end_matches('/').to_string(),
            cache_dir: cache_dir.into(),
            token: None,
            offline: false,
            progress: true,
            retries: 5,
        }
    }

    /// The same options without progress bars.
    pub fn quiet(mut self) -> Self {
        self.progress = false;
        self
    }
}

/// `huggingface_hub`'s truth test for boolean variables.
fn is_true(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

// The token stays out of logs and panics.
impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .field("progress", &self.progress)
            .field("retries", &self.retries)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn options(vars: &[(&str, &str)]) -> HubOptions {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubOptions::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_follow_huggingface_hub() {
        let o = options(&[("HOME", "/home/u")]);
        assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(o.endpoint, DEFAULT_ENDPOINT);
        assert!(!o.offline);
        assert!(o.progress);
        let o = options(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]);
        assert_eq!(o.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
    }

    #[test]
    fn variables_override_defaults() {
        let o = options(&[
            ("HOME", "/home/u"),
            ("HF_HOME", "/data/hf"),
            ("HF_ENDPOINT", "https://mirror.example/"),
            ("HF_TOKEN", " hf_abc \n"),
            ("HF_HUB_OFFLINE", "yes"),
            ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ]);
        assert_eq!(o.cache_dir, PathBuf::from("/data/hf/hub"));
        assert_eq!(o.endpoint, "https://mirror.example");
        assert_eq!(o.token.as_deref(), Some("hf_abc"));
        assert!(o.offline);
        assert!(!o.progress);
        assert!(
            !format!("{o:?}").contains("hf_abc"),
            "token must not be printed"
        );
        let o = options(&[("HF_HOME", "/data/hf"), ("HF_HUB_CACHE", "/fast/hub")]);
        assert_eq!(o.cache_dir, PathBuf::from("/fast/hub"));
        assert!(!options(&[("HF_HUB_OFFLINE", "0")]).offline);
    }

    #[test]
    fn token_file_is_read_when_the_variable_is_unset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hf_from_file\n").unwrap();
        let home = dir.path().to_string_lossy().into_owned();
        let o = options(&[("HF_HOME", &home)]);
        assert_eq!(o.token.as_deref(), Some("hf_from_file"));
        let o = options(&[("HF_HOME", &home), ("HF_TOKEN", "hf_env")]);
        assert_eq!(o.token.as_deref(), Some("hf_env"));
    }
}
