#!/usr/bin/env bash
# One GPU device call: parity on cuda (f32, bf16) and wgpu (the card's Vulkan driver), `zimage bench`
# with the published shapes on cuda and wgpu, then the diffusers baseline, so that every ratio
# compares figures of the same call. Prepared by scripts/prepare-device.sh. Results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
d=.device
out="${OUT:-/tmp/device-out}"
mkdir -p "$out"
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"

step "parity: cuda f32 and bf16, wgpu f32"
# Fixtures are found through the run-time CARGO_MANIFEST_DIR.
CARGO_MANIFEST_DIR="$PWD/tests" ZIMAGE_REQUIRE_CUDA=1 ZIMAGE_REQUIRE_WGPU=1 \
    timeout 150 "$d/bin/parity" gpu_backends:: --test-threads 1 --nocapture 2>&1 | tee "$out/parity.txt" | tail -40

step "zimage bench, cuda bf16, published shapes"
timeout 150 "$d/bin/zimage" bench --shapes turbo --backend cuda --dtype bf16 --runs 5 --warmup 2 --json \
    2>"$out/bench_cuda.err" | tee "$out/bench_cuda.json"
tail -5 "$out/bench_cuda.err"

step "zimage bench, wgpu f16, DiT step at 512x512"
timeout 60 "$d/bin/zimage" bench --shapes turbo --only dit --sizes 512 --backend wgpu --dtype f16 \
    --runs 3 --warmup 1 --json 2>"$out/bench_wgpu.err" | tee "$out/bench_wgpu.json"
tail -5 "$out/bench_wgpu.err"

step "diffusers 0.42.1 baseline, same call"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$HOME/pysite" "$d"/wheels/*.whl
PYTHONPATH="$HOME/pysite" timeout 200 python3 "$d/bench/diffusers_baseline.py" 2>&1 | tee "$out/baseline.txt" | tail -20
