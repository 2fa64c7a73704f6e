"""Where the VQ round trip loses the judge's points: the quantizer, or the autoencoder itself.

    tessera world render --samples eval/bench.jsonl --out GT
    python3 training/vq_probe.py --vq ROOT_OR_VQ --bench eval/bench.jsonl --gt GT --out DIR [--limit N]
    tessera eval --bench eval/bench.jsonl --images DIR/quantized  --json
    tessera eval --bench eval/bench.jsonl --images DIR/continuous --json

For every judged image of the bench (`image` of a t2i sample, `target` of an edit), writes two
reconstructions with transformers' encoder and decoder in float32, on the CPU:
- quantized/: the round trip Tessera makes (nearest code by transformers' euclidean argmin);
- continuous/: the same latent, unit-normalised and scaled to the codebook's norm, decoded
  without being quantized (the decoder also conditions on it, in place of the code).
Judging both splits what the round trip loses into what the codebook loses (continuous better
than quantized) and what the encoder and decoder lose (continuous already fails). Prints the mean
PSNR of both. ROOT_OR_VQ: a model root (`weights/` + `tokenizer/`) or a stage A vq.safetensors.
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vq as vqlib  # noqa: E402


def judged_image(sample):
    return sample["target"] if sample["task"] == "edit" else sample["image"]


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


@torch.no_grad()
def reconstruct(vq, u8):
    """uint8 (B,H,W,3) -> (quantized, continuous) uint8 reconstructions."""
    cb = vq.quantize.embedding.weight
    z = vqlib.encode_latents(vq, vqlib.to_pixels(u8))          # (B,1,E,h,w)
    b, _, _, h, w = z.shape
    idx = vqlib.nearest_euclidean(z, cb).view(b, h, w)
    zq = cb[idx].permute(0, 3, 1, 2).unsqueeze(1)
    zc = torch.nn.functional.normalize(z, dim=2) * cb.norm(dim=1).mean()
    return vqlib.to_u8(vqlib.decode_latents(vq, zq)).numpy(), vqlib.to_u8(vqlib.decode_latents(vq, zc)).numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vq", required=True, help="model root or stage A vq.safetensors")
    ap.add_argument("--bench", required=True)
    ap.add_argument("--gt", required=True, help="the bench's images (tessera world render)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=None, help="first N samples of each category")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    path = a.vq
    tmp = None
    if not path.endswith(".safetensors"):
        import subprocess
        tmp = tempfile.mkdtemp()
        path = os.path.join(tmp, "vq.safetensors")
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "swap_vq.py"),
                        "--root", a.vq, "--extract", path], check=True, stdout=subprocess.DEVNULL)
    vq, _ = vqlib.load_vq(path, "cpu")

    samples, seen = [], {}
    with open(a.bench) as f:
        for line in f:
            if line.strip():
                s = json.loads(line)
                seen[s["category"]] = seen.get(s["category"], 0) + 1
                if a.limit is None or seen[s["category"]] <= a.limit:
                    samples.append(s)
    dirs = {k: os.path.join(a.out, k) for k in ("quantized", "continuous")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    scores = {"quantized": [], "continuous": []}
    # Batches of one image size (the bench mixes shapes).
    groups = {}
    for s in samples:
        groups.setdefault((s["width"], s["height"]), []).append(s)
    for group in groups.values():
        for i in range(0, len(group), a.batch):
            chunk = group[i:i + a.batch]
            u8 = np.stack([np.array(Image.open(os.path.join(a.gt, judged_image(s))).convert("RGB")) for s in chunk])
            rq, rc = reconstruct(vq, torch.from_numpy(u8))
            for s, gt, q, c in zip(chunk, u8, rq, rc):
                Image.fromarray(q).save(os.path.join(dirs["quantized"], judged_image(s)))
                Image.fromarray(c).save(os.path.join(dirs["continuous"], judged_image(s)))
                scores["quantized"].append(psnr(gt, q))
                scores["continuous"].append(psnr(gt, c))
    print(json.dumps({"images": len(samples),
                      "psnr_quantized": round(float(np.mean(scores["quantized"])), 2),
                      "psnr_continuous": round(float(np.mean(scores["continuous"])), 2)}))
    if tmp:
        os.remove(path)
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
