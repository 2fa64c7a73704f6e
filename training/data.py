"""Stage 1: training data from the world generator (`tessera world sample`), and its loaders.

    python3 training/data.py --run RUN [--world target/release/tessera] [--procs 16] [--scale 1.0]

Runs the release binary in parallel processes, one seed per shard, and writes
RUN/data/<split>/shard_NNN/{samples.jsonl, images.u8} plus RUN/data/<split>/DONE. Splits:

    t2i_16x16   text-to-image, 128x128 px (token grid 16x16; most of the data)
    t2i_12x20   text-to-image, W=160 H=96 px (grid H=12, W=20)
    t2i_20x12   text-to-image, W=96 H=160 px (grid H=20, W=12)
    edit_16x16  instruction edits, 128x128 px (source and target image)
    heldout     1,000 text-to-image 128x128 images with their own seed, for the VQ's PSNR
    vq_text     extra 128x128 images of signs (the world's `text` category) for the VQ only:
                none unless --n-vq-text asks (the LM, the tokenizer and encode.py ignore it)
    vq_count    extra 128x128 images of the `counting` category (many small shapes), for the VQ
                only, as vq_text: none unless --n-vq-count asks

`--focus counting=95000,text=95000` adds to t2i_16x16 that many extra samples drawn from those
categories only (the LM sees them as ordinary t2i data; the default mix is uniform over the
categories). Their shards come first, so the split's last shards, whose tail lm.py keeps for
validation, stay of the uniform mix.

Split names carry the token grid as HxW (rows x columns); the binary's --size is W x H pixels.
Seeds: shard s of split i uses SEED_BASE + 1000*i + s; no seed here is the bench seed (see
BENCH_SEED below, and the generator refuses bench captions anyway). Same arguments -> same data.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

# ----------------------------------------------------------------------------- defaults
WORLD = "target/release/tessera"
PROCS = 16                 # parallel generator processes (the H200 box has 16 cores)
SEED_BASE = 1_000_000      # far from the bench seed
BENCH_SEED = 20_260_101    # eval/bench.jsonl's seed (src/cli/world.rs); asserted unused
SHARD = 10_000             # samples per generator process call
# split: (task, width_px, height_px, count at --scale 1); ~540k images, ~26 GB of raw uint8
SPLITS = {
    "t2i_16x16": ("t2i", 128, 128, 300_000),
    "t2i_12x20": ("t2i", 160, 96, 40_000),
    "t2i_20x12": ("t2i", 96, 160, 40_000),
    "edit_16x16": ("edit", 128, 128, 80_000),
    "heldout": ("t2i", 128, 128, 1_000),
    "vq_text": ("t2i", 128, 128, 0),
    "vq_count": ("t2i", 128, 128, 0),
}
CATEGORIES = {"vq_text": "text", "vq_count": "counting"}  # splits drawn from some categories only
VQ_ONLY = ("vq_text", "vq_count")  # splits only the VQ trains on
SPLIT_INDEX = {name: i for i, name in enumerate(SPLITS)}
PATCH = 8                  # VQ spatial factor: token grid = pixels / 8
T2I_CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr", "text", "scene")
FOCUS_SPLIT = "t2i_16x16"  # the split --focus adds to


def grid_of(split):
    """(rows, cols) of the token grid of a split."""
    _, w, h, _ = SPLITS[split]
    return h // PATCH, w // PATCH


def shard_seed(split, shard, base=SEED_BASE):
    """Seed of one shard. `base` moves the training splits to fresh samples (a second run sees new
    data); the held-out split always keeps SEED_BASE, so PSNR stays comparable between runs."""
    seed = (SEED_BASE if split == "heldout" else base) + 1000 * SPLIT_INDEX[split] + shard
    assert seed != BENCH_SEED
    return seed


def plan(split, count, shard_size=SHARD):
    """[(shard index, count)] covering `count` samples."""
    n = max(1, -(-count // shard_size))
    base, extra = divmod(count, n)
    return [(s, base + (1 if s < extra else 0)) for s in range(n)]


def parse_focus(text):
    """`counting=95000,text=95000` -> [("counting", 95000), ("text", 95000)]."""
    out = []
    for part in filter(None, (text or "").split(",")):
        cat, _, n = part.partition("=")
        if cat not in T2I_CATEGORIES or not n.isdigit():
            raise ValueError(f"--focus {part!r}: expected CATEGORY=COUNT, CATEGORY one of {', '.join(T2I_CATEGORIES)}")
        out.append((cat, int(n)))
    return out


def split_plan(split, count, focus=(), shard_size=SHARD):
    """[(shard index, count, categories or None)] of one split: for FOCUS_SPLIT the focus shards
    first (one category each), then the split's own `count` over every category."""
    shards, k = [], 0
    for cat, n in (focus if split == FOCUS_SPLIT else ()):
        for _, m in plan(split, n, shard_size):
            shards.append((k, m, cat))
            k += 1
    for _, m in plan(split, count, shard_size):
        shards.append((k, m, CATEGORIES.get(split)))
        k += 1
    assert k <= 1000, f"{split}: {k} shards would reuse the next split's seeds"
    return shards


