#!/usr/bin/env python3
"""transformers' Emu3 VQ-VAE on the CPU: decode of one code grid and encode of one image, timed
the way `cargo bench --bench decode -- vq vqenc` times Tessera's, for a side-by-side ratio.

    python scripts/vq_torch_bench.py --model weights --threads 2 --repeats 10
    TESSERA_BENCH_MODEL=shipped RAYON_NUM_THREADS=2 cargo bench --bench decode -- vq vqenc

Same inputs as the Rust bench: codes[i] = (i * 2654435761 mod 2^32) mod codebook_size over a
16x16 grid, and a 128x128 (grid times the spatial factor) RGB pattern
(x*255/w, y*255/h, (x+y)*7 mod 256) scaled to [-1, 1]. One untimed warm-up call each, then
the median (min, max) of `--repeats` calls. `--model` is a transformers Emu3 checkpoint
directory (config.json + safetensors; `weights` for the shipped model). Not part of CI.
"""

from __future__ import annotations

import argparse
import statistics
import time


def timed(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts), max(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Emu3 checkpoint dir (config.json + safetensors)")
    p.add_argument("--grid", default="16x16", help="code grid HxW")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)

    import torch
    from transformers import Emu3ForConditionalGeneration

    torch.set_num_threads(args.threads)
    gh, gw = (int(v) for v in args.grid.split("x"))
    model = Emu3ForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    vq = model.model.vqmodel
    k = vq.config.codebook_size
    s = vq.vision_spatial_factor
    codes = torch.tensor([((i * 2654435761) % 2**32) % k for i in range(gh * gw)]).view(1, gh, gw)
    h, w = gh * s, gw * s
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rgb = torch.stack([xs * 255 // w, ys * 255 // h, (xs + ys) * 7 % 256]).float()
    pixels = (rgb / 127.5 - 1.0).unsqueeze(0)
    sizes = torch.tensor([[h, w]])

    with torch.inference_mode():
        dec = timed(lambda: vq.decode(codes), args.repeats)
        enc = timed(lambda: vq.encode(pixels, sizes), args.repeats)
    for name, (med, lo, hi) in [(f"vq decode {gh}x{gw} codes -> {w}x{h} px", dec), (f"vq encode {w}x{h} px -> {gw}x{gh} codes", enc)]:
        print(f"torch {name:<38} median {med * 1e3:>10.3f} ms  (min {lo * 1e3:.3f}, max {hi * 1e3:.3f}, n={args.repeats}), {args.threads} threads")


if __name__ == "__main__":
    main()
