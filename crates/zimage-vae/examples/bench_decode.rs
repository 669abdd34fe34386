//! Times the VAE decoder with the published channel widths (random weights) on burn-ndarray
//! (f32), and reports the peak memory of untiled and tiled decoding.
//!
//!     cargo run --release -p zimage-vae --example bench_decode [-- --size 256 --runs 5 --tile T]
//!     cargo run --release -p zimage-vae --example bench_decode -- --peak-memory [--size 1024 --tile 512]
//!
//! `--size` is the image side (the latent is 8 times smaller); `--tile T` decodes in tiles of T
//! pixels (diffusers' tiling with `tile_sample_min_size = T`). `--peak-memory` runs one untiled
//! and one tiled decode, each in a fresh process, and prints each one's peak resident memory
//! (`VmHWM` of `/proc/self/status`, Linux only).
//!
//! The same in PyTorch: `python3 bench/torch_vae_cpu.py`.

use std::process::Command;
use std::time::Instant;

use burn::backend::NdArray;
use burn::tensor::{DType, Distribution, Tensor};
use zimage_vae::{AutoencoderKL, AutoencoderKLConfig, TilingConfig};

type B = NdArray<f32>;

struct Args {
    size: usize,
    runs: usize,
    tile: Option<usize>,
    peak_memory: bool,
    /// Child mode of `--peak-memory`: one decode, then print VmHWM.
    report_peak: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        size: 256,
        runs: 5,
        tile: None,
        peak_memory: false,
        report_peak: false,
    };
    let mut size_given = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<usize, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a positive integer"))
        };
        match arg.as_str() {
            "--size" => {
                args.size = value("--size")?;
                size_given = true;
            }
            "--runs" => args.runs = value("--runs")?.max(1),
            "--tile" => args.tile = Some(value("--tile")?),
            "--peak-memory" => args.peak_memory = true,
            "--report-peak" => args.report_peak = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.peak_memory && !size_given {
        args.size = 1024;
    }
    if args.size < 8 || args.size & 7 != 0 {
        return Err(format!(
            "--size {} must be a positive multiple of 8",
            args.size
        ));
    }
    Ok(args)
}

/// Peak resident memory of this process so far, in MiB (Linux).
fn vm_hwm_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    if args.peak_memory {
        return peak_memory(&args);
    }
    let config = AutoencoderKLConfig::z_image();
    let device = Default::default();
    let model = AutoencoderKL::<B>::random(&config, &device, DType::F32)?;
    let latent_side = args.size / config.downscale_factor();
    let latents = Tensor::<B, 4>::random(
        [1, config.latent_channels, latent_side, latent_side],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let tiling = args
        .tile
        .map(|tile| TilingConfig::for_sample_size(tile, &config));
    let decode = || -> Result<(), Box<dyn std::error::Error>> {
        let image = match &tiling {
            Some(tiling) => model.decode_tiled(latents.clone(), tiling)?,
            None => model.decode(latents.clone())?,
        };
        // Reading the data forces the computation to finish.
        let _ = image.into_data();
        Ok(())
    };

    if args.report_peak {
        let before = vm_hwm_mib().unwrap_or(f64::NAN);
        let start = Instant::now();
        decode()?;
        let secs = start.elapsed().as_secs_f64();
        let after = vm_hwm_mib().unwrap_or(f64::NAN);
        println!("peak {after:.0} MiB (model and latents {before:.0} MiB) in {secs:.1} s");
        return Ok(());
    }

    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mode = match args.tile {
        Some(tile) => format!("tiled ({tile}-pixel tiles)"),
        None => "untiled".into(),
    };
    println!(
        "VAE decode {0}x{0} (latent {1}x{1}), published widths, random weights, ndarray f32, {threads} threads, {mode}",
        args.size, latent_side
    );
    let mut times = Vec::new();
    for i in 0..=args.runs {
        let start = Instant::now();
        decode()?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if i == 0 {
            println!("warm-up: {ms:.0} ms");
        } else {
            times.push(ms);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "median of {}: {:.0} ms (min {:.0}, max {:.0})",
        args.runs,
        times[args.runs / 2],
        times[0],
        times[args.runs - 1]
    );
    Ok(())
}

/// One untiled and one tiled decode, each in a fresh process of this program.
fn peak_memory(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let tile = args.tile.unwrap_or(args.size / 2);
    println!(
        "peak resident memory (VmHWM) of one {0}x{0} decode, published widths, ndarray f32, fresh process each",
        args.size
    );
    for tiled in [false, true] {
        let mut command = Command::new(&exe);
        command.args(["--report-peak", "--size", &args.size.to_string()]);
        if tiled {
            command.args(["--tile", &tile.to_string()]);
        }
        let output = command.output()?;
        let label = if tiled {
            format!("tiled, {tile}-pixel tiles")
        } else {
            "untiled".into()
        };
        if !output.status.success() {
            return Err(format!(
                "{label} run failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        print!("{label:<24} {}", String::from_utf8_lossy(&output.stdout));
    }
    Ok(())
}
