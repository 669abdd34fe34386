//! One Hub repo at one revision: single files, and the set of files a Z-Image pipeline needs.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use serde::Deserialize;

use crate::cache::{is_commit_hash, RepoCache};
use crate::http::Client;
use crate::{HubError, HubOptions};

/// A component whose weights can be fetched or left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    Transformer,
    TextEncoder,
    Vae,
}

impl Component {
    pub const ALL: [Component; 3] = [
        Component::Transformer,
        Component::TextEncoder,
        Component::Vae,
    ];

    /// The component's folder in the repo.
    pub fn folder(self) -> &'static str {
        match self {
            Component::Transformer => "transformer",
            Component::TextEncoder => "text_encoder",
            Component::Vae => "vae",
        }
    }

    /// The weights file stem: diffusers models save `diffusion_pytorch_model`, transformers
    /// models `model`; sharded saves add `-0000i-of-0000n` and an index.
    pub fn weights_stem(self) -> &'static str {
        match self {
            Component::TextEncoder => "model",
            Component::Transformer | Component::Vae => "diffusion_pytorch_model",
        }
    }

    /// Where ComfyUI's repacks keep this component's single file (`split_files/<folder>/`).
    fn comfy_folder(self) -> &'static str {
        match self {
            Component::Transformer => "split_files/diffusion_models/",
            Component::TextEncoder => "split_files/text_encoders/",
            Component::Vae => "split_files/vae/",
        }
    }

    fn index_path(self) -> String {
        format!(
            "{}/{}.safetensors.index.json",
            self.folder(),
            self.weights_stem()
        )
    }

    fn single_path(self) -> String {
        format!("{}/{}.safetensors", self.folder(), self.weights_stem())
    }
}

/// Files every pipeline needs, whatever weights are asked for; `false` marks optional ones.
const CONFIG_FILES: [(&str, bool); 7] = [
    ("model_index.json", true),
    ("scheduler/scheduler_config.json", true),
    ("transformer/config.json", true),
    ("text_encoder/config.json", true),
    ("vae/config.json", true),
    ("tokenizer/tokenizer.json", true),
    ("tokenizer/tokenizer_config.json", false),
];

/// What a model resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// A folder in the Hugging Face layout (`model_index.json` and component folders).
    Folder(PathBuf),
    /// ComfyUI's layout (`split_files/{diffusion_models,text_encoders,vae}/`): one file per
    /// component asked for; configs and the tokenizer are the published ones.
    SingleFiles(Vec<(Component, PathBuf)>),
}

/// In a repo file listing, the single file of each of `wanted` in ComfyUI's layout: safetensors
/// directly in the component's `split_files/` folder, bf16 preferred, then f16, then the
/// others; fp8 and other quantized repacks last (they need scales this loader does not read).
/// `None` unless every wanted component has one.
pub fn comfy_files(paths: &[String], wanted: &[Component]) -> Option<Vec<(Component, String)>> {
    let rank = |name: &str| {
        let name = name.to_ascii_lowercase();
        if ["fp8", "fp4", "int8", "int4", "nf4", "mxfp", "gguf"]
            .iter()
            .any(|q| name.contains(q))
        {
            3
        } else if name.contains("bf16") {
            0
        } else if name.contains("fp16") || name.contains("f16") {
            1
        } else {
            2
        }
    };
    wanted
        .iter()
        .map(|&component| {
            let folder = component.comfy_folder();
            paths
                .iter()
                .filter_map(|p| p.strip_prefix(folder).map(|name| (p, name)))
                .filter(|(_, name)| !name.contains('/') && name.ends_with(".safetensors"))
                .filter(|(_, name)| rank(name) < 3)
                .min_by_key(|(_, name)| (rank(name), name.to_string()))
                .map(|(p, _)| (component, p.clone()))
        })
        .collect()
}

/// `owner/name[@revision]`, as given to `--model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoSpec {
    pub repo_id: String,
    pub revision: String,
}

