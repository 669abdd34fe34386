//! Talking to the Hub: what a file is (HEAD on its `resolve` URL) and fetching its bytes into
//! the cache (GET, resumed with `Range`, verified by size and, for LFS files, sha256).
//!
//! The metadata comes from the first answer, before any redirect: for LFS files the Hub answers
//! `302` to a CDN with `X-Repo-Commit`, `X-Linked-Etag` (the sha256) and `X-Linked-Size`; plain
//! git files answer `200` with `ETag` and `Content-Length`. Relative redirects (renamed repos)
//! are followed, as `huggingface_hub` does.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use ureq::http::{HeaderMap, Response};
use ureq::Agent;

use crate::HubError;

/// What the Hub says about one file.
#[derive(Debug, Clone)]
pub struct FileMeta {
    /// The commit the revision resolved to.
    pub commit: String,
    /// Blob name in the cache: LFS sha256 (64 hex) or git blob sha1 (40 hex).
    pub etag: String,
    pub size: u64,
    /// Where to GET the bytes (the CDN for LFS files).
    pub download_url: String,
    /// Whether `download_url` is the Hub's own `resolve` URL. A redirect target is a signed
    /// CDN URL that carries its own credentials, so the token is not sent there.
    pub direct: bool,
}

/// One connection pool with the endpoint's token.
pub struct Client {
    /// Redirects are handled by hand for HEAD (the interesting headers are on the redirect).
    no_redirects: Agent,
    /// Downloads follow redirects; ureq drops `Authorization` on them, so the CDN never sees it.
    redirects: Agent,
    endpoint: String,
    token: Option<String>,
    progress: bool,
    retries: u32,
}

const USER_AGENT: &str = concat!("zimage-hub/", env!("CARGO_PKG_VERSION"));
const CHUNK: usize = 1 << 20;

impl Client {
    pub fn new(endpoint: &str, token: Option<String>, progress: bool, retries: u32) -> Self {
        let agent = |redirects: u32| -> Agent {
            Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(redirects)
                .max_redirects_will_error(true)
                .user_agent(USER_AGENT)
                .timeout_connect(Some(Duration::from_secs(30)))
                // Time to the first byte of an answer; the body of a 10 GB file has no limit.
                .timeout_recv_response(Some(Duration::from_secs(60)))
                .build()
                .into()
        };
        Self {
            no_redirects: agent(0),
            redirects: agent(10),
            endpoint: endpoint.to_string(),
            token,
            progress,
            retries,
        }
    }

    /// `Authorization` goes to the endpoint only.
    fn auth(&self, url: &str) -> Option<String> {
        let token = self.token.as_ref()?;
        url.starts_with(&self.endpoint)
            .then(|| format!("Bearer {token}"))
    }

