"""Stage 5: train the Emu3 language model on the unified text/image token sequence.

    python3 training/lm.py --run RUN --seconds 420 [--device cuda]

The model is transformers' `Emu3ForCausalLM(Emu3TextConfig(...))` (SDPA attention, no dropout,
bf16 autocast). Sequences, with H, W the token grid and "H*W" the meta text (emu3-port-spec §3):

    t2i   BOS caption SOV "H*W" SOT row_0 EOL ... row_{H-1} EOL EOF EOV EOS
    edit  BOS SOV "H*W" SOT <source rows, EOL-terminated> EOF EOV instruction
              SOV "H*W" SOT <target rows, EOL-terminated> EOF EOV EOS

BOS=<|extra_203|> SOV=<|image start|> SOT=<|image token|> EOL=<|extra_200|> EOF=<|extra_201|>
EOV=<|image end|> EOS=<|extra_204|>. A fraction P_UNCOND of captions / instructions is replaced by
the empty text (the unconditional prompt for classifier-free guidance). The loss covers the target
image block: its visual tokens and EOL, EOF, EOV, EOS; never the prompt or the source image.

All codes and token ids live on the device. One optimizer step = one micro-batch from every
bucket (t2i 16x16, 12x20, 20x12, edit 16x16); sequences are assembled on the device from code
grids and padded text ids (no per-sample Python). The sample indices are drawn on the host (numpy)
where the text lengths are known, so the batch length needs no device-to-host sync; the three t2i
buckets run as one right-padded forward (`--no-merge`: one forward per bucket, as in the first
run), which is exact under causal attention. Writes RUN/lm/{lm.safetensors, lm_config.json,
lm_log.csv}; `--save-every S` rewrites the checkpoint every S seconds while training.

Warm start (`--init ROOT`): continues from the LM shipped in ROOT/weights (or RUN/lm); the run's
tokenizer must be the shipped one (checked), so every id keeps its meaning.
`--grow-layers N` (with --init) inserts N layers that start as the identity (`grow_layers`).
`--ema DECAY` saves a moving average of the weights, started at the first ones, as lm.safetensors,
and the last weights beside it (RUN/lm/lm_last.safetensors, f16), so both can be judged.
`--profile N` prints torch.profiler's top ops for N steps and exits; `--trace-steps N` prints the
same table for N steps of the real run.

Data parallel (`--gpus N`: N processes, one per GPU; on the CPU, N gloo processes for tests;
torchrun's environment works too): every rank trains the same model on its own draw of the
data (seed + 1000 * rank) and the gradients are averaged (one all-reduce of a flat buffer per
step), so a step sees N times the sequences of a single process. Rank 0 alone logs, evaluates,
keeps the moving average and writes the files; the learning-rate clock is rank 0's, shared every
CLOCK_EVERY steps (`Clock`) so every rank applies the same rate without a host sync per step.
"""

import argparse
import csv
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tokenizer as toklib  # noqa: E402  (training/tokenizer.py)
from ddp import Clock, Dist, launch  # noqa: E402  (training/ddp.py)

# ----------------------------------------------------------------------------- defaults
LM_CONFIG = dict(
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=10,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    hidden_act="silu",
    attention_dropout=0.0,
    initializer_range=0.02,
    tie_word_embeddings=False,
)
TINY_LM_CONFIG = dict(LM_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
SECONDS = 420.0
# bucket: (split, kind, sequences per micro-batch)
BUCKETS = [
    ("t2i_16x16", "t2i", 112),
    ("t2i_12x20", "t2i", 24),
    ("t2i_20x12", "t2i", 24),
    ("edit_16x16", "edit", 48),
]
P_UNCOND = 0.1


def bucket_batches(overrides=(), scale=1.0):
    """BUCKETS with each micro-batch multiplied by `scale`, then set by `overrides`
    ("SPLIT=N", e.g. "edit_16x16=80": more of every step for that task)."""
    fixed = {}
    for o in overrides:
        name, _, n = o.partition("=")
        if name not in {b[0] for b in BUCKETS} or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--bucket-batch {o!r}: expected SPLIT=N with SPLIT one of "
                             f"{', '.join(b[0] for b in BUCKETS)} and N >= 1")
        fixed[name] = int(n)
    return [(split, kind, fixed.get(split, max(1, int(round(batch * scale))))) for split, kind, batch in BUCKETS]
LR = 2e-3
MIN_LR_FRAC = 0.1
WARMUP_FRAC = 0.03
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
VAL_FRAC = 0.01            # last 1% of each bucket: validation loss only
EVAL_EVERY = 60.0          # seconds
VAL_N = 256                # validation sequences per bucket, the same ones at every evaluation
VAL_SEED = 12345           # their draw (index sampling only, not a world seed)

