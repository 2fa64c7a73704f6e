"""Stage 3: train the VQ image tokenizer (transformers' `Emu3VQVAE` architecture, our own trainer).

    python3 training/vq.py --run RUN --seconds 240 [--device cuda] [--batch 128]

The model is `transformers.Emu3VQVAE(Emu3VQVAEConfig(...))` itself, so export is a plain copy of
its state_dict. HF's VQ has no forward and no losses; this file runs the same modules in the same
order as `Emu3VQVAE.encode` / `decode` for a T=1 image (emu3-port-spec §1.4, §1.5):

    x (B,3,H,W) -> encoder(x[:,None]) (B,1,Z,h,w) -> quant_conv -> nearest code -> straight-through
      -> post_quant_conv -> decoder(post, zq) (B,3,H,W)

Quantizer: cosine lookup (latents and codes l2-normalised). The exported codebook holds unit-norm
codes, so HF's euclidean argmin on the raw quant_conv output picks the same code (all codes have
the same norm); `check()` verifies it on held-out images. Dead codes are restarted from recent
latents. BatchNorm3d (temporal res blocks) is kept in eval mode during training: a fixed affine
with running stats 0/1, so train and eval compute the same function and decode's latent/quant
halves never share batch statistics.

Losses: MSE + L1 + L1 on image gradients (edges, text strokes) + beta * commitment + codebook,
and with `--adv-weight W` an adversarial term: a small patch discriminator (`PatchDiscriminator`,
receptive field 34 px, about a small shape or two letters) learns with the hinge loss to tell the
originals from the reconstructions, and the generator adds lambda * -D(reconstruction) from the
time fraction `--adv-start` on (the discriminator trains from the start, so it has learnt
something first). lambda is taming-transformers' adaptive weight: W times the ratio of the
reconstruction loss's gradient norm to the adversarial term's at the decoder's last layer, so W
says how strong the adversarial push is against the reconstruction's, whatever their scales.
Only the VQ is saved; the discriminator is thrown away.
Writes RUN/vq/{vq.safetensors (fp16, config in metadata), vq_log.csv, recon.png, summary.json}.

Warm start (`--init ROOT`): continues from the VQ shipped in ROOT/weights (or a run's vq.safetensors)
instead of a fresh one; the config comes from the checkpoint, the codebook is not re-initialised.
`--grow-codebook K2` (with --init) splits the codebook to K2 codes: the new codes are noisy copies
of the old ones (code K+i starts at code i % K), so the model starts as it was and training
separates each pair (`grow_codebook`). `--grow-res-blocks N` (with --init) deepens the encoder
and the decoder to N res blocks per level, the new blocks starting as the identity, so the VQ
starts as it was with more decoder to spend on letters and corners (`grow_res_blocks`).
`--freeze-encoder-at F` trains only the decoder (encoder, quant_conv and codebook fixed, so the
codes stop moving) from the time fraction F on; F = 0 is a decoder-only session.

Data parallel (`--gpus N`, training/ddp.py, as `lm.py --gpus N`): every rank draws its own
images, the VQ's (and the discriminator's) gradients are averaged, so a step sees N times
`--batch` images. Code usage is averaged over the ranks, and dead codes restart from rank 0's
latents (broadcast), so the codebooks stay equal; the clock is rank 0's, so the ranks freeze the
encoder and stop at the same step. Rank 0 alone logs, evaluates and writes.

Speed (see README "Throughput"): the training step runs `fast_forward`, the same modules in the
same order as HF but with F.silu instead of x*sigmoid(x) in place (no clone for autograd), GroupNorm
in the autocast dtype (HF's path upcasts every norm to fp32), and SpatialNorm's two 1x1 convs on the
small code grid before the nearest upsampling (they commute) fused into one broadcast addcmul.
`--hf-forward` runs transformers' own forward instead. No host-device sync in the loop but the log
lines (code usage by index_add_, dead-code restarts by torch.where). `--profile N` times a few
steps of each variant and prints torch.profiler's top ops, then exits; `--trace-steps N` prints
the same table for N steps of the real run.
"""

import argparse
import csv
import json
import math
import os
import re
import struct
import sys
import time
import zlib

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402  (training/data.py)
from ddp import Clock, Dist, launch  # noqa: E402  (training/ddp.py)

# ----------------------------------------------------------------------------- defaults
VQ_CONFIG = dict(
    codebook_size=4096,
    embed_dim=8,
    latent_channels=8,
    double_latent=False,
    in_channels=3,
    out_channels=3,
    temporal_downsample_factor=1,
    base_channels=64,
    channel_multiplier=[1, 1, 2, 2],   # 4 levels -> 8x spatial downsampling
    num_res_blocks=2,
    attn_resolutions=[],               # attention only in the middle blocks (at 16x16)
    hidden_size=128,                   # == base_channels * channel_multiplier[-1]
    num_attention_heads=1,
    attention_dropout=0.0,
)
TINY_VQ_CONFIG = dict(VQ_CONFIG, codebook_size=256, base_channels=32, channel_multiplier=[1, 1, 1, 1],
                      num_res_blocks=1, hidden_size=32)
SECONDS = 240.0
BATCH = 128
LR = 6e-4                   # ~ taming-transformers: 4.5e-6 x batch
MIN_LR_FRAC = 0.05
WARMUP_FRAC = 0.04
BETAS = (0.9, 0.99)
GRAD_CLIP = 1.0
BETA_COMMIT = 0.25
W_L1, W_MSE, W_GRAD = 1.0, 1.0, 0.5
NONSQUARE_EVERY = 8        # every 8th step trains on a 160x96 or 96x160 batch
RESTART_EVERY = 25         # steps between dead-code restarts
RESTART_UNTIL = 0.8        # no restarts in the last 20% of the time
USAGE_DECAY = 0.98
DEAD_FRAC = 0.03           # a code is dead if its usage is < 3% of the uniform rate
EVAL_EVERY = 30.0          # seconds between held-out PSNR evaluations
DISC_CHANNELS = 64         # patch discriminator: 64 -> 128 channels, then 256, then one logit
DISC_BETAS = (0.5, 0.9)
LOSS_TERMS = ["loss", "mse", "l1", "grad_l1", "commit", "codebook", "adv_g", "disc", "adv_lambda"]
ADV_LAMBDA_MAX = 1e4
N_HELDOUT = 1000


# ----------------------------------------------------------------------------- model
def build_vq(cfg, device):
    from transformers import Emu3VQVAE, Emu3VQVAEConfig
    config = Emu3VQVAEConfig(**cfg)
    config._attn_implementation = "sdpa"
    vq = Emu3VQVAE(config)
    return vq.to(device)


def channels_last(vq):
    """channels_last for the 2D convs only (the Conv3d weights are 5-D)."""
    for m in vq.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)


def set_train(vq, train):
    vq.train(train)
    for m in vq.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.eval()   # fixed affine: running stats stay 0/1 (see module docstring)