    /// HEAD on a `resolve` URL: commit, etag, size and download URL. `what` describes the file
    /// for a 404 message.
    pub fn head(&self, url: &str, what: &str) -> Result<FileMeta, HubError> {
        let mut url = url.to_string();
        for _ in 0..10 {
            let mut request = self
                .no_redirects
                .head(&url)
                .header("Accept-Encoding", "identity");
            if let Some(auth) = self.auth(&url) {
                request = request.header("Authorization", auth);
            }
            let response = request.call().map_err(|e| network(&url, e))?;
            let status = response.status().as_u16();
            let headers = response.headers();
            let location = header(headers, "location");
            if (300..400).contains(&status) {
                let Some(location) = location.as_deref() else {
                    return Err(HubError::MissingHeader {
                        url,
                        header: "Location",
                    });
                };
                if location.starts_with('/') {
                    // A renamed repo: same server, ask again there.
                    url = format!("{}{location}", origin(&url));
                    continue;
                }
            } else if status >= 400 {
                return Err(status_error(
                    &url,
                    status,
                    headers,
                    what,
                    self.token.is_some(),
                ));
            }
            let commit =
                header(headers, "x-repo-commit").ok_or_else(|| HubError::MissingHeader {
                    url: url.clone(),
                    header: "X-Repo-Commit",
                })?;
            let etag = header(headers, "x-linked-etag")
                .or_else(|| header(headers, "etag"))
                .map(|e| normalize_etag(&e))
                .filter(|e| !e.is_empty() && is_safe_name(e))
                .ok_or_else(|| HubError::MissingHeader {
                    url: url.clone(),
                    header: "ETag",
                })?;
            let size = header(headers, "x-linked-size")
                .or_else(|| header(headers, "content-length"))
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| HubError::MissingHeader {
                    url: url.clone(),
                    header: "Content-Length",
                })?;
            let redirected = (300..400).contains(&status);
            let download_url = match location {
                Some(location) if redirected => location,
                _ => url.clone(),
            };
            return Ok(FileMeta {
                commit,
                etag,
                size,
                download_url,
                direct: !redirected,
            });
        }
        Err(HubError::Network {
            url,
            reason: "more than 10 redirects".into(),
        })
    }

    /// GET of a JSON document from the Hub's API (`what` describes it for a 404 message).
    pub fn get_json(&self, url: &str, what: &str) -> Result<serde_json::Value, HubError> {
        let mut request = self.redirects.get(url).header("Accept", "application/json");
        if let Some(auth) = self.auth(url) {
            request = request.header("Authorization", auth);
        }
        let response = request.call().map_err(|e| network(url, e))?;
        let status = response.status().as_u16();
        if status >= 400 {
            return Err(status_error(
                url,
                status,
                response.headers(),
                what,
                self.token.is_some(),
            ));
        }
        let text = response
            .into_body()
            .read_to_string()
            .map_err(|e| network(url, e))?;
        serde_json::from_str(&text).map_err(|e| HubError::Status {
            url: url.to_string(),
            status,
            detail: format!("the answer is not JSON ({e})"),
        })
    }

    /// Fetches `meta`'s bytes into `incomplete` (resuming what is there), verifies them and
    /// leaves a complete file. `file` is the repo path, for messages and the progress bar.
    /// A corrupt result is deleted; an interrupted one is kept for the next run.
    pub fn fetch(&self, meta: &FileMeta, file: &str, incomplete: &Path) -> Result<(), HubError> {
        let bar = self.progress_bar(file, meta.size);
        let result = self.fetch_inner(meta, file, incomplete, &bar);
        bar.finish_and_clear();
        if self.progress && result.is_ok() {
            eprintln!("downloaded {file} ({})", indicatif::HumanBytes(meta.size));
        }
        result
    }

    fn fetch_inner(
        &self,
        meta: &FileMeta,
        file: &str,
        incomplete: &Path,
        bar: &ProgressBar,
    ) -> Result<(), HubError> {
        // The hash covers what is already on disk, then every byte appended, so a resumed
        // download is still checked end to end without reading it twice.
        let mut hasher = Sha256::new();
        let mut have = hash_existing(incomplete, &mut hasher)?;
        if have > meta.size {
            // Not ours to resume (another file, or the remote file changed): start over.
            remove(incomplete)?;
            hasher = Sha256::new();
            have = 0;
        }
        let mut attempts = 0;
        while have < meta.size {
            attempts += 1;
            bar.set_position(have);
            match self.get_into(meta, file, incomplete, have, &mut hasher, bar) {
                Ok(()) => {
                    have = file_len(incomplete)?;
                    if have < meta.size && attempts > self.retries {
                        let reason = "the answer ended early".to_string();
                        return Err(interrupted(file, have, meta.size, attempts, reason));
                    }
                }
                Err(Retry(reason)) => {
                    have = file_len(incomplete)?;
                    if attempts > self.retries {
                        return Err(interrupted(file, have, meta.size, attempts, reason));
                    }
                    std::thread::sleep(Duration::from_millis(200 * u64::from(attempts.min(10))));
                }
                Err(Fatal(error)) => return Err(error),
            }
        }
        if have != meta.size {
            remove(incomplete)?;
            return Err(HubError::SizeMismatch {
                file: file.to_string(),
                expected: meta.size,
                actual: have,
            });
        }
        if is_sha256(&meta.etag) {
            let actual = to_hex(&hasher.finalize());
            if actual != meta.etag {
                // Resuming a corrupt file can never fix it.
                remove(incomplete)?;
                return Err(HubError::HashMismatch {
                    file: file.to_string(),
                    expected: meta.etag.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }

    /// One GET from byte `from`, appended to `incomplete` and fed to `hasher` (both start over
    /// when the server ignores the Range and sends the whole file).
    fn get_into(
        &self,
        meta: &FileMeta,
        file: &str,
        incomplete: &Path,
        from: u64,
        hasher: &mut Sha256,
        bar: &ProgressBar,
    ) -> Result<(), Failure> {
        let url = &meta.download_url;
        let mut request = self
            .redirects
            .get(url)
            .header("Accept-Encoding", "identity");
        if from > 0 {
            request = request.header("Range", format!("bytes={from}-"));
        }
        let auth = self.auth(url).filter(|_| meta.direct);
        let token_sent = auth.is_some();
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        let response: Response<ureq::Body> = request.call().map_err(|e| match network(url, e) {
            HubError::Network { reason, .. } => Retry(reason),
            other => Fatal(other),
        })?;
        let status = response.status().as_u16();
        let start = match status {
            206 => {
                let start =
                    header(response.headers(), "content-range").and_then(|r| range_start(&r));
                if start != Some(from) {
                    return Err(Fatal(HubError::Status {
                        url: url.clone(),
                        status,
                        detail: format!("asked for bytes from {from}, got range {start:?}"),
                    }));
                }
                from
            }
            200 => 0,
            500..=599 => return Err(Retry(format!("HTTP {status} from {url}"))),
            _ => {
                return Err(Fatal(status_error(
                    url,
                    status,
                    response.headers(),
                    file,
                    token_sent,
                )))
            }
        };
        let mut out = OpenOptions::new()
            .create(true)
            .append(start > 0)
            .write(true)
            .truncate(start == 0)
            .open(incomplete)
            .map_err(|e| Fatal(HubError::io("write", incomplete, e)))?;
        if start == 0 {
            *hasher = Sha256::new();
            bar.set_position(0);
        }
        let mut body = response.into_body().into_reader();
        let mut buffer = vec![0u8; CHUNK];
        loop {
            let n = match body.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // The bytes written so far stay; the caller resumes after them.
                Err(e) => return Err(Retry(e.to_string())),
            };
            out.write_all(&buffer[..n])
                .map_err(|e| Fatal(HubError::io("write", incomplete, e)))?;
            hasher.update(&buffer[..n]);
            bar.inc(n as u64);
        }
        out.flush()
            .map_err(|e| Fatal(HubError::io("write", incomplete, e)))?;
        Ok(())
    }

    fn progress_bar(&self, file: &str, size: u64) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(size);
        let style = ProgressStyle::with_template(
            "{msg} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} [{wide_bar}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        bar.set_message(file.to_string());
        bar
    }
}

enum Failure {
    /// Worth resuming: a broken connection or a server hiccup.
    Retry(String),
    /// Retrying cannot help.
    Fatal(HubError),
}
use Failure::{Fatal, Retry};

fn interrupted(
    file: &str,
    received: u64,
    expected: u64,
    attempts: u32,
    reason: String,
) -> HubError {
    HubError::Interrupted {
        file: file.to_string(),
        received,
        expected,
        attempts,
        reason,
    }
}

fn network(url: &str, error: ureq::Error) -> HubError {
    HubError::Network {
        url: url.to_string(),
        reason: error.to_string(),
    }
}

/// Turns an error status into the error that tells the user what to do.
fn status_error(
    url: &str,
    status: u16,
    headers: &HeaderMap,
    what: &str,
    token_sent: bool,
) -> HubError {
    let code = header(headers, "x-error-code").unwrap_or_default();
    let message = header(headers, "x-error-message").unwrap_or_default();
    match status {
        401 | 403 => HubError::Unauthorized {
            url: url.to_string(),
            status,
            hint: match code.as_str() {
                "GatedRepo" => "The repo is gated: accept its conditions on its Hub page.".into(),
                "RepoNotFound" => "The repo does not exist, or is private.".into(),
                _ => message,
            },
            token_sent,
        },
        404 => HubError::NotFound {
            url: url.to_string(),
            what: match code.as_str() {
                "RepoNotFound" => "repo".to_string(),
                "RevisionNotFound" => "revision".to_string(),
                "EntryNotFound" => what.to_string(),
                _ => format!("repo, revision or {what}"),
            },
        },
        _ => HubError::Status {
            url: url.to_string(),
            status,
            detail: message,
        },
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `W/"abc"` -> `abc`.
fn normalize_etag(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// An etag becomes a file name: keep it to characters that cannot escape `blobs/`.
fn is_safe_name(name: &str) -> bool {
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn is_sha256(etag: &str) -> bool {
    etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `bytes 100-999/1000` -> 100.
fn range_start(content_range: &str) -> Option<u64> {
    content_range
        .trim()
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// `https://host:port/a/b` -> `https://host:port`.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_len(path: &Path) -> Result<u64, HubError> {
    match fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(HubError::io("read", path, e)),
    }
}

/// Feeds an existing partial download to `hasher`; returns its length.
fn hash_existing(path: &Path, hasher: &mut Sha256) -> Result<u64, HubError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(HubError::io("read", path, e)),
    };
    let mut buffer = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| HubError::io("read", path, e))?;
        if n == 0 {
            return Ok(total);
        }
        hasher.update(&buffer[..n]);
        total += n as u64;
    }
}

fn remove(path: &Path) -> Result<(), HubError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HubError::io("delete", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parsing() {
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"0a1b\""), "0a1b");
        assert!(!is_safe_name("../x"));
        assert_eq!(range_start("bytes 100-999/1000"), Some(100));
        assert_eq!(range_start("items 1-2"), None);
        assert_eq!(origin("http://127.0.0.1:80/a/b?c"), "http://127.0.0.1:80");
        assert_eq!(origin("https://h"), "https://h");
        assert!(is_sha256(&"a".repeat(64)));
        assert!(!is_sha256(&"a".repeat(40)));
    }
}
