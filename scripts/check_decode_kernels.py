"""Check and time the decode-step CUDA kernels (src/text/decode_kernels.cu) on a GPU.

Correctness: every kernel against a float64 reference on fresh random inputs, outputs poisoned
with NaN before each launch (so an unwritten element fails), as ||out - ref|| / ||ref||.
Speed: each kernel at the Emu3-Gen shapes (bf16, two rows: one image with guidance) against
PyTorch's own op on the same inputs (cuBLAS for the products), timed with CUDA events over
launches that cycle through enough copies of the weights to overflow the L2 cache, as a decode
step does; and the device-to-device copy bandwidth the decode floor is measured against.

    python3 scripts/check_decode_kernels.py [--out results.jsonl]

Needs torch and cupy with a CUDA GPU, and nvcc (the PTX is built with build.rs's flags).
"""
import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile

import cupy
import numpy as np
import torch

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "text", "decode_kernels.cu")
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# ||out - ref|| / ||ref|| allowed: f32 sums; one bf16/f16 rounding of the output (and of inputs
# the kernels round as the unfused path does).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
GEMV_THREADS = 128
GEMV_MAX_ELEMENTS = float("inf")  # cuda_decode.rs: the GEMV's default largest weight (every weight)
ATT_THREADS = 1024
L2_FLUSH_BYTES = 512 << 20
RESULTS = []


def record(**kv):
    RESULTS.append(kv)
    print(json.dumps(kv), flush=True)


def build(cap):
    ptx = os.path.join(tempfile.mkdtemp(), "decode_kernels.ptx")
    subprocess.run(["nvcc", "-ptx", "-O3", "-std=c++17", f"-arch=compute_{cap}", SRC, "-o", ptx], check=True)
    return cupy.RawModule(path=ptx)


def ptr(t):
    return np.uint64(t.data_ptr())


def rel_err(out, ref):
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


# --- launches, as src/text/cuda_decode.rs does them ------------------------------------------

def gemv(mod, x, w, y=None):
    rows, k = x.shape
    n = w.shape[0]
    y = torch.full((rows, n), float("nan"), dtype=x.dtype, device=x.device) if y is None else y
    mod.get_function(f"gemv_{SUFFIX[x.dtype]}_{rows}")((n,), (GEMV_THREADS,), (ptr(x), ptr(w), ptr(y), np.uint32(n), np.uint32(k)))
    return y


def gemv_add(mod, x, w, resid, y=None):
    rows, k = x.shape
    n = w.shape[0]
    y = torch.full((rows, n), float("nan"), dtype=x.dtype, device=x.device) if y is None else y
    mod.get_function(f"gemv_add_{SUFFIX[x.dtype]}_{rows}")(
        (n,), (GEMV_THREADS,), (ptr(x), ptr(w), ptr(resid), ptr(y), np.uint32(n), np.uint32(k)))
    return y


def gemv_swiglu(mod, x, w, y=None, norm=None):
    """With norm=(g, eps), x is the residual stream and the kernel applies the RMSNorm."""
    rows, k = x.shape
    inter = w.shape[0] // 2
    y = torch.full((rows, inter), float("nan"), dtype=x.dtype, device=x.device) if y is None else y
    if norm is None:
        mod.get_function(f"gemv_swiglu_{SUFFIX[x.dtype]}_{rows}")(
            (inter,), (GEMV_THREADS,), (ptr(x), ptr(w), ptr(y), np.uint32(inter), np.uint32(k)))
    else:
        mod.get_function(f"gemv_swiglu_norm_{SUFFIX[x.dtype]}_{rows}")(
            (inter,), (GEMV_THREADS,),
            (ptr(x), ptr(w), ptr(y), ptr(norm[0]), np.uint32(inter), np.uint32(k), np.float32(norm[1])))
    return y