# Sequence layouts, documented in config.json by export.py.
T2I_LAYOUT = "<|extra_203|>{caption}<|image start|>{H}*{W}<|image token|>{row_0}<|extra_200|>...{row_H-1}<|extra_200|><|extra_201|><|image end|><|extra_204|>"
EDIT_LAYOUT = ("<|extra_203|><|image start|>{H}*{W}<|image token|>{source rows, each followed by <|extra_200|>}<|extra_201|><|image end|>"
               "{instruction}<|image start|>{H}*{W}<|image token|>{target rows, each followed by <|extra_200|>}<|extra_201|><|image end|><|extra_204|>")


def grid_of(split):
    h, w = split.split("_")[1].split("x")
    return int(h), int(w)


class Bucket:
    """One sequence layout and grid: codes and padded text ids on the device, batches built there."""

    def __init__(self, name, kind, batch, codes, texts, tok, sp, voff, device, val_frac, p_uncond):
        self.name, self.kind, self.batch, self.p_uncond = name, kind, batch, p_uncond
        self.h, self.w = grid_of(name)
        self.device = device
        self.sp = sp
        enc = tok.encode_batch(texts)
        lens = np.array([len(e.ids) for e in enc], dtype=np.int64)
        tmax = max(1, int(lens.max()))
        ids = np.full((len(texts), tmax), sp["pad"], dtype=np.int32)
        for i, e in enumerate(enc):
            ids[i, :len(e.ids)] = e.ids
        n = len(texts)
        n_val = int(n * val_frac) if n >= 200 else 0
        self.n, self.n_train = n, n - n_val
        self.device = torch.device(device)
        self.lens_np = lens
        self.codes = torch.from_numpy(codes.astype(np.int64) + voff).to(device)   # visual ids
        self.text = torch.from_numpy(ids).long().to(device)
        self.lens = torch.from_numpy(lens).to(device)
        self.meta = tok.encode(toklib.meta_text(self.h, self.w)).ids
        self.img_len = self.h * (self.w + 1)
        self.target_len = self.img_len + 3          # target rows + EOF EOV EOS
        self.tmax = tmax
        head = 1 + len(self.meta) + 1               # SOV meta SOT
        # tokens of a sequence besides its text: known on the host, so is every batch's length
        self.fixed = 1 + head + self.target_len if kind == "t2i" else 1 + 2 * head + self.img_len + 2 + self.target_len
        self._consts = {}

    def _img(self, codes):
        """(B,h,w) visual ids -> (B, h*(w+1)) rows each followed by EOL."""
        b = codes.shape[0]
        eol = torch.full((b, self.h, 1), self.sp["eol"], dtype=torch.long, device=self.device)
        return torch.cat([codes, eol], dim=2).reshape(b, self.img_len)

    def _const(self, b, toks):
        key = tuple(toks)
        if key not in self._consts:   # built once: no host-to-device copies in the hot loop
            self._consts[key] = torch.tensor(toks, dtype=torch.long, device=self.device)
        return self._consts[key].expand(b, len(toks))

    def build(self, idx, drop, length=None):
        """Token sequences (B, L) and target mask (B, L) for samples idx; drop: (B,) bool, empty text.
        length: the longest row (known on the host from the text lengths; None: read it back)."""
        sp, b = self.sp, idx.shape[0]
        text, lens = self.text[idx], torch.where(drop, torch.zeros_like(self.lens[idx]), self.lens[idx])
        keep_text = torch.arange(self.tmax, device=self.device)[None, :] < lens[:, None]
        head = [sp["sov"]] + self.meta + [sp["sot"]]
        tail = [sp["eof"], sp["eov"], sp["eos"]]
        ones = lambda n: torch.ones((b, n), dtype=torch.bool, device=self.device)  # noqa: E731
        zeros = lambda n: torch.zeros((b, n), dtype=torch.bool, device=self.device)  # noqa: E731
        if self.kind == "t2i":
            parts = [self._const(b, [sp["bos"]]), text, self._const(b, head), self._img(self.codes[idx]), self._const(b, tail)]
            keep = [ones(1), keep_text, ones(len(head)), ones(self.img_len), ones(3)]
            target = [zeros(1), zeros(self.tmax), zeros(len(head)), ones(self.img_len), ones(3)]
        else:
            src, tgt = self.codes[idx, 0], self.codes[idx, 1]
            parts = [self._const(b, [sp["bos"]] + head), self._img(src), self._const(b, [sp["eof"], sp["eov"]]), text,
                     self._const(b, head), self._img(tgt), self._const(b, tail)]
            keep = [ones(1 + len(head)), ones(self.img_len), ones(2), keep_text, ones(len(head)), ones(self.img_len), ones(3)]
            target = [zeros(1 + len(head)), zeros(self.img_len), zeros(2), zeros(self.tmax), zeros(len(head)),
                      ones(self.img_len), ones(3)]
        seq, keep, target = torch.cat(parts, 1), torch.cat(keep, 1), torch.cat(target, 1)
        # Compact: move the kept tokens left (stable), PAD after them; trim to the longest row.
        order = torch.sort((~keep).to(torch.int32), dim=1, stable=True).indices
        seq, target = seq.gather(1, order), target.gather(1, order)
        n_keep = keep.sum(1)
        if length is None:
            length = int(n_keep.max())
        pos = torch.arange(seq.shape[1], device=self.device)[None, :]
        seq = torch.where(pos < n_keep[:, None], seq, torch.full_like(seq, sp["pad"]))
        target = target & (pos < n_keep[:, None])
        # The targets are always the last target_len kept tokens of a row: n_keep locates them.
        return seq[:, :length], target[:, :length], n_keep

    def to_device(self, a):
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cuda":   # pinned + non_blocking: no wait for the GPU's queue
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def sample(self, rng, batch=None, val=False):
        """A micro-batch: (seq (B,L), target mask (B,L), n_keep (B,) on the device, real tokens).
        rng: numpy Generator; indices and caption drops are drawn on the host."""
        b = batch or self.batch
        lo, hi = (self.n_train, self.n) if val else (0, self.n_train)
        if hi <= lo:
            return None
        idx = rng.integers(lo, hi, b)
        drop = rng.random(b) < (0.0 if val else self.p_uncond)
        n_keep = self.fixed + np.where(drop, 0, self.lens_np[idx])
        seq, target, n_keep_dev = self.build(self.to_device(idx), self.to_device(drop), int(n_keep.max()))
        return seq, target, n_keep_dev, int(n_keep.sum())


