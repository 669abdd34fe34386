"""The PyTorch CPU baseline for `cargo run --release -p zimage-text --example bench_encoder`.

    python3 bench/torch_text_cpu.py [RUNS]

Same configuration (Qwen3, hidden 1024, 8 decoder layers, 16 query / 8 key-value heads of 64, SwiGLU 3072,
vocabulary 151936, one 128-token prompt), f32, random weights, transformers' default (SDPA) attention, as many
threads as the Rust side uses (all cores). The Rust side configures 9 layers and runs the 8 that
`hidden_states[-2]` needs; here the model has 8 layers and the final norm (negligible) runs too."""

import os
import statistics
import sys
import time

import torch
import transformers
from transformers import Qwen3Config, Qwen3Model

TOKENS = 128


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=64, rope_theta=1e6)
    model = Qwen3Model(config).eval()
    ids = torch.tensor([[(i * 7919 + 13) % 151643 for i in range(TOKENS)]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    print(f"Qwen3 encoder, hidden 1024, 8 layers run, 16/8 heads of 64, {TOKENS} tokens, "
          f"torch {torch.__version__} / transformers {transformers.__version__} f32, {threads} threads")
    times = []
    with torch.no_grad():
        for i in range(runs + 1):
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask).last_hidden_state
            ms = (time.perf_counter() - start) * 1e3
            if i == 0:
                print(f"warm-up: {ms:.1f} ms")
            else:
                times.append(ms)
    print(f"median of {runs}: {statistics.median(times):.1f} ms (min {min(times):.1f}, max {max(times):.1f})")


if __name__ == "__main__":
    main()
