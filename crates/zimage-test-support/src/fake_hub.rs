//! A tiny Hugging Face Hub on 127.0.0.1 for the download and command tests: HTTP/1.1, one request per
//! connection, the Hub's URL layout and headers.
//!
//! - `HEAD|GET /{owner}/{name}/resolve/{revision}/{path}`: `.safetensors` files are LFS files:
//!   `302` to `/cdn/...` with `X-Repo-Commit`, `X-Linked-Etag` (sha256) and `X-Linked-Size`;
//!   other files answer `200` with `ETag` (a 40-hex git-style id), `Content-Length`,
//!   `X-Repo-Commit`. Missing repo/revision/file: `404` with the Hub's `X-Error-Code`.
//! - `HEAD|GET /cdn/{owner}/{name}/{commit}/{path}`: the bytes, honouring `Range: bytes=N-`.
//! - `GET /api/models/{owner}/{name}/revision/{revision}`: the repo info (`sha`, `siblings`).
//! - Faults: a token requirement (401 without it), a disconnect after N body bytes for one
//!   file, a corrupted body for one file.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

use sha2::{Digest, Sha256};

pub const COMMIT: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

#[derive(Default)]
pub struct Faults {
    /// Body of `(file)` stops after this many bytes, for the next `times` GETs.
    pub disconnect: Option<(String, usize, usize)>,
    /// Body of this file has one byte flipped.
    pub corrupt: Option<String>,
    /// Every request needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

#[derive(Default)]
struct State {
    /// repo id -> path -> bytes
    repos: HashMap<String, BTreeMap<String, Vec<u8>>>,
    seen: Vec<Seen>,
    faults: Faults,
}

pub struct FakeHub {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl FakeHub {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let base = url.clone();
        // The thread lives as long as the test process; each connection gets its own thread.
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                let base = base.clone();
                thread::spawn(move || {
                    let _ = serve(stream, &state, &base);
                });
            }
        });
        Self { url, state }
    }

    pub fn add_repo(&self, repo: &str, files: BTreeMap<String, Vec<u8>>) {
        self.state.lock().unwrap().repos.insert(repo.into(), files);
    }

    pub fn set_faults(&self, faults: Faults) {
        self.state.lock().unwrap().faults = faults;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    pub fn clear_seen(&self) {
        self.state.lock().unwrap().seen.clear();
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn serve(stream: TcpStream, state: &Mutex<State>, base: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let seen = Seen {
        method: method.clone(),
        path: target.clone(),
        range: headers.get("range").cloned(),
        authorization: headers.get("authorization").cloned(),
    };
    let mut state = state.lock().unwrap();
    state.seen.push(seen.clone());
    let reply = route(&mut state, &seen, base);
    drop(state);
    reply.send(stream, method == "HEAD")
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Announce the full length but close after this many body bytes.
    cut_after: Option<usize>,
}

impl Reply {
    fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            cut_after: None,
        }
    }

    fn header(mut self, k: &str, v: impl ToString) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }

    fn not_found(code: &str) -> Self {
        Self::new(404).header("X-Error-Code", code)
    }

    fn send(self, mut stream: TcpStream, head: bool) -> std::io::Result<()> {
        let reason = match self.status {
            200 => "OK",
            206 => "Partial Content",
            302 => "Found",
            401 => "Unauthorized",
            404 => "Not Found",
            _ => "Other",
        };
        let mut text = format!("HTTP/1.1 {} {reason}\r\n", self.status);
        let has_length = self
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
        for (k, v) in &self.headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        if !has_length {
            text.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        text.push_str("Connection: close\r\n\r\n");
        stream.write_all(text.as_bytes())?;
        if !head {
            let end = self
                .cut_after
                .unwrap_or(self.body.len())
                .min(self.body.len());
            stream.write_all(&self.body[..end])?;
        }
        stream.flush()?;
        // Closing here, before the announced length was sent, is the "disconnect".
        stream.shutdown(std::net::Shutdown::Both)
    }
}

fn route(state: &mut State, req: &Seen, base: &str) -> Reply {
    if let Some(token) = &state.faults.token {
        if req.authorization.as_deref() != Some(&format!("Bearer {token}"))
            && !req.path.starts_with("/cdn/")
        {
            return Reply::new(401).header("X-Error-Code", "RepoNotFound");
        }
    }
    let segments: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", "models", owner, name, "revision", revision] => {
            let repo = format!("{owner}/{name}");
            let Some(files) = state.repos.get(&repo) else {
                return Reply::not_found("RepoNotFound");
            };
            if *revision != "main" && *revision != COMMIT {
                return Reply::not_found("RevisionNotFound");
            }
            let siblings: Vec<String> = files
                .keys()
                .map(|path| format!("{{\"rfilename\": \"{path}\"}}"))
                .collect();
            let mut reply = Reply::new(200).header("Content-Type", "application/json");
            reply.body = format!(
                "{{\"id\": \"{repo}\", \"sha\": \"{COMMIT}\", \"siblings\": [{}]}}",
                siblings.join(", ")
            )
            .into_bytes();
            reply
        }
        ["cdn", owner, name, commit, rest @ ..] => {
            let repo = format!("{owner}/{name}");
            let path = rest.join("/");
            let Some(bytes) = state.repos.get(&repo).and_then(|f| f.get(&path)).cloned() else {
                return Reply::not_found("EntryNotFound");
            };
            let _ = commit;
            serve_bytes(state, &path, bytes, req)
        }
        [owner, name, "resolve", revision, rest @ ..] => {
            let repo = format!("{owner}/{name}");
            let path = rest.join("/");
            let Some(files) = state.repos.get(&repo) else {
                return Reply::not_found("RepoNotFound");
            };
            if *revision != "main" && *revision != COMMIT {
                return Reply::not_found("RevisionNotFound");
            }
            let Some(bytes) = files.get(&path).cloned() else {
                return Reply::not_found("EntryNotFound").header("X-Repo-Commit", COMMIT);
            };
            if path.ends_with(".safetensors") {
                Reply::new(302)
                    .header("Location", format!("{base}/cdn/{repo}/{COMMIT}/{path}"))
                    .header("X-Repo-Commit", COMMIT)
                    .header("X-Linked-Etag", format!("\"{}\"", sha256_hex(&bytes)))
                    .header("X-Linked-Size", bytes.len())
                    .header("ETag", "\"not-the-lfs-one\"")
                    .header("Content-Length", 0)
            } else {
                // Plain git files: a 40-hex id like git's blob sha1.
                let etag = &sha256_hex(&bytes)[..40];
                serve_bytes(state, &path, bytes, req)
                    .header("ETag", format!("\"{etag}\""))
                    .header("X-Repo-Commit", COMMIT)
            }
        }
        _ => Reply::not_found("RepoNotFound"),
    }
}

fn serve_bytes(state: &mut State, path: &str, mut bytes: Vec<u8>, req: &Seen) -> Reply {
    let total = bytes.len();
    if state.faults.corrupt.as_deref() == Some(path) && !bytes.is_empty() {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
    }
    let start = req
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok());
    let mut reply = match start {
        Some(start) if start < total => Reply::new(206).header(
            "Content-Range",
            format!("bytes {start}-{}/{total}", total - 1),
        ),
        _ => Reply::new(200),
    };
    let body = bytes.split_off(start.filter(|s| *s < total).unwrap_or(0));
    if req.method == "GET" {
        if let Some((file, after, times)) = &mut state.faults.disconnect {
            if file == path && *times > 0 {
                *times -= 1;
                reply.cut_after = Some(*after);
            }
        }
    }
    reply.body = body;
    reply.header("Accept-Ranges", "bytes")
}