def group_loss(model, parts, pad_id, inner=None):
    """One forward for several micro-batches: parts = [(seq (B_i,L_i), n_keep (B_i,), target_len)].
    The batches are right-padded with PAD to the longest and stacked (exact: attention is causal
    and the targets sit before any padding). Returns [(loss sum, token count)] per part: the sum of
    token cross-entropies over each row's target block (its last target_len real tokens). Mirrors
    Emu3ForCausalLM.forward (model.model -> lm_head) but computes logits only where needed, with
    static shapes (no boolean indexing, no host sync). inner: a compiled model.model, if any."""
    length = max(p[0].shape[1] for p in parts)
    seq = torch.cat([F.pad(p[0], (0, length - p[0].shape[1]), value=pad_id) for p in parts]) if len(parts) > 1 \
        else parts[0][0]
    hidden = (inner or model.model)(input_ids=seq[:, :-1]).last_hidden_state       # (B, L-1, d)
    hs, ys, counts, row = [], [], [], 0
    for s_, n_keep, target_len in parts:
        b = s_.shape[0]
        pos = n_keep[:, None] - target_len + torch.arange(target_len, device=seq.device)[None, :]
        h = hidden[row:row + b]
        hs.append(h.gather(1, (pos - 1)[..., None].expand(-1, -1, h.shape[-1])).reshape(-1, h.shape[-1]))
        ys.append(seq[row:row + b].gather(1, pos).reshape(-1))                     # predicted by pos - 1
        counts.append(pos.numel())
        row += b
    logits = model.lm_head(torch.cat(hs) if len(hs) > 1 else hs[0]).float()
    tok = F.cross_entropy(logits, torch.cat(ys) if len(ys) > 1 else ys[0], reduction="none")
    return [(t.sum(), n) for t, n in zip(tok.split(counts), counts)]


def seq_loss(model, seq, n_keep, target_len, inner=None):
    """(loss sum, count) over the target block of one micro-batch (group_loss with one part)."""
    return group_loss(model, [(seq, n_keep, target_len)], 0, inner)[0]


def build_lm(cfg, vocab_size, sp, device, config=None):
    """Emu3ForCausalLM from cfg (+ vocab and special ids), or from a ready Emu3TextConfig."""
    from transformers import Emu3ForCausalLM, Emu3TextConfig
    if config is None:
        config = Emu3TextConfig(vocab_size=vocab_size, pad_token_id=sp["pad"], bos_token_id=sp["bos"],
                                eos_token_id=sp["eos"], **cfg)
    config._attn_implementation = "sdpa"
    return Emu3ForCausalLM(config).to(device), config


