#!/usr/bin/env python3
"""Build the tiny random Emu3 checkpoints and PyTorch reference outputs in tests/fixtures/.

Run it from the repository root, with a Python environment that has torch, transformers,
tokenizers, safetensors and numpy:

    python scripts/make_fixtures.py

Generated with torch 2.15.0 (the +cu132 wheel, run on CPU) and transformers 5.24.0 (tokenizers 0.23.3,
safetensors 0.8.0). Other versions may produce different bytes. reference.json records
the versions that were actually used.

What it writes. Everything is rebuilt from fixed seeds and the two directories are
replaced. For each of tests/fixtures/tiny-t4 and tests/fixtures/tiny-t1:

* config.json, generation_config.json, model.safetensors: a complete transformers Emu3
  checkpoint written by ``Emu3ForConditionalGeneration.save_pretrained``. Weights are
  f32 and use the on-disk legacy names ``text_model.model.*``, ``text_model.lm_head.*``
  and ``vqmodel.*``.
* tokenizer.json: a tiny byte-level BPE trained on ASCII sentences, plus the Emu3 special
  tokens and one ``<|visual token NNNNNN|>`` per codebook entry as added special tokens.
  The config's ``vocabulary_map`` is exactly this vocab. Digits are split one per token,
  as with Qwen/Emu3's regex, so the meta text "3*4" is "3", "*", "4". It covers ASCII only:
  characters it has not seen are dropped.
* reference.safetensors / reference.json: PyTorch outputs for the Rust parity tests. They
  cover the LM prefill and KV-cache steps, VQ encode and VQ decode, and greedy CFG
  generation with the prefix constraint plus decoding of the generated image.
  reference.json has the strings, ids, settings and a description of every tensor.

Why the weights are re-randomized: the HF init leaves the norms at weight 1 / bias 0, the
BatchNorm running stats at 0/1 and the codebook near zero (uniform +-1/K). It also scales
the LM so that activations vanish. A port could then get those parts wrong and still
match. So every norm affine, every BN buffer, the codebook and the LM weights are redrawn
with O(1) scales (spec §6). After that, each VQ conv/linear weight is rescaled in
execution order on a calibration input (LSUV-style), so the latents have unit spread and
the encode codes are diverse. The VQ encode input is re-drawn (from the next seed) until
every argmin has a clear margin, and the CFG caption is swapped until every greedy step
has a clear top-1/top-2 gap. The script asserts both.

Why these configs: both must stay under 2 MiB in total. GroupNorm(32) forces >= 32
channels, and the VQ attention width must equal base*mult[-1]. The spec's mult [1,2]
(hidden 64) would be about 2.7 MiB for the VQ alone, so both fixtures use 32-channel VQs:
* tiny-t4: temporal factor 4, mult [1,1] (spatial factor 2), attention at level 1.
* tiny-t1: temporal factor 1, mult [1] (spatial factor 1), no level attention.
The LMs differ in kv heads, rope theta, rms eps, intermediate size, vocab padding and the
head: t1 ties it to the embedding (``tie_word_embeddings``: no ``lm_head`` tensor on disk). The
vocab layouts differ as well: in t4 the visual tokens come after the specials, in t1
before them.

Determinism: one CPU thread, fixed seeds. Running the script twice gives byte-identical
files. At the end, each directory is reloaded with ``Emu3ForConditionalGeneration.from_pretrained``
and ``PreTrainedTokenizerFast(tokenizer_file=...)`` and checked against the references.

The prompt building and the prefix constraint are shared with scripts/torch_reference.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    Emu3Config,
    Emu3ForConditionalGeneration,
    Emu3TextConfig,
    Emu3VQVAEConfig,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as tr  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")

# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

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
    "a cup of coffee and a cake.",
    "masterpiece, film grained, best quality.",
    "a red cat sits on a mat. masterpiece, film grained, best quality.",
    "a portrait of young girl. masterpiece, film grained, best quality.",
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped,",
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry.",
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore.",
    "It was the best of times, it was the worst of times.",
    "Images are made of pixels; pixels are made of colors.",
    "We count 1 2 3 4 5 6 7 8 9 10 and then 90*90 or 3*4 or 12*16.",
    "In 2024 there were 365 days, 52 weeks and 12 months.",
    "Hello, world! How are you today?",
    "Tokens: <a> [b] {c} (d) \"e\" 'f' #g $h %i &j @k ^l _m `n |o ~p +q =r /s \\t -u :v ;w ?x",
    "A Large Language Model generates one token at a time.",
    "Emu3 turns text into images with next-token prediction.",
    "the rain in spain stays mainly in the plain.",
    "a snowy forest with tall pine trees.",
    "an astronaut riding a horse on the moon.",
    "a watercolor painting of a quiet village.",
    "a close-up photo of a yellow flower.",
]

BPE_VOCAB_SIZE = 160  # 95 printable ASCII byte symbols + merges


def printable_ascii_alphabet() -> list[str]:
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return [bl.pre_tokenize_str(chr(b))[0][0] for b in range(0x20, 0x7F)]


def build_tokenizer(codebook_size: int, visual_first: bool) -> Tokenizer:
    """Byte-level BPE with digits isolated, then Emu3 specials and visual tokens (added, special).

    visual_first=False: [BPE][pad, image, eol, eof, bos, eos, img, boi, eoi][visual 0..K-1]
    (the real Emu3 order); visual_first=True: [BPE][visual 0..K-1][specials, other order].
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=printable_ascii_alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)

    specials_real_order = [tr.PAD, tr.IMAGE, tr.EOL, tr.EOF, tr.BOS, tr.EOS, tr.IMG, tr.BOI, tr.EOI]
    specials_other_order = [tr.BOS, tr.EOS, tr.PAD, tr.IMG, tr.BOI, tr.EOI, tr.EOL, tr.EOF, tr.IMAGE]
    visual = [tr.VISUAL_FMT.format(k) for k in range(codebook_size)]

    def added(strings):
        return [AddedToken(s, special=True, normalized=False) for s in strings]

    if visual_first:
        tok.add_special_tokens(added(visual))
        tok.add_special_tokens(added(specials_other_order))
    else:
        tok.add_special_tokens(added(specials_real_order))
        tok.add_special_tokens(added(visual))
    return tok