def to_pixels(u8):
    """uint8 (B,H,W,3) -> float (B,3,H,W) in [-1,1], channels_last (a free permute)."""
    return u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_u8(x):
    """[-1,1] float (B,3,H,W) -> uint8 (B,H,W,3) exactly like Tessera/HF postprocess (truncation)."""
    return ((x.float() * 0.5 + 0.5) * 255.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def encode_latents(vq, x):
    """HF encode up to the quantizer: (B,3,H,W) -> quant_conv output (B,1,E,h,w)."""
    h = vq.encoder(x.unsqueeze(1))                           # (B,T=1,Z,h,w)
    z = vq.quant_conv(h.permute(0, 2, 1, 3, 4))              # (B,E,1,h,w)
    return z.permute(0, 2, 1, 3, 4)                          # (B,1,E,h,w)


def lookup(z, codebook):
    """Cosine nearest code. z (B,1,E,h,w) -> (zn (N,E), idx (N,), qn (N,E)) in fp32."""
    e = z.shape[2]
    with torch.autocast(z.device.type, enabled=False):   # fp32 similarities, even under bf16 autocast
        zf = z.permute(0, 1, 3, 4, 2).reshape(-1, e).float()
        zn = F.normalize(zf, dim=1)
        cn = F.normalize(codebook.float(), dim=1)
        idx = (zn @ cn.t()).argmax(dim=1)
        return zn, idx, cn[idx]


def decode_latents(vq, zq):
    """HF decode from quant vectors (B,1,E,h,w) -> (B,3,H,W)."""
    post = vq.post_quant_conv(zq.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
    return vq.decoder(post, zq)                              # (B*T, 3, H, W), T = 1


def forward(vq, x, fast=True, frozen_encoder=False):
    """Training path. Returns (recon, zn, idx, commit, codebook_loss).
    fast: `fast_encode_latents` / `fast_decode_latents` (same function as HF's, fewer and cheaper
    kernels); frozen_encoder: encoder + lookup without autograd (decoder-only training)."""
    enc = fast_encode_latents if fast else encode_latents
    dec = fast_decode_latents if fast else decode_latents
    with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_encoder):
        z = enc(vq, x)
        b, t, e, h, w = z.shape
        zn, idx, qn = lookup(z, vq.quantize.embedding.weight)
        commit = (zn - qn.detach()).pow(2).sum(1).mean()
        cb_loss = (zn.detach() - qn).pow(2).sum(1).mean()
        q_st = qn if frozen_encoder else zn + (qn - zn).detach()
        zq = q_st.view(b, t, h, w, e).permute(0, 1, 4, 2, 3).to(z.dtype)
    return dec(vq, zq), zn, idx, commit, cb_loss


# ----------------------------------------------------------------------------- fast path
# The same modules, in the same order, as transformers' Emu3VQVAEEncoder / Emu3VQVAEDecoder for a
# T=1 image (test_training.py checks equality with HF's encode/decode in float32). Differences are
# only in how each function is computed:
#  - SiLU is F.silu (one kernel, one saved tensor) instead of `h *= torch.sigmoid(h)` (sigmoid,
#    a clone of h that autograd keeps for the in-place product, mul, and three backward kernels);
#  - GroupNorm runs in the autocast dtype (bf16, statistics accumulated in fp32 inside the
#    kernel) instead of autocast's fp32 upcast, halving the traffic of every norm and activation;
#  - SpatialNorm(h, q) = GN(h) * conv_y(up(q)) + conv_b(up(q)) with nearest upsampling `up`: the
#    1x1 convs commute with `up`, so they run on the 16x16 code grid and one broadcast addcmul
#    replaces the upsample, two full-resolution convs, a multiply and an add (and their backward).
def _gn(norm, x):
    """GroupNorm in x's dtype (autocast would upcast it to fp32)."""
    if x.dtype == torch.float32:
        return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    with torch.autocast(x.device.type, enabled=False):
        return F.group_norm(x, norm.num_groups, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)


class _ScaleShift(torch.autograd.Function):
    """x * y + b with y and b broadcast over x: one kernel forward (addcmul) and no scalar
    multiply in the backward (autograd's addcmul backward spends a full-size pass on `* value`)."""

    @staticmethod
    def forward(ctx, x, y, b):
        ctx.save_for_backward(x, y)
        ctx.b_shape = b.shape
        return torch.addcmul(b, x, y)

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        gx = g * y if ctx.needs_input_grad[0] else None
        gy = (g * x).sum_to_size(y.shape) if ctx.needs_input_grad[1] else None
        gb = g.sum_to_size(ctx.b_shape) if ctx.needs_input_grad[2] else None
        return gx, gy, gb


def _spatial_norm(sn, h, q):
    """Emu3VQVAESpatialNorm(h, q) with the 1x1 convs on the code grid (exact: nearest upsampling
    by an integer factor commutes with a per-pixel linear map)."""
    hn = _gn(sn.norm_layer, h)
    y, b = sn.conv_y(q).to(hn.dtype), sn.conv_b(q).to(hn.dtype)
    bsz, c, hh, ww = hn.shape
    h0, w0 = q.shape[-2:]
    fh, fw = hh // h0, ww // w0
    if fh * h0 != hh or fw * w0 != ww:      # not an integer factor: HF's own path
        return sn(h, q)
    if fh == 1 and fw == 1:
        return _ScaleShift.apply(hn, y, b)
    out = _ScaleShift.apply(hn.view(bsz, c, h0, fh, w0, fw), y[:, :, :, None, :, None], b[:, :, :, None, :, None])
    return out.reshape(bsz, c, hh, ww)


def _norm(m, h, q):
    return _gn(m, h) if q is None else _spatial_norm(m, h, q)


def _resblock(blk, h, q=None):
    r = h
    h = blk.conv1(F.silu(_norm(blk.norm1, h, q)))
    h = blk.conv2(F.silu(_norm(blk.norm2, h, q)))
    if blk.in_channels != blk.out_channels:
        r = blk.nin_shortcut(r)
    return r + h


def _attn(attn, norm, h, q=None):
    """residual + attention(norm(h)) exactly as HF's middle / level attention blocks."""
    r = h
    hn = _norm(norm, h, q)
    b, c, hh, ww = hn.shape
    a = attn(hn.view(b, c, hh * ww).transpose(1, 2))[0]
    return r + a.reshape(b, hh, ww, c).permute(0, 3, 1, 2)


def _mid(mb, h, q=None):
    h = _resblock(mb.block_1, h, q)
    h = _attn(mb.attn_1, mb.attn_norm, h, q)
    return _resblock(mb.block_2, h, q)


def fast_encode_latents(vq, x):
    """== encode_latents(vq, x): (B,3,H,W) -> quant_conv output (B,1,E,h,w)."""
    enc = vq.encoder
    h = enc.conv_in(x)
    db = enc.down_block
    for i_level, blocks in enumerate(db.down):
        for i_block in range(db.num_res_blocks):
            h = _resblock(blocks.block[i_block], h)
            if len(blocks.attn) > 0:
                h = _attn(blocks.attn[i_block], blocks.attn_norms[i_block], h)
        if i_level != db.num_resolutions - 1:
            h = blocks.downsample(h)
    h = _mid(enc.middle_block, h)
    h = enc.conv_out(F.silu(_gn(enc.norm_out, h)))
    h = h.unsqueeze(2)                                        # (B, C, T=1, h, w)
    for conv in enc.time_conv:
        h = F.silu(conv(h))
    for layer in enc.time_res_stack:
        h = layer(h)
    return vq.quant_conv(h).permute(0, 2, 1, 3, 4)           # (B, 1, E, h, w)


def fast_decode_latents(vq, zq):
    """== decode_latents(vq, zq): quant vectors (B,1,E,h,w) -> (B,3,H,W)."""
    dec = vq.decoder
    zq5 = zq.permute(0, 2, 1, 3, 4)                           # (B, E, 1, h, w)
    hq = torch.cat((vq.post_quant_conv(zq5), zq5), dim=0)
    for layer in dec.time_res_stack:
        hq = layer(hq)
    for layer in dec.time_conv:
        hq = F.silu(layer(hq))
    h, q = torch.chunk(hq.squeeze(2), 2, dim=0)
    h = dec.conv_in(h)
    h = _mid(dec.middle_block, h, q)
    ub = dec.up_block
    for i_level, blocks in enumerate(ub.up[::-1]):
        for i_block in range(ub.num_res_blocks + 1):
            h = _resblock(blocks.block[i_block], h, q)
            if len(blocks.attn) > 0:
                h = _attn(blocks.attn[i_block], blocks.attn_norms[i_block], h, q)
        if i_level != len(ub.up) - 1:
            h = blocks.upsample(h)
    return dec.conv_out(F.silu(_spatial_norm(dec.norm_out, h, q)))


def nearest_euclidean(z, codebook):
    """transformers' Emu3VQVAEVectorQuantizer math, in fp32: argmin |z|^2 + |e|^2 - 2 z.e."""
    e = z.shape[2]
    with torch.autocast(z.device.type, enabled=False):
        zf = z.permute(0, 1, 3, 4, 2).reshape(-1, e).float()
        cb = codebook.float()
        d = 2 * torch.matmul(zf, cb.transpose(0, 1))
        d = torch.sum(zf ** 2, dim=1, keepdim=True) + torch.sum(cb ** 2, dim=1) - d
        return torch.argmin(d, dim=1)


@torch.no_grad()
def encode_codes(vq, x, cosine=None, fast=False):
    """Our encode path: (B,3,H,W) -> codes (B,h,w). A VQ in export form (unit-norm fp16
    codebook, scaled quant_conv: vq.export_form) uses HF's euclidean argmin, so the codes the LM
    learns are exactly those transformers and Tessera compute; while training, the cosine lookup.
    fast: the encoder trunk of `fast_encode_latents` (for bulk encoding under bf16 autocast, where
    HF's path differs from fp32 by rounding anyway; `check` reports the code mismatch)."""
    z = (fast_encode_latents if fast else encode_latents)(vq, x)
    b, _, _, h, w = z.shape
    if cosine is None:
        cosine = not getattr(vq, "export_form", False)
    if cosine:
        return lookup(z, vq.quantize.embedding.weight)[1].view(b, h, w)
    return nearest_euclidean(z, vq.quantize.embedding.weight).view(b, h, w)


@torch.no_grad()
def decode_codes(vq, codes):
    """Our decode path from codes (B,h,w) -> (B,3,H,W); same math as HF decode (the codebook
    parameter is kept unit-norm by the trainer, so raw rows are the normalised codes)."""
    zq = vq.quantize.embedding.weight[codes].permute(0, 3, 1, 2).unsqueeze(1)
    return decode_latents(vq, zq)


@torch.no_grad()
def scale_latents(vq, u8, target=32.0, batch=250):
    """Scale quant_conv by a power of two so the median latent norm is ~target. Cosine lookup (our
    path, the decoder) is unchanged; HF's euclidean argmin |z|^2 + |e|^2 - 2 z.e then no longer
    feels the fp16 rounding of the codebook norms (|e|^2 = 1 +- 1e-3) against small |z|."""
    norms = []
    for i in range(0, u8.shape[0], batch):
        z = encode_latents(vq, to_pixels(u8[i:i + batch]).float())
        norms.append(z.float().norm(dim=2).flatten())
    med = torch.cat(norms).median().item()
    scale = 2.0 ** round(math.log2(target / max(med, 1e-6)))
    vq.quant_conv.conv.weight.mul_(scale)
    vq.quant_conv.conv.bias.mul_(scale)
    return med, scale


def hf_encode(vq, x):
    """transformers' own Emu3VQVAE.encode -> codes (B,h,w)."""
    sizes = torch.tensor([[x.shape[2], x.shape[3]]] * x.shape[0], device=x.device)
    out = vq.encode(x, sizes)
    toks = out.image_tokens if hasattr(out, "image_tokens") else out
    return torch.stack(list(toks))


def edge_map(x, thresh=0.1):
    """1 on pixels next to a colour edge of x (B,3,H,W) in [-1,1] (any channel steps by > thresh,
    i.e. ~13 of 255), else 0: flat regions, shape outlines and glyph strokes in this world."""
    with torch.no_grad():
        gx = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(1, keepdim=True) > thresh
        gy = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(1, keepdim=True) > thresh
        e = torch.zeros_like(x[:, :1], dtype=torch.bool)
        e[..., :, 1:] |= gx
        e[..., :, :-1] |= gx
        e[..., 1:, :] |= gy
        e[..., :-1, :] |= gy
        return e.to(x.dtype)


def loss_fn(x, y, edge_weight=0.0):
    """(mse, l1, gradient l1). edge_weight > 0: the L1 term weighs pixels next to an edge of the
    original (edge_map) 1 + edge_weight times (normalised so flat images keep the same scale)."""
    d = y.float() - x
    mse = d.pow(2).mean()
    if edge_weight > 0:
        w = 1.0 + edge_weight * edge_map(x)
        l1 = (d.abs() * w).mean() / w.mean()
    else:
        l1 = d.abs().mean()
    gx = (d[..., :, 1:] - d[..., :, :-1]).abs().mean()
    gy = (d[..., 1:, :] - d[..., :-1, :]).abs().mean()
    return mse, l1, gx + gy


class PatchDiscriminator(torch.nn.Module):
    """pix2pix's PatchGAN with two strided layers: (B,3,H,W) in [-1,1] -> (B,1,H/4-2,W/4-2) logits,
    each seeing a 34x34 patch. GroupNorm, not BatchNorm, so real and fake batches never share
    statistics."""

    def __init__(self, ch=DISC_CHANNELS):
        super().__init__()
        nn = torch.nn
        self.net = nn.Sequential(
            nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.GroupNorm(16, 2 * ch), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * ch, 4 * ch, 4, 1, 1), nn.GroupNorm(16, 4 * ch), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * ch, 1, 4, 1, 1),
        )

    def forward(self, x):
        return self.net(x)