def grow_layers(sd, n_layers, extra):
    """A warm-start state_dict with `extra` decoder layers inserted, spread evenly among the
    `n_layers` old ones (depth up-scaling). Each new layer copies the layer before it, with its
    attention output and MLP down projections zeroed: both branches then add nothing to the
    residual stream, so the grown model computes exactly the old function, and training starts
    from there. Returns (state_dict, n_layers + extra)."""
    if extra <= 0:
        return sd, n_layers
    total = n_layers + extra
    # New layer k follows old layer after[k] (10 + 4: after layers 1, 3, 5, 7); old layers keep order.
    after = [max(0, (k + 1) * n_layers // (extra + 1) - 1) for k in range(extra)]
    order = []                               # (source old layer, is_new) per grown position
    for i in range(n_layers):
        order.append((i, False))
        order.extend((i, True) for _ in range(after.count(i)))
    assert len(order) == total, (len(order), total)
    prefix = "model.layers."
    out = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    for j, (i, new) in enumerate(order):
        for k, v in sd.items():
            if k.startswith(f"{prefix}{i}."):
                name = k[len(f"{prefix}{i}."):]
                t = v.clone()
                if new and name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                    t.zero_()
                out[f"{prefix}{j}.{name}"] = t
    return out, total


def lr_at(frac, peak, warmup=WARMUP_FRAC, min_frac=MIN_LR_FRAC):
    if frac < warmup:
        return peak * max(frac, 1e-3) / warmup
    p = min(1.0, (frac - warmup) / (1 - warmup))
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def layout_string(kind, text, h, w, rows, source_rows=None):
    """The sequence as text (what the Rust engine and the tokenizer see). rows: (h, w) code lists."""
    S = toklib.SPECIALS

    def block(r):
        return "".join("".join(toklib.visual_token(c) for c in row) + S["eol"] for row in r)

    meta = S["sov"] + toklib.meta_text(h, w) + S["sot"]
    end = S["eof"] + S["eov"]
    if kind == "t2i":
        return S["bos"] + text + meta + block(rows) + end + S["eos"]
    return S["bos"] + meta + block(source_rows) + end + text + meta + block(rows) + end + S["eos"]


def check_layout(bucket, tok, sp):
    """Every device-built sequence equals the tokenizer's encoding of the layout string (with and
    without the text), is right-padded with PAD, and its target mask covers exactly the target block."""
    n = min(8, bucket.codes.shape[0])
    idx = torch.arange(n, device=bucket.device)
    for drop in (False, True):
        seq, target, n_keep = bucket.build(idx, torch.full((n,), drop, device=bucket.device))
        for i in range(n):
            row, tmask = seq[i].tolist(), target[i].tolist()
            text = "" if drop else tok.decode(bucket.text[i, :bucket.lens[i]].tolist())
            codes = (bucket.codes[i] - sp["vis"]).tolist()
            if bucket.kind == "t2i":
                s = layout_string("t2i", text, bucket.h, bucket.w, codes)
            else:
                s = layout_string("edit", text, bucket.h, bucket.w, codes[1], codes[0])
            expect = tok.encode(s).ids
            assert row[:len(expect)] == expect, (bucket.name, drop, i)
            assert row[len(expect):] == [sp["pad"]] * (len(row) - len(expect))
            assert [t for t, m in zip(row, tmask) if m] == expect[-bucket.target_len:]
            assert n_keep[i].item() == len(expect)
            assert bucket.fixed + (0 if drop else int(bucket.lens_np[i])) == len(expect)   # host-side length


SYNTH_WORDS = (["a", "an", "the", "draw", "two", "three", "small", "large", "red", "blue", "green", "yellow"],
               ["circle", "square", "star", "triangle", "sign", "heart"], ["above", "below", "left of", "next to"])


def synthetic_codes(tok, sp, n=4000, seed=0):
    """Random code grids and world-like captions for --profile --synthetic (no RUN/codes)."""
    rng = np.random.default_rng(seed)
    a, b, c = SYNTH_WORDS
    texts = [" ".join([rng.choice(a), rng.choice(a), rng.choice(b), rng.choice(c), rng.choice(a), rng.choice(b)])
             for _ in range(n)]
    out = {}
    for split, kind, _ in BUCKETS:
        h, w = grid_of(split)
        shape = (n, 2, h, w) if kind == "edit" else (n, h, w)
        out[split] = (rng.integers(0, sp["K"], shape), texts)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--seconds", type=float, default=SECONDS)
    ap.add_argument("--deadline", type=float, default=None,
                    help="unix time by which training must stop (the budget is cut to fit; for stage scripts)")
    ap.add_argument("--steps", type=int, default=0, metavar="N",
                    help="train exactly N steps instead of --seconds (the LR schedule follows the steps; for tests)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke tests)")
    ap.add_argument("--config", default=None, help="JSON overrides of the LM config")
    ap.add_argument("--init", default=None, metavar="DIR",
                    help="warm start from a shipped model (ROOT with weights/ + tokenizer/, a weights dir) or a RUN dir")
    ap.add_argument("--grow-layers", type=int, default=0, metavar="N",
                    help="with --init: insert N decoder layers that start as the identity (grow_layers)")
    ap.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                    help="keep an exponential moving average of the weights (e.g. 0.9995) and save it "
                         "instead of the last weights; both validation losses are logged at the end")
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--warmup", type=float, default=WARMUP_FRAC, help="warm-up fraction of the time budget")
    ap.add_argument("--min-lr-frac", type=float, default=MIN_LR_FRAC)
    ap.add_argument("--batch-scale", type=float, default=1.0, help="multiplies every bucket's micro-batch")
    ap.add_argument("--bucket-batch", action="append", default=[], metavar="SPLIT=N",
                    help="set one bucket's micro-batch (after --batch-scale), e.g. edit_16x16=80; repeatable")
    ap.add_argument("--p-uncond", type=float, default=P_UNCOND)
    ap.add_argument("--eval-every", type=float, default=EVAL_EVERY)
    ap.add_argument("--save-every", type=float, default=0.0, help="rewrite RUN/lm/lm.safetensors every S seconds (0: at the end)")
    ap.add_argument("--no-merge", action="store_true", help="one forward per bucket (the first run's step)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (off by default: untested there)")
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="print torch.profiler's top ops for N steps (merged and per-bucket), then exit")
    ap.add_argument("--synthetic", action="store_true", help="with --profile: random codes instead of RUN/codes")
    ap.add_argument("--trace-steps", type=int, default=0, metavar="N",
                    help="print torch.profiler's top ops for N steps of the real run (after step 30)")
    ap.add_argument("--gpus", type=int, default=1,
                    help="data parallel over N GPUs (cuda:0..N-1; on --device cpu, N processes): N times the "
                         "sequences per step, gradients averaged")
    args = ap.parse_args(argv)
    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        launch(main, args.gpus, sys.argv[1:] if argv is None else argv)
        return

    torch.manual_seed(args.seed)
    ddp = Dist(args.device)
    dev = ddp.device
    if ddp.world > 1 and (args.profile or args.trace_steps):
        raise SystemExit("[lm] --profile/--trace-steps run in one process (no torchrun)")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    use_amp = not args.no_amp

    def amp():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp)

    out_dir = os.path.join(args.run, "lm")
    os.makedirs(out_dir, exist_ok=True)

    def log(s):
        if ddp.main:
            print(s, flush=True)

    from tokenizers import Tokenizer
    tok_path = os.path.join(args.run, "tokenizer", "tokenizer.json")
    init_config, init_sd = None, None
    if args.init:
        import warm  # noqa: E402  (training/warm.py)
        shipped_tok = warm.tokenizer_file(args.init)
        if not os.path.exists(tok_path) and shipped_tok:
            tok_path = shipped_tok
        if shipped_tok and not warm.same_tokenizer(tok_path, shipped_tok):
            raise SystemExit(f"[lm] --init {args.init}: {tok_path} is not the tokenizer of that model; "
                             "a warm start needs the same ids (copy its tokenizer/ into RUN/tokenizer)")
        init_config, init_sd = warm.load_lm_init(args.init)
        if args.grow_layers:
            old = init_config.num_hidden_layers
            init_sd, init_config.num_hidden_layers = grow_layers(init_sd, old, args.grow_layers)
            print(f"[lm] --grow-layers {args.grow_layers}: {old} -> {init_config.num_hidden_layers} layers", flush=True)
    elif args.grow_layers:
        raise SystemExit("[lm] --grow-layers needs --init (it grows a trained model)")
    tok = Tokenizer.from_file(tok_path)
    sp = toklib.special_ids(tok)
    # The codebook size is the number of visual tokens in the tokenizer.
    sp["K"] = sum(1 for t in tok.get_vocab(with_added_tokens=True) if t.startswith("<|visual token"))
    sp["vis"] = toklib.visual_offset(tok, sp["K"])
    codes_dir = os.path.join(args.run, "codes")
    t0 = time.time()
    synth = synthetic_codes(tok, sp) if args.profile and args.synthetic else None
    buckets = []
    for split, kind, batch in bucket_batches(args.bucket_batch, args.batch_scale):
        if synth is not None:
            codes, texts = synth[split]
        else:
            path = os.path.join(codes_dir, f"{split}.npy")
            if not os.path.exists(path):
                log(f"[lm] {split}: no codes, bucket skipped")
                continue
            codes = np.load(path)
            with open(os.path.join(codes_dir, f"{split}.texts.json")) as f:
                texts = json.load(f)
        assert codes.max() < sp["K"], "codes exceed the tokenizer's visual tokens"
        b = Bucket(split, kind, batch, codes, texts, tok, sp, sp["vis"], dev,
                   VAL_FRAC, args.p_uncond)
        check_layout(b, tok, sp)
        buckets.append(b)
        log(f"[lm] bucket {split}: {b.codes.shape[0]} samples ({b.n_train} train), grid {b.h}x{b.w}, "
            f"text tokens max {b.tmax}, target tokens {b.target_len}, micro-batch {b.batch}")
    assert buckets, "no codes found: run encode.py first"
    vocab_size = tok.get_vocab_size()
    if init_config is not None:
        assert init_config.vocab_size == vocab_size, (init_config.vocab_size, vocab_size)
        assert (init_config.pad_token_id, init_config.bos_token_id, init_config.eos_token_id) == \
            (sp["pad"], sp["bos"], sp["eos"]), "special ids differ from the checkpoint's"
        cfg = {k: getattr(init_config, k) for k in ("max_position_embeddings", "num_hidden_layers", "hidden_size")}
        if args.config or args.tiny:
            log("[lm] --init: the config comes from the checkpoint; --config/--tiny ignored")
    else:
        cfg = dict(TINY_LM_CONFIG if args.tiny else LM_CONFIG)
        if args.config:
            cfg.update(json.loads(args.config))
    longest = max(b.tmax + b.target_len + 8 + (b.img_len + 2 + 8 if b.kind == "edit" else 0) for b in buckets)
    assert cfg["max_position_embeddings"] >= longest, f"max_position_embeddings < {longest}"
    model, config = build_lm(cfg, vocab_size, sp, dev, init_config)
    if init_sd is not None:
        model.load_state_dict(init_sd, strict=True)
        log(f"[lm] warm start from {args.init}")
    if ddp.world > 1:   # every rank starts from rank 0's weights (a fresh init's too)
        for p in model.parameters():
            ddp.dist.broadcast(p.data, 0)
        log(f"[lm] data parallel: {ddp.world} ranks ({dev.type}), {ddp.world}x the sequences per step")
    n_params = sum(p.numel() for p in model.parameters())
    n_emb = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    tok_per_step = sum(b.batch * (b.tmax // 2 + b.target_len + (b.img_len + 8 if b.kind == "edit" else 6)) for b in buckets)
    flop_tok = 6 * (n_params - model.model.embed_tokens.weight.numel()) + 6 * cfg["num_hidden_layers"] * cfg["hidden_size"] * 400
    log(f"[lm] vocab {vocab_size}, params {n_params/1e6:.2f}M ({(n_params-n_emb)/1e6:.2f}M non-embedding), "
        f"~{tok_per_step} tokens/step, ~{flop_tok/1e6:.0f} MFLOP/token (train), longest sequence {longest}; "
        f"data loaded in {time.time()-t0:.1f}s")

    if not 0.0 <= args.ema < 1.0:
        raise SystemExit(f"[lm] --ema {args.ema}: expected a decay in [0, 1)")
    params = list(model.parameters())
    # The average starts at the first weights (a warm start's model): averaging a run with where it
    # began is what made the shipped soup (training/soup.py) better than either end.
    ema = [p.detach().clone() for p in params] if args.ema and ddp.main else None
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=BETAS, fused=dev.type == "cuda")
    inner = torch.compile(model.model, dynamic=True) if args.compile else None
    model.train()
    rng = np.random.default_rng(args.seed + 1000 * ddp.rank)   # each rank its own draw
    index = {b.name: j for j, b in enumerate(buckets)}

    def groups_of(merge):
        if not merge:
            return [[b] for b in buckets]
        t2i = [b for b in buckets if b.kind == "t2i"]
        return ([t2i] if t2i else []) + [[b] for b in buckets if b.kind != "t2i"]

    groups = groups_of(not args.no_merge)
    n_target = sum(b.batch * b.target_len for b in buckets)
    acc = torch.zeros(len(buckets) * 2, device=dev)
    counters = {"tokens": 0, "real": 0}

    def train_step(lr, groups):
        nonlocal inner
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        for grp in groups:
            got = [b.sample(rng) for b in grp]
            parts = [(s[0], s[2], b.target_len) for s, b in zip(got, grp)]
            try:
                with amp():
                    res = group_loss(model, parts, sp["pad"], inner)
            except Exception as err:  # noqa: BLE001
                if inner is None:
                    raise
                log(f"[lm] compiled model failed ({err!r}); eager from here")
                inner = None
                with amp():
                    res = group_loss(model, parts, sp["pad"], None)
            (sum(r[0] for r in res) / n_target).backward()
            for (loss_sum, n), b in zip(res, grp):
                acc[2 * index[b.name]] += loss_sum.detach()
                acc[2 * index[b.name] + 1] += n
            counters["tokens"] += max(s[0].shape[1] for s in got) * sum(s[0].shape[0] for s in got) * ddp.world
            counters["real"] += sum(s[3] for s in got) * ddp.world   # every rank's (the same batch shape)
        ddp.average_grads(params)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()

    if args.profile:
        for merge in (True, False):
            grps = groups_of(merge)
            for _ in range(3):
                train_step(1e-6, grps)
            sync(dev)
            t = time.time()
            tok0 = counters["real"]
            for _ in range(8):
                train_step(1e-6, grps)
            sync(dev)
            dt = (time.time() - t) / 8
            log(f"[lm] profile: {'merged t2i' if merge else 'per-bucket'} forwards ({len(grps)} per step): "
                f"{dt*1e3:.1f} ms/step, {(counters['real'] - tok0) / 8 / dt / 1e3:.0f}k real tok/s")
        run_profiler(lambda i: train_step(1e-6, groups), args.profile, dev, log)
        return

    names = [b.name for b in buckets]
    if not ddp.main:
        train_rank(ddp, args, train_step, groups, params)
        return
    fcsv = open(os.path.join(out_dir, "lm_log.csv"), "w", newline="")
    wr = csv.writer(fcsv)
    wr.writerow(["step", "seconds", "tokens", "lr", "loss"] + [f"loss_{n}" for n in names] + [f"val_{n}" for n in names])

    if init_sd is not None:
        log("[lm] start: val " + " ".join(f"{n} {v:.4f}" for n, v in zip(names, val_loss(model, buckets, amp))))
    seconds = train_seconds(args)
    clock = Clock(ddp, seconds, steps=args.steps)
    t0 = clock.t0
    log(f"[lm] training for {f'{args.steps} steps' if args.steps else f'{seconds:.0f}s'}: lr {args.lr:g} (warm-up {args.warmup:.0%}, cosine to {args.min_lr_frac:.0%}), "
        f"{len(groups)} forwards per step{', compiled' if inner is not None else ''}"
        + (", warm start" if init_sd is not None else ""))
    last_eval, last_save, step = t0, t0, 0
    traced = args.trace_steps <= 0
    while True:
        frac = clock.frac(step)
        if frac >= 1.0:
            break
        lr = lr_at(frac, args.lr, args.warmup, args.min_lr_frac)
        if not traced and step >= 30:
            traced = True
            try:
                run_profiler(lambda i: train_step(lr, groups), args.trace_steps, dev, log)
                step += args.trace_steps
            except Exception as err:  # noqa: BLE001
                log(f"[lm] profiler failed: {err!r}")
            continue
        train_step(lr, groups)
        step += 1
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1.0 - args.ema)
        now = time.time()
        do_eval = now - last_eval >= args.eval_every
        if step % 50 == 0 or do_eval or step == 1:
            a = acc.view(-1, 2)
            per = (a[:, 0] / a[:, 1].clamp_min(1)).tolist()
            total = (a[:, 0].sum() / a[:, 1].sum().clamp_min(1)).item()
            acc.zero_()
            vals = [""] * len(buckets)
            if do_eval:
                vals = [f"{v:.4f}" for v in val_loss(model, buckets, amp)]
                last_eval = time.time()
            wr.writerow([step, f"{now-t0:.1f}", counters["tokens"], f"{lr:.3g}", f"{total:.4f}"]
                        + [f"{v:.4f}" for v in per] + vals)
            fcsv.flush()
            el = max(now - t0, 1e-9)
            log(f"[lm] step {step} {now-t0:.0f}s {counters['real']/el/1e3:.0f}k tok/s "
                f"({counters['tokens']/el/1e3:.0f}k with padding) lr {lr:.2e} loss {total:.4f} ("
                + " ".join(f"{n} {v:.3f}" for n, v in zip(names, per)) + ")"
                + (" | val " + " ".join(vals) if do_eval else ""))
        if args.save_every > 0 and time.time() - last_save >= args.save_every:
            with swapped(params, ema):
                save_lm(model, config, out_dir)
            last_save = time.time()
            log(f"[lm] checkpoint at step {step} ({last_save - t0:.0f}s)")
    train_s = time.time() - t0
    if ddp.world > 1:
        log(f"[lm] ranks in step at the end: largest weight difference from rank 0 {ddp.same_params(params):.3g}")
    if ema is not None:
        raw = val_loss(model, buckets, amp)
        log("[lm] last weights: val " + " ".join(f"{n} {v:.4f}" for n, v in zip(names, raw)))
        save_lm(model, config, out_dir, name="lm_last", dtype=torch.float16)
        log(f"[lm] wrote {out_dir}/lm_last.safetensors (the last weights, f16)")
    with swapped(params, ema):
        save_lm(model, config, out_dir)
        log(f"[lm] wrote {out_dir}/lm.safetensors" + (f" (the moving average, decay {args.ema:g})" if ema else ""))
        vals = val_loss(model, buckets, amp)
    wr.writerow([step, f"{train_s:.1f}", counters["tokens"], "final", ""] + [""] * len(buckets) + [f"{v:.4f}" for v in vals])
    fcsv.close()
    log(f"[lm] trained {step} steps, {counters['real']/1e6:.1f}M tokens ({counters['tokens']/1e6:.1f}M with padding) "
        f"in {train_s:.0f}s ({counters['real']/train_s/1e3:.0f}k tok/s); "
        f"val " + " ".join(f"{n} {v:.4f}" for n, v in zip(names, vals)))
    ddp.close()


