"""stable-diffusion.cpp (PyPI stable-diffusion-cpp-python) on the same three ComfyUI files as
scripts/bench-full-size.sh, for the baseline beside our figure. Prints load, generation and
per-step seconds; run it under `/usr/bin/time -v` for peak memory.

    /usr/bin/time -v python scripts/bench-sdcpp.py /work/synth/comfy 256 2
"""
import sys
import time
from pathlib import Path

import stable_diffusion_cpp as sdcpp

root = Path(sys.argv[1]) / "split_files"
size = int(sys.argv[2]) if len(sys.argv) > 2 else 256
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 2
threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2

t0 = time.time()
sd = sdcpp.StableDiffusion(
    diffusion_model_path=str(root / "diffusion_models" / "z_image_turbo_bf16.safetensors"),
    llm_path=str(root / "text_encoders" / "qwen_3_4b.safetensors"),
    vae_path=str(root / "vae" / "ae.safetensors"),
    n_threads=threads,
    verbose=True,  # its log has the per-stage and per-step times
)
t1 = time.time()
images = sd.generate_image(prompt="a lighthouse on a cliff at dusk, photograph", width=size, height=size,
                           sample_steps=steps, cfg_scale=1.0, seed=42)
t2 = time.time()
images[0].save(f"/tmp/sdcpp-{size}.png")
print(f"sd.cpp {size}x{size} {steps} steps, {threads} threads: load {t1 - t0:.1f} s, "
      f"generate {t2 - t1:.1f} s, total {t2 - t0:.1f} s")