def generate(run, world, procs, counts, shard_size=SHARD, log=print, seed_base=SEED_BASE, focus=()):
    """Run the generator for every split in `counts` ({split: n}, plus `focus` for FOCUS_SPLIT);
    skips splits already DONE."""
    jobs = []
    for split, count in counts.items():
        if count <= 0:
            continue
        root = os.path.join(run, "data", split)
        if os.path.exists(os.path.join(root, "DONE")):
            log(f"[data] {split}: already done")
            continue
        task, w, h, _ = SPLITS[split]
        for shard, n, cats in split_plan(split, count, focus, shard_size):
            out = os.path.join(root, f"shard_{shard:03d}")
            cmd = [world, "world", "sample", "--count", str(n), "--seed", str(shard_seed(split, shard, seed_base)),
                   "--size", f"{w}x{h}", "--task", task, "--out", out, "--format", "raw"]
            if cats:
                cmd += ["--categories", cats]
            jobs.append((split, out, n, cmd))
    # The binary is itself parallel (rayon): give each process its share of the cores.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = dict(os.environ, RAYON_NUM_THREADS=str(max(1, cores // procs)))
    t0 = time.time()
    running, done, failed = [], 0, []
    pending = list(jobs)
    while pending or running:
        while pending and len(running) < procs:
            split, out, n, cmd = pending.pop(0)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            errf = open(out + ".stderr", "w")
            running.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf, env=env), errf, split, out, n, cmd))
        time.sleep(0.05)
        still = []
        for p, errf, split, out, n, cmd in running:
            rc = p.poll()
            if rc is None:
                still.append((p, errf, split, out, n, cmd))
                continue
            errf.close()
            if rc != 0:
                failed.append((cmd, rc, open(out + ".stderr").read()[-2000:]))
            else:
                done += 1
        running = still
    if failed:
        cmd, rc, err = failed[0]
        raise RuntimeError(f"{len(failed)} generator runs failed; first: {' '.join(cmd)} -> rc {rc}\n{err}")
    n_img = 0
    for split, count in counts.items():
        if count <= 0:
            continue
        root = os.path.join(run, "data", split)
        if os.path.exists(os.path.join(root, "DONE")):
            continue
        n = check_split(run, split)
        n_img += n * (2 if SPLITS[split][0] == "edit" else 1)
        with open(os.path.join(root, "DONE"), "w") as f:
            f.write(f"{n}\n")
    dt = time.time() - t0
    log(f"[data] generated {len(jobs)} shards, {n_img} images in {dt:.1f}s ({n_img / max(dt, 1e-9):.0f} img/s)")


def _shards(run, split):
    root = os.path.join(run, "data", split)
    names = sorted(d for d in os.listdir(root) if d.startswith("shard_") and not d.endswith(".stderr"))
    return [os.path.join(root, d) for d in names]


def _count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def check_split(run, split):
    """Checks that every shard's images.u8 size matches its samples.jsonl; returns the sample count."""
    task, w, h, _ = SPLITS[split]
    per = (2 if task == "edit" else 1) * w * h * 3
    total = 0
    for d in _shards(run, split):
        n = _count_lines(os.path.join(d, "samples.jsonl"))
        size = os.path.getsize(os.path.join(d, "images.u8"))
        if size != n * per:
            raise RuntimeError(f"{d}: images.u8 has {size} bytes, expected {n} x {per}")
        total += n
    return total


