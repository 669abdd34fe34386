//! What the server allows: limits on every request, authentication, CORS and the adapter folder.

use std::path::PathBuf;

/// Bounds on what one request may ask for. Every limit is checked before a job is queued, and a
/// request past one gets a 4xx naming it.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body (JSON with base64 images, or multipart uploads).
    pub max_body_bytes: usize,
    /// Largest width or height of a generated image, in pixels.
    pub max_side: usize,
    pub max_steps: usize,
    /// Most images one request makes.
    pub max_images: usize,
    /// Longest prompt or negative prompt, in characters.
    pub max_prompt_chars: usize,
    /// Jobs waiting (not counting the one running); past it, 429.
    pub max_queue: usize,
    /// Most adapters one request may name.
    pub max_loras: usize,
    /// Largest uploaded image, in pixels per side, and the memory its decoding may take.
    pub max_upload_side: u32,
    pub max_upload_bytes: u64,
    /// Finished jobs kept for `GET /v1/jobs/{id}` (oldest forgotten first), so that memory stays
    /// flat however long the server runs.
    pub keep_finished: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            max_side: 2048,
            max_steps: 100,
            max_images: 4,
            max_prompt_chars: 4000,
            max_queue: 16,
            max_loras: 8,
            max_upload_side: 4096,
            // An RGBA8 image of the largest side, twice (the decoder's buffer and a conversion).
            max_upload_bytes: 4096 * 4096 * 8,
            keep_finished: 64,
        }
    }
}

/// How the server runs, apart from the model.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    pub limits: Limits,
    /// `Authorization: Bearer <key>` required on every API route (the page and `/health` stay
    /// open: the page asks for the key and sends it).
    pub api_key: Option<String>,
    /// Origins allowed by CORS; empty turns CORS off (browsers then only call from the page).
    pub cors_origins: Vec<String>,
    /// Adapters clients may name: `<name>.safetensors` files in this folder (never a path).
    pub lora_dir: Option<PathBuf>,
}
