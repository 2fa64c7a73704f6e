#!/usr/bin/env python3
"""Write a random-weight Emu3 checkpoint directory for benchmarks.

The directory loads in both transformers (``Emu3ForConditionalGeneration.from_pretrained``)
and Tessera (``tessera gen --model DIR``): config.json (with ``vocabulary_map``),
model.safetensors (or shards of at most ``--max-shard-gb`` plus model.safetensors.index.json,
on-disk tensor names ``text_model.model.*`` / ``text_model.lm_head.*`` / ``vqmodel.*``)
and tokenizer.json.

    python scripts/make_random_model.py --preset default --out DIR [--tessera-grids]
    python scripts/make_random_model.py --preset tiny --out DIR
    python scripts/make_random_model.py --preset emu3-gen --out DIR --device cuda   # 8.49B, bf16, ~17 GB

Presets:
* ``default``: the shape intended for Tessera's shipped model. LM hidden 384, 10 layers,
  6 heads / 2 kv heads (head_dim 64), intermediate 1024, max 1024 positions, vocabulary of
  2048 BPE ids + 9 specials + 4096 visual tokens (about 20.5M LM parameters). VQ: codebook
  4096 x 8, base 64, multipliers [1,2,2,4] (8x spatial), 2 res blocks, no attention
  levels, temporal factor 1, so 16x16 codes decode to a 128x128 image.
* ``tiny``: a few-MB model for smoke tests (same layout, small everything).
* ``emu3-gen``: the real Emu3-Gen shape (port spec §2.2: hidden 4096, 32 layers, 32/8
  heads, intermediate 14336, vocab 184622; transformers' VQ defaults), bf16 by default.
  Its token ids follow the real layout: BPE 0..151642 (a small trained BPE padded with
  filler entries), ``<|endoftext|>`` 151643, ``<image>`` 151646, ``<|extra_K|>``
  151646+K, ``<|image token|>`` 151851, ``<|image start|>`` 151852, ``<|image end|>``
  151853, visual tokens 151854..184621.

Weights: no model is built; a transformers model on the meta device supplies the tensor
names and shapes, and each tensor is drawn directly on ``--device`` in the target dtype
(so emu3-gen is written in about the time it takes to write 17 GB). Linear, conv and
embedding weights ~ N(0, 0.02), biases ~ N(0, 0.02), RMSNorm/GroupNorm/BatchNorm scales
~ 1 + N(0, 0.02), BatchNorm running means ~ N(0, 0.1) and variances ~ U(0.5, 1.5), the
VQ codebook ~ N(0, 1). Tensors are drawn in sorted-name order from one generator seeded
with ``--seed``; the same seed gives the same bytes on the same device type (CPU and
CUDA generators differ).

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on a few
sentences (digits split one per token, like Qwen/Emu3's regex), padded with unreachable
filler entries up to the preset's BPE size, then the Emu3 special tokens and one
``<|visual token NNNNNN|>`` per code as added special tokens. ``vocabulary_map`` in
config.json is the whole vocabulary, as in the hub's Emu3-Gen-hf.

``--tessera-grids`` adds Tessera's metadata block to config.json
(``{"grids": [[16,16],[12,20],[20,12]], "unconditional_prompt": ""}``).

Tested with torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3, safetensors 0.8.0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------

PRESETS = {
    "default": dict(
        bpe_size=2048,
        layout="compact",
        dtype="f32",
        text=dict(
            hidden_size=384,
            intermediate_size=1024,
            num_hidden_layers=10,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=1024,
            rms_norm_eps=1e-5,
            rope_theta=1_000_000.0,
        ),
        vq=dict(
            codebook_size=4096,
            embed_dim=8,
            latent_channels=8,
            base_channels=64,
            channel_multiplier=[1, 2, 2, 4],
            num_res_blocks=2,
            attn_resolutions=[],
            hidden_size=256,
            num_attention_heads=1,
            temporal_downsample_factor=1,
        ),
    ),
    "tiny": dict(
        bpe_size=256,
        layout="compact",
        dtype="f32",
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=1024,
            rms_norm_eps=1e-5,
            rope_theta=1_000_000.0,
        ),
        vq=dict(
            codebook_size=512,
            embed_dim=4,
            latent_channels=4,
            base_channels=32,
            channel_multiplier=[1, 1, 1, 1],
            num_res_blocks=1,
            attn_resolutions=[],
            hidden_size=32,
            num_attention_heads=1,
            temporal_downsample_factor=1,
        ),
    ),
    "emu3-gen": dict(
        bpe_size=151643,
        layout="emu3",
        dtype="bf16",
        text=dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=9216,
            rms_norm_eps=1e-5,
            rope_theta=1_000_000.0,
        ),
        vq={},  # transformers' Emu3VQVAEConfig defaults = the real Emu3 vision tokenizer
    ),
}

# Emu3 special-token strings (port spec §3.1), shared with scripts/torch_reference.py.
PAD = "<|endoftext|>"
BOS = "<|extra_203|>"
EOS = "<|extra_204|>"
IMAGE = "<image>"
EOL = "<|extra_200|>"
EOF = "<|extra_201|>"
IMG = "<|image token|>"
BOI = "<|image start|>"
EOI = "<|image end|>"
VISUAL_FMT = "<|visual token {:06d}|>"

TESSERA_META = {"grids": [[16, 16], [12, 20], [20, 12]], "unconditional_prompt": ""}

CORPUS = [
    "a red cat sits on a mat.",
    "a blue dog runs in the park.",
    "a portrait of young girl.",
    "a photo of a small house by the lake.",
    "two birds fly over the green hills at dawn.",
    "an old man reads a book under a tree.",
    "the city at night, with bright lights and rain.",
    "a bowl of fruit on a wooden table.",
    "a white horse stands in a field of flowers.",
    "a castle on a mountain, clouds in the sky.",
    "a boat on the sea at sunset.",
    "a red circle above a blue square.",
    "a green triangle to the left of a yellow star.",
    "masterpiece, film grained, best quality.",
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped,",
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry.",
    "The quick brown fox jumps over the lazy dog.",
    "We count 1 2 3 4 5 6 7 8 9 10 and then 90*90 or 16*16 or 12*20.",
]


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def special_layout(layout: str) -> list[tuple[str, int]]:
    """(token, offset from the first special id) for the Emu3 specials."""
    if layout == "emu3":
        # The real Emu3 ids relative to 151643: endoftext, im_start, im_end, then <image> in
        # place of <|extra_0|> and <|extra_K|> at 3+K up to K=204, then image token/start/end.
        out = [(PAD, 0), ("<|im_start|>", 1), ("<|im_end|>", 2), (IMAGE, 3)]
        out += [(f"<|extra_{k}|>", 3 + k) for k in range(1, 205)]
        out += [(IMG, 208), (BOI, 209), (EOI, 210)]
        return out
    names = [PAD, IMAGE, EOL, EOF, BOS, EOS, IMG, BOI, EOI]
    return [(n, i) for i, n in enumerate(names)]


def build_tokenizer(bpe_size: int, layout: str, codebook_size: int):
    """Byte-level BPE (digits isolated) padded to ``bpe_size`` ids, then specials, then visual tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(bpe_size, 4096),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)

    # Pad the BPE model's vocab with filler entries that no merge can produce.
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    trained = len(vocab)
    if trained > bpe_size:
        raise SystemExit(f"trained BPE has {trained} ids, more than the preset's {bpe_size}")
    for i in range(trained, bpe_size):
        vocab[f"<filler_{i:06d}>"] = i
    tok = Tokenizer.from_str(json.dumps(data))

    def added(s):
        return AddedToken(s, special=True, normalized=False)

    specials = special_layout(layout)
    n_special = max(off for _, off in specials) + 1
    by_offset = dict((off, name) for name, off in specials)
    # Every id gets a token so the ids are dense (gaps become <|reserved_N|>).
    tok.add_special_tokens([added(by_offset.get(i, f"<|reserved_{i}|>")) for i in range(n_special)])
    tok.add_special_tokens([added(VISUAL_FMT.format(k)) for k in range(codebook_size)])

    full = tok.get_vocab(with_added_tokens=True)
    first_special = bpe_size
    for name, off in specials:
        assert full[name] == first_special + off, (name, full[name], first_special + off)
    ids = sorted(full.values())
    assert ids == list(range(len(ids))), "vocab ids must be dense"
    for s, n in [("16*16", 5), ("12*20", 5)]:
        assert len(tok.encode(s, add_special_tokens=False).ids) == n, s
    return tok, trained


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def build_config(preset: dict, vocab: dict[str, int], dtype_name: str):
    from transformers import Emu3Config, Emu3TextConfig, Emu3VQVAEConfig

    t = dict(preset["text"])
    theta = t.pop("rope_theta")
    text_config = Emu3TextConfig(
        vocab_size=len(vocab),
        hidden_act="silu",
        attention_dropout=0.0,
        pad_token_id=vocab[PAD],
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=False,
        **t,
    )
    vq_config = Emu3VQVAEConfig(**preset["vq"])
    config = Emu3Config(
        text_config=text_config.to_dict(),
        vq_config=vq_config.to_dict(),
        vocabulary_map=dict(sorted(vocab.items(), key=lambda kv: kv[1])),
        tie_word_embeddings=False,
    )
    config.architectures = ["Emu3ForConditionalGeneration"]
    config.dtype = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[dtype_name]
    return config


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------


