//! Grouped-query self-attention with RoPE and a key/value cache (`Emu3Attention`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{RmsNorm, VarBuilder};

use super::cache::LayerCache;
use super::cuda_decode;

use super::linear::{CpuWeights, Linear};

use super::rope::RotaryEmbedding;
use crate::config::TextConfig;

/// How a forward pass attends: the generic tensor ops with an optional additive mask, or the
/// fused CUDA decode kernels (one new token per row) with each row's padding `(b,)` u32.
pub enum Step {
    Generic { mask: Option<Tensor> },
    Fused { pad: Tensor },
}

#[derive(Debug, Clone)]
pub struct Attention {
    /// q_proj | k_proj | v_proj stacked: one pass over their weights per step.
    qkv_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn new(cfg: &TextConfig, vb: VarBuilder, weights: CpuWeights) -> Result<Self> {
        let (d, h, kv, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let lin = |i, o, name| {
            if cfg.attention_bias {
                candle_nn::linear(i, o, vb.pp(name))
            } else {
                candle_nn::linear_no_bias(i, o, vb.pp(name))
            }
        };
        let o = lin(h * hd, d, "o_proj")?;
        Ok(Self {
            qkv_proj: Linear::fused(&[lin(d, h * hd, "q_proj")?, lin(d, kv * hd, "k_proj")?, lin(d, kv * hd, "v_proj")?], weights)?,
            o_proj: Linear::with_cpu_weights(o.weight().clone(), o.bias().cloned(), weights)?,
            heads: h,
            kv_heads: kv,
            head_dim: hd,
        })
    }

    /// x `(b, t, d)`; cos/sin `(b, t, hd/2)`; `mask` `(b, 1, t, kv_len)` additive, or, for the
    /// fused CUDA decode step (see `Step`), each row's padding.
    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, step: &Step, cache: &mut LayerCache) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let mask = match step {
            Step::Fused { pad } => {
                let y = cuda_decode::attend(x, None, &self.qkv_proj, cos, sin, pad, cache, h, kvh, hd)?;
                return self.o_proj.forward(&y);
            }
            Step::Generic { mask } => mask.as_ref(),
        };
        let qkv = self.qkv_proj.forward(x)?;
        let q = qkv.narrow(2, 0, h * hd)?.reshape((b, t, h, hd))?.transpose(1, 2)?;
        let k = qkv.narrow(2, h * hd, kvh * hd)?.reshape((b, t, kvh, hd))?.transpose(1, 2)?;
        let v = qkv.narrow(2, (h + kvh) * hd, kvh * hd)?.reshape((b, t, kvh, hd))?.transpose(1, 2)?.contiguous()?;
        let q = RotaryEmbedding::apply(&q, cos, sin)?;
        let k = RotaryEmbedding::apply(&k, cos, sin)?;
        let (k, v) = cache.append(&k, &v)?; // (b, kvh, kv_len, hd)
        let kv_len = k.dim(2)?;

        let n_rep = h / kvh;
        if t == 1
            && let Some(y) = single_query_cpu(&q, &k, &v, mask, n_rep)? {
                return self.o_proj.forward(&y.reshape((b, 1, h * hd))?);
            }
        // GQA without copying the keys: query head `i` uses kv head `i / n_rep`, so the
        // (b, h, t, hd) queries are (b, kvh, n_rep * t, hd) in the same memory.
        let q = q.reshape((b, kvh, n_rep * t, hd))?;
        let att = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        let att = match mask {
            Some(m) => att
                .reshape((b, kvh, n_rep, t, kv_len))?
                .broadcast_add(&m.unsqueeze(2)?)?
                .reshape((b, kvh, n_rep * t, kv_len))?,
            None => att,
        };
        let dtype = att.dtype();
        let att = candle_nn::ops::softmax_last_dim(&att.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
        let y = att.matmul(&v)?; // (b, kvh, n_rep * t, hd)
        let y = y.reshape((b, h, t, hd))?.transpose(1, 2)?.reshape((b, t, h * hd))?;
        self.o_proj.forward(&y)
    }

    /// A fused CUDA decode step of the block with its norm and residual: `x + o_proj(attn(norm(x)))`
    /// for the residual stream `x` `(b, 1, d)`, with the norm applied inside the q|k|v product and
    /// the residual added by `o_proj`'s (see `cuda_decode::norm_fold`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_residual(&self, x: &Tensor, norm: &RmsNorm, cos: &Tensor, sin: &Tensor, pad: &Tensor, cache: &mut LayerCache) -> Result<Tensor> {
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let y = cuda_decode::attend(x, Some(norm), &self.qkv_proj, cos, sin, pad, cache, h, kvh, hd)?;
        cuda_decode::project_add(&self.o_proj, &y, x)
    }
}

