"""Stage 4: encode every training image to a VQ code grid, once (batched, on the GPU).

    python3 training/encode.py --run RUN [--vq RUN/vq/vq.safetensors] [--device cuda] [--batch 512] [--gpus N]

Writes RUN/codes/<split>.npy (int16; (N,h,w) for t2i splits, (N,2,h,w) source/target for edits),
RUN/codes/<split>.texts.json (the caption or instruction of each sample) and RUN/codes/DONE.
Uses the fp16-rounded VQ that ships, so the LM learns the codes Tessera's encoder produces.
`--gpus N` (default: every GPU there is) encodes in N processes, one per GPU, each taking every
N-th shard of every split (RUN/codes/parts/, joined in shard order at the end): the same codes as
one process, N times as fast. On the CPU (`--device cpu --gpus N`) the processes share the CPU.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import vq as vqlib  # noqa: E402

# ----------------------------------------------------------------------------- defaults
BATCH = 1024
SPLITS = ["t2i_16x16", "t2i_12x20", "t2i_20x12", "edit_16x16"]


@torch.no_grad()
def encode_tensor(vq, u8, batch, amp, fast=True):
    """uint8 (N,H,W,3) torch tensor (any device) -> int16 codes (N,h,w) numpy. fast: vq.py's
    fast encoder trunk (same function, bf16 norms; vq.py's check reports the code mismatch)."""
    dev = next(vq.parameters()).device
    n, h, w, _ = u8.shape
    out = torch.empty((n, h // 8, w // 8), dtype=torch.int16, device=dev)
    for i in range(0, n, batch):
        with amp():
            out[i:i + batch] = vqlib.encode_codes(vq, vqlib.to_pixels(u8[i:i + batch].to(dev)), fast=fast).to(torch.int16)
    return out.cpu().numpy()


def encode_split(vq, run, split, u8, batch, amp, fast=True):
    """Encodes one split's images (t2i (N,H,W,3) or edit (N,2,H,W,3)), writes codes + texts; returns codes."""
    t0 = time.time()
    if u8.ndim == 5:
        n = u8.shape[0]
        codes = encode_tensor(vq, u8.reshape(-1, *u8.shape[2:]), batch, amp, fast)
        codes = codes.reshape(n, 2, *codes.shape[1:])
    else:
        codes = encode_tensor(vq, u8, batch, amp, fast)
    out_dir = os.path.join(run, "codes")
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, f"{split}.npy"), codes)
    texts = [data.text_of(r) for r in data.load_meta(run, split)]
    assert len(texts) == codes.shape[0], (split, len(texts), codes.shape)
    with open(os.path.join(out_dir, f"{split}.texts.json"), "w") as f:
        json.dump(texts, f)
    n_img = codes.size // (codes.shape[-1] * codes.shape[-2])
    print(f"[encode] {split}: codes {codes.shape} in {time.time()-t0:.1f}s ({n_img / max(time.time()-t0, 1e-9):.0f} img/s)",
          flush=True)
    return codes


def _encode_worker(rank, n, run, vq_path, device, batch, no_amp, fast):
    """Process `rank` of n: every n-th shard of every split, each to RUN/codes/parts/SPLIT.SHARD.npy."""
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", rank)
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))

    def amp():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not no_amp)

    vq, _ = vqlib.load_vq(vq_path, dev)
    vqlib.channels_last(vq)
    parts = os.path.join(run, "codes", "parts")
    for split in SPLITS:
        if not os.path.exists(os.path.join(run, "data", split, "DONE")):
            continue
        shards = data.shard_dirs(run, split)
        for j in range(rank, len(shards), n):
            u8 = torch.from_numpy(data.load_shard_images(shards[j], split))
            if u8.ndim == 5:
                codes = encode_tensor(vq, u8.reshape(-1, *u8.shape[2:]), batch, amp, fast)
                codes = codes.reshape(u8.shape[0], 2, *codes.shape[1:])
            else:
                codes = encode_tensor(vq, u8, batch, amp, fast)
            np.save(os.path.join(parts, f"{split}.{j:05d}.npy"), codes)


