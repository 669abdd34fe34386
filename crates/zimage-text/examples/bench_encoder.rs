//! Times one text-encoder forward of a mid-size Qwen3 on burn-ndarray (f32, random weights).
//!
//!     cargo run --release -p zimage-text --example bench_encoder [-- RUNS]
//!
//! The same configuration in PyTorch: `python3 bench/torch_text_cpu.py`.

use std::time::Instant;

use burn::backend::NdArray;
use burn::tensor::DType;
use zimage_text::{Qwen3Config, Qwen3TextEncoder};

type B = NdArray<f32>;

/// Prompt length in tokens.
const TOKENS: u32 = 128;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5)
        .max(1);
    // hidden 1024, 16 query heads / 8 key-value heads of 64, SwiGLU 3072, Qwen's vocabulary.
    // 9 layers configured: hidden_states[-2] needs the first 8.
    let config = Qwen3Config {
        hidden_size: 1024,
        intermediate_size: 3072,
        num_hidden_layers: 9,
        num_attention_heads: 16,
        num_key_value_heads: Some(8),
        head_dim: Some(64),
        rope_theta: Some(1e6),
        ..Qwen3Config::default()
    };
    let device = Default::default();
    let model = Qwen3TextEncoder::<B>::random(&config, &device, DType::F32)?;
    // A fixed pseudo-random prompt.
    let ids: Vec<u32> = (0..TOKENS).map(|i| (i * 7919 + 13) % 151_643).collect();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "Qwen3 encoder, hidden 1024, 8 layers run, 16/8 heads of 64, {TOKENS} tokens, ndarray f32, {threads} threads"
    );
    let mut times = Vec::new();
    for i in 0..=runs {
        let start = Instant::now();
        let out = model.encode(std::slice::from_ref(&ids))?;
        // Reading the data forces the computation to finish.
        let _ = out[0].clone().into_data();
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if i == 0 {
            println!("warm-up: {ms:.1} ms");
        } else {
            times.push(ms);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "median of {runs}: {:.1} ms (min {:.1}, max {:.1})",
        times[runs / 2],
        times[0],
        times[runs - 1]
    );
    Ok(())
}
