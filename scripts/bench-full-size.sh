#!/usr/bin/env bash
# The published model's sizes end to end on the CPU: ComfyUI's three single files (synthetic
# weights in the published names, shapes and dtypes), `zimage generate` at each size, with peak
# resident memory, load time per component and seconds per denoising step.
#
#   scripts/bench-full-size.sh [DIR]        (SIZES="512 1024" STEPS=2 by default)
#
# DIR holds (or receives, from `cargo xtask synth-checkpoint --layout comfy --dtype bf16`) the
# split_files/ tree: 12.3 GB transformer, 8.0 GB text encoder, 0.3 GB VAE.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/work/synth/comfy}
SIZES=${SIZES:-"512 1024"}
STEPS=${STEPS:-2}
TARGET=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}
ZIMAGE=${ZIMAGE:-$TARGET/release/zimage}

if [ ! -d "$DIR/split_files" ]; then
    cargo run --release -p xtask -- synth-checkpoint --layout comfy --dtype bf16 --out "$DIR"
fi
[ -x "$ZIMAGE" ] || cargo build --release -p zimage-cli --no-default-features --features ndarray

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
for size in $SIZES; do
    log=$(mktemp)
    /usr/bin/time -v "$ZIMAGE" generate --backend ndarray --seed 1 --steps "$STEPS" \
        --width "$size" --height "$size" -p "a lighthouse at dusk, oil painting" \
        --transformer "$DIR/split_files/diffusion_models/z_image_turbo_bf16.safetensors" \
        --text-encoder "$DIR/split_files/text_encoders/qwen_3_4b.safetensors" \
        --vae "$DIR/split_files/vae/ae.safetensors" \
        -o "$(mktemp -d)/full-size-$size.png" 2>"$log" || { cat "$log"; exit 1; }
    echo "== ${size}x${size}, $STEPS steps"
    grep -E "^Z-Image|took|done in|Maximum resident|Elapsed \(wall" "$log"
    rm -f "$log"
done