/// Attention of one new query per row on the CPU in f32, straight over the cache's memory:
/// each (row, kv head) reads its keys and values once for all `n_rep` query heads that share
/// them, with no intermediate tensors. `None` when the inputs are not CPU f32.
/// q `(b, h, 1, hd)`; k, v `(b, kvh, kv_len, hd)` (views of the cache); mask `(b, 1, 1, kv_len)`.
fn single_query_cpu(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, n_rep: usize) -> Result<Option<Tensor>> {
    use candle_core::{CpuStorage, Storage};
    use rayon::prelude::*;
    if !q.device().is_cpu() || q.dtype() != DType::F32 || k.dtype() != DType::F32 {
        return Ok(None);
    }
    let (b, h, _, hd) = q.dims4()?;
    let (_, kvh, kv_len, _) = k.dims4()?;
    let q = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mask = mask.map(|m| m.flatten_all().and_then(|m| m.to_vec1::<f32>())).transpose()?;
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(kd)), Storage::Cpu(CpuStorage::F32(vd))) = (&*ks, &*vs) else {
        return Ok(None);
    };
    // Rows of one (row, kv head) are contiguous in the cache: strides (.., .., hd, 1).
    let (kst, vst) = (kl.stride(), vl.stride());
    if kst[2] != hd || kst[3] != 1 || vst[2] != hd || vst[3] != 1 {
        return Ok(None);
    }
    let scale = (hd as f32).powf(-0.5);
    let mut out = vec![0f32; b * h * hd];
    out.par_chunks_mut(n_rep * hd).enumerate().for_each(|(bk, out)| {
        let (bi, g) = (bk / kvh, bk % kvh);
        let k0 = kl.start_offset() + bi * kst[0] + g * kst[1];
        let v0 = vl.start_offset() + bi * vst[0] + g * vst[1];
        let group = Group {
            q: &q[(bi * h + g * n_rep) * hd..(bi * h + (g + 1) * n_rep) * hd],
            keys: &kd[k0..k0 + kv_len * hd],
            values: &vd[v0..v0 + kv_len * hd],
            mask: mask.as_ref().map(|m| &m[bi * kv_len..(bi + 1) * kv_len]),
            hd,
            scale,
        };
        group.run(out);
    });
    Ok(Some(Tensor::from_vec(out, (b, h, 1, hd), &candle_core::Device::Cpu)?))
}

/// The query heads that share one (row, kv head): `q` holds them back to back.
struct Group<'a> {
    q: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    mask: Option<&'a [f32]>,
    hd: usize,
    scale: f32,
}

