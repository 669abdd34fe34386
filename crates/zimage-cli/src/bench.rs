//! `zimage bench`: the model's stages timed on random weights made on the device (nothing to
//! download), with the published shapes or smaller ones for the CPU.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::backend::Backend as BurnBackend;
use burn::tensor::{DType, Distribution, Tensor};
use clap::{Args, ValueEnum};
use zimage_nn::ZBackend;
use zimage_text::{Qwen3Config, Qwen3TextEncoder};
use zimage_transformer::{ZImageTransformer2DModel, ZImageTransformerConfig};
use zimage_vae::{AutoencoderKL, AutoencoderKLConfig};

use crate::backend::{self, BackendChoice, DtypeChoice};
use crate::with_backend;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shapes {
    /// The published Z-Image-Turbo shapes (6.15B DiT, Qwen3-4B, Flux VAE); needs a GPU.
    Turbo,
    /// A mid-size DiT (dim 768, 8 layers), text encoder (hidden 1024, 8 layers) and the published
    /// VAE at 256x256: minutes on a CPU.
    Mid,
    /// Very small models: seconds anywhere.
    Tiny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Stage {
    Text,
    Dit,
    Vae,
    Image,
    /// Merging a random LoRA into every DiT Linear, and taking it off again.
    Lora,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "turbo")]
    pub shapes: Shapes,
    /// Stages to run [default: all]
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Stage>,
    /// Image sides for the DiT step [default: 1024,512 (turbo), 512 (mid), 128 (tiny)]
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<usize>,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Untimed runs first (kernel compilation, autotuning, caches).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendChoice,
    /// [default: bf16 on cuda, f32 elsewhere]
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeChoice>,
    /// Rank of the random LoRA the `lora` stage merges.
    #[arg(long, default_value_t = 32)]
    pub lora_rank: usize,
    /// One JSON object per measurement on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let backend = backend::resolve(args.backend)?;
    let dtype = args
        .dtype
        .map(DtypeChoice::dtype)
        .unwrap_or(backend.default_dtype());
    backend.check_dtype(dtype)?;
    with_backend!(backend, |B| bench::<B>(&args, dtype, backend.name()))
}

struct Reporter<'a> {
    json: bool,
    backend: &'a str,
    dtype: DType,
}

impl Reporter<'_> {
    fn report(&self, stage: &str, detail: &str, times: &mut [f64]) {
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let rss = peak_rss_mib();
        if self.json {
            println!(
                "{}",
                serde_json::json!({
                    "stage": stage, "detail": detail, "median_ms": median, "min_ms": times[0],
                    "max_ms": times[times.len() - 1], "runs": times.len(), "backend": self.backend,
                    "dtype": backend::dtype_name(self.dtype), "peak_host_rss_mib": rss,
                })
            );
        } else {
            println!(
                "{stage:<14} {detail:<34} median {median:>9.1} ms  (min {:.1}, max {:.1}, {} runs)",
                times[0],
                times[times.len() - 1],
                times.len()
            );
        }
    }
}

/// Runs `f` `warmup` times, then `runs` times with the device synchronised around each. The
/// first failure (of `f` or of the device) ends the benchmark: a failed pass is not a fast one.
fn time<B: BurnBackend>(
    device: &B::Device,
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    let sync = || B::sync(device).map_err(|e| anyhow::anyhow!("the device failed: {e}"));
    for _ in 0..warmup {
        f()?;
    }
    sync()?;
    (0..runs.max(1))
        .map(|_| {
            let start = Instant::now();
            f()?;
            sync()?;
            Ok(start.elapsed().as_secs_f64() * 1e3)
        })
        .collect()
}

struct Models {
    text: Qwen3Config,
    dit: ZImageTransformerConfig,
    vae: AutoencoderKLConfig,
    /// Prompt tokens, as the diffusers baseline (120 valid of 512 padded).
    caption: usize,
    sizes: Vec<usize>,
    vae_size: usize,
}

fn models(shapes: Shapes) -> Models {
    match shapes {
        Shapes::Turbo => Models {
            text: Qwen3Config::qwen3_4b(),
            dit: ZImageTransformerConfig::z_image_turbo(),
            vae: AutoencoderKLConfig::z_image(),
            caption: 120,
            sizes: vec![1024, 512],
            vae_size: 1024,
        },
        Shapes::Mid => Models {
            text: Qwen3Config {
                hidden_size: 1024,
                intermediate_size: 3072,
                num_hidden_layers: 8,
                num_attention_heads: 16,
                num_key_value_heads: Some(8),
                head_dim: Some(64),
                ..Qwen3Config::qwen3_4b()
            },
            dit: ZImageTransformerConfig {
                dim: 768,
                n_layers: 8,
                n_heads: 12,
                n_kv_heads: 12,
                cap_feat_dim: 1024,
                axes_dims: vec![16, 24, 24],
                ..ZImageTransformerConfig::z_image_turbo()
            },
            vae: AutoencoderKLConfig::z_image(),
            caption: 120,
            sizes: vec![512],
            vae_size: 256,
        },
        Shapes::Tiny => Models {
            text: Qwen3Config {
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 3,
                num_attention_heads: 4,
                num_key_value_heads: Some(2),
                head_dim: Some(16),
                ..Qwen3Config::qwen3_4b()
            },
            dit: ZImageTransformerConfig {
                dim: 96,
                n_layers: 2,
                n_heads: 3,
                n_kv_heads: 3,
                cap_feat_dim: 64,
                axes_dims: vec![8, 12, 12],
                ..ZImageTransformerConfig::z_image_turbo()
            },
            vae: AutoencoderKLConfig {
                block_out_channels: vec![32, 32, 32, 32],
                ..AutoencoderKLConfig::z_image()
            },
            caption: 32,
            sizes: vec![128],
            vae_size: 128,
        },
    }
}