def gemv_rope(mod, x, w, cos, sin, kc, vc, pos, q=None, norm=None):
    rows, k = x.shape
    _, kvh, max_len, hd = kc.shape
    h = w.shape[0] // hd - 2 * kvh
    q = torch.full((rows, h, hd), float("nan"), dtype=x.dtype, device=x.device) if q is None else q
    args = [ptr(x), ptr(w), ptr(cos), ptr(sin), ptr(q), ptr(kc), ptr(vc)]
    dims = [np.uint32(h), np.uint32(kvh), np.uint32(hd), np.uint32(max_len), np.uint32(pos), np.uint32(k)]
    if norm is None:
        mod.get_function(f"gemv_rope_{SUFFIX[x.dtype]}_{rows}")(((h + 2 * kvh) * hd // 2,), (GEMV_THREADS,), tuple(args + dims))
    else:
        mod.get_function(f"gemv_rope_norm_{SUFFIX[x.dtype]}_{rows}")(
            ((h + 2 * kvh) * hd // 2,), (GEMV_THREADS,), tuple(args + [ptr(norm[0])] + dims + [np.float32(norm[1])]))
    return q


def rms_ref(x, g, eps):
    """The RMSNorm's output as add_rms_norm stores it (rounded to x's dtype), in float64."""
    xd = x.double()
    return (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * g.double()).to(x.dtype).double()


def add_rms_norm(mod, x, p, w, eps, out=None):
    rows, d = x.shape
    parts = 1 if p is None else 2
    out = torch.full((parts, rows, d), float("nan"), dtype=x.dtype, device=x.device) if out is None else out
    threads = min(32, max(1, (d + 31) // 32)) * 32
    mod.get_function(f"add_rms_norm_{SUFFIX[x.dtype]}")(
        (rows,), (threads,),
        (ptr(x), ptr(p) if p is not None else np.uint64(0), ptr(w), ptr(out[0]), ptr(out[parts - 1]), np.uint32(d),
         np.float32(eps)))
    return out


def silu_mul(mod, gu, out=None):
    rows, two_i = gu.shape
    inter = two_i // 2
    out = torch.full((rows, inter), float("nan"), dtype=gu.dtype, device=gu.device) if out is None else out
    n = rows * inter
    mod.get_function(f"silu_mul_{SUFFIX[gu.dtype]}")(((n + 1023) // 1024,), (1024,),
                                                       (ptr(gu), ptr(out), np.uint32(rows), np.uint32(inter)))
    return out


def attention(mod, q, kc, vc, pad, kv_len, out=None):
    b, h, hd = q.shape
    kvh, max_len = kc.shape[1], kc.shape[2]
    out = torch.full_like(q, float("nan")) if out is None else out
    scale = float(torch.tensor(hd ** -0.5, dtype=q.dtype))
    shared = (kv_len + 33 * hd + 32) * 4
    mod.get_function(f"decode_attention_{SUFFIX[q.dtype]}")(
        (b * h,), (ATT_THREADS,),
        (ptr(q), ptr(kc), ptr(vc), ptr(pad), ptr(out), np.uint32(h), np.uint32(kvh), np.uint32(hd),
         np.uint32(max_len), np.uint32(kv_len), np.float32(scale)), shared_mem=shared)
    return out


def attention_ref(q, kc, vc, pad, kv_len):
    b, h, hd = q.shape
    kvh = kc.shape[1]
    k = kc[:, :, :kv_len].double().repeat_interleave(h // kvh, dim=1)
    v = vc[:, :, :kv_len].double().repeat_interleave(h // kvh, dim=1)
    s = torch.einsum("bhd,bhjd->bhj", q.double(), k) * hd ** -0.5
    j = torch.arange(kv_len, device=q.device)
    s = s.masked_fill(j[None, None, :] < pad.long()[:, None, None], float("-inf"))
    return torch.einsum("bhj,bhjd->bhd", s.softmax(-1), v)


def guided_argmax(mod, scores, cond, uncond, scale):
    jobs, n = cond.shape[0], scores.shape[1]
    picked = torch.full((jobs,), 0xFFFFFFF, dtype=torch.int32, device=scores.device)  # never a pick here
    mod.get_function(f"guided_argmax_{SUFFIX[scores.dtype]}")(
        (jobs,), (1024,), (ptr(scores), ptr(cond), ptr(uncond), ptr(scale), ptr(picked), np.uint32(n)))
    return picked


# --- checks ----------------------------------------------------------------------------------

def check(mod, g):
    dev = "cuda"
    ok = True
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        # n not a multiple of the block's rows; k's vectors not a multiple of 32 x unroll.
        for rows in (1, 2, 3, 8):
            for n, k in ((1001, 4104), (64, 136)):
                x = torch.randn(rows, k, generator=g, device=dev).to(dt)
                w = (torch.randn(n, k, generator=g, device=dev) * k ** -0.5).to(dt)
                ref = x.double() @ w.double().T
                e = rel_err(gemv(mod, x, w), ref)
                e_torch = rel_err(x @ w.T, ref)
                good = e < TOL[dt]
                ok &= good
                record(check="gemv", dtype=SUFFIX[dt], rows=rows, n=n, k=k, rel_err=e, torch_rel_err=e_torch, ok=good)
        for rows, d in ((2, 4096), (3, 520), (1, 40)):
            x = torch.randn(rows, d, generator=g, device=dev).to(dt)
            p = torch.randn(rows, d, generator=g, device=dev).to(dt)
            w = (1 + 0.1 * torch.randn(d, generator=g, device=dev)).to(dt)
            eps = 1e-5
            s_ref = (x.double() + p.double()).to(dt).double()  # the sum, stored in the dtype
            norm = lambda v: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w.double()
            out = add_rms_norm(mod, x, p, w, eps)
            e_sum, e_norm = rel_err(out[0], s_ref), rel_err(out[1], norm(s_ref))
            e_plain = rel_err(add_rms_norm(mod, x, None, w, eps)[0], norm(x.double()))
            good = e_sum < TOL[dt] and e_norm < TOL[dt] and e_plain < TOL[dt]
            ok &= good
            record(check="add_rms_norm", dtype=SUFFIX[dt], rows=rows, d=d, rel_err_sum=e_sum, rel_err_norm=e_norm,
                   rel_err_norm_only=e_plain, ok=good)
        for rows, inter in ((2, 14336), (3, 1000)):
            gu = torch.randn(rows, 2 * inter, generator=g, device=dev).to(dt) * 3
            gd, ud = gu.double()[:, :inter], gu.double()[:, inter:]
            ref = torch.nn.functional.silu(gd) * ud
            e = rel_err(silu_mul(mod, gu), ref)
            good = e < TOL[dt]
            ok &= good
            record(check="silu_mul", dtype=SUFFIX[dt], rows=rows, inter=inter, rel_err=e, ok=good)
        for rows, n, k in ((2, 1001, 4104), (3, 64, 136), (8, 520, 64)):
            x = torch.randn(rows, k, generator=g, device=dev).to(dt)
            w = (torch.randn(n, k, generator=g, device=dev) * k ** -0.5).to(dt)
            resid = torch.randn(rows, n, generator=g, device=dev).to(dt)
            ref = (resid.double() + (x.double() @ w.double().T).to(dt).double()).to(dt).double()
            e = rel_err(gemv_add(mod, x, w, resid), ref)
            good = e < TOL[dt]
            ok &= good
            record(check="gemv_add", dtype=SUFFIX[dt], rows=rows, n=n, k=k, rel_err=e, ok=good)
        for rows, inter, k in ((2, 1001, 4104), (3, 64, 136), (8, 300, 520)):
            for normed in (False, True):
                x = torch.randn(rows, k, generator=g, device=dev).to(dt) * (4 if normed else 1)
                w = (torch.randn(2 * inter, k, generator=g, device=dev) * k ** -0.5 * 3).to(dt)
                gw = (1 + 0.1 * torch.randn(k, generator=g, device=dev)).to(dt)
                xin = rms_ref(x, gw, 1e-5) if normed else x.double()
                gu = xin @ w.double().T
                ref = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
                e = rel_err(gemv_swiglu(mod, x, w, norm=(gw, 1e-5) if normed else None), ref)
                good = e < TOL[dt]
                ok &= good
                record(check="gemv_swiglu_norm" if normed else "gemv_swiglu", dtype=SUFFIX[dt], rows=rows, inter=inter,
                       k=k, rel_err=e, ok=good)
        for (rows, hd, h, kvh, k), normed in itertools.product(
                ((2, 128, 4, 2, 520), (3, 64, 6, 3, 384), (1, 32, 2, 1, 136)), (False, True)):
            max_len, pos, half = 40, 17, hd // 2
            x = torch.randn(rows, k, generator=g, device=dev).to(dt) * (4 if normed else 1)
            gw = (1 + 0.1 * torch.randn(k, generator=g, device=dev)).to(dt)
            w = (torch.randn((h + 2 * kvh) * hd, k, generator=g, device=dev) * k ** -0.5).to(dt)
            ang = torch.rand(rows, half, generator=g, device=dev) * 6.3
            cos, sin = ang.cos().to(dt), ang.sin().to(dt)
            kc = torch.randn(rows, kvh, max_len, hd, generator=g, device=dev).to(dt)
            vc = torch.randn(rows, kvh, max_len, hd, generator=g, device=dev).to(dt)
            kc0, vc0 = kc.clone(), vc.clone()
            xin = rms_ref(x, gw, 1e-5) if normed else x.double()
            qkv = (xin @ w.double().T).view(rows, h + 2 * kvh, hd)
            c, s_ = cos.double()[:, None, :], sin.double()[:, None, :]
            rot = lambda t: torch.cat([t[..., :half] * c - t[..., half:] * s_, t[..., :half] * s_ + t[..., half:] * c], -1)
            q = gemv_rope(mod, x, w, cos, sin, kc, vc, pos, norm=(gw, 1e-5) if normed else None)
            e_q = rel_err(q, rot(qkv[:, :h]))
            e_k = rel_err(kc[:, :, pos], rot(qkv[:, h:h + kvh]))
            e_v = rel_err(vc[:, :, pos], qkv[:, h + kvh:])
            others = [j for j in range(max_len) if j != pos]
            untouched = bool(torch.equal(kc[:, :, others], kc0[:, :, others]) and torch.equal(vc[:, :, others], vc0[:, :, others]))
            good = e_q < TOL[dt] and e_k < TOL[dt] and e_v < TOL[dt] and untouched
            ok &= good
            record(check="gemv_rope_norm" if normed else "gemv_rope", dtype=SUFFIX[dt], rows=rows, hd=hd, heads=h, kv_heads=kvh, k=k, rel_err_q=e_q,
                   rel_err_k=e_k, rel_err_v=e_v, rest_of_cache_untouched=untouched, ok=good)
        for hd, h, kvh, kv_len in ((128, 32, 8, 600), (64, 8, 2, 1100), (32, 4, 4, 37)):
            b, max_len = 2, kv_len + 100
            q = torch.randn(b, h, hd, generator=g, device=dev).to(dt)
            kc = torch.randn(b, kvh, max_len, hd, generator=g, device=dev).to(dt)
            vc = torch.randn(b, kvh, max_len, hd, generator=g, device=dev).to(dt)
            kc[:, :, kv_len:] = float("nan")  # past the cache's length: never read
            vc[:, :, kv_len:] = float("nan")
            pad = torch.tensor([0, min(17, kv_len - 1)], dtype=torch.int32, device=dev)
            ref = attention_ref(q, kc, vc, pad, kv_len)
            e = rel_err(attention(mod, q, kc, vc, pad, kv_len), ref)
            good = e < TOL[dt]
            ok &= good
            record(check="attention", dtype=SUFFIX[dt], hd=hd, heads=h, kv_heads=kvh, kv_len=kv_len, rel_err=e, ok=good)
        # Guidance and the greedy pick: two guided jobs (rows 0, 1 against 2, 3) and one without
        # guidance (its row as both); equal to torch's f32 ops and argmax (the first maximum),
        # including planted ties: the same scores at two indices, made the largest.
        for n in (32768, 1001, 37):
            scores = torch.randn(4, n, generator=g, device=dev).to(dt) * 4
            j1, j2 = n // 3, n // 3 + 5
            for r, bump in ((0, 100), (2, 1)):
                scores[r, j1] = scores[r, j2] = bump
            cond = torch.tensor([0, 1, 3], dtype=torch.int32, device=dev)
            uncond = torch.tensor([2, 3, 3], dtype=torch.int32, device=dev)
            scale = torch.tensor([3.0, 2.5, 1.0], dtype=torch.float32, device=dev)
            f = scores.float()
            ref = ((f[cond.long()] - f[uncond.long()]) * scale[:, None] + f[uncond.long()]).argmax(-1)
            got = guided_argmax(mod, scores, cond, uncond, scale)
            good = bool(torch.equal(got.long(), ref)) and int(ref[0]) == j1
            ok &= good
            record(check="guided_argmax", dtype=SUFFIX[dt], n=n, picked=got.tolist(), torch=ref.tolist(), ok=good)
    return ok


# --- timing ----------------------------------------------------------------------------------

def timed(fn, reps):
    """Median microseconds of one call over `reps` calls (3 rounds), after a warm-up."""
    for i in range(5):
        fn(i)
    torch.cuda.synchronize()
    rounds = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(reps):
            fn(i)
        b.record()
        torch.cuda.synchronize()
        rounds.append(a.elapsed_time(b) * 1e3 / reps)
    return sorted(rounds)[1]


def bench(mod, g, reps):
    dev, dt = "cuda", torch.bfloat16
    # Emu3-Gen (8.49B): hidden 4096, 32 heads / 8 kv heads of 128, intermediate 14336, 32
    # layers; the head restricted to the 32,768 visual tokens.
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
              "head": (32768, 4096)}
    per_layer = {}
    for name, (n, k) in shapes.items():
        copies = max(2, math.ceil(L2_FLUSH_BYTES / (n * k * 2)))
        ws = [(torch.randn(n, k, generator=g, device=dev) * 0.02).to(dt) for _ in range(copies)]
        x = torch.randn(2, k, generator=g, device=dev).to(dt)
        y = torch.empty(2, n, dtype=dt, device=dev)
        t_k = timed(lambda i: gemv(mod, x, ws[i % copies], y), reps)
        t_t = timed(lambda i: torch.matmul(x, ws[i % copies].T, out=y), reps)
        gb = n * k * 2 / 1e9
        per_layer[name] = (t_k, t_t)
        record(bench="gemv", shape=name, n=n, k=k, rows=2, kernel_us=t_k, cublas_us=t_t,
               kernel_tb_s=gb / t_k * 1e3, cublas_tb_s=gb / t_t * 1e3)
        del ws
    # The fused products against the unfused launches they replace (same weights).
    for name, (n, k) in (("gate_up", shapes["gate_up"]), ("qkv", shapes["qkv"])):
        copies = max(2, math.ceil(L2_FLUSH_BYTES / (n * k * 2)))
        ws = [(torch.randn(n, k, generator=g, device=dev) * 0.02).to(dt) for _ in range(copies)]
        x = torch.randn(2, k, generator=g, device=dev).to(dt)
        y = torch.empty(2, n, dtype=dt, device=dev)
        if name == "gate_up":  # SwiGLU inside the gate|up GEMV
            h_out = torch.empty(2, n // 2, dtype=dt, device=dev)
            t_f = timed(lambda i: gemv_swiglu(mod, x, ws[i % copies], h_out), reps)
            t_u = timed(lambda i: silu_mul(mod, gemv(mod, x, ws[i % copies], y), h_out), reps)
            record(bench="gemv_swiglu", rows=2, n=n, k=k, fused_us=t_f, gemv_then_silu_mul_us=t_u)
        else:
            kvh, hd, max_len = 8, 128, 1200
            kc, vc = (torch.empty(2, kvh, max_len, hd, dtype=dt, device=dev) for _ in range(2))
            ang = torch.rand(2, hd // 2, generator=g, device=dev)
            cos, sin = ang.cos().to(dt), ang.sin().to(dt)
            q = torch.empty(2, n // hd - 2 * kvh, hd, dtype=dt, device=dev)
            t_f = timed(lambda i: gemv_rope(mod, x, ws[i % copies], cos, sin, kc, vc, 600, q), reps)
            t_u = timed(lambda i: gemv(mod, x, ws[i % copies], y), reps)
            record(bench="gemv_rope", rows=2, n=n, k=k, fused_us=t_f, gemv_alone_us=t_u)
        del ws
    gu = torch.randn(2, 2 * 14336, generator=g, device=dev).to(dt)
    out = torch.empty(2, 14336, dtype=dt, device=dev)
    t_k = timed(lambda i: silu_mul(mod, gu, out), reps)
    t_t = timed(lambda i: torch.mul(torch.nn.functional.silu(gu[:, :14336]), gu[:, 14336:], out=out), reps)
    per_layer["silu_mul"] = (t_k, t_t)
    record(bench="silu_mul", rows=2, inter=14336, kernel_us=t_k, torch_us=t_t)
    x, p = (torch.randn(2, 4096, generator=g, device=dev).to(dt) for _ in range(2))
    w = torch.ones(4096, dtype=dt, device=dev)
    buf = torch.empty(2, 2, 4096, dtype=dt, device=dev)
    t_k = timed(lambda i: add_rms_norm(mod, x, p, w, 1e-5, buf), reps)

    def unfused(i):  # what the path without the kernel launches: an add and a norm
        s = x + p
        return torch.nn.functional.rms_norm(s, (4096,), w, 1e-5)
    t_t = timed(unfused, reps)
    per_layer["add_rms_norm"] = (2 * t_k, None)
    record(bench="add_rms_norm", rows=2, d=4096, kernel_us=t_k, torch_add_then_norm_us=t_t)
    for kv_len in (300, 600, 1100):
        b, h, kvh, hd, max_len = 2, 32, 8, 128, 1200
        kcs = [torch.randn(b, kvh, max_len, hd, generator=g, device=dev).to(dt) for _ in range(8)]
        q = torch.randn(b, h, hd, generator=g, device=dev).to(dt)
        pad = torch.tensor([0, 5], dtype=torch.int32, device=dev)
        o = torch.empty_like(q)
        t_k = timed(lambda i: attention(mod, q, kcs[i % 8], kcs[(i + 1) % 8], pad, kv_len, o), reps)
        kv_bytes = 2 * b * kvh * kv_len * hd * 2
        record(bench="attention", kv_len=kv_len, kernel_us=t_k, kv_mb=kv_bytes / 1e6,
               kernel_tb_s=kv_bytes / t_k / 1e6)
        if kv_len == 600:
            per_layer["attention"] = (t_k, None)
    # Copy bandwidth, counting bytes read and written (the decode floor's denominator).
    src = torch.empty(1 << 31, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = timed(lambda i: dst.copy_(src), 20)
    record(bench="copy", bytes=2 * src.numel(), tb_s=2 * src.numel() / t / 1e6)
    layers = 32
    prods = ("qkv", "o", "gate_up", "down")
    chosen = lambda s: per_layer[s][0] if shapes[s][0] * shapes[s][1] <= GEMV_MAX_ELEMENTS else per_layer[s][1]
    record(bench="step_products", layers=layers,
           kernel_ms=(layers * sum(per_layer[s][0] for s in prods) + per_layer["head"][0]) / 1e3,
           cublas_ms=(layers * sum(per_layer[s][1] for s in prods) + per_layer["head"][1]) / 1e3,
           default_ms=(layers * sum(chosen(s) for s in prods) + chosen("head")) / 1e3,
           attention_ms=layers * per_layer["attention"][0] / 1e3, silu_mul_ms=layers * per_layer["silu_mul"][0] / 1e3,
           add_rms_norm_ms=layers * per_layer["add_rms_norm"][0] / 1e3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="also write the JSON lines here")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args()
    cap = "".join(map(str, torch.cuda.get_device_capability()))
    mod = build(cap)
    g = torch.Generator(device="cuda").manual_seed(1)
    ok = check(mod, g)
    if not args.no_bench:
        bench(mod, g, args.reps)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in RESULTS)
    print("all checks passed" if ok else "CHECKS FAILED", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