impl Group<'_> {
    /// Softmax attention of every query head of the group into `out` (heads back to back):
    /// the scores of each head over the group's keys, their softmax, then the weighted sum of
    /// the values (normalised once at the end). With AVX-512 and a head size of 64 or 128 the
    /// first and last steps keep a head's vectors in registers; otherwise the loops are
    /// compiled for AVX2/FMA where the processor has it (the crate is built for baseline
    /// x86-64, so the processor is checked at run time).
    fn run(&self, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") && (self.hd == 64 || self.hd == 128) {
                // Safety: the feature was just detected.
                unsafe { self.run_avx512(out) };
                return;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // Safety: the features were just detected.
                unsafe { self.run_avx2(out) };
                return;
            }
        }
        self.run_with(out, false);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, out: &mut [f32]) {
        self.run_with(out, true);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, out: &mut [f32]) {
        self.run_with(out, false);
    }

    /// `wide`: use the AVX-512 routines (only when the processor has them and hd is 64 or 128).
    #[inline(always)]
    fn run_with(&self, out: &mut [f32], wide: bool) {
        let (hd, kv_len) = (self.hd, self.keys.len() / self.hd);
        let heads = self.q.len() / hd;
        let mut scores = vec![0f32; heads * kv_len];
        if wide {
            #[cfg(target_arch = "x86_64")]
            // Safety: avx512f was detected (run_avx512) and hd is 64 or 128; the slices hold
            // `heads` queries and `kv_len` keys of hd.
            unsafe {
                avx512::for_head_groups(hd, heads, |c, h0, nh| {
                    let q = &self.q[h0 * hd..(h0 + nh) * hd];
                    let rows = &mut scores[h0 * kv_len..(h0 + nh) * kv_len];
                    avx512::dispatch!(c, nh, scores(q, self.keys, kv_len, rows))
                });
            }
        } else {
            for (qv, row) in self.q.chunks_exact(hd).zip(scores.chunks_exact_mut(kv_len.max(1))) {
                for (s, key) in row.iter_mut().zip(self.keys.chunks_exact(hd)) {
                    *s = dot(qv, key);
                }
            }
        }
        let mut inv_total = vec![0f32; heads];
        for (row, inv) in scores.chunks_exact_mut(kv_len.max(1)).zip(inv_total.iter_mut()) {
            let mut max = f32::NEG_INFINITY;
            for (j, s) in row.iter_mut().enumerate() {
                *s = *s * self.scale + self.mask.map_or(0.0, |m| m[j]);
                max = max.max(*s);
            }
            let mut total = 0f32;
            for s in row.iter_mut() {
                *s = (*s - max).exp();
                total += *s;
            }
            *inv = 1.0 / total;
        }
        if wide {
            #[cfg(target_arch = "x86_64")]
            // Safety: as above; `out` holds `heads` outputs of hd.
            unsafe {
                avx512::for_head_groups(hd, heads, |c, h0, nh| {
                    let p = &scores[h0 * kv_len..(h0 + nh) * kv_len];
                    let inv = &inv_total[h0..h0 + nh];
                    let o = &mut out[h0 * hd..(h0 + nh) * hd];
                    avx512::dispatch!(c, nh, weighted_sum(p, kv_len, self.values, inv, o))
                });
            }
        } else {
            for ((o, row), inv) in out.chunks_exact_mut(hd).zip(scores.chunks_exact(kv_len.max(1))).zip(inv_total) {
                o.fill(0.0);
                for (&p, value) in row.iter().zip(self.values.chunks_exact(hd)) {
                    for (oi, vi) in o.iter_mut().zip(value) {
                        *oi += p * vi;
                    }
                }
                o.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Keys/values prefetched this many ahead (a key of 64 floats is 4 cache lines).
    const AHEAD: usize = 8;

    /// Call `f(c, h0, nh)` for groups of `nh` consecutive query heads that fit in registers
    /// (up to 4 heads of 64 values, `c` = 4 vectors each, or 2 heads of 128, `c` = 8).
    pub fn for_head_groups(hd: usize, heads: usize, mut f: impl FnMut(usize, usize, usize)) {
        let (c, max) = if hd == 64 { (4, 4) } else { (8, 2) };
        let mut h0 = 0;
        while h0 < heads {
            let nh = (heads - h0).min(max);
            f(c, h0, nh);
            h0 += nh;
        }
    }

    /// `$f::<C, H>($args)` for the (vectors per head, heads) pairs `for_head_groups` gives.
    macro_rules! dispatch {
        ($c:expr, $nh:expr, $f:ident($($arg:expr),*)) => {
            match ($c, $nh) {
                (4, 4) => avx512::$f::<4, 4>($($arg),*),
                (4, 3) => avx512::$f::<4, 3>($($arg),*),
                (4, 2) => avx512::$f::<4, 2>($($arg),*),
                (4, _) => avx512::$f::<4, 1>($($arg),*),
                (_, 2) => avx512::$f::<8, 2>($($arg),*),
                _ => avx512::$f::<8, 1>($($arg),*),
            }
        };
    }
    pub(super) use dispatch;

    /// `scores[h * kv_len + j] = q_h . key_j` for `H` heads of `16 * C` values: the queries stay
    /// in registers, each key is loaded once for all of them, and each dot product runs as two
    /// independent chains. The caller checks avx512f.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores<const C: usize, const H: usize>(q: &[f32], keys: &[f32], kv_len: usize, scores: &mut [f32]) {
        assert!(C.is_multiple_of(2) && q.len() == H * 16 * C && keys.len() >= kv_len * 16 * C && scores.len() == H * kv_len);
        unsafe {
            let qv: [[__m512; C]; H] = std::array::from_fn(|h| std::array::from_fn(|c| _mm512_loadu_ps(q.as_ptr().add((h * C + c) * 16))));
            for j in 0..kv_len {
                let kp = keys.as_ptr().add(j * 16 * C);
                for c in 0..C {
                    _mm_prefetch::<_MM_HINT_T0>(kp.wrapping_add((AHEAD * C + c) * 16) as *const i8);
                }
                let kv: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(kp.add(16 * c)));
                for (h, qh) in qv.iter().enumerate() {
                    let mut a = _mm512_mul_ps(qh[0], kv[0]);
                    let mut b = _mm512_mul_ps(qh[1], kv[1]);
                    for c in (2..C).step_by(2) {
                        a = _mm512_fmadd_ps(qh[c], kv[c], a);
                        b = _mm512_fmadd_ps(qh[c + 1], kv[c + 1], b);
                    }
                    *scores.get_unchecked_mut(h * kv_len + j) = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
                }
            }
        }
    }

    /// `o_h = inv[h] * sum_j p[h * kv_len + j] * value_j` for `H` heads of `16 * C` values: the
    /// sums stay in registers (H x C independent chains) and each value is loaded once.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weighted_sum<const C: usize, const H: usize>(p: &[f32], kv_len: usize, values: &[f32], inv: &[f32], o: &mut [f32]) {
        assert!(p.len() == H * kv_len && values.len() >= kv_len * 16 * C && inv.len() == H && o.len() == H * 16 * C);
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); C]; H];
            for j in 0..kv_len {
                let vp = values.as_ptr().add(j * 16 * C);
                for c in 0..C {
                    _mm_prefetch::<_MM_HINT_T0>(vp.wrapping_add((AHEAD * C + c) * 16) as *const i8);
                }
                let v: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(vp.add(16 * c)));
                for (h, acc_h) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*p.get_unchecked(h * kv_len + j));
                    for (a, vc) in acc_h.iter_mut().zip(&v) {
                        *a = _mm512_fmadd_ps(w, *vc, *a);
                    }
                }
            }
            for (h, acc_h) in acc.iter().enumerate() {
                let s = _mm512_set1_ps(inv[h]);
                for (c, a) in acc_h.iter().enumerate() {
                    _mm512_storeu_ps(o.as_mut_ptr().add((h * C + c) * 16), _mm512_mul_ps(*a, s));
                }
            }
        }
    }
}