fn bench<B: ZBackend>(args: &BenchArgs, dtype: DType, backend: &str) -> Result<()> {
    let device = B::Device::default();
    let m = models(args.shapes);
    let sizes = if args.sizes.is_empty() {
        m.sizes.clone()
    } else {
        args.sizes.clone()
    };
    let wants = |s: Stage| args.only.is_empty() || args.only.contains(&s);
    let r = Reporter {
        json: args.json,
        backend,
        dtype,
    };
    let (warmup, runs) = (args.warmup, args.runs);
    if !args.json {
        println!(
            "zimage bench: {:?} shapes, {backend} {}",
            args.shapes,
            backend::dtype_name(dtype)
        );
    }

    let ids = |n: usize| -> Vec<u32> { (0..n as u32).map(|i| (i * 7919) % 150_000).collect() };
    let mut caption: Option<Tensor<B, 2>> = None;
    if wants(Stage::Text) || wants(Stage::Image) {
        let start = Instant::now();
        let encoder = Qwen3TextEncoder::<B>::random(&m.text, &device, dtype)?;
        let _ = B::sync(&device);
        let made = start.elapsed().as_secs_f64();
        if wants(Stage::Text) {
            for tokens in [512, m.caption] {
                let batch = [ids(tokens)];
                let mut t = time::<B>(&device, warmup, runs, || {
                    encoder.encode(&batch)?[0].clone().sum().into_data();
                    Ok(())
                })?;
                r.report(
                    "text-encoder",
                    &format!("{tokens} tokens (random weights {made:.1} s)"),
                    &mut t,
                );
            }
        }
        caption = Some(encoder.encode(&[ids(m.caption)])?.remove(0));
    }

    let dit_needed = wants(Stage::Dit) || wants(Stage::Image);
    let mut dit = if dit_needed {
        Some(ZImageTransformer2DModel::<B>::random(
            &m.dit, &device, dtype,
        )?)
    } else {
        None
    };
    let caption = caption.unwrap_or_else(|| {
        Tensor::<B, 2>::random(
            [m.caption, m.dit.cap_feat_dim],
            Distribution::Normal(0.0, 1.0),
            (&device, dtype),
        )
    });
    if let (Some(dit), true) = (&dit, wants(Stage::Dit)) {
        for &size in &sizes {
            let latent = Tensor::<B, 4>::random(
                [16, 1, size / 8, size / 8],
                Distribution::Normal(0.0, 1.0),
                (&device, dtype),
            );
            let mut t = time::<B>(&device, warmup, runs, || {
                dit.forward(&[latent.clone()], &[0.5], &[caption.clone()])?;
                Ok(())
            })?;
            r.report(
                "dit-step",
                &format!("{size}x{size}, {}-token caption", m.caption),
                &mut t,
            );
            let batch = [latent.clone(), latent.clone()];
            let negative = caption.clone().narrow(0, 0, m.caption.min(8));
            let mut t = time::<B>(&device, warmup.min(1), runs, || {
                dit.forward(&batch, &[0.5, 0.5], &[caption.clone(), negative.clone()])?;
                Ok(())
            })?;
            r.report(
                "dit-step-cfg",
                &format!("{size}x{size}, batch 2 (guidance)"),
                &mut t,
            );
        }
    }

    // Only when asked for: with the published shapes it makes its own bf16 DiT.
    if args.only.contains(&Stage::Lora) {
        bench_lora::<B>(&r, &m.dit, &mut dit, &device, dtype, args.lora_rank, runs)?;
    }

    let vae = if wants(Stage::Vae) || wants(Stage::Image) {
        Some(AutoencoderKL::<B>::random(&m.vae, &device, dtype)?)
    } else {
        None
    };
    if let (Some(vae), true) = (&vae, wants(Stage::Vae)) {
        let f = m.vae.downscale_factor();
        let side = m.vae_size;
        let z = Tensor::<B, 4>::random(
            [1, 16, side / f, side / f],
            Distribution::Normal(0.0, 1.0),
            (&device, dtype),
        );
        let mut t = time::<B>(&device, warmup.min(1), runs.min(3), || {
            vae.decode(z.clone())?;
            Ok(())
        })?;
        r.report("vae-decode", &format!("{side}x{side}"), &mut t);
        let image = Tensor::<B, 4>::random(
            [1, 3, side, side],
            Distribution::Uniform(-1.0, 1.0),
            (&device, dtype),
        );
        let mut t = time::<B>(&device, warmup.min(1), runs.min(3), || {
            vae.encode(image.clone())?.mode();
            Ok(())
        })?;
        r.report("vae-encode", &format!("{side}x{side}"), &mut t);
    }

    if let (Some(dit), Some(vae), true) = (&dit, &vae, wants(Stage::Image)) {
        // A whole Turbo image at the first size: 8 steps then the decode (prompt encoding is
        // timed above; the encoder and the DiT need not be resident together).
        let size = sizes[0];
        let h = size / m.vae.downscale_factor();
        let sigmas = zimage_scheduler::z_image_sigmas(8);
        let mut t = time::<B>(&device, 0, runs.min(3), || {
            let mut x = Tensor::<B, 4>::random(
                [1, 16, h, h],
                Distribution::Normal(0.0, 1.0),
                (&device, DType::F32),
            );
            for (i, &s) in sigmas.iter().enumerate() {
                let next = sigmas.get(i + 1).copied().unwrap_or(0.0);
                let out = dit.forward(
                    &[x.clone().cast(dtype).reshape([16, 1, h, h])],
                    &[1.0 - s],
                    &[caption.clone()],
                )?;
                let v = out[0].clone().cast(DType::F32).reshape([1, 16, h, h]).neg();
                x = x + v.mul_scalar(next - s);
            }
            vae.decode(vae.unscale_latents(x.cast(dtype)))?;
            Ok(())
        })?;
        r.report("image", &format!("{size}x{size}, 8 steps + decode"), &mut t);
    }
    Ok(())
}

