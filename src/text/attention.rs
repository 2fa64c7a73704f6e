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

        // GQA without copying the keys: query head `i` uses kv head `i / n_rep`, so the
        // (b, h, t, hd) queries are (b, kvh, n_rep * t, hd) in the same memory.
        let n_rep = h / kvh;
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