def hinge_d_loss(real_logits, fake_logits):
    """The discriminator's hinge loss: 2 when it cannot tell, 0 when every logit is past its margin."""
    return F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean()


def grow_codebook(cb, k2, seed=0, noise=0.01):
    """A unit-norm codebook of k2 >= K codes: the K old ones, then noisy unit-norm copies (code K+i
    starts at code i % K). Each copy sits closer to its parent than to any other code, so the
    encoder's latents split between the two and training pulls them apart."""
    k, d = cb.shape
    assert k2 >= k, f"--grow-codebook {k2} is smaller than the codebook ({k})"
    g = torch.Generator().manual_seed(seed)
    parents = torch.arange(k2 - k) % k
    extra = F.normalize(cb[parents] + noise * torch.randn(k2 - k, d, generator=g), dim=1)
    return torch.cat([cb, extra.to(cb.dtype)])


def grow_res_blocks(sd, cfg, n):
    """A warm-start state_dict and config with `num_res_blocks` raised to n (function-preserving
    growth, as lm.grow_layers for the LM). `num_res_blocks` sets the depth of every level of the
    encoder (n blocks) and the decoder (n + 1) and of both temporal res stacks, so each of those
    groups gets new blocks after its old ones. A new block copies its group's last old block, with
    conv2 (weight and bias) zeroed: every res block is `x + conv2(...)`, so it starts as the
    identity and the grown VQ computes exactly the old function (the same codes, the same
    pixels) until training moves it. The old tensors keep their names; only new names appear."""
    n0 = cfg["num_res_blocks"]
    assert n >= n0, f"--grow-res-blocks {n} is smaller than num_res_blocks ({n0})"
    if n == n0:
        return sd, cfg
    cfg = dict(cfg, num_res_blocks=n)
    fresh = build_vq(cfg, "cpu").state_dict()
    unexpected = sorted(set(sd) - set(fresh))
    assert not unexpected, f"grow_res_blocks: tensors the grown VQ lacks: {unexpected[:5]}"
    out = {}
    for k, v in fresh.items():
        if k in sd:
            out[k] = sd[k]
            continue
        m = re.fullmatch(r"(.*\.(?:block|time_res_stack)\.)(\d+)\.(.*)", k)
        assert m, f"grow_res_blocks: {k} is not part of a res block"
        group, rest = m.group(1), m.group(3)
        last = max(int(re.match(r"\d+", q[len(group):]).group()) for q in sd if q.startswith(group))
        src = f"{group}{last}.{rest}"
        t = sd[src].clone() if src in sd and sd[src].shape == v.shape else v.clone()
        if rest.startswith("conv2."):
            t.zero_()
        out[k] = t
    return out, cfg