def check_tokenizer(tok: Tokenizer, vocab: dict[str, int]):
    # Digits one per token, "3*4" round-trips.
    for s, n in [("3*4", 3), ("12*16", 5), ("90*90", 5)]:
        enc = tok.encode(s, add_special_tokens=False)
        assert len(enc.ids) == n, (s, enc.tokens)
        assert tok.decode(enc.ids, skip_special_tokens=False) == s
    for t in tr.SPECIAL_TOKENS.values():
        enc = tok.encode("x" + t + "y", add_special_tokens=False)
        assert vocab[t] in enc.ids, (t, enc.tokens)
    text = "a red cat sits on a mat. masterpiece, film grained, best quality."
    assert tok.decode(tok.encode(text).ids) == text
    ids = sorted(vocab.values())
    assert ids == list(range(len(ids))), "vocab ids must be dense"


# --------------------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------------------

FIXTURE_SPECS = {
    "tiny-t4": dict(
        seed=1234,
        visual_first=False,
        tied=False,
        vocab_pad_to=1,  # vocab_size == len(tokenizer)
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            rope_theta=1_000_000.0,
        ),
        vq=dict(
            codebook_size=64,
            embed_dim=4,
            latent_channels=4,
            base_channels=32,
            channel_multiplier=[1, 1],
            num_res_blocks=1,
            attn_resolutions=[1],
            hidden_size=32,
            num_attention_heads=1,
            temporal_downsample_factor=4,
        ),
        vq_encode_hw=(16, 24),  # pixels -> 8 x 12 codes
        vq_decode_hw=(5, 7),  # codes -> 10 x 14 pixels
        grid=(3, 4),
        lm_prompt="a red cat 3*4.",
        captions=[
            "a red cat sits on a mat. masterpiece, film grained, best quality.",
            "a blue dog runs in the park. masterpiece, film grained, best quality.",
            "a boat on the sea at sunset. masterpiece, film grained, best quality.",
        ],
    ),
    "tiny-t1": dict(
        seed=4321,
        visual_first=True,
        tied=True,  # the head is the embedding matrix (tie_word_embeddings)
        vocab_pad_to=16,  # vocab_size rounded up: some ids have no token
        text=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=256,
            rms_norm_eps=1e-6,
            rope_theta=10_000.0,
        ),
        vq=dict(
            codebook_size=48,
            embed_dim=4,
            latent_channels=4,
            base_channels=32,
            channel_multiplier=[1],
            num_res_blocks=1,
            attn_resolutions=[],
            hidden_size=32,
            num_attention_heads=1,
            temporal_downsample_factor=1,
        ),
        vq_encode_hw=(6, 10),  # spatial factor 1 -> 6 x 10 codes
        vq_decode_hw=(4, 7),
        grid=(4, 3),
        lm_prompt="a boat at 90*90.",
        captions=[
            "a white horse stands in a field of flowers.",
            "a snowy forest with tall pine trees.",
            "a cup of coffee and a cake.",
        ],
    ),
}

