//! The `huggingface_hub` cache layout, so that Python and Rust share downloads:
//!
//! ```text
//! <cache>/models--owner--name/
//!     blobs/<etag>                 file contents, named by LFS sha256 or git blob sha1
//!     blobs/<etag>.incomplete      a download in progress (resumed from its length)
//!     refs/<revision>              the commit a branch or tag pointed to when last resolved
//!     snapshots/<commit>/<path>    relative symlink to ../../blobs/<etag> (a copy where
//!                                  symlinks are not allowed)
//!     .no_exist/<commit>/<path>    empty marker: the file is absent at that commit
//! ```
//!
//! A snapshot entry is only ever created from a complete, verified blob, so an entry that exists
//! is trusted without asking the network.

use std::fs;
use std::path::{Path, PathBuf};

use crate::HubError;

/// The cache folder of one model repo.
#[derive(Debug, Clone)]
pub struct RepoCache {
    dir: PathBuf,
}

impl RepoCache {
    /// `repo_id` is `owner/name`.
    pub fn new(cache_dir: &Path, repo_id: &str) -> Self {
        Self {
            dir: cache_dir.join(format!("models--{}", repo_id.replace('/', "--"))),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    pub fn incomplete(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{etag}.incomplete"))
    }

    pub fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    /// `path` is a repo path with `/` separators.
    pub fn snapshot_file(&self, commit: &str, path: &str) -> PathBuf {
        join_repo_path(&self.snapshot_dir(commit), path)
    }

    fn no_exist_marker(&self, commit: &str, path: &str) -> PathBuf {
        join_repo_path(&self.dir.join(".no_exist").join(commit), path)
    }

    /// The commit a revision stands for in the cache: a full commit hash with a snapshot stands
    /// for itself, anything else is looked up in `refs/`.
    pub fn commit_for(&self, revision: &str) -> Option<String> {
        if is_commit_hash(revision) && self.snapshot_dir(revision).is_dir() {
            return Some(revision.to_string());
        }
        let text = fs::read_to_string(join_repo_path(&self.dir.join("refs"), revision)).ok()?;
        let commit = text.trim();
        is_commit_hash(commit).then(|| commit.to_string())
    }

    /// Records that `revision` points to `commit` (nothing to record when it is the commit).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<(), HubError> {
        if revision == commit {
            return Ok(());
        }
        let path = join_repo_path(&self.dir.join("refs"), revision);
        if fs::read_to_string(&path).is_ok_and(|old| old.trim() == commit) {
            return Ok(());
        }
        create_parent(&path)?;
        write_atomically(&path, commit.as_bytes())
    }

    /// A snapshot entry that exists (a dangling symlink does not count).
    /// Every file of the commit's snapshot.
    pub fn snapshot_files(&self, commit: &str) -> Vec<String> {
        files_under(&self.snapshot_dir(commit))
    }

    pub fn cached_file(&self, commit: &str, path: &str) -> Option<PathBuf> {
        let file = self.snapshot_file(commit, path);
        file.is_file().then_some(file)
    }

    pub fn is_marked_missing(&self, commit: &str, path: &str) -> bool {
        self.no_exist_marker(commit, path).is_file()
    }

    /// Remembers that `path` does not exist at `commit`, so later runs skip asking. Best effort:
    /// failing to write the marker only costs a request next time.
    pub fn mark_missing(&self, commit: &str, path: &str) {
        let marker = self.no_exist_marker(commit, path);
        if create_parent(&marker).is_ok() {
            let _ = fs::write(&marker, b"");
        }
    }

    /// Makes `snapshots/<commit>/<path>` point at `blobs/<etag>`: a relative symlink as
    /// `huggingface_hub` makes, or a copy where the file system refuses symlinks.
    pub fn link(&self, etag: &str, commit: &str, path: &str) -> Result<PathBuf, HubError> {
        let blob = self.blob(etag);
        let target = self.snapshot_file(commit, path);
        create_parent(&target)?;
        // From snapshots/<commit>/<a>/<b> back to the repo folder: one `..` per path component
        // plus one for <commit> and one for `snapshots`, minus the file itself.
        let depth = path.split('/').count() + 1;
        let relative: PathBuf = std::iter::repeat_n("..", depth)
            .collect::<PathBuf>()
            .join("blobs")
            .join(etag);
        let staging = target.with_file_name(format!(
            ".{}.linking",
            target
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("file")
        ));
        let _ = fs::remove_file(&staging);
        if symlink(&relative, &staging).is_err() {
            fs::copy(&blob, &staging).map_err(|e| HubError::io("copy", &blob, e))?;
        }
        fs::rename(&staging, &target).map_err(|e| HubError::io("create", &target, e))?;
        Ok(target)
    }
}

/// `huggingface_hub` only treats full 40-hex commit ids as commits.
/// Every file under `root`, as `/`-separated paths relative to it (symlinks followed).
pub fn files_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(entries) = fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for entry in entries.flatten() {
            let rel = rel.join(entry.file_name());
            let full = root.join(&rel);
            if full.is_dir() {
                stack.push(rel);
            } else if full.is_file() {
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
    }
    out.sort();
    out
}

pub fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Joins a `/`-separated repo path under `base`, component by component.
pub fn join_repo_path(base: &Path, path: &str) -> PathBuf {
    path.split('/')
        .filter(|part| !part.is_empty())
        .fold(base.to_path_buf(), |acc, part| acc.join(part))
}

pub fn create_parent(path: &Path) -> Result<(), HubError> {
    match path.parent() {
        Some(parent) => {
            fs::create_dir_all(parent).map_err(|e| HubError::io("create folder", parent, e))
        }
        None => Ok(()),
    }
}

/// Writes through a temporary name so that readers never see half a file.
fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), HubError> {
    let staging = path.with_extension("writing");
    fs::write(&staging, contents).map_err(|e| HubError::io("write", &staging, e))?;
    fs::rename(&staging, path).map_err(|e| HubError::io("write", path, e))
}