impl RepoSpec {
    /// Parses `owner/name` or `owner/name@revision` (revision defaults to `main`); `None` for
    /// anything else.
    pub fn parse(spec: &str) -> Option<Self> {
        let (repo_id, revision) = match spec.split_once('@') {
            Some((repo, revision)) => (repo, revision),
            None => (spec, "main"),
        };
        let (owner, name) = repo_id.split_once('/')?;
        let valid_part = |part: &str| {
            !part.is_empty()
                && !part.starts_with(['.', '-'])
                && !part.contains("..")
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        // A revision may be a branch with slashes (`refs/pr/1`); it becomes a path under refs/.
        let valid_revision = !revision.is_empty()
            && revision
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != "..")
            && !revision.chars().any(|c| c.is_whitespace() || c == '\\');
        (valid_part(owner) && valid_part(name) && valid_revision).then(|| Self {
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// A model repo on the Hub, seen through the local cache.
pub struct HubRepo {
    spec: RepoSpec,
    options: HubOptions,
    cache: RepoCache,
    client: Client,
}

#[derive(Deserialize)]
struct Index {
    weight_map: std::collections::HashMap<String, String>,
}

impl HubRepo {
    pub fn new(spec: RepoSpec, options: HubOptions) -> Self {
        let cache = RepoCache::new(&options.cache_dir, &spec.repo_id);
        let client = Client::new(
            &options.endpoint,
            options.token.clone(),
            options.progress,
            options.retries,
        );
        Self {
            spec,
            options,
            cache,
            client,
        }
    }

    pub fn spec(&self) -> &RepoSpec {
        &self.spec
    }

    pub fn cache(&self) -> &RepoCache {
        &self.cache
    }

    /// Downloads one repo file (at the repo's revision) into the cache if it is not there yet,
    /// and returns its path under `snapshots/<commit>/`.
    pub fn download_file(&self, path: &str) -> Result<PathBuf, HubError> {
        if self.options.offline {
            let commit = self.cached_commit()?;
            return self
                .cache
                .cached_file(&commit, path)
                .ok_or_else(|| self.not_cached(format!("{path} is missing")));
        }
        let (commit, file) = self.fetch(&self.spec.revision, path)?;
        self.cache.write_ref(&self.spec.revision, &commit)?;
        Ok(file)
    }

    /// The model in this repo: a diffusers layout snapshot ([`Self::snapshot`]), or, when the
    /// repo has no `model_index.json`, ComfyUI's layout: only the single files of `weights`
    /// are downloaded (20.6 GB for Comfy-Org/z_image_turbo instead of the diffusers repo's 33).
    pub fn resolve(&self, weights: &[Component]) -> Result<Resolved, HubError> {
        match self.snapshot(weights) {
            Ok(folder) => Ok(Resolved::Folder(folder)),
            Err(e) if self.is_missing_index(&e) => self.comfy_snapshot(weights).map_err(|comfy| {
                match comfy {
                    // Neither layout: say what a Z-Image repo holds.
                    HubError::NotFound { url, .. } => HubError::NotFound {
                        url,
                        what:
                            "model_index.json (diffusers layout) or split_files/ (ComfyUI layout)"
                                .into(),
                    },
                    other => other,
                }
            }),
            Err(e) => Err(e),
        }
    }

    /// Whether `e` says the repo exists but has no `model_index.json`.
    fn is_missing_index(&self, e: &HubError) -> bool {
        match e {
            HubError::NotFound { what, .. } => what.contains(CONFIG_FILES[0].0),
            HubError::NotCached { missing, .. } => missing.contains(CONFIG_FILES[0].0),
            _ => false,
        }
    }

    /// ComfyUI's layout: the repo's file list (one API request, which also pins the commit),
    /// then each wanted component's file. Offline, the files of the cached snapshot.
    fn comfy_snapshot(&self, weights: &[Component]) -> Result<Resolved, HubError> {
        let (commit, paths) = if self.options.offline {
            let commit = self.cached_commit()?;
            let paths = self.cache.snapshot_files(&commit);
            (commit, paths)
        } else {
            self.list_files()?
        };
        let Some(files) = comfy_files(&paths, weights) else {
            let missing = weights
                .iter()
                .map(|c| c.comfy_folder())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(if self.options.offline {
                self.not_cached(format!("a safetensors file in each of {missing}"))
            } else {
                HubError::NotFound {
                    url: self.url(&commit, "split_files"),
                    what: format!("a safetensors file in each of {missing}"),
                }
            });
        };
        if !self.options.offline {
            self.cache.write_ref(&self.spec.revision, &commit)?;
        }
        files
            .into_iter()
            .map(|(component, path)| {
                let file = if self.options.offline {
                    self.cache
                        .cached_file(&commit, &path)
                        .ok_or_else(|| self.not_cached(format!("{path} is missing")))?
                } else {
                    self.fetch(&commit, &path)?.1
                };
                Ok((component, file))
            })
            .collect::<Result<_, _>>()
            .map(Resolved::SingleFiles)
    }

    /// The revision's commit and every file path in it (`/api/models/{repo}/revision/{rev}`).
    pub fn list_files(&self) -> Result<(String, Vec<String>), HubError> {
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.options.endpoint,
            self.spec.repo_id,
            escape(&self.spec.revision)
        );
        let info = self.client.get_json(&url, "repo")?;
        let malformed = |what: &str| HubError::Status {
            url: url.clone(),
            status: 200,
            detail: format!("the repo info has no {what}"),
        };
        let commit = info
            .get("sha")
            .and_then(|s| s.as_str())
            .filter(|s| is_commit_hash(s))
            .ok_or_else(|| malformed("commit sha"))?
            .to_string();
        let paths = info
            .get("siblings")
            .and_then(|s| s.as_array())
            .ok_or_else(|| malformed("file list"))?
            .iter()
            .filter_map(|f| {
                f.get("rfilename")
                    .and_then(|n| n.as_str())
                    .map(str::to_string)
            })
            .collect();
        Ok((commit, paths))
    }

    /// Makes sure the snapshot holds the configs, the tokenizer and the weights of `weights`,
    /// and returns the snapshot folder (a model folder in the Hugging Face layout).
    ///
    /// Online, one request resolves the revision to a commit; files already in that commit's
    /// snapshot are not asked for again. Offline, the revision is resolved through `refs/`.
    pub fn snapshot(&self, weights: &[Component]) -> Result<PathBuf, HubError> {
        if self.options.offline {
            let commit = self.cached_commit()?;
            return self.complete_snapshot(&commit, weights);
        }
        // Resolving the revision through the first file pins every later file to the same
        // commit, even if the branch moves while we download.
        let (commit, _) = match self.fetch(&self.spec.revision, CONFIG_FILES[0].0) {
            Ok(found) => found,
            Err(HubError::Network { url, reason }) => {
                // No network: a complete cached snapshot is as good as `huggingface_hub`'s
                // fallback to the cache.
                let cached = self
                    .cache
                    .commit_for(&self.spec.revision)
                    .and_then(|commit| self.complete_snapshot(&commit, weights).ok());
                return match cached {
                    Some(folder) => {
                        if self.options.progress {
                            eprintln!(
                                "{url}: {reason}; using the cached snapshot {}",
                                folder.display()
                            );
                        }
                        Ok(folder)
                    }
                    None => Err(HubError::Network { url, reason }),
                };
            }
            Err(e) => return Err(e),
        };
        self.cache.write_ref(&self.spec.revision, &commit)?;
        for (path, required) in &CONFIG_FILES[1..] {
            match self.fetch(&commit, path) {
                Ok(_) => {}
                Err(e) if !required && e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        for component in weights {
            self.fetch_weights(&commit, *component)?;
        }
        Ok(self.cache.snapshot_dir(&commit))
    }

    /// The index and its shards, or the single weights file when the repo has no index.
    fn fetch_weights(&self, commit: &str, component: Component) -> Result<(), HubError> {
        let index_path = component.index_path();
        match self.fetch(commit, &index_path) {
            Ok((_, index)) => {
                for shard in self.shards(&index, &index_path)? {
                    self.fetch(commit, &format!("{}/{shard}", component.folder()))?;
                }
                Ok(())
            }
            Err(e) if e.is_not_found() => self.fetch(commit, &component.single_path()).map(|_| ()),
            Err(e) => Err(e),
        }
    }

    /// Offline check of a snapshot: every needed file present, shards found through the cached
    /// indexes.
    fn complete_snapshot(&self, commit: &str, weights: &[Component]) -> Result<PathBuf, HubError> {
        let missing = |path: &str| self.not_cached(format!("{path} is missing"));
        for (path, required) in CONFIG_FILES {
            if required && self.cache.cached_file(commit, path).is_none() {
                return Err(missing(path));
            }
        }
        for component in weights {
            let index_path = component.index_path();
            if let Some(index) = self.cache.cached_file(commit, &index_path) {
                for shard in self.shards(&index, &index_path)? {
                    let path = format!("{}/{shard}", component.folder());
                    if self.cache.cached_file(commit, &path).is_none() {
                        return Err(missing(&path));
                    }
                }
            } else if self
                .cache
                .cached_file(commit, &component.single_path())
                .is_none()
            {
                return Err(missing(&component.single_path()));
            }
        }
        Ok(self.cache.snapshot_dir(commit))
    }

    /// Shard file names listed by a downloaded index (plain names in the index's folder).
    fn shards(
        &self,
        index: &std::path::Path,
        index_path: &str,
    ) -> Result<BTreeSet<String>, HubError> {
        let malformed = |reason: String| HubError::MalformedIndex {
            file: index_path.to_string(),
            reason,
        };
        let text = fs::read_to_string(index).map_err(|e| HubError::io("read", index, e))?;
        let parsed: Index = serde_json::from_str(&text)
            .map_err(|e| malformed(format!("not a safetensors index ({e})")))?;
        let shards: BTreeSet<String> = parsed.weight_map.into_values().collect();
        if shards.is_empty() {
            return Err(malformed("its weight_map is empty".into()));
        }
        if let Some(bad) = shards
            .iter()
            .find(|s| s.contains(['/', '\\']) || s.starts_with('.') || !s.ends_with(".safetensors"))
        {
            return Err(malformed(format!(
                "shard {bad:?} is not a .safetensors file name"
            )));
        }
        Ok(shards)
    }

    /// One file at `revision`: from the snapshot when `revision` is a commit that already has
    /// it, else HEAD for its metadata, the blob fetched if the cache lacks it, and the snapshot
    /// entry linked. Returns the commit and the snapshot path.
    fn fetch(&self, revision: &str, path: &str) -> Result<(String, PathBuf), HubError> {
        if is_commit_hash(revision) {
            if let Some(file) = self.cache.cached_file(revision, path) {
                return Ok((revision.to_string(), file));
            }
            if self.cache.is_marked_missing(revision, path) {
                return Err(HubError::NotFound {
                    url: self.url(revision, path),
                    what: format!("file {path} (remembered in the cache's .no_exist)"),
                });
            }
        }
        let url = self.url(revision, path);
        let meta = match self.client.head(&url, &format!("file {path}")) {
            Ok(meta) => meta,
            Err(e) => {
                if e.is_not_found() && is_commit_hash(revision) {
                    self.cache.mark_missing(revision, path);
                }
                return Err(e);
            }
        };
        if let Some(file) = self.cache.cached_file(&meta.commit, path) {
            return Ok((meta.commit, file));
        }
        let blob = self.cache.blob(&meta.etag);
        let blob_ok = fs::metadata(&blob).is_ok_and(|m| m.len() == meta.size);
        if !blob_ok {
            let incomplete = self.cache.incomplete(&meta.etag);
            crate::cache::create_parent(&incomplete)?;
            self.client.fetch(&meta, path, &incomplete)?;
            fs::rename(&incomplete, &blob).map_err(|e| HubError::io("move", &incomplete, e))?;
        }
        let file = self.cache.link(&meta.etag, &meta.commit, path)?;
        Ok((meta.commit, file))
    }

    /// `{endpoint}/{repo}/resolve/{revision}/{path}`, with the revision escaped whole (a branch
    /// may contain `/`) and the path per segment.
    fn url(&self, revision: &str, path: &str) -> String {
        let path: Vec<String> = path.split('/').map(escape).collect();
        format!(
            "{}/{}/resolve/{}/{}",
            self.options.endpoint,
            self.spec.repo_id,
            escape(revision),
            path.join("/")
        )
    }

    fn cached_commit(&self) -> Result<String, HubError> {
        self.cache.commit_for(&self.spec.revision).ok_or_else(|| {
            self.not_cached(format!("no snapshot for revision {}", self.spec.revision))
        })
    }

    fn not_cached(&self, missing: String) -> HubError {
        HubError::NotCached {
            repo: self.spec.repo_id.clone(),
            revision: self.spec.revision.clone(),
            cache: self.cache.dir().to_path_buf(),
            missing,
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn escape(part: &str) -> String {
    part.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repo_specs() {
        assert_eq!(
            RepoSpec::parse("Tongyi-MAI/Z-Image-Turbo"),
            Some(RepoSpec {
                repo_id: "Tongyi-MAI/Z-Image-Turbo".into(),
                revision: "main".into()
            })
        );
        assert_eq!(
            RepoSpec::parse("o/n@refs/pr/3").map(|s| s.revision),
            Some("refs/pr/3".into())
        );
        for bad in [
            "",
            "name",
            "/abs/path",
            "./x",
            "a/b/c",
            "a/..",
            "a/b@",
            "a/b@../x",
            "a b/c",
        ] {
            assert_eq!(RepoSpec::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn escapes_url_parts() {
        assert_eq!(escape("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(
            escape("model-00001-of-00003.safetensors"),
            "model-00001-of-00003.safetensors"
        );
        assert_eq!(escape("a b"), "a%20b");
    }
}
