#!/usr/bin/env bash
# Builds, on this (CPU) machine, everything scripts/device-check.sh runs on a GPU machine, into
# .device/ (git-ignored): the release `zimage` with every backend, the GPU parity tests with cuda,
# and the diffusers baseline with its wheels. Then, through the device tool:
#     run --carry .device -- bash scripts/device-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/zimage-rs/target}"
shared="${SHARED:-../shared}"
out=.device
rm -rf "$out"
mkdir -p "$out/bin"

cargo build --release -p zimage-cli
cp "$CARGO_TARGET_DIR/release/zimage" "$out/bin/"

# The parity tests (tests/tests/parity/, gpu_backends among them) with the cuda feature.
cargo test --release -p zimage-tests --features cuda --test parity --no-run \
    --message-format=json >"$out/build.json"
test_bin=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    msg = json.loads(line)
    if msg.get("executable") and msg.get("target", {}).get("name") == "parity":
        print(msg["executable"])' "$out/build.json")
cp "$test_bin" "$out/bin/parity"
rm "$out/build.json"

cp -r "$shared/bench" "$out/bench"
cp -r "$shared/wheels" "$out/wheels"
du -sh "$out"