def load_meta(run, split):
    """The samples.jsonl records of a split, in order."""
    out = []
    for d in _shards(run, split):
        with open(os.path.join(d, "samples.jsonl")) as f:
            out.extend(json.loads(line) for line in f if line.strip())
    return out


def load_images(run, split, limit=None):
    """uint8 array (N, H, W, 3) for t2i splits, (N, 2, H, W, 3) (source, target) for edit splits."""
    task, w, h, _ = SPLITS[split]
    per_sample = (2, h, w, 3) if task == "edit" else (h, w, 3)
    shards = _shards(run, split)
    counts = [_count_lines(os.path.join(d, "samples.jsonl")) for d in shards]
    n = sum(counts) if limit is None else min(limit, sum(counts))
    out = np.empty((n, *per_sample), dtype=np.uint8)
    i = 0
    for d, c in zip(shards, counts):
        if i >= n:
            break
        take = min(c, n - i)
        out[i:i + take] = load_shard_images(d, split, take)
        i += take
    return out


def shard_dirs(run, split):
    """The shard directories of a split, in sample order."""
    return _shards(run, split)


def load_shard_images(shard_dir, split, count=None):
    """One shard's images (all of them, or the first `count`), shaped as in load_images."""
    task, w, h, _ = SPLITS[split]
    per_sample = (2, h, w, 3) if task == "edit" else (h, w, 3)
    if count is None:
        count = _count_lines(os.path.join(shard_dir, "samples.jsonl"))
    arr = np.fromfile(os.path.join(shard_dir, "images.u8"), dtype=np.uint8, count=count * int(np.prod(per_sample)))
    return arr.reshape(count, *per_sample)


def text_of(rec):
    """The conditioning text of a record: the caption (t2i) or the instruction (edit)."""
    return rec["instruction"] if rec["task"] == "edit" else rec["caption"]


def load_texts(run, max_texts=None):
    """All captions and instructions of the training splits (not the held-out one)."""
    texts = []
    for split in SPLITS:
        if split == "heldout" or split in VQ_ONLY or not os.path.exists(os.path.join(run, "data", split, "DONE")):
            continue
        texts.extend(text_of(r) for r in load_meta(run, split))
    if max_texts is not None and len(texts) > max_texts:
        idx = np.random.default_rng(0).choice(len(texts), max_texts, replace=False)
        texts = [texts[i] for i in sorted(idx)]
    return texts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory")
    ap.add_argument("--world", default=WORLD, help="the tessera release binary")
    ap.add_argument("--procs", type=int, default=PROCS)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every split's count except heldout")
    ap.add_argument("--shard", type=int, default=SHARD, help="samples per generator call")
    ap.add_argument("--seed-base", type=int, default=SEED_BASE,
                    help="first seed of the training splits (another value: fresh samples; heldout keeps its seed)")
    for split in SPLITS:
        ap.add_argument(f"--n-{split.replace('_', '-')}", type=int, default=None, help=f"override {split} count")
    ap.add_argument("--focus", default="", metavar="CAT=N,...",
                    help=f"extra {FOCUS_SPLIT} samples of these t2i categories only (e.g. counting=95000,text=95000)")
    args = ap.parse_args()
    try:
        focus = parse_focus(args.focus)
    except ValueError as e:
        ap.error(str(e))
    counts = {}
    for split, (_, _, _, n) in SPLITS.items():
        override = getattr(args, f"n_{split}")
        counts[split] = override if override is not None else (n if split == "heldout" else int(n * args.scale))
    print(f"[data] counts {counts}, focus {focus}, procs {args.procs}", flush=True)
    generate(args.run, args.world, args.procs, counts, args.shard, log=lambda s: print(s, flush=True),
             seed_base=args.seed_base, focus=focus)
    for split in SPLITS:
        if counts[split] > 0:
            recs = load_meta(args.run, split)[:1]
            print(f"[data] {split}: {check_split(args.run, split)} samples, e.g. {text_of(recs[0])!r}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
