//! The Flux-style AutoencoderKL (work in progress).