def train_seconds(args):
    """The training time budget: --seconds, cut to end by --deadline."""
    if args.deadline is None:
        return args.seconds
    return max(10.0, min(args.seconds, args.deadline - time.time()))


def train_rank(ddp, args, train_step, groups, params):
    """A data-parallel rank other than 0: the same steps at the same learning rates as rank 0
    (the shared Clock), no logging, evaluation or files."""
    clock, step = Clock(ddp, train_seconds(args), steps=args.steps), 0
    while True:
        frac = clock.frac(step)
        if frac >= 1.0:
            break
        train_step(lr_at(frac, args.lr, args.warmup, args.min_lr_frac), groups)
        step += 1
    ddp.same_params(params)
    ddp.close()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_profiler(step_fn, n, dev, log, tag="lm"):
    """n steps of step_fn under torch.profiler; logs the top ops and the GPU-busy share."""
    import vq as vqlib  # noqa: E402  (training/vq.py: the same helper)
    vqlib.run_profiler(step_fn, n, dev, log, tag)


@torch.no_grad()
def val_loss(model, buckets, amp, n=VAL_N):
    """Mean target-token loss on n sequences of each bucket's held-out part: the same sequences at
    every call (a fixed draw), so successive evaluations differ by the model alone."""
    model.eval()
    rng = np.random.default_rng(VAL_SEED)
    out = []
    for b in buckets:
        got = b.sample(rng, batch=min(n, max(1, b.codes.shape[0] - b.n_train)), val=True)
        if got is None:
            out.append(float("nan"))
            continue
        with amp():
            s, c = seq_loss(model, got[0], got[2], b.target_len)
        out.append((s / c).item())
    model.train()
    return out


