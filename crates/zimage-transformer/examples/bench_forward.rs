//! Times one DiT forward of a mid-size configuration on burn-ndarray (f32, random weights).
//!
//!     cargo run --release -p zimage-transformer --example bench_forward [-- RUNS]
//!
//! The same configuration in PyTorch: `python3 bench/torch_transformer_cpu.py`.

use std::time::Instant;

use burn::backend::NdArray;
use burn::tensor::{DType, Distribution, Tensor};
use zimage_transformer::{ZImageTransformer2DModel, ZImageTransformerConfig};

type B = NdArray<f32>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5);
    // dim 768, 8 layers, 12 heads of 64; 64x64 latent (1024 image tokens), 128-token caption.
    let config = ZImageTransformerConfig {
        dim: 768,
        n_layers: 8,
        n_heads: 12,
        n_kv_heads: 12,
        axes_dims: vec![16, 24, 24],
        axes_lens: vec![1536, 512, 512],
        ..ZImageTransformerConfig::default()
    };
    let device = Default::default();
    let model = ZImageTransformer2DModel::<B>::random(&config, &device, DType::F32)?;
    let latent = Tensor::<B, 4>::random([16, 1, 64, 64], Distribution::Normal(0.0, 1.0), &device);
    let caption = Tensor::<B, 2>::random(
        [128, config.cap_feat_dim],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("DiT forward, dim 768, 8 layers, 64x64 latent, 128-token caption, ndarray f32, {threads} threads");
    let mut times = Vec::new();
    for i in 0..=runs {
        let start = Instant::now();
        let out = model.forward(&[latent.clone()], &[0.5], &[caption.clone()])?;
        // Reading the data forces the computation to finish.
        let _ = out[0].clone().into_data();
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if i == 0 {
            println!("warm-up: {ms:.0} ms");
        } else {
            times.push(ms);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "median of {runs}: {:.0} ms (min {:.0}, max {:.0})",
        times[runs / 2],
        times[0],
        times[runs - 1]
    );
    Ok(())
}