GUIDANCE_SCALE = 3.0
VQ_MARGIN_REL = 1e-3
GEN_MARGIN = 1e-4
NEG_BIG = -1e30


def build_config(spec, vocab: dict[str, int]) -> Emu3Config:
    ids = tr.special_ids(vocab)
    n = len(vocab)
    pad_to = spec["vocab_pad_to"]
    vocab_size = ((n + pad_to - 1) // pad_to) * pad_to
    t = dict(spec["text"])
    theta = t.pop("rope_theta")
    text_config = Emu3TextConfig(
        vocab_size=vocab_size,
        hidden_act="silu",
        attention_dropout=0.0,
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=spec["tied"],
        **t,
    )
    vq_config = Emu3VQVAEConfig(attention_dropout=0.0, in_channels=3, out_channels=3, double_latent=False, **spec["vq"])
    return Emu3Config(
        text_config=text_config.to_dict(),
        vq_config=vq_config.to_dict(),
        vocabulary_map=dict(sorted(vocab.items(), key=lambda kv: kv[1])),
        tie_word_embeddings=spec["tied"],
    )


# --------------------------------------------------------------------------------------
# Randomization
# --------------------------------------------------------------------------------------


@torch.no_grad()
def randomize(model: Emu3ForConditionalGeneration, gen: torch.Generator):
    def normal_(t, std, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64).mul(std).add(mean).to(t.dtype))

    def uniform_(t, lo, hi):
        t.copy_((torch.rand(t.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(t.dtype))

    text = model.model.text_model
    d = text.config.hidden_size
    # LM: O(1) activations, logits with a spread of a few nats.
    tied = model.config.tie_word_embeddings
    for name, p in sorted(text.named_parameters()):
        if name.endswith("embed_tokens.weight"):
            normal_(p, 2.0 / math.sqrt(d) if tied else 1.0)   # tied: also the head (logits of a few nats)
        elif "norm" in name:
            uniform_(p, 0.5, 1.5)
        else:  # q/k/v/o, gate/up/down: Linear [out, in]
            normal_(p, 1.0 / math.sqrt(p.shape[1]))
    if not model.config.tie_word_embeddings:   # tied: the head is the embedding drawn above
        normal_(model.lm_head.weight, 2.0 / math.sqrt(d))

    vq = model.model.vqmodel
    for mname, m in sorted(vq.named_modules()):
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm3d)):
            uniform_(m.weight, 0.6, 1.4)
            normal_(m.bias, 0.2)
        if isinstance(m, torch.nn.BatchNorm3d):
            normal_(m.running_mean, 0.3)
            uniform_(m.running_var, 0.5, 2.0)
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            fan_in = m.weight[0].numel()
            normal_(m.weight, 1.0 / math.sqrt(fan_in))
            normal_(m.bias, 0.1)
    normal_(vq.quantize.embedding.weight, 1.0)


def _out_std(out: torch.Tensor, channel_dim: int) -> float:
    """Mean over channels of the per-channel std (a per-channel bias does not count)."""
    x = out.double().movedim(channel_dim, 0).reshape(out.shape[channel_dim], -1)
    return x.std(dim=1).mean().item()


