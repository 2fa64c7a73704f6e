//! `Emu3VQVAEAttentionBlock`: non-causal multi-head self-attention over the pixels of a
//! feature map. The normalisation lives outside (in `attn_norms` / `attn_norm`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

#[derive(Debug, Clone)]
pub struct VqAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl VqAttention {
    pub fn new(dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            q_proj: candle_nn::linear(dim, dim, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(dim, dim, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(dim, dim, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(dim, dim, vb.pp("out_proj"))?,
            heads,
        })
    }

    /// x: `(b, c, h, w)` (already normalised) -> `(b, c, h, w)`; the caller adds the residual.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hd = c / self.heads;
        let tokens = x.flatten_from(2)?.transpose(1, 2)?.contiguous()?; // (b, hw, c)
        let split = |t: Tensor| t.reshape((b, h * w, self.heads, hd))?.transpose(1, 2)?.contiguous();
        let q = split(self.q_proj.forward(&tokens)?)?;
        let k = split(self.k_proj.forward(&tokens)?)?;
        let v = split(self.v_proj.forward(&tokens)?)?;
        let att = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?; // (b, heads, hw, hd)
        let y = y.transpose(1, 2)?.reshape((b, h * w, c))?;
        let y = self.out_proj.forward(&y)?;
        y.transpose(1, 2)?.reshape((b, c, h, w))
    }
}