def encode_parallel(run, vq_path, device, n, batch, no_amp, fast):
    """Encodes every split in n processes (_encode_worker), then joins each split's shards in
    order into RUN/codes/SPLIT.npy with its texts, as encode_split does. Returns the codes."""
    import shutil
    import torch.multiprocessing as mp
    parts = os.path.join(run, "codes", "parts")
    shutil.rmtree(parts, ignore_errors=True)
    os.makedirs(parts)
    t0 = time.time()
    mp.spawn(_encode_worker, args=(n, run, vq_path, device, batch, no_amp, fast), nprocs=n, join=True)
    all_codes = []
    for split in SPLITS:
        if not os.path.exists(os.path.join(run, "data", split, "DONE")):
            print(f"[encode] {split}: no data, skipped", flush=True)
            continue
        n_shards = len(data.shard_dirs(run, split))
        codes = np.concatenate([np.load(os.path.join(parts, f"{split}.{j:05d}.npy")) for j in range(n_shards)])
        np.save(os.path.join(run, "codes", f"{split}.npy"), codes)
        texts = [data.text_of(r) for r in data.load_meta(run, split)]
        assert len(texts) == codes.shape[0], (split, len(texts), codes.shape)
        with open(os.path.join(run, "codes", f"{split}.texts.json"), "w") as f:
            json.dump(texts, f)
        print(f"[encode] {split}: codes {codes.shape} ({n} processes, {time.time()-t0:.1f}s so far)", flush=True)
        all_codes.append(codes)
    shutil.rmtree(parts)
    return all_codes


def finish(run, all_codes, k, t0):
    """Codebook usage over all training codes; writes RUN/codes/DONE."""
    counts = np.zeros(k, dtype=np.int64)
    for c in all_codes:
        counts += np.bincount(c.reshape(-1).astype(np.int64), minlength=k)
    p = counts / max(1, counts.sum())
    nz = p[p > 0]
    usage, ppl = float((counts > 0).mean()), float(np.exp(-(nz * np.log(nz)).sum()))
    with open(os.path.join(run, "codes", "DONE"), "w") as f:
        json.dump({"codebook_usage": usage, "perplexity": ppl, "seconds": time.time() - t0}, f)
    print(f"[encode] done in {time.time()-t0:.1f}s; codebook usage over all training codes {usage:.3f}, "
          f"perplexity {ppl:.0f} (of {k})", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--vq", default=None, help="VQ checkpoint (default RUN/vq/vq.safetensors)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--hf-forward", action="store_true", help="transformers' encoder forward instead of the fast trunk")
    ap.add_argument("--gpus", type=int, default=None,
                    help="encoding processes, one per GPU (default: every GPU; 1 on the CPU)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    n = args.gpus if args.gpus is not None else (torch.cuda.device_count() if dev.type == "cuda" else 1)
    vq_path = args.vq or os.path.join(args.run, "vq", "vq.safetensors")
    if n > 1:
        t0 = time.time()
        _, cfg = vqlib.load_vq(vq_path, "cpu")
        all_codes = encode_parallel(args.run, vq_path, args.device, n, args.batch, args.no_amp, not args.hf_forward)
        finish(args.run, all_codes, cfg["codebook_size"], t0)
        return
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def amp():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not args.no_amp)

    t0 = time.time()
    vq, cfg = vqlib.load_vq(vq_path, dev)
    vqlib.channels_last(vq)
    all_codes = []
    for split in SPLITS:
        if not os.path.exists(os.path.join(args.run, "data", split, "DONE")):
            print(f"[encode] {split}: no data, skipped", flush=True)
            continue
        t1 = time.time()
        imgs = torch.from_numpy(data.load_images(args.run, split))
        print(f"[encode] {split}: loaded {tuple(imgs.shape)} in {time.time()-t1:.1f}s", flush=True)
        all_codes.append(encode_split(vq, args.run, split, imgs, args.batch, amp, not args.hf_forward))
        del imgs
    finish(args.run, all_codes, cfg["codebook_size"], t0)


if __name__ == "__main__":
    main()