def on_disk_name(name: str) -> str:
    """In-memory transformers names -> the legacy names save_pretrained writes (spec §2.3)."""
    if name.startswith("model.text_model."):
        return "text_model.model." + name[len("model.text_model.") :]
    if name.startswith("lm_head."):
        return "text_model." + name
    if name.startswith("model.vqmodel."):
        return "vqmodel." + name[len("model.vqmodel.") :]
    raise ValueError(f"unexpected tensor name {name}")


def tensor_plan(config):
    """[(on-disk name, shape, kind)] from a model on the meta device; kind says how to draw it."""
    import torch
    from transformers import Emu3ForConditionalGeneration

    with torch.device("meta"):
        model = Emu3ForConditionalGeneration(config)
    kinds = {}
    for mname, m in model.named_modules():
        cls = type(m).__name__
        for pname, _ in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(m, torch.nn.BatchNorm3d) and pname in ("running_mean", "running_var", "num_batches_tracked"):
                kind = pname
            elif "Norm" in cls or isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm3d, torch.nn.LayerNorm)):
                kind = "norm_weight" if pname == "weight" else "bias"
            elif mname.endswith("quantize.embedding"):
                kind = "codebook"
            elif pname == "bias":
                kind = "bias"
            else:
                kind = "weight"
            kinds[full] = kind
    state = model.state_dict()
    plan = []
    for name, t in state.items():
        if name not in kinds:
            raise ValueError(f"no module found for {name}")
        plan.append((on_disk_name(name), tuple(t.shape), kinds[name], t.dtype))
    plan.sort()
    return plan