/// Dot product with eight independent partial sums, so it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Softmax attention in f64, one head at a time.
    fn reference(g: &Group, heads: usize) -> Vec<f64> {
        let (hd, kv_len) = (g.hd, g.keys.len() / g.hd);
        let mut out = vec![0f64; heads * hd];
        for h in 0..heads {
            let q = &g.q[h * hd..(h + 1) * hd];
            let s: Vec<f64> = (0..kv_len)
                .map(|j| {
                    let d: f64 = (0..hd).map(|i| q[i] as f64 * g.keys[j * hd + i] as f64).sum();
                    d * g.scale as f64 + g.mask.map_or(0.0, |m| m[j] as f64)
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
            let total: f64 = e.iter().sum();
            for (j, ej) in e.iter().enumerate() {
                for i in 0..hd {
                    out[h * hd + i] += ej / total * g.values[j * hd + i] as f64;
                }
            }
        }
        out
    }

    #[test]
    fn every_attention_path_matches_a_double_precision_reference() {
        let mut seed = 7u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        for &(hd, heads, kv_len, masked) in &[(64, 3, 1, false), (64, 3, 37, true), (64, 4, 50, true), (64, 6, 9, false), (128, 2, 300, true), (128, 3, 10, true), (32, 4, 20, false), (8, 1, 5, true)] {
            let q: Vec<f32> = (0..heads * hd).map(|_| rnd()).collect();
            let keys: Vec<f32> = (0..kv_len * hd).map(|_| rnd()).collect();
            let values: Vec<f32> = (0..kv_len * hd).map(|_| rnd()).collect();
            // Left padding: the first few keys masked out.
            let mask: Vec<f32> = (0..kv_len).map(|j| if masked && j < kv_len / 3 { f32::NEG_INFINITY } else { 0.0 }).collect();
            let g = Group { q: &q, keys: &keys, values: &values, mask: masked.then_some(&mask[..]), hd, scale: (hd as f32).powf(-0.5) };
            let want = reference(&g, heads);
            let mut paths = vec![("portable", false)];
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") && (hd == 64 || hd == 128) {
                paths.push(("avx512", true));
            }
            for (name, wide) in paths {
                let mut got = vec![f32::NAN; heads * hd];
                g.run_with(&mut got, wide);
                for (a, b) in got.iter().zip(&want) {
                    assert!((*a as f64 - b).abs() < 1e-5, "{name} hd {hd} heads {heads} kv {kv_len}: {a} vs {b}");
                }
            }
            let mut got = vec![f32::NAN; heads * hd];
            g.run(&mut got);
            assert!(got.iter().zip(&want).all(|(a, b)| (*a as f64 - b).abs() < 1e-5));
        }
    }
}
