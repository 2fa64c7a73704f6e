#!/usr/bin/env python3
"""Tessera against PyTorch transformers, side by side: same checkpoint, prompt, grid, greedy
CFG settings and thread count; checks that the tokens agree and prints the time ratio.

    cargo build --release --example greedy_tokens
    python scripts/compare_torch.py --model DIR --grid 16x16 --threads 2 --repeats 5

Not part of CI. The PyTorch side runs in this process: ``Emu3ForConditionalGeneration.generate``
with classifier-free guidance (``guidance_scale`` + ``negative_prompt_ids``) and the Emu3
prefix constraint, greedy, exactly as scripts/torch_reference.py does, with
``torch.set_num_threads(--threads)``. The Tessera side is ``examples/greedy_tokens.rs``
(the library's decode loop, ``--temperature 0``) run as a subprocess with
``RAYON_NUM_THREADS=--threads``. Both sides time themselves in-process and leave out model
loading; "gen" is the token loop (prefill + decode), "e2e" adds the VQ decode of the code
grid to pixels. Repeats alternate which side goes first, and the ratios are of medians,
so a load spike from another process hits both sides alike as far as possible. The load
average before and after is printed: on a shared machine, read the figures with it.

The negative prompt defaults to the model's unconditional prompt (Tessera's metadata
block in config.json, else ""), which is what ``tessera gen`` uses.

Exit status 1 if the tokens differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as tr  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_side(model, tokenizer, args, cond, neg, height, width, max_new_tokens=None):
    """One timed generate + VQ decode; returns (new ids, gen seconds, vq seconds)."""
    import torch

    ids = tr.special_ids(tokenizer.get_vocab(with_added_tokens=True))
    vis = tr.visual_ids(tokenizer.get_vocab(with_added_tokens=True))
    cond_t = torch.tensor([cond])
    neg_t = torch.tensor([neg])
    gen_cfg = tr.generation_config(ids, height, width, args.cfg, 0)
    if max_new_tokens is not None:
        gen_cfg.max_new_tokens = max_new_tokens
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            cond_t,
            attention_mask=torch.ones_like(cond_t),
            generation_config=gen_cfg,
            negative_prompt_ids=neg_t if args.cfg != 1 else None,
            prefix_allowed_tokens_fn=tr.make_prefix_allowed_tokens_fn(ids, vis, height, width),
        )
    gen_s = time.perf_counter() - t0
    if max_new_tokens is not None:
        return out[0, len(cond) :].tolist(), gen_s, 0.0
    t1 = time.perf_counter()
    with torch.no_grad():
        model.decode_image_tokens(image_tokens=out[:, len(cond) :], height=height, width=width)
    vq_s = time.perf_counter() - t1
    return out[0, len(cond) :].tolist(), gen_s, vq_s


def tessera_side(args, negative, height, width):
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    cmd = [
        args.tessera_bin,
        "--model", args.model,
        "--prompt", args.prompt,
        "--negative", negative,
        "--grid", f"{height}x{width}",
        "--cfg", str(args.cfg),
        "--temperature", "0",
    ]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def med(xs):
    return statistics.median(xs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Emu3 checkpoint dir (e.g. from scripts/make_random_model.py)")
    p.add_argument("--prompt", default="a red circle above a blue square, masterpiece, film grained, best quality.")
    p.add_argument("--negative", default=None, help="negative prompt [the model's unconditional prompt, else '']")
    p.add_argument("--grid", default="16x16", type=tr.parse_grid, help="token grid HxW")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and RAYON_NUM_THREADS")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--tessera-bin",
        default=os.path.join(REPO, "target", "release", "examples", "greedy_tokens"),
        help="the greedy_tokens example (cargo build --release --example greedy_tokens)",
    )
    args = p.parse_args(argv)
    if not os.path.isfile(args.tessera_bin):
        raise SystemExit(f"{args.tessera_bin} is missing: run  cargo build --release --example greedy_tokens")

    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import Emu3ForConditionalGeneration

    torch.set_num_threads(args.threads)
    height, width = args.grid
    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    negative = args.negative
    if negative is None:
        negative = (config.get("tessera") or {}).get("unconditional_prompt") or ""

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    model = Emu3ForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    torch_load_s = time.perf_counter() - t0
    ids = tr.special_ids(tokenizer.get_vocab(with_added_tokens=True))
    cond = tr.build_prompt_ids(tokenizer, ids, args.prompt, height, width)
    neg = tr.build_prompt_ids(tokenizer, ids, negative, height, width)

    # Warm-up of torch's first-call costs (one row of the image), not timed. Tessera has
    # none beyond its model load, which it leaves out of its timings.
    torch_side(model, tokenizer, args, cond, neg, height, width, max_new_tokens=width + 1)

    torch_runs, tessera_runs = [], []
    for r in range(args.repeats):
        order = ["torch", "tessera"] if r % 2 == 0 else ["tessera", "torch"]
        for side in order:
            if side == "torch":
                new_ids, gen_s, vq_s = torch_side(model, tokenizer, args, cond, neg, height, width)
                torch_runs.append({"ids": new_ids, "gen_s": gen_s, "vq_s": vq_s})
            else:
                out = tessera_side(args, negative, height, width)
                run = out["runs"][0]
                tessera_runs.append(
                    {"ids": out["generated_ids"], "cond": out["cond_ids"], "neg": out["neg_ids"],
                     "gen_s": run["gen_s"], "vq_s": run["vq_decode_s"], "load_s": out["load_s"],
                     "peak_rss": out["peak_rss_bytes"]}
                )
        print(
            f"repeat {r}: torch gen {torch_runs[-1]['gen_s']:.3f}s vq {torch_runs[-1]['vq_s']:.3f}s | "
            f"tessera gen {tessera_runs[-1]['gen_s']:.3f}s vq {tessera_runs[-1]['vq_s']:.3f}s",
            file=sys.stderr,
        )
    load_after = os.getloadavg()

    ref = torch_runs[0]["ids"]
    problems = []
    if tessera_runs[0]["cond"] != cond or tessera_runs[0]["neg"] != neg:
        problems.append("prompt ids differ")
    for i, run in enumerate(torch_runs):
        if run["ids"] != ref:
            problems.append(f"torch repeat {i} differs from torch repeat 0")
    for i, run in enumerate(tessera_runs):
        if run["ids"] != ref:
            first = next((j for j, (a, b) in enumerate(zip(run["ids"], ref)) if a != b), min(len(run["ids"]), len(ref)))
            problems.append(f"tessera repeat {i} differs from torch at generated token {first}")
    agree = not problems

    n_tokens = len(ref)
    tg, sg = med([r["gen_s"] for r in torch_runs]), med([r["gen_s"] for r in tessera_runs])
    te = med([r["gen_s"] + r["vq_s"] for r in torch_runs])
    se = med([r["gen_s"] + r["vq_s"] for r in tessera_runs])
    tv, sv = med([r["vq_s"] for r in torch_runs]), med([r["vq_s"] for r in tessera_runs])
    summary = {
        "model": os.path.basename(os.path.normpath(args.model)),
        "grid": [height, width],
        "cfg": args.cfg,
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokens_agree": agree,
        "problems": problems,
        "generated_tokens": n_tokens,
        "distinct_codes": len({c for row in tr.codes_from_generated(ref, ids, model.vocabulary_mapping.bpe2img, height, width) for c in row}),
        "torch_gen_s": round(tg, 4),
        "tessera_gen_s": round(sg, 4),
        "gen_speedup": round(tg / sg, 2),
        "torch_tokens_per_s": round(n_tokens / tg, 2),
        "tessera_tokens_per_s": round(n_tokens / sg, 2),
        "torch_vq_s": round(tv, 4),
        "tessera_vq_s": round(sv, 4),
        "vq_speedup": round(tv / sv, 2),
        "torch_e2e_s": round(te, 4),
        "tessera_e2e_s": round(se, 4),
        "e2e_speedup": round(te / se, 2),
        "torch_load_s": round(torch_load_s, 4),
        "tessera_load_s": round(med([r["load_s"] for r in tessera_runs]), 4),
        "tessera_peak_rss_bytes": max(r["peak_rss"] or 0 for r in tessera_runs),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }
    print(
        f"tokens agree: {agree} ({n_tokens} tokens, {args.repeats} repeats, {args.threads} threads)\n"
        f"token loop: torch {tg:.3f}s, tessera {sg:.3f}s -> tessera is {tg / sg:.2f}x faster\n"
        f"VQ decode:  torch {tv:.3f}s, tessera {sv:.3f}s -> {tv / sv:.2f}x\n"
        f"end to end: torch {te:.3f}s, tessera {se:.3f}s -> {te / se:.2f}x\n"
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}",
        file=sys.stderr,
    )
    for prob in problems:
        print(f"MISMATCH: {prob}", file=sys.stderr)
    print(json.dumps(summary))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
