//! `Emu3TextModel` + `lm_head`: a Llama-style decoder (RMSNorm, GQA attention with RoPE,
//! SwiGLU), with the residual dropout of Emu3 being a no-op at inference.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};

use super::attention::{Attention, Step};
use super::cache::Cache;
use super::cuda_decode;
use super::linear::CpuWeights;
use super::mlp::Mlp;
use super::rope::RotaryEmbedding;
use crate::config::TextConfig;

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder, weights: CpuWeights) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        Ok(Self {
            input_layernorm: candle_nn::rms_norm(cfg.hidden_size, eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"), weights)?,
            post_attention_layernorm: candle_nn::rms_norm(cfg.hidden_size, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"), weights)?,
        })
    }
}

/// `x + pending` (a block's output, when there is one) and its RMSNorm: `(sum, normed)`. One
/// kernel on a GPU (`cuda_decode::add_rms_norm`); candle's add and norm elsewhere.
fn add_norm(norm: &RmsNorm, x: Tensor, pending: Option<Tensor>) -> Result<(Tensor, Tensor)> {
    if let Some(r) = cuda_decode::add_rms_norm(&x, pending.as_ref(), norm)? {
        return Ok(r);
    }
    let x = match pending {
        Some(p) => (x + p)?,
        None => x,
    };
    let h = norm.forward(&x)?;
    Ok((x, h))
}

#[derive(Debug, Clone)]
pub struct Emu3TextModel {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    cfg: TextConfig,
    device: Device,
    dtype: DType,
}

impl Emu3TextModel {
    /// `vb` points at the checkpoint root; weights live under `text_model.model.*` and
    /// `text_model.lm_head` (see `weights::canonical_name`). `weights` says how the decoder
    /// layers' projections hold f32 weights on the CPU.
    pub fn new(cfg: &TextConfig, vb: VarBuilder, weights: CpuWeights) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("{e}")
        }
        let vb_m = vb.pp("text_model").pp("model");
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb_m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, vb_m.pp("layers").pp(i), weights))
            .collect::<Result<Vec<_>>>()?;
        let norm = candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb_m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            candle_nn::linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("text_model").pp("lm_head"))?
        };
        let rope = RotaryEmbedding::new(
            cfg.head_dim(),
            cfg.rope_theta(),
            cfg.max_position_embeddings,
            vb.dtype(),
            vb.device(),
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A fresh cache for rows left-padded by `pad`, holding up to `max_len` tokens.
    pub fn new_cache(&self, pad: Vec<usize>, max_len: usize) -> Cache {
        Cache::new(self.layers.len(), pad, max_len)
    }

    /// Run `ids` `(b, t)` through the decoder, appending them to `cache`; returns the final
    /// hidden states `(b, t, hidden)` (after the last RMSNorm).
    pub fn forward_hidden(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if b != cache.batch() {
            candle_core::bail!("batch of {b} rows fed to a cache of {} rows", cache.batch());
        }
        if cache.len() + t > cache.max_len() || cache.len() + t > self.rope.max_positions() {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's {} positions",
                cache.len() + t,
                cache.max_len().min(self.rope.max_positions())
            );
        }
        let positions = cache.positions(t, &self.device)?;
        let (cos, sin) = self.rope.at(&positions)?;
        let c = &self.cfg;
        let step = if t == 1
            && cuda_decode::usable(&self.device, self.dtype, c.num_attention_heads, c.num_kv_heads(), c.head_dim(), cache.len() + 1)
        {
            Step::Fused { pad: cache.pad_tensor(&self.device)? }
        } else {
            Step::Generic { mask: cache.mask(t, &self.device)?.map(|m| m.to_dtype(self.dtype)).transpose()? }
        };
        let mut x = self.embed_tokens.forward(ids)?;
        if let Step::Fused { pad } = &step
            && cuda_decode::norm_fold(&self.device)
        {
            // Each norm inside the product after it, each residual add inside the output
            // projection before it: five launches per layer.
            for (i, layer) in self.layers.iter().enumerate() {
                x = layer.self_attn.forward_residual(&x, &layer.input_layernorm, &cos, &sin, pad, cache.layer_mut(i))?;
                x = layer.mlp.forward_residual(&x, &layer.post_attention_layernorm)?;
            }
            cache.advance(t);
            return cuda_decode::normed(&x, &self.norm);
        }
        // Each block's output is added to the residual stream by the next norm (`add_norm`).
        let mut pending = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let (sum, h) = add_norm(&layer.input_layernorm, x, pending.take())?;
            let a = layer.self_attn.forward(&h, &cos, &sin, &step, cache.layer_mut(i))?;
            let (sum, h) = add_norm(&layer.post_attention_layernorm, sum, Some(a))?;
            pending = Some(layer.mlp.forward(&h)?);
            x = sum;
        }
        cache.advance(t);
        Ok(add_norm(&self.norm, x, pending)?.1)
    }

    /// Logits `(b, t, vocab)` in f32 for hidden states `(b, t, hidden)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)?.to_dtype(DType::F32)
    }

    /// The LM head restricted to the given token ids (a view when they are contiguous).
    pub fn head_rows(&self, ids: &[u32]) -> Result<crate::generate::HeadRows> {
        let w = self.lm_head.weight();
        let contiguous = ids.windows(2).all(|p| p[1] == p[0] + 1);
        let rows = match (contiguous, ids.first()) {
            (true, Some(&start)) => w.narrow(0, start as usize, ids.len())?,
            _ => w.index_select(&Tensor::new(ids, &self.device)?, 0)?,
        };
        crate::generate::HeadRows::new(rows)
    }

    /// Feed `ids` and return the f32 logits of the last position only, `(b, vocab)`.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, cache)?;
        let t = hidden.dim(1)?;
        self.logits(&hidden.narrow(1, t - 1, 1)?)?.squeeze(1)
    }
}