def draw(shape, kind, dtype, gen, device):
    import torch

    if kind == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.int64, device=device)
    if kind == "running_var":
        return (torch.rand(shape, generator=gen, device=device, dtype=torch.float32) + 0.5).to(dtype)
    std = {"weight": 0.02, "bias": 0.02, "norm_weight": 0.02, "running_mean": 0.1, "codebook": 1.0}[kind]
    # randn in the target dtype directly: no f32 copy of an 8B model on the way.
    x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    x.mul_(std)
    if kind == "norm_weight":
        x.add_(1.0)
    return x


def write_weights(out: str, plan, dtype, seed: int, device: str, max_shard_bytes: int):
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator(device=device).manual_seed(seed)
    nbytes = lambda shape, dt: int(torch.Size(shape).numel()) * (torch.finfo(dt).bits // 8 if dt.is_floating_point else 8)
    # Pack tensors in name order into shards of at most max_shard_bytes.
    shards, cur, cur_bytes = [], [], 0
    for entry in plan:
        name, shape, kind, meta_dtype = entry
        dt = torch.int64 if kind == "num_batches_tracked" else dtype
        b = nbytes(shape, dt)
        if cur and cur_bytes + b > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(entry)
        cur_bytes += b
    if cur:
        shards.append(cur)

    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, shape, kind, _ in shard:
            t = draw(shape, kind, dtype, gen, device)
            tensors[name] = t.cpu().contiguous()
            weight_map[name] = fname
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, os.path.join(out, fname), metadata={"format": "pt"})
        os.chmod(os.path.join(out, fname), 0o644)
        print(f"  wrote {fname} ({len(tensors)} tensors)", file=sys.stderr)
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    return total, n


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def verify(out: str, vocab: dict[str, int]):
    """Reload with transformers (every tensor present, none unexpected) and run one forward."""
    import torch
    from transformers import Emu3ForConditionalGeneration

    model, info = Emu3ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, bad
    with torch.no_grad():
        ids = torch.tensor([[vocab[BOS], vocab[BOI], vocab[IMG]]])
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    print("  verified: transformers loads it with no missing/unexpected tensors", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--out", required=True, help="output directory (created; must be empty or absent)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["f32", "bf16", "f16"], default=None, help="stored dtype [preset's]")
    p.add_argument("--device", default="cpu", help="where to draw the weights: cpu, cuda, cuda:1 ...")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file, in GB (1e9 bytes)")
    p.add_argument("--tessera-grids", action="store_true", help="add Tessera's metadata block (grids, unconditional prompt)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's LM layer count (e.g. a 1-layer emu3-gen to test the pipeline)")
    p.add_argument("--verify", action="store_true", help="reload with transformers and run a forward (slow for emu3-gen)")
    args = p.parse_args(argv)

    import torch

    preset = dict(PRESETS[args.preset])
    if args.layers is not None:
        preset["text"] = dict(preset["text"], num_hidden_layers=args.layers)
    dtype_name = args.dtype or preset["dtype"]
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype_name]
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise SystemExit(f"{args.out} exists and is not empty")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()

    from transformers import Emu3VQVAEConfig

    codebook = preset["vq"].get("codebook_size", Emu3VQVAEConfig().codebook_size)
    tok, trained = build_tokenizer(preset["bpe_size"], preset["layout"], codebook)
    vocab = tok.get_vocab(with_added_tokens=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))

    config = build_config(preset, vocab, dtype_name)
    config.save_pretrained(args.out)
    if args.tessera_grids:
        path = os.path.join(args.out, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["tessera"] = TESSERA_META
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")

    plan = tensor_plan(config)
    total, n_files = write_weights(args.out, plan, dtype, args.seed, args.device, int(args.max_shard_gb * 1e9))
    lm = sum(int(torch.Size(s).numel()) for n, s, _, _ in plan if n.startswith("text_model."))
    vq = sum(int(torch.Size(s).numel()) for n, s, k, _ in plan if n.startswith("vqmodel.") and k != "num_batches_tracked")
    summary = {
        "preset": args.preset,
        "layers": preset["text"]["num_hidden_layers"],
        "out": args.out,
        "dtype": dtype_name,
        "seed": args.seed,
        "vocab_size": len(vocab),
        "bpe_trained": trained,
        "bpe_size": preset["bpe_size"],
        "visual_first_id": vocab[VISUAL_FMT.format(0)],
        "lm_params": lm,
        "lm_params_without_embedding": lm - len(vocab) * preset["text"]["hidden_size"],
        "vq_params": vq,
        "tensors": len(plan),
        "weight_bytes": total,
        "files": n_files,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if args.verify:
        verify(args.out, vocab)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