@torch.no_grad()
def calibrate(vq, gen: torch.Generator, enc_hw, dec_hw):
    """LSUV-style rescaling of the VQ conv/linear weights (data-dependent, deterministic).

    With plain fan-in scaling the causal temporal convs (which see 2 zero frames) and the
    non-normalizing BatchNorm path shrink the latents to ~0.02 std around a constant, and
    every position maps to the same code. This walks the layers in execution order and
    rescales each weight so that its output has ~unit per-channel std on a calibration
    input. quant_conv gets std 1 (codebook std 1). decoder.conv_out gets 0.5, so pixels
    are mostly in [-1, 1].
    """
    enc_pix = torch.rand((1, 3, *enc_hw), generator=gen) * 2 - 1
    dec_codes = torch.randint(0, vq.config.codebook_size, (1, *dec_hw), generator=gen)
    kinds = (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
    for run in (lambda: vq_encode_parts(vq, enc_pix), lambda: vq.decode(dec_codes)):
        order, hooks = [], []
        for _, m in vq.named_modules():
            if isinstance(m, kinds):
                hooks.append(m.register_forward_hook(lambda mod, i, o: order.append(mod) if mod not in order else None))
        run()
        for h in hooks:
            h.remove()
        for m in order:
            box = {}
            h = m.register_forward_hook(lambda mod, i, o: box.__setitem__("o", o))
            run()
            h.remove()
            std = _out_std(box["o"], -1 if isinstance(m, torch.nn.Linear) else 1)
            target = 0.5 if m is vq.decoder.conv_out else 1.0
            m.weight.mul_(target / max(std, 1e-6))


# --------------------------------------------------------------------------------------
# Reference computations
# --------------------------------------------------------------------------------------


@torch.no_grad()
def vq_encode_parts(vq, pixels: torch.Tensor):
    """Mirror Emu3VQVAE.encode for a 4-D image batch and return the intermediate tensors."""
    t = vq.config.temporal_downsample_factor
    x = pixels.unsqueeze(1).repeat(1, t, 1, 1, 1)
    hidden = vq.encoder(x)  # (B, T', Z, h, w)
    lat = vq.quant_conv(hidden.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)  # (B, T', E, h, w)
    codes = vq.quantize(lat)  # (B, T', h, w)
    return hidden[:, 0], lat[:, 0], codes[:, 0]


def code_margins(latents: torch.Tensor, codebook: torch.Tensor):
    """Relative gap between the best and second-best squared distance, per position (float64)."""
    z = latents.double().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    e = codebook.double()
    d = (z * z).sum(1, keepdim=True) + (e * e).sum(1)[None] - 2 * z @ e.T
    top2 = torch.topk(d, 2, dim=1, largest=False).values
    gap = top2[:, 1] - top2[:, 0]
    return gap / top2[:, 1].abs().clamp_min(1e-12), d.argmin(1)


@torch.no_grad()
def manual_cfg_scores(model, cond, neg, new_ids, prefix_fn, g):
    """Recompute every step's processed scores without the KV cache (full forward each step)."""
    steps = []
    for t in range(len(new_ids)):
        c = torch.tensor([cond + new_ids[:t]])
        u = torch.tensor([neg + new_ids[:t]])
        lc = torch.log_softmax(model(c).logits[0, -1].float(), -1)
        lu = torch.log_softmax(model(u).logits[0, -1].float(), -1)
        s = g * (lc - lu) + lu
        allowed = prefix_fn(0, c[0])
        mask = torch.full_like(s, -math.inf)
        mask[allowed] = 0
        steps.append(s + mask)
    return torch.stack(steps)


def top2_gap(scores: torch.Tensor) -> torch.Tensor:
    v = torch.topk(scores, 2, dim=-1).values
    return v[..., 0] - v[..., 1]


def finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.full_like(x, NEG_BIG))


