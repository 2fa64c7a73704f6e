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

Losses: MSE + L1 + L1 on image gradients (edges, text strokes) + beta * commitment + codebook.
Writes RUN/vq/{vq.safetensors (fp16, config in metadata), vq_log.csv, recon.png, summary.json}.
"""

import argparse
import csv
import json
import math
import os
import struct
import sys
import time
import zlib

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402  (training/data.py)

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


def forward(vq, x):
    """Training path. Returns (recon, zn, idx, commit, codebook_loss)."""
    z = encode_latents(vq, x)
    b, t, e, h, w = z.shape
    zn, idx, qn = lookup(z, vq.quantize.embedding.weight)
    commit = (zn - qn.detach()).pow(2).sum(1).mean()
    cb_loss = (zn.detach() - qn).pow(2).sum(1).mean()
    q_st = zn + (qn - zn).detach()
    zq = q_st.view(b, t, h, w, e).permute(0, 1, 4, 2, 3).to(z.dtype)
    return decode_latents(vq, zq), zn, idx, commit, cb_loss


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
def encode_codes(vq, x, cosine=None):
    """Our (fast) encode path: (B,3,H,W) -> codes (B,h,w). A VQ in export form (unit-norm fp16
    codebook, scaled quant_conv: vq.export_form) uses HF's euclidean argmin, so the codes the LM
    learns are exactly those transformers and Tessera compute; while training, the cosine lookup."""
    z = encode_latents(vq, x)
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


def loss_fn(x, y):
    d = y.float() - x
    mse = d.pow(2).mean()
    l1 = d.abs().mean()
    gx = (d[..., :, 1:] - d[..., :, :-1]).abs().mean()
    gy = (d[..., 1:, :] - d[..., :-1, :]).abs().mean()
    return mse, l1, gx + gy


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
def check(vq, heldout_u8, n=64):
    """Equivalence of our paths and transformers' encode/decode, in fp32 eval mode. Returns a dict."""
    set_train(vq, False)
    x = to_pixels(heldout_u8[:n])
    ours = encode_codes(vq, x)
    hf = hf_encode(vq, x)
    mismatch = (ours != hf).float().mean().item()
    cos_mismatch = (encode_codes(vq, x, cosine=True) != hf).float().mean().item()
    y_hf = vq.decode(hf)
    y_ours = decode_codes(vq, hf)
    dec_diff = (y_hf - y_ours).abs().max().item()
    # The cosine == euclidean equivalence holds exactly for a unit-norm codebook; measure the norms.
    norms = vq.quantize.embedding.weight.float().norm(dim=1)
    return dict(code_mismatch=mismatch, cosine_vs_euclidean=cos_mismatch, decode_max_abs_diff=dec_diff,
                codebook_norm_min=norms.min().item(), codebook_norm_max=norms.max().item())


def recon_grid(vq, u8, amp, n=8):
    """Originals (top row) above reconstructions (bottom row), uint8 (2H, nW, 3)."""
    set_train(vq, False)
    with torch.no_grad(), amp():
        y = to_u8(decode_codes(vq, encode_codes(vq, to_pixels(u8[:n]))))
    top = torch.cat(list(u8[:n]), dim=1)
    bot = torch.cat(list(y), dim=1)
    return torch.cat([top, bot], dim=0).cpu().numpy()


# ----------------------------------------------------------------------------- training
def lr_at(frac, peak):
    if frac < WARMUP_FRAC:
        return peak * max(frac, 1e-3) / WARMUP_FRAC
    p = min(1.0, (frac - WARMUP_FRAC) / (1 - WARMUP_FRAC))
    return peak * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * p)))


