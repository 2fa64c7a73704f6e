"""How many bits the VQ would need per code to keep the world's sign text: the entropy of the
8x8 pixel patches that lie wholly inside a sign.

    tessera world sample --categories text --count 3000 --seed 5 --format raw --out DIR
    python3 training/sign_bits.py DIR [--vq ROOT --limit 600]

For every sample with a sign, the sign's box is recomputed from its spec (the layout rules of
`sign_layout` in src/world/render.rs: integer letter scale, box (6*len+3)*s x 11*s, centred on
(x, y) and kept a margin inside the image), and each 8x8 patch of the 16x16 code grid that lies
wholly inside the box is read as an ink mask (pixels that differ from the sign colour). Prints
the number of patches, of distinct masks and their entropy in bits, then the same with the
sign and ink colours added. A codebook of K codes gives log2(K) bits per patch (12 for 4,096),
shared with every other thing the world draws.

With --vq (a model root or a stage A vq.safetensors), the images are also encoded by that VQ
(transformers, float32, CPU) and it prints the entropy of the codes on those patches and
H(mask | code): the bits of letter shape per patch that the codes do not keep (0 would mean
every code names one mask).
"""

import argparse
import collections
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PATCH = 8


def sign_size(n_letters, width, height):
    """(scale, box width, box height): src/world/render.rs `sign_size`."""
    n = max(1, n_letters)
    cap = max(1, math.floor(4 * min(width, height) / 128 + 0.5))
    for s in range(cap, 0, -1):
        if (6 * n + 3) * s <= 0.8 * width and 11 * s <= 0.4 * height:
            return s, (6 * n + 3) * s, 11 * s
    return 1, 6 * n + 3, 11


def place(centre, size, total):
    """Top-left coordinate along one axis: src/world/render.rs `sign_layout`'s `place`."""
    margin = max(total // 64, 1)
    v = centre * total - size / 2
    x0 = int(math.copysign(math.floor(abs(v) + 0.5), v))   # Rust's f64::round (half away from 0)
    room = total - size
    lo = max(min(margin, room), 0)
    return min(max(x0, lo), max(room - margin, lo))


def entropy(counter):
    total = sum(counter.values())
    return -sum(v / total * math.log2(v / total) for v in counter.values())


def conditional_entropy(pairs):
    """H(A | B) in bits from a Counter of (a, b) pairs."""
    by_b = collections.Counter()
    for (_, b), v in pairs.items():
        by_b[b] += v
    return entropy(pairs) - entropy(by_b)


def encode(root, images, batch=50):
    """Codes (N, h, w) of uint8 images with the VQ of `root` (transformers, float32, CPU)."""
    import tempfile
    import torch
    import vq as vqlib  # noqa: E402  (training/vq.py)
    path, tmp = root, None
    if not root.endswith(".safetensors"):
        import subprocess
        tmp = tempfile.mkdtemp()
        path = os.path.join(tmp, "vq.safetensors")
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "swap_vq.py"),
                        "--root", root, "--extract", path], check=True, stdout=subprocess.DEVNULL)
    vq, _ = vqlib.load_vq(path, "cpu")
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            z = vqlib.encode_latents(vq, vqlib.to_pixels(torch.from_numpy(images[i:i + batch])))
            b, _, _, h, w = z.shape
            out.append(vqlib.nearest_euclidean(z, vq.quantize.embedding.weight).view(b, h, w).numpy())
    if tmp:
        os.remove(path)
        os.rmdir(tmp)
    return np.concatenate(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="output of `tessera world sample --categories text --format raw`")
    ap.add_argument("--size", default="128x128", help="the samples' WIDTHxHEIGHT")
    ap.add_argument("--vq", default=None, help="also encode with this VQ (model root or vq.safetensors)")
    ap.add_argument("--limit", type=int, default=None, help="first N samples only")
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    samples = [json.loads(line) for line in open(os.path.join(a.dir, "samples.jsonl"))]
    images = np.fromfile(os.path.join(a.dir, "images.u8"), dtype=np.uint8).reshape(-1, h, w, 3)
    assert len(samples) == len(images), f"{len(samples)} samples, {len(images)} images"
    if a.limit:
        samples, images = samples[:a.limit], images[:a.limit]
    codes = encode(a.vq, images) if a.vq else None
    masks, with_colours = collections.Counter(), collections.Counter()
    mask_code, code_count = collections.Counter(), collections.Counter()
    signs = mismatches = 0
    for k, (s, img) in enumerate(zip(samples, images)):
        sign = s["spec"].get("sign")
        if not sign:
            continue
        signs += 1
        scale, bw, bh = sign_size(len(sign["word"]), w, h)
        x0, y0 = place(sign["x"], bw, w), place(sign["y"], bh, h)
        colour = img[y0, x0].astype(int)                     # the box's corner is never ink
        ink = np.abs(img.astype(int) - colour).sum(-1) > 30
        # Self-check of the layout: the padding band (2*scale px) along the box's top and left
        # edges holds no ink (a box placed wrongly would cut through letters or background).
        pad = 2 * scale
        if ink[y0:y0 + pad, x0:x0 + bw].any() or ink[y0:y0 + bh, x0:x0 + pad].any():
            mismatches += 1
        for py in range(y0 // PATCH, h // PATCH):
            for px in range(x0 // PATCH, w // PATCH):
                ys, xs = py * PATCH, px * PATCH
                if not (ys >= y0 and xs >= x0 and ys + PATCH <= y0 + bh and xs + PATCH <= x0 + bw):
                    continue
                m = ink[ys:ys + PATCH, xs:xs + PATCH]
                key = m.tobytes()
                masks[key] += 1
                patch = img[ys:ys + PATCH, xs:xs + PATCH]
                ink_rgb = tuple(patch[m][0]) if m.any() else None
                with_colours[(key, tuple(colour), ink_rgb)] += 1
                if codes is not None:
                    c = int(codes[k, py, px])
                    code_count[c] += 1
                    mask_code[(key, c)] += 1
    n = sum(masks.values())
    out = dict(samples=len(samples), signs=signs, layout_mismatches=mismatches, patches_inside_signs=n,
               distinct_masks=len(masks), mask_bits=round(entropy(masks), 2),
               distinct_with_colours=len(with_colours), bits_with_colours=round(entropy(with_colours), 2))
    if codes is not None:
        out.update(distinct_codes=len(code_count), code_bits=round(entropy(code_count), 2),
                   mask_bits_given_code=round(conditional_entropy(mask_code), 2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