@torch.no_grad()
def make_fixture(name: str, spec: dict):
    out_dir = os.path.join(FIXTURES, name)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)

    tok = build_tokenizer(spec["vq"]["codebook_size"], spec["visual_first"])
    vocab = tok.get_vocab(with_added_tokens=True)
    check_tokenizer(tok, vocab)
    ids = tr.special_ids(vocab)
    vis = tr.visual_ids(vocab)

    config = build_config(spec, vocab)
    torch.manual_seed(spec["seed"])
    model = Emu3ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(spec["seed"])
    randomize(model, gen)
    model.eval()
    calibrate(model.model.vqmodel, gen, spec["vq_encode_hw"], spec["vq_decode_hw"])

    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"), pretty=True)

    vq = model.model.vqmodel
    s = vq.spatial_scale_factor
    tensors: dict[str, torch.Tensor] = {}
    desc: dict[str, str] = {}

    # ---------------- LM: prefill + KV-cache steps ----------------
    prompt_ids = [ids["bos"]] + tok.encode(spec["lm_prompt"], add_special_tokens=False).ids
    x = torch.tensor([prompt_ids])
    full = model(x, use_cache=True)
    prefill = full.logits.float()
    cache = full.cache
    step_ids = [vis[5], ids["eol"], tok.encode(" cat", add_special_tokens=False).ids[0]]
    step_logits = []
    for sid in step_ids:
        o = model(torch.tensor([[sid]]), cache=cache, use_cache=True)
        cache = o.cache
        step_logits.append(o.logits[0, -1].float())
    step_logits = torch.stack(step_logits)
    # The cached steps must equal a full recompute of the extended sequence.
    ref = model(torch.tensor([prompt_ids + step_ids])).logits[0, len(prompt_ids) :].float()
    assert torch.allclose(ref, step_logits, atol=1e-5), (ref - step_logits).abs().max()
    tensors["lm_prompt_ids"] = x.to(torch.int64)
    tensors["lm_prefill_logits"] = prefill.contiguous()
    tensors["lm_step_ids"] = torch.tensor(step_ids, dtype=torch.int64)
    tensors["lm_step_logits"] = step_logits.contiguous()
    desc["lm_prompt_ids"] = "[1,T] int64: BOS id + tokenizer(lm_prompt) ids"
    desc["lm_prefill_logits"] = "[1,T,V] logits of a full forward of lm_prompt_ids (no cache)"
    desc["lm_step_ids"] = "[3] int64: tokens fed one at a time after the prompt, using the KV cache"
    desc["lm_step_logits"] = "[3,V] logits of each cached step (positions T, T+1, T+2)"

    # ---------------- VQ encode ----------------
    eh, ew = spec["vq_encode_hw"]
    for attempt in range(100):
        g = torch.Generator().manual_seed(spec["seed"] * 1000 + attempt)
        pix = torch.rand((1, 3, eh, ew), generator=g) * 2 - 1
        hidden, lat, codes = vq_encode_parts(vq, pix)
        rel, am = code_margins(lat, vq.quantize.embedding.weight)
        if rel.min().item() > VQ_MARGIN_REL and torch.equal(am.view_as(codes), codes):
            break
    else:
        raise RuntimeError("no VQ encode input with clear argmin margins")
    enc_attempt = attempt
    api = vq.encode(pix, torch.tensor([[eh, ew]])).image_tokens[0]
    assert torch.equal(api, codes[0]), "vq_encode_parts disagrees with Emu3VQVAE.encode"
    tensors["vq_encode_input"] = pix.contiguous()
    tensors["vq_encode_hidden"] = hidden.contiguous()
    tensors["vq_encode_latents"] = lat.contiguous()
    tensors["vq_encode_codes"] = codes.to(torch.int64).contiguous()
    desc["vq_encode_input"] = "[1,3,H,W] f32 in [-1,1], non-square"
    desc["vq_encode_hidden"] = "[1,Z,h,w] encoder output (after time convs / time_res_stack), before quant_conv"
    desc["vq_encode_latents"] = "[1,E,h,w] quant_conv output = continuous latents fed to the quantizer"
    desc["vq_encode_codes"] = "[1,h,w] int64 codebook indices = Emu3VQVAE.encode(...).image_tokens"
    vq_margin = rel.min().item()

    # ---------------- VQ decode ----------------
    dh, dw = spec["vq_decode_hw"]
    g = torch.Generator().manual_seed(spec["seed"] + 7)
    dcodes = torch.randint(0, vq.config.codebook_size, (1, dh, dw), generator=g)
    dpix = vq.decode(dcodes)
    assert dpix.shape == (1, 3, dh * s, dw * s), dpix.shape
    tensors["vq_decode_codes"] = dcodes.to(torch.int64)
    tensors["vq_decode_pixels"] = dpix.float().contiguous()
    desc["vq_decode_codes"] = "[1,h,w] int64 codebook indices, non-square"
    desc["vq_decode_pixels"] = "[1,3,h*s,w*s] Emu3VQVAE.decode output (frame 0), before clamp/uint8"

    # ---------------- Greedy CFG generation ----------------
    H, W = spec["grid"]
    neg_text = tr.NEGATIVE_PROMPT
    for caption in spec["captions"]:
        cond = tr.build_prompt_ids(tok, ids, caption, H, W)
        neg = tr.build_prompt_ids(tok, ids, neg_text, H, W)
        gcfg = tr.generation_config(ids, H, W, GUIDANCE_SCALE, 0)
        gcfg.output_scores = True
        gcfg.return_dict_in_generate = True
        out = model.generate(
            torch.tensor([cond]),
            attention_mask=torch.ones(1, len(cond), dtype=torch.long),
            generation_config=gcfg,
            negative_prompt_ids=torch.tensor([neg]),
            prefix_allowed_tokens_fn=tr.make_prefix_allowed_tokens_fn(ids, vis, H, W),
        )
        seq = out.sequences
        new = seq[0, len(cond) :].tolist()
        gen_scores = torch.cat([sc.float() for sc in out.scores], 0)
        manual = manual_cfg_scores(
            model, cond, neg, new, tr.make_prefix_allowed_tokens_fn(ids, vis, H, W), GUIDANCE_SCALE
        )
        fin = torch.isfinite(manual)
        assert torch.equal(fin, torch.isfinite(gen_scores)), "mask mismatch between generate and manual"
        assert torch.allclose(manual[fin], gen_scores[fin], atol=1e-4), (manual[fin] - gen_scores[fin]).abs().max()
        assert torch.equal(manual.argmax(-1), torch.tensor(new)), "manual greedy != generate"
        gaps = torch.minimum(top2_gap(manual), top2_gap(gen_scores))
        if gaps.min().item() > GEN_MARGIN:
            break
        print(f"[{name}] caption {caption!r}: greedy margin {gaps.min().item():.2e} too small, trying next")
    else:
        raise RuntimeError("no caption with clear greedy margins")
    assert len(new) == tr.max_new_tokens_for(H, W), len(new)
    assert new[-1] == ids["eos"], "generation did not end with EOS"
    codes_grid = tr.codes_from_generated(new, ids, model.vocabulary_mapping.bpe2img, H, W)
    img = model.decode_image_tokens(image_tokens=seq[:, len(cond) :], height=H, width=W)
    direct = vq.decode(torch.tensor([codes_grid]))
    assert torch.equal(img, direct)
    n_distinct = len({c for row in codes_grid for c in row})

    tensors["gen_cond_ids"] = torch.tensor([cond], dtype=torch.int64)
    tensors["gen_neg_ids"] = torch.tensor([neg], dtype=torch.int64)
    tensors["gen_output_ids"] = seq.to(torch.int64).contiguous()
    tensors["gen_step_scores"] = finite(gen_scores).contiguous()
    tensors["gen_image_codes"] = torch.tensor([codes_grid], dtype=torch.int64)
    tensors["gen_image_pixels"] = img.float().contiguous()
    desc["gen_cond_ids"] = "[1,Lc] int64: BOS + caption + BOI + 'H*W' + IMG"
    desc["gen_neg_ids"] = "[1,Ln] int64: BOS + negative_prompt + BOI + 'H*W' + IMG (BAAI form)"
    desc["gen_output_ids"] = "[1,Lc+H*(W+1)+3] int64: the whole sequence returned by generate (prompt + new)"
    desc["gen_step_scores"] = (
        "[H*(W+1)+3,V] per-step processed scores: g*(logsoftmax(cond)-logsoftmax(uncond))+logsoftmax(uncond), "
        f"then prefix mask; disallowed entries are {NEG_BIG:g} instead of -inf. Greedy picks argmax. "
        "These are generate()'s output_scores (KV-cached); a cache-free recompute agrees within 1e-4."
    )
    desc["gen_image_codes"] = "[1,H,W] int64 codebook indices of the generated image (EOL column dropped)"
    desc["gen_image_pixels"] = "[1,3,H*s,W*s] decode_image_tokens output (before clamp/uint8)"

    for k, v in tensors.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
        if v.dtype == torch.float32:
            assert torch.isfinite(v).all(), k
    save_file(dict(sorted(tensors.items())), os.path.join(out_dir, "reference.safetensors"))

    text_cfg = config.text_config
    meta = {
        "fixture": name,
        "generator": "scripts/make_fixtures.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
        "seed": spec["seed"],
        "dtype": "float32",
        "special_token_ids": {role: ids[role] for role in tr.SPECIAL_TOKENS},
        "special_tokens": dict(tr.SPECIAL_TOKENS),
        "visual_token_ids": {"first": vis[0], "last": vis[-1], "count": len(vis), "contiguous": vis == list(range(vis[0], vis[-1] + 1))},
        "tokenizer_len": len(vocab),
        "vocab_size": text_cfg.vocab_size,
        "spatial_factor": s,
        "temporal_downsample_factor": vq.config.temporal_downsample_factor,
        "lm": {
            "prompt": spec["lm_prompt"],
            "prompt_tokens": [tok.id_to_token(i) for i in prompt_ids],
            "step_ids": step_ids,
            "step_tokens": [tok.id_to_token(i) for i in step_ids],
            "prefill_len": len(prompt_ids),
        },
        "vq_encode": {
            "input_hw": [eh, ew],
            "codes_hw": list(codes.shape[-2:]),
            "input_seed": spec["seed"] * 1000 + enc_attempt,
            "min_relative_argmin_margin": vq_margin,
            "distinct_codes": int(codes.unique().numel()),
        },
        "vq_decode": {"codes_hw": [dh, dw], "pixels_hw": [dh * s, dw * s]},
        "generation": {
            "caption": caption,
            "negative_prompt": neg_text,
            "grid": [H, W],
            "meta_text": f"{H}*{W}",
            "guidance_scale": GUIDANCE_SCALE,
            "do_sample": False,
            "max_new_tokens": tr.max_new_tokens_for(H, W),
            "cond_len": len(cond),
            "neg_len": len(neg),
            "num_new_tokens": len(new),
            "new_ids": new,
            "image_codes": codes_grid,
            "distinct_codes": n_distinct,
            "min_top2_gap": gaps.min().item(),
            "image_pixels_hw": [H * s, W * s],
            "notes": (
                "generate() with guidance_scale + negative_prompt_ids + prefix_allowed_tokens_fn; processor order "
                "CFG (log_softmax both, g*(c-u)+u) then prefix mask; the unconditional branch has its own KV cache "
                "and is fed the chosen token each step; positions are arange for both sequences (no padding)."
            ),
        },
        "tensors": {
            k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape), "description": desc[k]}
            for k, v in sorted(tensors.items())
        },
    }
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")

    print(
        f"[{name}] V={text_cfg.vocab_size} tokenizer={len(vocab)} lm_T={len(prompt_ids)} "
        f"logit_std={prefill.std().item():.2f} vq_codes={tuple(codes.shape)} distinct={meta['vq_encode']['distinct_codes']} "
        f"vq_margin={vq_margin:.2e} (attempt {enc_attempt}) dec_std={dpix.std().item():.2f} "
        f"gen_len={len(new)} gen_gap={gaps.min().item():.2e} gen_distinct={n_distinct} caption={caption!r}"
    )
    return out_dir


