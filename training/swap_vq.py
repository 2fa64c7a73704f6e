"""A model directory with another VQ: ROOT's LM, tokenizer and config, with the `vqmodel.*`
tensors taken from a stage A `vq.safetensors` (same VQ config). For judging a new VQ's round trip
with `tessera eval --roundtrip` before any LM is trained on its codes.

    python3 training/swap_vq.py --root ROOT --vq RUN/vq/vq.safetensors --out DIR

ROOT is a model root (`weights/` + `tokenizer/`, e.g. the repository). Every VQ tensor must exist
in ROOT with the same shape, and the VQ configs must agree; the tensors keep ROOT's shards and
dtypes.

    python3 training/swap_vq.py --root ROOT --extract FILE

does the reverse: ROOT's VQ as a stage A `vq.safetensors` (what `vq.py --init` and stage B's
`VQ_ROOT` read), so a model root can carry a VQ to the GPU machine inside `weights/`.
"""

import argparse
import json
import os
import shutil
import sys

from safetensors import safe_open
from safetensors.torch import load_file, save_file

PREFIX = "vqmodel."


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="model root with weights/ and tokenizer/")
    ap.add_argument("--vq", help="stage A vq.safetensors")
    ap.add_argument("--out", help="new model root (must not exist)")
    ap.add_argument("--extract", metavar="FILE", help="write ROOT's VQ to FILE as a stage A vq.safetensors instead")
    a = ap.parse_args()

    wdir = os.path.join(a.root, "weights")
    with open(os.path.join(wdir, "config.json")) as f:
        config = json.load(f)
    if a.extract:
        extract(wdir, config, a.extract)
        return
    if not (a.vq and a.out):
        sys.exit("--vq and --out are required (or --extract)")
    with safe_open(a.vq, "pt") as f:
        vq_cfg = json.loads(f.metadata()["vq_config"])
    mismatched = {k: (config["vq_config"].get(k), v) for k, v in vq_cfg.items() if config["vq_config"].get(k) != v}
    if mismatched:
        sys.exit(f"VQ configs differ (ROOT, new): {mismatched}")
    new = load_file(a.vq)
    with open(os.path.join(wdir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    root_vq = {k[len(PREFIX):] for k in weight_map if k.startswith(PREFIX)}
    if root_vq != set(new):
        sys.exit(f"VQ tensors differ: missing in new {sorted(root_vq - set(new))[:5]}, "
                 f"unexpected {sorted(set(new) - root_vq)[:5]}")

    os.makedirs(a.out)
    shutil.copytree(os.path.join(a.root, "tokenizer"), os.path.join(a.out, "tokenizer"))
    out_w = os.path.join(a.out, "weights")
    shutil.copytree(wdir, out_w)
    replaced = 0
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(out_w, shard)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        tensors = load_file(path)
        for name in tensors:
            if name.startswith(PREFIX):
                t = new[name[len(PREFIX):]]
                if t.shape != tensors[name].shape:
                    sys.exit(f"{name}: shape {tuple(t.shape)} in the new VQ, {tuple(tensors[name].shape)} in ROOT")
                tensors[name] = t.to(tensors[name].dtype).contiguous()
                replaced += 1
        save_file(tensors, path, metadata=meta)
    print(json.dumps({"out": a.out, "vq_tensors_replaced": replaced}))


def extract(wdir, config, path):
    """ROOT's `vqmodel.*` tensors, unprefixed, with the `vq_config` metadata vq.py's save_vq writes."""
    with open(os.path.join(wdir, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    sd = {}
    for shard in shards:
        for name, t in load_file(os.path.join(wdir, shard)).items():
            if name.startswith(PREFIX):
                sd[name[len(PREFIX):]] = t.contiguous()
    if not sd:
        sys.exit(f"no {PREFIX}* tensors in {wdir}")
    vq_cfg = {k: v for k, v in config["vq_config"].items() if k != "model_type"}  # as vq.py writes it
    save_file(sd, path, metadata={"vq_config": json.dumps(vq_cfg)})
    print(json.dumps({"out": path, "vq_tensors": len(sd)}))


if __name__ == "__main__":
    main()
