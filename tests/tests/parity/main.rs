//! The cross-crate tests, in one binary: each module used to be a test binary of its own, and
//! every binary compiled and linked the backends again (most of the suite's build time).
//!
//! Parity with the reference (diffusers 0.42.1, transformers) on the committed fixtures, the
//! checkpoint loaders and their errors, device limits, and the GPU backends.

mod controlnet;
mod device_limits;
mod gguf;
mod gpu_backends;
mod lora;
mod pipeline_parity;
mod resize;
mod rng;
mod scheduler;
mod text_errors;
mod text_parity;
mod transformer_checkpoint;
mod transformer_parity;
mod vae_checkpoint;
mod vae_errors;
mod vae_parity;
