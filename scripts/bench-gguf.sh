#!/usr/bin/env bash
# Quantized weights at the published sizes on the CPU (issue 15): each GGUF type's transformer +
# text encoder against the bf16 files they were made from. Same seed, prompt and size for every
# run; prints each run's seconds per step, total and peak resident memory, and each image's PSNR
# against the bf16 image.
#
#   scripts/bench-gguf.sh [DIR]      (TYPES="q8_0 q4_k q4_0" SIZE=256 STEPS=2 by default;
#                                     BASELINE=0 skips the bf16 run when its image exists)
#
# DIR holds (or receives) the bf16 ComfyUI files of `cargo xtask synth-checkpoint --layout comfy`;
# the GGUF files are written next to them by `cargo xtask convert --dtype TYPE`.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/work/synth/comfy}
TYPES=${TYPES:-"q8_0 q4_k q4_0"}
SIZE=${SIZE:-256}
STEPS=${STEPS:-2}
BASELINE=${BASELINE:-1}
PYTHON=${PYTHON:-python3}
TARGET=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}
ZIMAGE=${ZIMAGE:-$TARGET/release/zimage}
XTASK=${XTASK:-$TARGET/release/xtask}
FILES=$DIR/split_files
OUT=$DIR/bench-gguf
mkdir -p "$OUT"

if [ ! -d "$FILES" ]; then
    "$XTASK" synth-checkpoint --layout comfy --dtype bf16 --out "$DIR"
fi
TRANSFORMER=$FILES/diffusion_models/z_image_turbo_bf16.safetensors
TEXT_ENCODER=$FILES/text_encoders/qwen_3_4b.safetensors
VAE=$FILES/vae/ae.safetensors

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'), ${SIZE}x${SIZE}, $STEPS steps"

# run NAME TRANSFORMER TEXT_ENCODER: one generation, its figures, the image at $OUT/NAME-SIZE.png.
run() {
    local name=$1 log
    log=$(mktemp)
    /usr/bin/time -v "$ZIMAGE" generate --backend ndarray --seed 1 --steps "$STEPS" \
        --width "$SIZE" --height "$SIZE" -p "a lighthouse at dusk, oil painting" \
        --transformer "$2" --text-encoder "$3" --vae "$VAE" \
        -o "$OUT/$name-$SIZE.png" 2>"$log" || { cat "$log"; exit 1; }
    echo "== $name"
    grep -E "took|done in|Maximum resident|Elapsed \(wall" "$log"
    rm -f "$log"
}

psnr() {
    "$PYTHON" - "$1" "$2" <<'EOF'
import sys
import numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in sys.argv[1:3])
mse = np.mean((a - b) ** 2)
print("identical" if mse == 0 else f"{10 * np.log10(255.0**2 / mse):.2f} dB")
EOF
}

if [ "$BASELINE" = 1 ] || [ ! -f "$OUT/bf16-$SIZE.png" ]; then
    run bf16 "$TRANSFORMER" "$TEXT_ENCODER"
fi
for type in $TYPES; do
    upper=$(echo "$type" | tr a-z A-Z)
    gguf=$DIR/gguf-$type
    if [ ! -f "$gguf/z_image_turbo-$upper.gguf" ] || [ ! -f "$gguf/qwen3-$upper.gguf" ]; then
        rm -rf "$gguf"
        /usr/bin/time -f "convert $type: %e s, peak %M KiB" \
            "$XTASK" convert --from "$TRANSFORMER" "$TEXT_ENCODER" --out "$gguf" --dtype "$type"
    fi
    ls -l "$gguf"/*.gguf | awk '{printf "  %s: %.2f GB\n", $NF, $5 / 1e9}'
    run "$type" "$gguf/z_image_turbo-$upper.gguf" "$gguf/qwen3-$upper.gguf"
    echo "  PSNR against bf16: $(psnr "$OUT/bf16-$SIZE.png" "$OUT/$type-$SIZE.png")"
done
