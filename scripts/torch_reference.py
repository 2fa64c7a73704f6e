#!/usr/bin/env python3
"""PyTorch/transformers reference run of Emu3 text-to-image generation.

Loads any transformers-format Emu3 checkpoint directory (``Emu3ForConditionalGeneration``
with a ``tokenizer.json``), for example ``BAAI/Emu3-Gen-hf`` or the tiny fixtures in
``tests/fixtures/``. It builds the conditional and negative prompts the way BAAI's
``image_generation.py`` does and runs ``model.generate`` with classifier-free guidance
and the Emu3 prefix constraint. It then prints ONE JSON line with the generated ids,
the image code grid, timings and peak memory. Use it to compare Tessera's tokens and
speed with PyTorch side by side.

Prompt format (Emu3 port spec §3.3, BAAI processing_emu3.py):

    cond = BOS + caption + "<|image start|>" + f"{H}*{W}" + "<|image token|>"
    neg  = BOS + negative + "<|image start|>" + f"{H}*{W}" + "<|image token|>"

H and W are token-grid sizes. The caption and the negative text are tokenized with
``tokenizer.json`` (no BOS added by the tokenizer). The special tokens are spliced in as
ids looked up in the tokenizer by their strings.

Generation settings:
* CFG: ``guidance_scale`` + ``negative_prompt_ids``. transformers adds
  ``UnbatchedClassifierFreeGuidanceLogitsProcessor`` first, then the
  ``PrefixConstrainedLogitsProcessor`` built from ``prefix_allowed_tokens_fn``.
* Decoding is greedy (``--top-k 0``, the default) or top-k sampling (``--top-k K``,
  temperature 1, seeded with ``--seed``). BAAI uses top-k 2048.

Example:

    python scripts/torch_reference.py --model tests/fixtures/tiny-t4 --grid 3x4
    python scripts/torch_reference.py --model /path/to/Emu3-Gen-hf --grid 32x32 \\
        --dtype bfloat16 --device cuda --top-k 2048 --quality-suffix --out-png out.png

Tested with torch 2.15.0 and transformers 5.24.0 (the ``cache`` kwarg rename and
``dtype=`` in ``from_pretrained`` are v5 spellings; 4.5x may need small changes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

# Emu3 special-token strings (spec §3.1).
PAD = "<|endoftext|>"
BOS = "<|extra_203|>"
EOS = "<|extra_204|>"
IMAGE = "<image>"
EOL = "<|extra_200|>"
EOF = "<|extra_201|>"
IMG = "<|image token|>"  # IMG / SOT: starts the visual block
BOI = "<|image start|>"  # BOI / SOV
EOI = "<|image end|>"  # EOI / EOV
VISUAL_FMT = "<|visual token {:06d}|>"

SPECIAL_TOKENS = {
    "pad": PAD,
    "bos": BOS,
    "eos": EOS,
    "image": IMAGE,
    "eol": EOL,
    "eof": EOF,
    "img": IMG,
    "boi": BOI,
    "eoi": EOI,
}

# BAAI image_generation.py prompt texts.
QUALITY_SUFFIX = " masterpiece, film grained, best quality."
NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
    "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
    "username, blurry."
)


def special_ids(vocab: dict[str, int]) -> dict[str, int]:
    """Map role -> id for the Emu3 special tokens, looked up by string in a vocab."""
    return {role: vocab[tok] for role, tok in SPECIAL_TOKENS.items()}


def visual_ids(vocab: dict[str, int]) -> list[int]:
    """Sorted ids of all ``<|visual token NNNNNN|>`` entries (like Emu3ImageVocabularyMapping)."""
    return sorted(v for k, v in vocab.items() if k.startswith("<|visual token"))


def build_prompt_ids(tokenizer, ids: dict[str, int], text: str, height: int, width: int) -> list[int]:
    """BOS + text + BOI + "H*W" + IMG as a list of ids (``tokenizer`` is a tokenizers.Tokenizer)."""
    text_ids = tokenizer.encode(text, add_special_tokens=False).ids
    meta_ids = tokenizer.encode(f"{height}*{width}", add_special_tokens=False).ids
    return [ids["bos"], *text_ids, ids["boi"], *meta_ids, ids["img"]]


def make_prefix_allowed_tokens_fn(ids: dict[str, int], vis: list[int], height: int, width: int):
    """Emu3 prefix constraint (spec §4.1, BAAI Emu3PrefixConstrainedLogitsHelper).

    ``o`` = len(seq) - index of the first IMG token = 1-based offset of the token about
    to be generated. The checks run in this order: EOL every W+1, then EOF, EOI, EOS, PAD,
    otherwise any visual token.
    """
    img_pos: dict[int, int] = {}
    n = (width + 1) * height

    def fn(batch_id: int, input_ids):
        if batch_id not in img_pos:
            img_pos[batch_id] = input_ids.tolist().index(ids["img"])
        o = input_ids.shape[0] - img_pos[batch_id]
        if o % (width + 1) == 0:
            return [ids["eol"]]
        if o == n + 1:
            return [ids["eof"]]
        if o == n + 2:
            return [ids["eoi"]]
        if o == n + 3:
            return [ids["eos"]]
        if o > n + 3:
            return [ids["pad"]]
        return vis

    return fn


def max_new_tokens_for(height: int, width: int) -> int:
    """H rows of (W visual + EOL), then EOF, EOI, EOS."""
    return height * (width + 1) + 3


def generation_config(ids, height, width, cfg, top_k):
    from transformers import GenerationConfig

    kw = dict(
        max_new_tokens=max_new_tokens_for(height, width),
        guidance_scale=cfg,
        use_cache=True,
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
    )
    if top_k and top_k > 0:
        kw.update(do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0)
    else:
        kw.update(do_sample=False, top_k=None, top_p=None, temperature=None)
    return GenerationConfig(**kw)


def codes_from_generated(new_ids: list[int], ids, bpe2img: dict[int, int], height: int, width: int):
    """Split the generated tokens (after IMG) into the H x W code grid; checks the EOL column."""
    grid = []
    for r in range(height):
        row = new_ids[r * (width + 1) : (r + 1) * (width + 1)]
        if len(row) != width + 1 or row[-1] != ids["eol"]:
            raise ValueError(f"row {r} is not W visual tokens + EOL: {row}")
        grid.append([bpe2img[t] for t in row[:-1]])
    return grid


def to_uint8_image(pixels):
    """Spec §4.5: x*0.5+0.5, *255, clip, truncate to uint8, CHW->HWC."""
    import numpy as np

    x = pixels.float().cpu().numpy()
    x = (x * 0.5 + 0.5) * 255.0
    x = np.clip(x, 0, 255).astype(np.uint8)
    return x.transpose(1, 2, 0)


def parse_grid(s: str) -> tuple[int, int]:
    h, w = s.lower().split("x")
    return int(h), int(w)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Emu3 checkpoint dir (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--prompt", default="a red cat sits on a mat.", help="caption text")
    p.add_argument("--quality-suffix", action="store_true", help=f"append BAAI's suffix {QUALITY_SUFFIX!r}")
    p.add_argument("--negative-prompt", default=NEGATIVE_PROMPT, help="negative (unconditional) caption text")
    p.add_argument("--grid", default="3x4", type=parse_grid, help="token grid HxW (e.g. 90x90 for 720x720 px)")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale (1 disables CFG)")
    p.add_argument("--top-k", type=int, default=0, help="0 = greedy; K > 0 = top-k sampling (BAAI: 2048)")
    p.add_argument("--seed", type=int, default=0, help="torch seed for sampling")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out-png", default=None, help="decode the image and save it as PNG")
    args = p.parse_args(argv)

    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import Emu3ForConditionalGeneration

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    height, width = args.grid

    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    load_kw = {"device_map": args.device} if args.device == "cuda" else {}
    model = Emu3ForConditionalGeneration.from_pretrained(args.model, dtype=dtype, **load_kw).eval()
    if args.device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    ids = special_ids(vocab)
    vis = visual_ids(vocab)
    bpe2img = model.vocabulary_mapping.bpe2img

    caption = args.prompt + (QUALITY_SUFFIX if args.quality_suffix else "")
    cond = build_prompt_ids(tokenizer, ids, caption, height, width)
    neg = build_prompt_ids(tokenizer, ids, args.negative_prompt, height, width)
    cond_t = torch.tensor([cond], dtype=torch.long, device=args.device)
    neg_t = torch.tensor([neg], dtype=torch.long, device=args.device)

    gen_cfg = generation_config(ids, height, width, args.cfg, args.top_k)
    prefix_fn = make_prefix_allowed_tokens_fn(ids, vis, height, width)
    torch.manual_seed(args.seed)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            cond_t,
            attention_mask=torch.ones_like(cond_t),
            generation_config=gen_cfg,
            negative_prompt_ids=neg_t if args.cfg != 1 else None,
            prefix_allowed_tokens_fn=prefix_fn,
        )
    if args.device == "cuda":
        torch.cuda.synchronize()
    gen_s = time.perf_counter() - t1

    new_ids = out[0, len(cond) :].tolist()
    reached_eos = ids["eos"] in new_ids
    codes = codes_from_generated(new_ids, ids, bpe2img, height, width)
    tail_ok = new_ids[height * (width + 1) : height * (width + 1) + 3] == [ids["eof"], ids["eoi"], ids["eos"]]

    result = {
        "model": os.path.basename(os.path.normpath(args.model)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "grid": [height, width],
        "cfg": args.cfg,
        "top_k": args.top_k,
        "seed": args.seed,
        "caption": caption,
        "cond_ids": cond,
        "neg_ids": neg,
        "generated_ids": new_ids,
        "image_codes": codes,
        "num_new_tokens": len(new_ids),
        "reached_eos": reached_eos,
        "tail_ok": tail_ok,
        "load_s": round(load_s, 4),
        "wall_s": round(gen_s, 4),
        "tokens_per_s": round(len(new_ids) / gen_s, 3) if gen_s > 0 else None,
        # ru_maxrss is KiB on Linux; it includes the weights loaded in host memory.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if args.device == "cuda":
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()

    if args.out_png:
        from PIL import Image

        with torch.no_grad():
            pixels = model.decode_image_tokens(image_tokens=out[:, len(cond) :], height=height, width=width)
        Image.fromarray(to_uint8_image(pixels[0])).save(args.out_png)
        result["out_png"] = args.out_png
        result["image_size"] = list(pixels.shape[-2:])

    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
