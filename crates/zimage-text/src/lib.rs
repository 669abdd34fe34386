//! The Qwen3 prompt tokenizer and text encoder (work in progress).