def verify(out_dir: str):
    """Reload the checkpoint and the tokenizer with the public APIs and rerun a forward."""
    model = Emu3ForConditionalGeneration.from_pretrained(out_dir).eval()
    ref = safetensors.torch.load_file(os.path.join(out_dir, "reference.safetensors"))
    with open(os.path.join(out_dir, "reference.json")) as f:
        meta = json.load(f)
    with torch.no_grad():
        logits = model(ref["lm_prompt_ids"]).logits
    assert torch.allclose(logits, ref["lm_prefill_logits"], atol=1e-5)
    with torch.no_grad():
        pix = model.model.vqmodel.decode(ref["vq_decode_codes"])
    assert torch.allclose(pix, ref["vq_decode_pixels"], atol=1e-5)
    fast = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(out_dir, "tokenizer.json"),
        bos_token=tr.BOS,
        eos_token=tr.EOS,
        pad_token=tr.PAD,
    )
    ids = fast(meta["lm"]["prompt"], add_special_tokens=False)["input_ids"]
    assert [fast.bos_token_id] + ids == ref["lm_prompt_ids"][0].tolist()
    assert fast.decode(ids) == meta["lm"]["prompt"]
    assert fast.convert_tokens_to_ids(tr.IMG) == meta["special_token_ids"]["img"]
    assert fast.get_vocab() == model.config.vocabulary_map
    with safetensors.safe_open(os.path.join(out_dir, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(("text_model.model.", "text_model.lm_head.", "vqmodel.")) for k in keys), keys[:5]
    # A tied head is the embedding: save_pretrained writes no lm_head tensor.
    assert ("text_model.lm_head.weight" in keys) != model.config.tie_word_embeddings


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name, spec in FIXTURE_SPECS.items():
        out_dir = make_fixture(name, spec)
        verify(out_dir)


if __name__ == "__main__":
    main()
