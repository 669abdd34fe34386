#!/usr/bin/env python3
"""Reads `cargo xtask convert`'s GGUF files with gguf-py (the reader ComfyUI-GGUF uses) and compares a
few tensors, dequantized by `gguf.quants.dequantize`, with the bf16 ComfyUI files they were made from.

    python scripts/check-gguf-with-gguf-py.py [DIR] [TYPES...]   (after scripts/bench-gguf.sh DIR;
                                                                   needs numpy and gguf from PyPI)
"""
import sys, numpy as np, gguf
import json, struct
class safe_open:
    """bf16-aware safetensors reader (numpy has no bfloat16)."""
    def __init__(self, path, _fw): self.path = path
    def __enter__(self):
        self.f = open(self.path, "rb"); n = struct.unpack("<Q", self.f.read(8))[0]
        self.h = json.loads(self.f.read(n)); self.base = 8 + n; return self
    def __exit__(self, *a): self.f.close()
    def keys(self): return [k for k in self.h if k != "__metadata__"]
    def get_tensor(self, k):
        e = self.h[k]; a, b = e["data_offsets"]; self.f.seek(self.base + a); raw = self.f.read(b - a)
        assert e["dtype"] == "BF16", e["dtype"]
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(e["shape"])

DIR = sys.argv[1] if len(sys.argv) > 1 else "/work/synth/comfy"
TYPES = sys.argv[2:] or ["Q8_0", "Q4_K", "Q4_0"]
src_t = f"{DIR}/split_files/diffusion_models/z_image_turbo_bf16.safetensors"
src_q = f"{DIR}/split_files/text_encoders/qwen_3_4b.safetensors"
for ty in [t.upper() for t in TYPES]:
    d = f"{DIR}/gguf-{ty.lower()}"
    for path, src, pairs in [
        (f"{d}/z_image_turbo-{ty}.gguf", src_t, [("layers.0.attention.qkv.weight", "layers.0.attention.qkv.weight"), ("layers.29.feed_forward.w2.weight", "layers.29.feed_forward.w2.weight"), ("x_embedder.weight", "x_embedder.weight")]),
        (f"{d}/qwen3-{ty}.gguf", src_q, [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"), ("token_embd.weight", "model.embed_tokens.weight"), ("blk.35.ffn_down.weight", "model.layers.35.mlp.down_proj.weight")]),
    ]:
        r = gguf.GGUFReader(path)
        arch = r.fields["general.architecture"]
        arch = bytes(arch.parts[arch.data[0]]).decode()
        types = {}
        for t in r.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        print(path.split("/")[-1], "arch", arch, "tensors", len(r.tensors), types)
        by = {t.name: t for t in r.tensors}
        with safe_open(src, "np") as f:
            keys = set(f.keys())
            for gname, sname in pairs:
                t = by[gname]
                deq = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
                deq = deq.reshape([int(x) for x in reversed(t.shape)]) if deq.ndim == 1 else deq
                sname = sname if sname in keys else sname.removeprefix("model.")
                ref = f.get_tensor(sname).astype(np.float32)
                rel = np.linalg.norm(deq - ref) / np.linalg.norm(ref)
                print(f"  {gname} {t.tensor_type.name} {list(deq.shape)} vs source {list(ref.shape)}: rel L2 {rel:.4f}")
