"""The PyTorch CPU baseline for `cargo run --release -p zimage-transformer --example bench_forward`.

    python3 bench/torch_transformer_cpu.py [RUNS]

Same configuration (dim 768, 8 layers, 12 heads, 64x64 latent, 128-token caption), f32, random
weights, as many threads as the Rust side uses (all cores)."""

import os
import statistics
import sys
import time

import torch
from diffusers import ZImageTransformer2DModel


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    model = ZImageTransformer2DModel(dim=768, n_layers=8, n_heads=12, n_kv_heads=12, axes_dims=[16, 24, 24],
                                     axes_lens=[1536, 512, 512]).eval()
    latent = torch.randn(16, 1, 64, 64)
    caption = torch.randn(128, 2560)
    t = torch.tensor([0.5])
    print(f"DiT forward, dim 768, 8 layers, 64x64 latent, 128-token caption, torch {torch.__version__} f32, {threads} threads")
    times = []
    with torch.no_grad():
        for i in range(runs + 1):
            start = time.perf_counter()
            model([latent], t, [caption])
            ms = (time.perf_counter() - start) * 1e3
            if i == 0:
                print(f"warm-up: {ms:.0f} ms")
            else:
                times.append(ms)
    print(f"median of {runs}: {statistics.median(times):.0f} ms (min {min(times):.0f}, max {max(times):.0f})")


if __name__ == "__main__":
    main()
