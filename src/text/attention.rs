//! Grouped-query self-attention with RoPE and a key/value cache (`Emu3Attention`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use candle_nn::kv_cache::KvCache;

use super::linear::Linear;

use super::rope::RotaryEmbedding;
use crate::config::TextConfig;

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
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
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
            qkv_proj: Linear::fused(&[lin(d, h * hd, "q_proj")?, lin(d, kv * hd, "k_proj")?, lin(d, kv * hd, "v_proj")?])?,
            o_proj: Linear::new(o.weight().clone(), o.bias().cloned())?,
            heads: h,
            kv_heads: kv,
            head_dim: hd,
        })
    }

    /// x `(b, t, d)`; cos/sin `(b, t, hd/2)`; mask `(b, 1, t, kv_len)` additive.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
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
    /// Softmax attention of every query head of the group into `out` (heads back to back),
    /// compiled for AVX2/FMA where the processor has it (the crate is built for baseline x86-64).
    fn run(&self, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // Safety: the features were just detected.
                unsafe { self.run_avx2(out) };
                return;
            }
        }
        self.run_portable(out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, out: &mut [f32]) {
        self.run_portable(out);
    }

    #[inline(always)]
    fn run_portable(&self, out: &mut [f32]) {
        let (hd, kv_len) = (self.hd, self.keys.len() / self.hd);
        let mut scores = vec![0f32; kv_len];
        for (qv, o) in self.q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                *s = dot(qv, &self.keys[j * hd..(j + 1) * hd]) * self.scale + self.mask.map_or(0.0, |m| m[j]);
                max = max.max(*s);
            }
            let mut total = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                total += *s;
            }
            o.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                let p = p / total;
                for (oi, vi) in o.iter_mut().zip(&self.values[j * hd..(j + 1) * hd]) {
                    *oi += p * vi;
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