class swapped:
    """`with swapped(params, ema):` the model holds the averaged weights inside the block and its
    own after it (a no-op when ema is None)."""

    def __init__(self, params, ema):
        self.params, self.ema = params, ema

    def __enter__(self):
        if self.ema is not None:
            with torch.no_grad():
                self.saved = [p.detach().clone() for p in self.params]
                torch._foreach_copy_(self.params, self.ema)

    def __exit__(self, *exc):
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.saved)
            self.saved = None


def save_lm(model, config, out_dir, name="lm", dtype=torch.float32):
    """Weights (float32 unless `dtype`) as NAME.safetensors + lm_config.json; written to temporary
    files and renamed (a reader never sees half). A tied head is not written twice (`warm.with_head`
    puts it back on loading)."""
    from safetensors.torch import save_file
    tied = getattr(config, "tie_word_embeddings", False)
    sd = {k: v.detach().to(dtype).cpu().contiguous() for k, v in model.state_dict().items()
          if not (tied and k == "lm_head.weight")}
    save_file(sd, os.path.join(out_dir, f"{name}.safetensors.tmp"))
    with open(os.path.join(out_dir, "lm_config.json.tmp"), "w") as f:
        f.write(config.to_json_string())
    os.replace(os.path.join(out_dir, "lm_config.json.tmp"), os.path.join(out_dir, "lm_config.json"))
    os.replace(os.path.join(out_dir, f"{name}.safetensors.tmp"), os.path.join(out_dir, f"{name}.safetensors"))


def load_lm(run_dir, device="cpu"):
    from safetensors.torch import load_file
    from transformers import Emu3ForCausalLM, Emu3TextConfig
    config = Emu3TextConfig.from_json_file(os.path.join(run_dir, "lm", "lm_config.json"))
    model = Emu3ForCausalLM(config)
    import warm  # noqa: E402  (training/warm.py)
    sd = {k: v.float() for k, v in load_file(os.path.join(run_dir, "lm", "lm.safetensors")).items()}
    model.load_state_dict(warm.with_head(sd, config), strict=True)
    return model.to(device), config


if __name__ == "__main__":
    main()
