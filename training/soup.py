"""Average the language models of model roots that share a VQ and a tokenizer (a weight "soup").

    python3 training/soup.py --out DIR ROOT_A ROOT_B [ROOT_C ...]

Each ROOT is a shipped layout (`weights/` + `tokenizer/`), e.g. the repository and an export
installed from `ship.tar.part-*`. The roots must come from one training line (a run and its
warm-started continuation), where averaging stays in one basin; the VQ tensors, the config and
the tokenizer must be identical (checked). DIR gets ROOT_A's `weights/` and `tokenizer/` with every LM tensor replaced
by the mean over the roots (float32 mean, stored in ROOT_A's dtype).
"""

import argparse
import filecmp
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

VQ_PREFIX = "vqmodel."


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="new model root (must not exist)")
    ap.add_argument("roots", nargs="+")
    a = ap.parse_args()
    if len(a.roots) < 2:
        sys.exit("give at least two model roots")
    first = a.roots[0]
    for r in a.roots[1:]:
        for f in ("weights/config.json", "weights/model.safetensors.index.json", "tokenizer/tokenizer.json"):
            if not filecmp.cmp(os.path.join(first, f), os.path.join(r, f), shallow=False):
                sys.exit(f"{r}/{f} differs from {first}/{f}: not one training line")
    for sub in ("weights", "tokenizer"):
        shutil.copytree(os.path.join(first, sub), os.path.join(a.out, sub))
    wdir = os.path.join(first, "weights")
    with open(os.path.join(wdir, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    averaged = 0
    for shard in shards:
        tensors = [load_file(os.path.join(r, "weights", shard)) for r in a.roots]
        with safe_open(os.path.join(wdir, shard), "pt") as h:
            meta = h.metadata()
        out = {}
        for name, t in tensors[0].items():
            if name.startswith(VQ_PREFIX):
                if not all(torch.equal(t, o[name]) for o in tensors[1:]):
                    sys.exit(f"{name} differs between the roots: the VQ must be the same")
                out[name] = t
            else:
                out[name] = (sum(o[name].float() for o in tensors) / len(tensors)).to(t.dtype)
                averaged += 1
        save_file(out, os.path.join(a.out, "weights", shard), metadata=meta)
    print(json.dumps({"out": a.out, "roots": len(a.roots), "lm_tensors_averaged": averaged}))


if __name__ == "__main__":
    main()