/// Peak resident memory of this process (Linux), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Time to merge a random rank-`rank` LoRA on every Linear of the DiT (as `--lora` does at load)
/// and to take it off. Without a DiT from the earlier stages, one is made with bf16 weights (the
/// published files' precision; what fits a CPU machine).
fn bench_lora<B: ZBackend>(
    r: &Reporter<'_>,
    config: &ZImageTransformerConfig,
    dit: &mut Option<ZImageTransformer2DModel<B>>,
    device: &B::Device,
    dtype: DType,
    rank: usize,
    runs: usize,
) -> Result<()> {
    use std::sync::Arc;
    use zimage_lora::{AdapterKind, AdapterModule, LoraAdapter, Matrix};
    if dit.is_none() {
        let precision = zimage_nn::Precision::from(dtype).with_weights(Some(DType::BF16));
        *dit = Some(ZImageTransformer2DModel::<B>::random(
            config, device, precision,
        )?);
    }
    let dit = dit.as_mut().expect("made above");
    let targets = ZImageTransformer2DModel::<B>::adapter_targets(config, device)?;
    let mut seed = 0x2545_f491u32;
    let mut noise = |n: usize, std: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                (seed as f32 / u32::MAX as f32 - 0.5) * std
            })
            .collect()
    };
    let modules: Vec<AdapterModule> = targets
        .iter()
        .filter(|t| t.parts.len() == 1 && t.parts[0].0 == t.name)
        .map(|t| {
            let [out, inp] = t.shape;
            AdapterModule {
                name: t.name.clone(),
                kind: AdapterKind::LoRA {
                    down: Matrix {
                        rows: rank,
                        cols: inp,
                        values: noise(rank * inp, 0.02),
                    },
                    up: Matrix {
                        rows: out,
                        cols: rank,
                        values: noise(out * rank, 0.02),
                    },
                },
                alpha: Some(rank as f32),
                rank_stabilized: false,
            }
        })
        .collect();
    let layers = modules.len();
    let adapter = Arc::new(LoraAdapter::new("random.safetensors".into(), modules));
    let resolved = zimage_lora::resolve(&[(adapter, 1.0)], &targets)?;
    let sync = || B::sync(device).map_err(|e| anyhow::anyhow!("the device failed: {e}"));
    let dtype_of = dit.dtype();
    let (mut merge, mut apply, mut restore) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs.clamp(1, 3) {
        // Merging every Linear, one at a time, each taken off before the next: the merge's
        // cost at this size without holding a second copy of the weights (these random weights
        // are not a file's mapped pages, so set_adapters runs the change beside them).
        let mut total = 0.0;
        let mut failed = None;
        dit.for_each_linear(&mut |path, linear| {
            let delta = resolved.delta(path);
            let start = Instant::now();
            linear.apply_delta(delta.as_ref(), true, device, dtype_of);
            if let Err(e) = sync() {
                failed = Some(e);
            }
            total += start.elapsed().as_secs_f64() * 1e3;
            linear.apply_delta(None, false, device, dtype_of);
        });
        if let Some(e) = failed {
            return Err(e);
        }
        merge.push(total);
        let start = Instant::now();
        dit.set_adapters(&resolved);
        sync()?;
        apply.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        dit.set_adapters(&zimage_lora::Resolved::none());
        sync()?;
        restore.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let what = format!("rank {rank}, {layers} Linears");
    r.report("lora-merge", &format!("{what}, merged"), &mut merge);
    r.report("lora-apply", &format!("{what}, set_adapters"), &mut apply);
    r.report("lora-restore", &what, &mut restore);
    Ok(())
}
