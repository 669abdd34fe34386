"""The PyTorch CPU baseline for `cargo run --release -p zimage-vae --example bench_decode`.

    python3 bench/torch_vae_cpu.py [--size 256] [--runs 5] [--tile T] [--threads N]
    python3 bench/torch_vae_cpu.py --peak-memory [--size 1024] [--tile 512]

The published Z-Image VAE widths ([128, 256, 512, 512], 16 latent channels), random weights, f32,
decoding a `size x size` image from a `size/8` latent, with as many threads as the Rust side uses
(all cores, unless --threads). `--tile T` decodes with `enable_tiling()` and T-pixel tiles.
`--peak-memory` runs one untiled and one tiled decode, each in a fresh process, and prints each
one's peak resident memory (VmHWM, as the Rust example reads it)."""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from diffusers import AutoencoderKL

PUBLISHED = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32,
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)


def vm_hwm_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(tile):
    model = AutoencoderKL(**PUBLISHED).eval()
    if tile is not None:
        model.enable_tiling()
        model.tile_sample_min_size = tile
        model.tile_latent_min_size = tile // 8
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tile", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--peak-memory", action="store_true")
    parser.add_argument("--report-peak", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.size or (1024 if args.peak_memory else 256)
    torch.set_num_threads(args.threads)

    if args.peak_memory:
        tile = args.tile or size // 2
        print(f"peak resident memory (VmHWM) of one {size}x{size} decode, torch {torch.__version__} f32, "
              f"{args.threads} threads, fresh process each")
        for tiled in (False, True):
            cmd = [sys.executable, __file__, "--report-peak", "--size", str(size), "--threads", str(args.threads)]
            if tiled:
                cmd += ["--tile", str(tile)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            label = f"tiled, {tile}-pixel tiles" if tiled else "untiled"
            print(f"{label:<24} {out}", end="")
        return

    model = build(args.tile)
    latents = torch.randn(1, 16, size // 8, size // 8)
    if args.report_peak:
        before = vm_hwm_mib()
        start = time.perf_counter()
        with torch.no_grad():
            model.decode(latents)
        secs = time.perf_counter() - start
        print(f"peak {vm_hwm_mib():.0f} MiB (model and latents {before:.0f} MiB) in {secs:.1f} s")
        return

    mode = f"tiled ({args.tile}-pixel tiles)" if args.tile else "untiled"
    print(f"VAE decode {size}x{size} (latent {size // 8}x{size // 8}), published widths, random weights, "
          f"torch {torch.__version__} f32, {args.threads} threads, {mode}")
    times = []
    with torch.no_grad():
        for i in range(args.runs + 1):
            start = time.perf_counter()
            model.decode(latents)
            ms = (time.perf_counter() - start) * 1e3
            if i == 0:
                print(f"warm-up: {ms:.0f} ms")
            else:
                times.append(ms)
    print(f"median of {args.runs}: {statistics.median(times):.0f} ms (min {min(times):.0f}, max {max(times):.0f})")


if __name__ == "__main__":
    main()