#[cfg(unix)]
fn symlink(original: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(original, link)
}

#[cfg(windows)]
fn symlink(original: &Path, link: &Path) -> std::io::Result<()> {
    // Needs developer mode or privileges; the caller copies when this fails.
    std::os::windows::fs::symlink_file(original, link)
}

#[cfg(not(any(unix, windows)))]
fn symlink(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::other("no symlinks on this platform"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn layout_matches_huggingface_hub() {
        let cache = RepoCache::new(Path::new("/c"), "Tongyi-MAI/Z-Image-Turbo");
        assert_eq!(
            cache.dir(),
            Path::new("/c/models--Tongyi-MAI--Z-Image-Turbo")
        );
        assert_eq!(
            cache.snapshot_file(COMMIT, "vae/config.json"),
            Path::new("/c/models--Tongyi-MAI--Z-Image-Turbo/snapshots")
                .join(COMMIT)
                .join("vae/config.json")
        );
        assert_eq!(
            cache.incomplete("abc"),
            Path::new("/c/models--Tongyi-MAI--Z-Image-Turbo/blobs/abc.incomplete")
        );
    }

    #[test]
    fn refs_links_and_markers() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RepoCache::new(dir.path(), "o/n");
        assert_eq!(cache.commit_for("main"), None);
        cache.write_ref("main", COMMIT).unwrap();
        assert_eq!(cache.commit_for("main").as_deref(), Some(COMMIT));
        cache.write_ref("refs/pr/1", COMMIT).unwrap();
        assert_eq!(cache.commit_for("refs/pr/1").as_deref(), Some(COMMIT));

        fs::create_dir_all(cache.blob("e").parent().unwrap()).unwrap();
        fs::write(cache.blob("e"), b"data").unwrap();
        let linked = cache.link("e", COMMIT, "vae/config.json").unwrap();
        assert_eq!(fs::read(&linked).unwrap(), b"data");
        #[cfg(unix)]
        assert_eq!(
            fs::read_link(&linked).unwrap(),
            Path::new("../../../blobs/e")
        );
        assert_eq!(cache.cached_file(COMMIT, "vae/config.json"), Some(linked));
        assert_eq!(cache.commit_for(COMMIT).as_deref(), Some(COMMIT));

        assert!(!cache.is_marked_missing(COMMIT, "a/b.json"));
        cache.mark_missing(COMMIT, "a/b.json");
        assert!(cache.is_marked_missing(COMMIT, "a/b.json"));
    }
}