def param_count(m):
    return sum(p.numel() for p in m.parameters())


def flops_per_image(vq, h=128, w=128):
    """(encode, decode) GFLOP for one h x w image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    dev = next(vq.parameters()).device
    was = vq.training
    set_train(vq, False)
    with torch.no_grad():
        x = torch.zeros(1, 3, h, w, device=dev)
        with FlopCounterMode(display=False) as fc:
            encode_codes(vq, x)
        enc = fc.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as fc:
            vq.decode(torch.zeros(1, h // 8, w // 8, dtype=torch.long, device=dev))
        dec = fc.get_total_flops() / 1e9
    set_train(vq, was)
    return enc, dec


# ----------------------------------------------------------------------------- io
def save_vq(vq, cfg, path):
    from safetensors.torch import save_file
    sd = {}
    for k, v in vq.state_dict().items():
        v = v.detach().cpu().contiguous()
        sd[k] = v.half() if v.is_floating_point() else v
    save_file(sd, path, metadata={"vq_config": json.dumps(cfg)})


def load_vq(path, device):
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, "pt") as f:
        cfg = json.loads(f.metadata()["vq_config"])
    vq = build_vq(cfg, "cpu")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(path).items()}
    vq.load_state_dict(sd, strict=True)
    vq = vq.to(device)
    vq.export_form = True   # saved checkpoints are always in export form (see main)
    set_train(vq, False)
    return vq, cfg


def write_png(path, img):
    """Minimal PNG writer (no PIL on the GPU box). img: uint8 (H,W,3)."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(tag, payload):
        c = struct.pack(">I", len(payload)) + tag + payload
        return c + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def psnr_u8(a, b):
    """Per-image PSNR (dB) between uint8 batches (B,H,W,3); returns a float tensor (B,)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(255.0 ** 2 / mse)


@torch.no_grad()
def evaluate(vq, heldout_u8, batch, amp, fp32_hf=False):
    """Held-out PSNR and code usage. fp32_hf: use transformers' encode/decode in fp32 (the shipped path)."""
    was = vq.training
    set_train(vq, False)
    psnrs, mses, counts = [], [], None
    k = vq.config.codebook_size
    for i in range(0, heldout_u8.shape[0], batch):
        u8 = heldout_u8[i:i + batch]
        x = to_pixels(u8)
        if fp32_hf:
            codes = hf_encode(vq, x)
            y = vq.decode(codes)
        else:
            with amp():
                codes = encode_codes(vq, x)
                y = decode_codes(vq, codes)
        out = to_u8(y)
        psnrs.append(psnr_u8(out, u8))
        mses.append((out.float() - u8.float()).pow(2).flatten(1).mean(1))
        c = torch.bincount(codes.flatten(), minlength=k)
        counts = c if counts is None else counts + c
    set_train(vq, was)
    psnr = torch.cat(psnrs)
    p = counts.float() / counts.sum()
    ppl = torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()
    return dict(psnr=psnr.mean().item(), psnr_of_mean_mse=(10 * math.log10(255 ** 2 / torch.cat(mses).mean().item())),
                psnr_min=psnr.min().item(), usage=(counts > 0).float().mean().item(), perplexity=ppl)


@torch.no_grad()
def check(vq, heldout_u8, n=64, amp=None):
    """Equivalence of our paths and transformers' encode/decode, in fp32 eval mode. Returns a dict.
    amp: also the code mismatch of the bulk-encoding path (fast trunk under autocast) vs HF fp32."""
    set_train(vq, False)
    x = to_pixels(heldout_u8[:n])
    ours = encode_codes(vq, x)
    hf = hf_encode(vq, x)
    mismatch = (ours != hf).float().mean().item()
    cos_mismatch = (encode_codes(vq, x, cosine=True) != hf).float().mean().item()
    extra = {}
    if amp is not None:
        with amp():
            extra["bulk_encode_vs_hf_fp32"] = (encode_codes(vq, x, fast=True) != hf).float().mean().item()
            extra["hf_autocast_vs_hf_fp32"] = (encode_codes(vq, x) != hf).float().mean().item()
    y_hf = vq.decode(hf)
    y_ours = decode_codes(vq, hf)
    dec_diff = (y_hf - y_ours).abs().max().item()
    # The cosine == euclidean equivalence holds exactly for a unit-norm codebook; measure the norms.
    norms = vq.quantize.embedding.weight.float().norm(dim=1)
    return dict(code_mismatch=mismatch, cosine_vs_euclidean=cos_mismatch, decode_max_abs_diff=dec_diff,
                codebook_norm_min=norms.min().item(), codebook_norm_max=norms.max().item(), **extra)


def recon_grid(vq, u8, amp, n=8):
    """Originals (top row) above reconstructions (bottom row), uint8 (2H, nW, 3)."""
    set_train(vq, False)
    with torch.no_grad(), amp():
        y = to_u8(decode_codes(vq, encode_codes(vq, to_pixels(u8[:n]))))
    top = torch.cat(list(u8[:n]), dim=1)
    bot = torch.cat(list(y), dim=1)
    return torch.cat([top, bot], dim=0).cpu().numpy()


# ----------------------------------------------------------------------------- training
def lr_at(frac, peak, warmup=WARMUP_FRAC, min_frac=MIN_LR_FRAC):
    if frac < warmup:
        return peak * max(frac, 1e-3) / warmup
    p = min(1.0, (frac - warmup) / (1 - warmup))
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def load_pools(run, device, limit=None, log=print):
    """Training images on the device as uint8 NHWC. Returns (square pool, {split: view of it or
    its own tensor}, [non-square tensors], held-out). The square pool holds the 128x128 t2i images,
    both images of every edit and the VQ-only splits (data.VQ_ONLY), without an extra copy."""
    t0 = time.time()
    arrays = {}
    for split in ("t2i_16x16", "edit_16x16", *data.VQ_ONLY):
        if os.path.exists(os.path.join(run, "data", split, "DONE")):
            arrays[split] = data.load_images(run, split, limit)
    n_sq = sum(a.shape[0] * (2 if a.ndim == 5 else 1) for a in arrays.values())
    hw = next(iter(arrays.values())).shape[-3:]
    square = torch.empty((n_sq, *hw), dtype=torch.uint8, device=device)
    views, at = {}, 0
    for split in list(arrays):
        a = arrays.pop(split)
        n = a.shape[0] * (2 if a.ndim == 5 else 1)
        square[at:at + n].copy_(torch.from_numpy(a.reshape(n, *hw)))
        views[split] = square[at:at + n].view(a.shape)
        at += n
        del a
    nonsq = []
    for split in ("t2i_12x20", "t2i_20x12"):
        if os.path.exists(os.path.join(run, "data", split, "DONE")):
            views[split] = torch.from_numpy(data.load_images(run, split, limit)).to(device)
            nonsq.append(views[split])
    held = torch.from_numpy(data.load_images(run, "heldout", N_HELDOUT)).to(device)
    log(f"[vq] loaded {square.shape[0]} square, {[t.shape[0] for t in nonsq]} non-square, "
        f"{held.shape[0]} held-out images to {device} in {time.time()-t0:.1f}s")
    return square, views, nonsq, held


