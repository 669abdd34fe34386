//! A server over the tiny fixture pipeline (ndarray), and a small HTTP client for the tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use burn::backend::NdArray;
use serde_json::Value;
use zimage_pipeline::record::Provenance;
use zimage_pipeline::{ModelFiles, ZImagePipeline};
use zimage_server::{Engine, PipelineEngine, Server, ServerConfig};
use zimage_test_support::pipeline::model_folder;

/// A server on a free loopback port over the tiny pipeline.
pub fn start(config: ServerConfig) -> Server {
    start_at("127.0.0.1:0".parse().unwrap(), config, false).expect("server starts")
}

pub fn start_at(
    address: SocketAddr,
    config: ServerConfig,
    allow_no_auth: bool,
) -> Result<Server, zimage_server::ServerError> {
    start_with(address, config, allow_no_auth, None)
}

/// [`start_at`] with a ControlNet file set on the pipeline.
pub fn start_with(
    address: SocketAddr,
    config: ServerConfig,
    allow_no_auth: bool,
    controlnet: Option<PathBuf>,
) -> Result<Server, zimage_server::ServerError> {
    let lora_dir = config.lora_dir.clone();
    let model = model_folder();
    Server::start(config, address, allow_no_auth, move || {
        let files = ModelFiles::open(&model)
            .map_err(|e| zimage_server::ServerError::Model(e.to_string()))?;
        let provenance = Provenance {
            // The name clients see in /v1/models, /health and the PNG parameters.
            model: "tiny".into(),
            variant: files.variant(),
            backend: "ndarray".into(),
            dtype: "f32".into(),
            loras: Vec::new(),
            controlnet: None,
        };
        let mut pipeline =
            ZImagePipeline::<NdArray>::new(files, &Default::default(), burn::tensor::DType::F32)
                .map_err(|e| zimage_server::ServerError::Model(e.to_string()))?;
        if let Some(file) = &controlnet {
            pipeline
                .set_controlnet(Some(file))
                .map_err(|e| zimage_server::ServerError::Model(e.to_string()))?;
        }
        let engine = PipelineEngine::new(pipeline, provenance, lora_dir, 64)?;
        Ok(Box::new(engine) as Box<dyn Engine>)
    })
}

pub fn config() -> ServerConfig {
    ServerConfig::default()
}

/// An HTTP client that returns every status (4xx and 5xx included) instead of failing.
pub struct Client {
    pub base: String,
    agent: ureq::Agent,
    pub key: Option<String>,
}

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} with a body that is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A JSON error of `status` whose message contains `needle`.
    pub fn assert_error(&self, status: u16, needle: &str, what: &str) {
        assert_eq!(self.status, status, "{what}: {}", self.text());
        assert!(
            self.content_type.starts_with("application/json"),
            "{what}: {}",
            self.content_type
        );
        let message = self.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            message.contains(needle),
            "{what}: {message:?} lacks {needle:?}"
        );
    }
}

impl Client {
    pub fn new(address: SocketAddr) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            base: format!("http://{address}"),
            agent,
            key: None,
        }
    }

    fn finish(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
        let mut response = response.expect("HTTP exchange");
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_vec()
            .expect("body");
        Reply {
            status,
            content_type,
            body,
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        let mut request = self.agent.get(format!("{}{path}", self.base));
        if let Some(key) = &self.key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        Self::finish(request.call())
    }

    pub fn delete(&self, path: &str) -> Reply {
        let mut request = self.agent.delete(format!("{}{path}", self.base));
        if let Some(key) = &self.key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        Self::finish(request.call())
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.post_raw(path, "application/json", body.to_string().into_bytes())
    }

    pub fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> Reply {
        let mut request = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", content_type);
        if let Some(key) = &self.key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        Self::finish(request.send(&body[..]))
    }

    /// A multipart/form-data POST: text fields and files (name, file name, bytes).
    pub fn post_multipart(
        &self,
        path: &str,
        texts: &[(&str, &str)],
        files: &[(&str, &str, Vec<u8>)],
    ) -> Reply {
        let boundary = "zimage-test-boundary-7d1f3a";
        let mut body = Vec::new();
        for (name, value) in texts {
            body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").bytes());
        }
        for (name, file, bytes) in files {
            body.extend(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: image/png\r\n\r\n"
                )
                .bytes(),
            );
            body.extend(bytes);
            body.extend(b"\r\n");
        }
        body.extend(format!("--{boundary}--\r\n").bytes());
        self.post_raw(
            path,
            &format!("multipart/form-data; boundary={boundary}"),
            body,
        )
    }
}

/// A PNG decoded to RGB.
pub fn decode_png(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .expect("a PNG")
        .to_rgb8()
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64")
}

pub fn pipeline_fixture(name: &str) -> PathBuf {
    zimage_test_support::fixtures().join("pipeline").join(name)
}

/// Server-sent events of a finished stream: (event name, data JSON).
pub fn parse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = "message".to_string();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = n.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim());
                }
            }
            (!data.is_empty()).then(|| {
                (
                    name,
                    serde_json::from_str(&data).expect("event data is JSON"),
                )
            })
        })
        .collect()
}

/// Polls until `check` holds (at most `seconds`).
pub fn wait_until(seconds: f64, what: &str, mut check: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(
            start.elapsed().as_secs_f64() < seconds,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