def load_pools(run, device, limit=None, log=print):
    """Training images on the device as uint8 NHWC. Returns (square pool, {split: view of it or
    its own tensor}, [non-square tensors], held-out). The square pool holds the 128x128 t2i images
    and both images of every edit, without an extra copy."""
    t0 = time.time()
    arrays = {}
    for split in ("t2i_16x16", "edit_16x16"):
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--seconds", type=float, default=SECONDS, help="training time budget (LR schedule follows it)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke tests)")
    ap.add_argument("--config", default=None, help="JSON overrides of the VQ config")
    ap.add_argument("--limit", type=int, default=None, help="load at most this many images per split")
    ap.add_argument("--eval-every", type=float, default=EVAL_EVERY)
    ap.add_argument("--no-amp", action="store_true", help="fp32 instead of bf16 autocast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--encode", action="store_true",
                    help="then encode every training image (encode.py's job) from the images already on the device")
    ap.add_argument("--encode-batch", type=int, default=512)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_amp = not args.no_amp

    def amp():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp)

    out_dir = os.path.join(args.run, "vq")
    os.makedirs(out_dir, exist_ok=True)
    log_lines = []

    def log(s):
        print(s, flush=True)
        log_lines.append(s)

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
    square, views, nonsq, held = load_pools(args.run, dev, args.limit, log)
    vq = build_vq(cfg, dev)
    enc_gf, dec_gf = flops_per_image(vq)
    log(f"[vq] config {json.dumps(cfg)}")
    log(f"[vq] params total {param_count(vq)/1e6:.2f}M encoder {param_count(vq.encoder)/1e6:.2f}M "
        f"decoder {param_count(vq.decoder)/1e6:.2f}M; GFLOP per 128x128 image: encode {enc_gf:.2f} decode {dec_gf:.2f}")
    channels_last(vq)
    set_train(vq, True)
    codebook = vq.quantize.embedding.weight
    decay, no_decay = [], []
    for n_, p in vq.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in n_ else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=BETAS, fused=dev.type == "cuda")
    K = cfg["codebook_size"]
    usage = torch.full((K,), 1.0 / K, device=dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(args.seed)

    csv_path = os.path.join(out_dir, "vq_log.csv")
    fcsv = open(csv_path, "w", newline="")
    wr = csv.writer(fcsv)
    wr.writerow(["step", "seconds", "images", "lr", "loss", "mse", "l1", "grad_l1", "commit", "codebook",
                 "restarted", "psnr", "usage", "perplexity"])

    t0 = time.time()
    last_eval, step, images, restarted_total = t0, 0, 0, 0
    acc = torch.zeros(6, device=dev)
    acc_n = 0
    while True:
        frac = (time.time() - t0) / args.seconds
        if frac >= 1.0:
            break
        lr = lr_at(frac, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        if nonsq and step % NONSQUARE_EVERY == NONSQUARE_EVERY - 1:
            pool = nonsq[(step // NONSQUARE_EVERY) % len(nonsq)]
        else:
            pool = square
        idx = torch.randint(0, pool.shape[0], (args.batch,), device=dev, generator=gen)
        x = to_pixels(pool[idx])
        with amp():
            y, zn, codes, commit, cb_loss = forward(vq, x)
        mse, l1, gl1 = loss_fn(x, y)
        loss = W_MSE * mse + W_L1 * l1 + W_GRAD * gl1 + BETA_COMMIT * commit + cb_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), GRAD_CLIP)
        opt.step()
        with torch.no_grad():
            if step == 0:
                # Initialise the codebook from real latents instead of HF's random init.
                pick = torch.randint(0, zn.shape[0], (K,), device=dev, generator=gen)
                codebook.data.copy_(zn[pick] + 0.01 * torch.randn(K, zn.shape[1], device=dev, generator=gen))
            usage.mul_(USAGE_DECAY).add_(torch.bincount(codes, minlength=K).float() / codes.numel(), alpha=1 - USAGE_DECAY)
            restarted = 0
            if step % RESTART_EVERY == RESTART_EVERY - 1 and frac < RESTART_UNTIL:
                dead = (usage < DEAD_FRAC / K).nonzero().flatten()
                restarted = dead.numel()
                if restarted:
                    pick = torch.randint(0, zn.shape[0], (restarted,), device=dev, generator=gen)
                    codebook.data[dead] = zn[pick] + 0.01 * torch.randn(restarted, zn.shape[1], device=dev, generator=gen)
                    usage[dead] = 1.0 / K
                    restarted_total += restarted
            # Keep the codebook parameter unit-norm (it ships that way; see module docstring).
            codebook.data.copy_(F.normalize(codebook.data, dim=1))
            acc += torch.stack([loss.detach(), mse.detach(), l1.detach(), gl1.detach(), commit.detach(), cb_loss.detach()])
            acc_n += 1
        step += 1
        images += args.batch
        now = time.time()
        do_eval = now - last_eval >= args.eval_every
        if step % 50 == 0 or do_eval:
            a = (acc / acc_n).tolist()
            acc.zero_()
            acc_n = 0
            row = [step, f"{now-t0:.1f}", images, f"{lr:.3g}"] + [f"{v:.5f}" for v in a] + [restarted_total, "", "", ""]
            if do_eval:
                ev = evaluate(vq, held, 250, amp)
                row[-3:] = [f"{ev['psnr']:.2f}", f"{ev['usage']:.3f}", f"{ev['perplexity']:.0f}"]
                last_eval = time.time()
            wr.writerow(row)
            fcsv.flush()
            log(f"[vq] step {step} {now-t0:.0f}s {images/(now-t0):.0f} img/s lr {lr:.2e} loss {a[0]:.4f} "
                f"mse {a[1]:.5f} l1 {a[2]:.4f} commit {a[4]:.4f} restarts {restarted_total}"
                + (f" | held-out psnr {row[-3]} usage {row[-2]} ppl {row[-1]}" if do_eval else ""))
    train_s = time.time() - t0
    log(f"[vq] trained {step} steps, {images} images in {train_s:.0f}s")

    # Export form: unit-norm codebook, weights rounded to fp16 (what ships; what encode.py uses).
    # Checks run in true fp32 (no TF32), like Tessera on the CPU.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    set_train(vq, False)
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
                   decoder_params=param_count(vq.decoder), encode_gflop_128=enc_gf, decode_gflop_128=dec_gf,
                   steps=step, images=images, seconds=train_s, restarted=restarted_total)
    try:
        ev_amp = evaluate(vq, held, 250, amp)
        log(f"[vq] held-out (ours, bf16, fp16 weights): psnr {ev_amp['psnr']:.2f} dB usage {ev_amp['usage']:.3f} "
            f"perplexity {ev_amp['perplexity']:.0f}")
        ev = evaluate(vq, held, 100, amp, fp32_hf=True)
        log(f"[vq] held-out (transformers encode/decode, fp32, fp16 weights): psnr {ev['psnr']:.2f} dB "
            f"(min {ev['psnr_min']:.2f}, of mean mse {ev['psnr_of_mean_mse']:.2f}) usage {ev['usage']:.3f} "
            f"perplexity {ev['perplexity']:.0f}")
        ck = check(vq, held)
        ok = ck["code_mismatch"] < 0.01 and ck["decode_max_abs_diff"] < 1e-3
        log(f"[vq] check {'OK' if ok else 'FAILED'}: code mismatch ours vs HF encode {ck['code_mismatch']:.5f} "
            f"(cosine lookup vs HF {ck['cosine_vs_euclidean']:.5f}), decode max |diff| "
            f"{ck['decode_max_abs_diff']:.2e}, codebook norms [{ck['codebook_norm_min']:.5f}, {ck['codebook_norm_max']:.5f}]")
        summary.update(heldout_ours_bf16=ev_amp, heldout_hf_fp32=ev, check=ck, check_ok=ok)
        wr.writerow([step, f"{train_s:.1f}", images, "final", "", "", "", "", "", "", restarted_total,
                     f"{ev['psnr']:.2f}", f"{ev['usage']:.3f}", f"{ev['perplexity']:.0f}"])
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
        all_codes = [encode.encode_split(vq, args.run, split, views[split], args.encode_batch, amp)
                     for split in encode.SPLITS if split in views]
        encode.finish(args.run, all_codes, K, t1)


if __name__ == "__main__":
    main()