def synthetic_pools(device, n=2048, log=print):
    """Random images (flat rectangles on a flat background) for --profile without data."""
    g = torch.Generator().manual_seed(0)

    def make(k, h, w):
        img = torch.randint(0, 256, (k, 1, 1, 3), generator=g, dtype=torch.uint8).expand(k, h, w, 3).clone()
        for _ in range(3):
            y0, x0 = torch.randint(0, h // 2, (2,), generator=g).tolist()
            y1, x1 = y0 + h // 3, x0 + w // 3
            img[:, y0:y1, x0:x1] = torch.randint(0, 256, (k, 1, 1, 3), generator=g, dtype=torch.uint8)
        return img.to(device)

    square, nonsq, held = make(n, 128, 128), [make(n // 4, 96, 160), make(n // 4, 160, 96)], make(250, 128, 128)
    log(f"[vq] synthetic data: {n} square, {[t.shape[0] for t in nonsq]} non-square images")
    return square, {}, nonsq, held


def set_memory_format(vq, fmt):
    """'cl' (channels_last, the first run's layout) or 'nchw' for the 2-D conv weights."""
    mf = torch.channels_last if fmt == "cl" else torch.contiguous_format
    for m in vq.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=mf)


class Trainer:
    """One optimizer step at a time; everything stays on the device (no host sync)."""

    def __init__(self, vq, args, dev, amp, gen, fresh_codebook, ddp=None):
        self.vq, self.args, self.dev, self.amp, self.gen = vq, args, dev, amp, gen
        self.ddp = ddp if ddp is not None else Dist("cpu")   # one process unless vq.py --gpus N
        self.codebook = vq.quantize.embedding.weight
        self.K = self.codebook.shape[0]
        self.usage = torch.full((self.K,), 1.0 / self.K, device=dev)
        self.restarted = torch.zeros((), dtype=torch.long, device=dev)
        self.fresh_codebook = fresh_codebook
        self.fast = not args.hf_forward
        self.fmt = "cl"
        self.frozen = False
        self.enc_fn, self.dec_fn = None, None
        self.opt = self.make_optimizer()
        self.adv_weight = getattr(args, "adv_weight", 0.0)
        self.disc, self.dopt = None, None
        if self.adv_weight > 0:
            self.disc = PatchDiscriminator().to(dev).to(memory_format=torch.channels_last)
            self.dopt = torch.optim.AdamW(self.disc.parameters(), lr=args.lr, betas=DISC_BETAS, weight_decay=0.0,
                                          fused=dev.type == "cuda")

    def make_optimizer(self):
        params = [p for p in self.vq.parameters() if p.requires_grad]
        return torch.optim.AdamW([{"params": params, "weight_decay": 0.0}], lr=self.args.lr, betas=BETAS,
                                 fused=self.dev.type == "cuda")

    def pixels(self, u8):
        x = to_pixels(u8)                       # channels_last strides (a permute of NHWC)
        return x if self.fmt == "cl" else x.contiguous()

    def freeze_encoder(self):
        """Decoder-only from now on: encoder, quant_conv and codebook fixed (codes stop moving)."""
        for m in (self.vq.encoder, self.vq.quant_conv, self.vq.quantize):
            for p in m.parameters():
                p.requires_grad_(False)
                p.grad = None
        self.frozen = True

    def forward(self, x):
        return forward(self.vq, x, fast=self.fast, frozen_encoder=self.frozen)

    def step(self, x, lr, restart=False, update=True, adv=False):
        """One step on the pixel batch x (and, with a discriminator, one discriminator step; adv: the
        generator also gets the adversarial term). Returns the loss terms, LOSS_TERMS (device tensor)."""
        a = self.args
        for g in self.opt.param_groups:
            g["lr"] = lr
        with self.amp():
            y, zn, codes, commit, cb_loss = self.forward(x)
        mse, l1, gl1 = loss_fn(x, y, a.edge_weight)
        rec = W_MSE * mse + W_L1 * l1 + W_GRAD * gl1
        loss = rec
        if not self.frozen:
            loss = loss + BETA_COMMIT * commit + cb_loss
        zero = torch.zeros((), device=x.device)
        adv_g, d_loss, lam = zero, zero, zero
        if self.disc is not None and adv:
            self.disc.requires_grad_(False)      # the generator's term moves the VQ only
            with self.amp():
                adv_g = -self.disc(y).float().mean()
            self.disc.requires_grad_(True)
            lam = self.adaptive_weight(rec, adv_g)
            loss = loss + lam * adv_g
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if not update:
            self.opt.zero_grad(set_to_none=True)
            return None
        trainable = [p for p in self.vq.parameters() if p.requires_grad]
        self.ddp.average_grads(trainable)
        torch.nn.utils.clip_grad_norm_([p for p in trainable if p.grad is not None], GRAD_CLIP)
        self.opt.step()
        if self.disc is not None:
            d_loss = self.disc_step(x, y.detach(), lr)
        with torch.no_grad():
            zn = zn.detach()
            K, cb = self.K, self.codebook
            if self.fresh_codebook:
                # Initialise the codebook from real latents instead of HF's random init.
                pick = torch.randint(0, zn.shape[0], (K,), device=self.dev, generator=self.gen)
                cb.data.copy_(zn[pick] + 0.01 * torch.randn(K, zn.shape[1], device=self.dev, generator=self.gen))
                self.ddp.broadcast_([cb.data])
                self.fresh_codebook = False
            counts = torch.zeros(K, device=self.dev).index_add_(0, codes, torch.ones_like(codes, dtype=torch.float32))
            self.ddp.mean_(counts)               # data parallel: every rank keeps the usage of all ranks' codes
            self.usage.mul_(USAGE_DECAY).add_(counts / codes.numel(), alpha=1 - USAGE_DECAY)
            if restart and not self.frozen:
                # Dead codes (usage EMA < DEAD_FRAC of uniform) restart from this batch's latents,
                # with masks instead of nonzero() so that nothing waits for the GPU.
                dead = self.usage < DEAD_FRAC / K
                pick = torch.randint(0, zn.shape[0], (K,), device=self.dev, generator=self.gen)
                fresh = zn[pick] + 0.01 * torch.randn(K, zn.shape[1], device=self.dev, generator=self.gen)
                cb.data.copy_(torch.where(dead[:, None], fresh, cb.data))
                self.usage.copy_(torch.where(dead, torch.full_like(self.usage, 1.0 / K), self.usage))
                self.restarted += dead.sum()
                self.ddp.broadcast_([cb.data, self.usage, self.restarted])   # rank 0's latents restart them
            # Keep the codebook parameter unit-norm (it ships that way; see module docstring).
            if not self.frozen:
                cb.data.copy_(F.normalize(cb.data, dim=1))
            return torch.stack([loss.detach(), mse.detach(), l1.detach(), gl1.detach(), commit.detach(),
                                cb_loss.detach(), adv_g.detach(), d_loss.detach(), lam])

    def adaptive_weight(self, rec, adv_g):
        """adv_weight * |d rec / d w| / |d adv_g / d w| at the decoder's last conv (taming-transformers'
        VQGAN), detached and clamped; computed on the device, nothing read back."""
        last = self.vq.decoder.conv_out.weight
        g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(adv_g, last, retain_graph=True)[0]
        lam = g_rec.float().norm() / (g_adv.float().norm() + 1e-4)
        return (self.adv_weight * lam.clamp(0.0, ADV_LAMBDA_MAX)).detach()

    def disc_step(self, real, fake, lr):
        """One hinge-loss step of the discriminator on originals and (detached) reconstructions."""
        for g in self.dopt.param_groups:
            g["lr"] = lr
        with self.amp():
            d_loss = hinge_d_loss(self.disc(real), self.disc(fake))
        self.dopt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.ddp.average_grads(list(self.disc.parameters()))
        torch.nn.utils.clip_grad_norm_(self.disc.parameters(), GRAD_CLIP)
        self.dopt.step()
        return d_loss.detach()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_steps(tr, batches, n_warm, n_timed, dev, update):
    """Seconds per step over n_timed steps after n_warm (cudnn autotuning, allocator growth)."""
    for i in range(n_warm):
        tr.step(tr.pixels(batches(i)), 1e-5, update=update)
    sync(dev)
    t = time.time()
    for i in range(n_timed):
        tr.step(tr.pixels(batches(n_warm + i)), 1e-5, update=update)
    sync(dev)
    return (time.time() - t) / n_timed


def pick_memory_format(tr, batches, dev, log):
    """--memory-format auto: time forward+backward (no optimizer step, so the weights and the
    optimizer state are untouched) in channels_last and in NCHW, keep the faster one."""
    times = {}
    for fmt in ("cl", "nchw"):
        try:
            set_memory_format(tr.vq, fmt)
            tr.fmt = fmt
            times[fmt] = time_steps(tr, batches, 3, 5, dev, update=False)
        except Exception as err:  # noqa: BLE001
            log(f"[vq] memory format {fmt} failed in the trial: {err!r}")
    best = min(times, key=times.get) if times else "cl"
    set_memory_format(tr.vq, best)
    tr.fmt = best
    log("[vq] memory format trial (s/step, fwd+bwd): " + ", ".join(f"{k} {v:.4f}" for k, v in times.items())
        + f" -> {best}")
    return best


def profile_table(prof, dev, rows=22):
    by = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"   # accepted by torch 2.x
    ka = prof.key_averages()
    out = [ka.table(sort_by=by, row_limit=rows, max_name_column_width=60)]
    if dev.type == "cuda":
        out.append(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    return "\n".join(out)


def run_profiler(step_fn, n, dev, log, tag):
    """n steps of step_fn under torch.profiler; logs the top ops and the GPU-busy share."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    t = time.time()
    with profile(activities=acts) as prof:
        for i in range(n):
            step_fn(i)
        sync(dev)
    wall = time.time() - t
    busy = ""
    if dev.type == "cuda":
        try:
            kern = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
            busy = f", GPU kernels busy {kern / 1e6 / wall:.0%} of the wall time"
        except Exception:  # noqa: BLE001  (profiler API differences: the table below still prints)
            pass
    log(f"[{tag}] profile: {n} steps in {wall:.2f}s ({wall / n * 1e3:.1f} ms/step){busy}")
    log(profile_table(prof, dev))


def profile_mode(tr, pools, args, dev, log):
    """--profile N: times the step variants, then N steps under torch.profiler; no training."""
    square, _, nonsq, _ = pools
    g = torch.Generator(device=dev).manual_seed(1)

    def batches(i):
        return square[torch.randint(0, square.shape[0], (args.batch,), device=dev, generator=g)]

    base_fast = tr.fast
    for fast in ([True, False] if base_fast else [False]):
        for fmt in ("cl", "nchw"):
            try:
                tr.fast, tr.fmt = fast, fmt
                set_memory_format(tr.vq, fmt)
                tr.opt = tr.make_optimizer()
                sec = time_steps(tr, batches, 3, 8, dev, update=True)
                log(f"[vq] profile: {'fast' if fast else 'hf  '} forward, {fmt:4s}: {sec*1e3:7.1f} ms/step, "
                    f"{args.batch / sec:6.0f} img/s")
            except Exception as err:  # noqa: BLE001
                log(f"[vq] profile: {'fast' if fast else 'hf'} forward, {fmt} failed: {err!r}")
    tr.fast, tr.fmt = base_fast, "cl"
    set_memory_format(tr.vq, "cl")
    tr.opt = tr.make_optimizer()
    time_steps(tr, batches, 2, 1, dev, update=True)
    run_profiler(lambda i: tr.step(tr.pixels(batches(i)), 1e-5), args.profile, dev, log, "vq")
    if nonsq:
        x = tr.pixels(nonsq[0][:args.batch])
        sec = time_steps(tr, lambda i: nonsq[0][:args.batch], 2, 4, dev, update=True)
        log(f"[vq] profile: non-square {tuple(x.shape[-2:])} batch: {sec*1e3:.1f} ms/step")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--gpus", type=int, default=1,
                    help="data parallel over N GPUs of this host (N processes; gloo processes with --device cpu)")
    ap.add_argument("--seconds", type=float, default=SECONDS, help="training time budget (LR schedule follows it)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="unix time by which training must stop (the budget is cut to fit; for stage scripts)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--warmup", type=float, default=WARMUP_FRAC, help="warm-up fraction of the time budget")
    ap.add_argument("--min-lr-frac", type=float, default=MIN_LR_FRAC)
    ap.add_argument("--init", default=None, metavar="DIR",
                    help="warm start from a shipped model (ROOT with weights/, a weights dir) or RUN/vq/vq.safetensors")
    ap.add_argument("--grow-codebook", type=int, default=0, metavar="K2",
                    help="with --init: split the codebook into K2 codes (grow_codebook)")
    ap.add_argument("--grow-res-blocks", type=int, default=0, metavar="N",
                    help="with --init: deepen every level to N res blocks (N + 1 in the decoder), the new "
                         "ones starting as the identity (grow_res_blocks)")
    ap.add_argument("--freeze-encoder-at", type=float, default=1.0, metavar="FRAC",
                    help="train only the decoder from this time fraction on (0: decoder-only; 1: never)")
    ap.add_argument("--edge-weight", type=float, default=0.0,
                    help="extra L1 weight on pixels next to colour edges (0: off, the first run's loss)")
    ap.add_argument("--adv-weight", type=float, default=0.0, metavar="W",
                    help="adversarial term's weight against the reconstruction's gradient at the decoder's last layer "
                         "(0: off; a patch discriminator trains beside the VQ; taming-transformers used 0.8)")
    ap.add_argument("--adv-start", type=float, default=0.1, metavar="FRAC",
                    help="time fraction from which the VQ gets the adversarial term (the discriminator trains from 0)")
    ap.add_argument("--hf-forward", action="store_true", help="transformers' forward instead of fast_forward")
    ap.add_argument("--memory-format", choices=["cl", "nchw", "auto"], default="cl",
                    help="conv layout: channels_last (cl, the first run's), NCHW, or auto (timed trial at the start)")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke tests)")
    ap.add_argument("--config", default=None, help="JSON overrides of the VQ config")
    ap.add_argument("--limit", type=int, default=None, help="load at most this many images per split")
    ap.add_argument("--eval-every", type=float, default=EVAL_EVERY)
    ap.add_argument("--no-amp", action="store_true", help="fp32 instead of bf16 autocast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--encode", action="store_true",
                    help="then encode every training image (encode.py's job) from the images already on the device")
    ap.add_argument("--encode-batch", type=int, default=1024)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="time the step variants and print torch.profiler's top ops for N steps, then exit")
    ap.add_argument("--synthetic", action="store_true", help="with --profile: random images instead of RUN/data")
    ap.add_argument("--trace-steps", type=int, default=0, metavar="N",
                    help="print torch.profiler's top ops for N steps of the real run (after step 30)")
    args = ap.parse_args(argv)
    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        launch(main, args.gpus, sys.argv[1:] if argv is None else argv)
        return
    ddp = Dist(args.device)
    if ddp.world > 1 and (args.profile or args.trace_steps or args.encode or args.memory_format == "auto"):
        raise SystemExit("[vq] --gpus: --profile, --trace-steps, --encode and --memory-format auto run in one process")

    torch.manual_seed(args.seed)                 # the same initial weights on every rank
    dev = ddp.device
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_amp = not args.no_amp

    def amp():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp)

    out_dir = os.path.join(args.run, "vq")
    os.makedirs(out_dir, exist_ok=True)

    def log(s):
        if ddp.main:
            print(s, flush=True)

    init_sd = None
    if args.init:
        import warm  # noqa: E402  (training/warm.py)
        cfg, init_sd = warm.load_vq_init(args.init)
        if args.config or args.tiny:
            log("[vq] --init: the config comes from the checkpoint; --config/--tiny ignored")
        if args.grow_codebook:
            key = "quantize.embedding.weight"
            k0 = cfg["codebook_size"]
            init_sd[key] = grow_codebook(init_sd[key], args.grow_codebook, args.seed)
            cfg["codebook_size"] = args.grow_codebook
            log(f"[vq] --grow-codebook: {k0} -> {args.grow_codebook} codes (noisy copies of the old ones)")
        if args.grow_res_blocks:
            n0 = cfg["num_res_blocks"]
            init_sd, cfg = grow_res_blocks(init_sd, cfg, args.grow_res_blocks)
            log(f"[vq] --grow-res-blocks: {n0} -> {cfg['num_res_blocks']} res blocks per level "
                f"(new blocks start as the identity)")
    elif args.grow_codebook or args.grow_res_blocks:
        raise SystemExit("[vq] --grow-codebook and --grow-res-blocks need --init (they grow a trained VQ)")
    else:
        cfg = dict(TINY_VQ_CONFIG if args.tiny else VQ_CONFIG)
        if args.config:
            cfg.update(json.loads(args.config))
    assert cfg["hidden_size"] == cfg["base_channels"] * cfg["channel_multiplier"][-1]
    assert cfg["embed_dim"] == cfg["latent_channels"] and cfg["temporal_downsample_factor"] == 1
    assert all(cfg["base_channels"] * m % 32 == 0 for m in cfg["channel_multiplier"])
    assert len(cfg["channel_multiplier"]) == 4, "8x spatial downsampling"

    tok_path = os.path.join(args.run, "tokenizer", "tokenizer.json")
    if os.path.exists(tok_path):   # fail now, not after training, if tokenizer.py used another K
        from tokenizers import Tokenizer
        n_vis = sum(1 for t in Tokenizer.from_file(tok_path).get_vocab(with_added_tokens=True)
                    if t.startswith("<|visual token"))
        assert n_vis == cfg["codebook_size"], f"tokenizer has {n_vis} visual tokens, VQ codebook_size {cfg['codebook_size']}"
    if args.profile and args.synthetic:
        pools = synthetic_pools(dev, log=log)
    else:
        pools = load_pools(args.run, dev, args.limit, log)
    square, views, nonsq, held = pools
    vq = build_vq(cfg, dev)
    if init_sd is not None:
        vq.load_state_dict(init_sd, strict=True)
        norms = vq.quantize.embedding.weight.norm(dim=1)
        log(f"[vq] warm start from {args.init}: codebook norms [{norms.min().item():.4f}, {norms.max().item():.4f}]")
    enc_gf, dec_gf = flops_per_image(vq)
    log(f"[vq] config {json.dumps(cfg)}")
    log(f"[vq] params total {param_count(vq)/1e6:.2f}M encoder {param_count(vq.encoder)/1e6:.2f}M "
        f"decoder {param_count(vq.decoder)/1e6:.2f}M; GFLOP per 128x128 image: encode {enc_gf:.2f} decode {dec_gf:.2f}")
    set_memory_format(vq, "cl")
    set_train(vq, True)
    K = cfg["codebook_size"]
    gen = torch.Generator(device=dev)
    gen.manual_seed(args.seed + 1000 * ddp.rank)   # each rank its own draw of the images
    if ddp.world > 1:
        ddp.broadcast_([t for t in vq.state_dict().values() if t.is_floating_point()])
        log(f"[vq] data parallel: {ddp.world} ranks ({dev.type}), {ddp.world}x the images per step")
    tr = Trainer(vq, args, dev, amp, gen, fresh_codebook=init_sd is None, ddp=ddp)
    if args.profile:
        profile_mode(tr, pools, args, dev, log)
        return

    def sample(step):
        if nonsq and step % NONSQUARE_EVERY == NONSQUARE_EVERY - 1:
            pool = nonsq[(step // NONSQUARE_EVERY) % len(nonsq)]
        else:
            pool = square
        return pool[torch.randint(0, pool.shape[0], (args.batch,), device=dev, generator=gen)]

    if tr.fast:
        try:   # the fast path on this device, once, before anything depends on it
            tr.step(tr.pixels(square[:args.batch]), 0.0, update=False)
        except Exception as err:  # noqa: BLE001
            log(f"[vq] fast forward failed ({err!r}); using transformers' forward")
            tr.fast = False
    if args.memory_format == "auto":
        pick_memory_format(tr, lambda i: square[i * args.batch % max(1, square.shape[0] - args.batch):][:args.batch],
                           dev, log)
    else:
        set_memory_format(vq, args.memory_format)
        tr.fmt = args.memory_format
    if init_sd is not None and ddp.main:
        ev = evaluate(vq, held, 250, amp)
        log(f"[vq] start: held-out psnr {ev['psnr']:.2f} usage {ev['usage']:.3f} ppl {ev['perplexity']:.0f}")

    csv_path = os.path.join(out_dir, "vq_log.csv")
    fcsv = open(csv_path if ddp.main else os.devnull, "w", newline="")
    wr = csv.writer(fcsv)
    wr.writerow(["step", "seconds", "images", "lr"] + LOSS_TERMS + ["restarted", "psnr", "usage", "perplexity"])

    t0 = time.time()
    seconds = args.seconds
    if args.deadline is not None:
        seconds = max(10.0, min(seconds, args.deadline - t0))
    clock = Clock(ddp, seconds)                  # data parallel: rank 0's clock, so the ranks stop together
    log(f"[vq] training for {seconds:.0f}s: lr {args.lr:g} (warm-up {args.warmup:.0%}, cosine to "
        f"{args.min_lr_frac:.0%}), batch {args.batch}, {'fast' if tr.fast else 'hf'} forward, layout {tr.fmt}, "
        f"edge weight {args.edge_weight:g}, decoder-only from {args.freeze_encoder_at:.0%}"
        + (f", adversarial weight {args.adv_weight:g} from {args.adv_start:.0%}" if tr.disc is not None else "")
        + ("" if init_sd is None else ", warm start"))
    restart_until = min(RESTART_UNTIL, args.freeze_encoder_at)
    last_eval, step, images = t0, 0, 0
    acc = torch.zeros(len(LOSS_TERMS), device=dev)
    acc_n = 0
    traced = args.trace_steps <= 0
    while True:
        frac = clock.frac(step)
        if frac >= 1.0:
            break
        if not tr.frozen and frac >= args.freeze_encoder_at:
            tr.freeze_encoder()
            log(f"[vq] step {step}: encoder, quant_conv and codebook frozen; decoder-only from here")
        lr = lr_at(frac, args.lr, args.warmup, args.min_lr_frac)
        if not traced and step >= 30:
            traced = True
            try:
                run_profiler(lambda i: acc.add_(tr.step(tr.pixels(sample(step + i)), lr, adv=frac >= args.adv_start)),
                             args.trace_steps, dev, log, "vq")
                step += args.trace_steps
                images += args.trace_steps * args.batch
                acc_n += args.trace_steps
            except Exception as err:  # noqa: BLE001
                log(f"[vq] profiler failed: {err!r}")
            continue
        restart = step % RESTART_EVERY == RESTART_EVERY - 1 and frac < restart_until
        acc += tr.step(tr.pixels(sample(step)), lr, restart=restart, adv=frac >= args.adv_start)
        acc_n += 1
        step += 1
        images += args.batch * ddp.world
        now = time.time()
        do_eval = ddp.main and now - last_eval >= args.eval_every
        if ddp.main and (step % 50 == 0 or do_eval):
            a = (acc / max(acc_n, 1)).tolist()
            acc.zero_()
            acc_n = 0
            restarted_total = int(tr.restarted.item())
            row = [step, f"{now-t0:.1f}", images, f"{lr:.3g}"] + [f"{v:.5f}" for v in a] + [restarted_total, "", "", ""]
            if do_eval:
                ev = evaluate(vq, held, 250, amp)
                row[-3:] = [f"{ev['psnr']:.2f}", f"{ev['usage']:.3f}", f"{ev['perplexity']:.0f}"]
                last_eval = time.time()
            wr.writerow(row)
            fcsv.flush()
            log(f"[vq] step {step} {now-t0:.0f}s {images/(now-t0):.0f} img/s lr {lr:.2e} loss {a[0]:.4f} "
                f"mse {a[1]:.5f} l1 {a[2]:.4f} commit {a[4]:.4f} restarts {restarted_total}"
                + (f" adv {a[6]:.3f} (weight {a[8]:.3g}) disc {a[7]:.3f}" if tr.disc is not None else "")
                + (f" | held-out psnr {row[-3]} usage {row[-2]} ppl {row[-1]}" if do_eval else ""))
    train_s = time.time() - t0
    if ddp.world > 1:
        log(f"[vq] ranks in step at the end: largest weight difference from rank 0 "
            f"{ddp.same_params(list(vq.parameters())):.3g}")
        if not ddp.main:
            fcsv.close()
            ddp.close()
            return
    restarted_total = int(tr.restarted.item())
    log(f"[vq] trained {step} steps, {images} images in {train_s:.0f}s ({images / max(train_s, 1e-9):.0f} img/s)")
    finish(vq, cfg, args, dev, amp, held, views, square, nonsq, out_dir, wr, fcsv, log,
           dict(steps=step, images=images, seconds=train_s, restarted=restarted_total,
                encode_gflop_128=enc_gf, decode_gflop_128=dec_gf, init=args.init, layout=tr.fmt,
                fast_forward=tr.fast, edge_weight=args.edge_weight, freeze_encoder_at=args.freeze_encoder_at,
                adv_weight=args.adv_weight, adv_start=args.adv_start, gpus=ddp.world))
    ddp.close()


def finish(vq, cfg, args, dev, amp, held, views, square, nonsq, out_dir, wr, fcsv, log, summary):
    """Export form, save, held-out figures and checks, then (--encode) encode every image."""
    # Export form: unit-norm codebook, weights rounded to fp16 (what ships; what encode.py uses).
    # Checks run in true fp32 (no TF32), like Tessera on the CPU.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    set_train(vq, False)
    codebook = vq.quantize.embedding.weight
    med, scale = scale_latents(vq, held)
    log(f"[vq] median latent norm {med:.3g}; quant_conv scaled by {scale:g}")
    with torch.no_grad():
        codebook.data.copy_(F.normalize(codebook.data.float(), dim=1))
        for p in vq.parameters():
            p.data.copy_(p.data.half().float())
        for b in vq.buffers():
            if b.is_floating_point():
                b.copy_(b.half().float())
    vq.export_form = True
    save_vq(vq, cfg, os.path.join(out_dir, "vq.safetensors"))   # first: the weights are the product
    log(f"[vq] wrote {out_dir}/vq.safetensors ({os.path.getsize(os.path.join(out_dir, 'vq.safetensors'))/2**20:.1f} MiB)")
    summary = dict(config=cfg, params=param_count(vq), encoder_params=param_count(vq.encoder),
                   decoder_params=param_count(vq.decoder), **summary)
    K = cfg["codebook_size"]
    try:
        ev_amp = evaluate(vq, held, 250, amp)
        log(f"[vq] held-out (ours, bf16, fp16 weights): psnr {ev_amp['psnr']:.2f} dB usage {ev_amp['usage']:.3f} "
            f"perplexity {ev_amp['perplexity']:.0f}")
        ev = evaluate(vq, held, 100, amp, fp32_hf=True)
        log(f"[vq] held-out (transformers encode/decode, fp32, fp16 weights): psnr {ev['psnr']:.2f} dB "
            f"(min {ev['psnr_min']:.2f}, of mean mse {ev['psnr_of_mean_mse']:.2f}) usage {ev['usage']:.3f} "
            f"perplexity {ev['perplexity']:.0f}")
        ck = check(vq, held, amp=amp)
        ok = ck["code_mismatch"] < 0.01 and ck["decode_max_abs_diff"] < 1e-3
        log(f"[vq] check {'OK' if ok else 'FAILED'}: code mismatch ours vs HF encode {ck['code_mismatch']:.5f} "
            f"(cosine lookup vs HF {ck['cosine_vs_euclidean']:.5f}), decode max |diff| "
            f"{ck['decode_max_abs_diff']:.2e}, codebook norms [{ck['codebook_norm_min']:.5f}, {ck['codebook_norm_max']:.5f}]; "
            f"bulk-encode (bf16) codes vs HF fp32 differ in {ck.get('bulk_encode_vs_hf_fp32', float('nan')):.4f} "
            f"(HF path under autocast: {ck.get('hf_autocast_vs_hf_fp32', float('nan')):.4f})")
        summary.update(heldout_ours_bf16=ev_amp, heldout_hf_fp32=ev, check=ck, check_ok=ok)
        wr.writerow([summary["steps"], f"{summary['seconds']:.1f}", summary["images"], "final"] + [""] * len(LOSS_TERMS)
                    + [summary["restarted"], f"{ev['psnr']:.2f}", f"{ev['usage']:.3f}", f"{ev['perplexity']:.0f}"])
        write_png(os.path.join(out_dir, "recon.png"), recon_grid(vq, held, amp))
    except Exception as err:  # noqa: BLE001  (keep going: the encode below matters more)
        log(f"[vq] final evaluation failed: {err!r}")
        summary["evaluation_error"] = repr(err)
    fcsv.close()
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if args.encode:
        import encode  # noqa: E402  (training/encode.py)
        if args.limit is not None:
            log("[vq] --encode needs the whole data on the device: run encode.py instead when using --limit")
            sys.exit(2)
        del square, nonsq
        t1 = time.time()
        all_codes = [encode.encode_split(vq, args.run, split, views[split], args.encode_batch, amp, not args.hf_forward)
                     for split in encode.SPLITS if split in views]
        encode.finish(args.run, all_codes, K, t1)


if __name__ == "__main__":
    main()
