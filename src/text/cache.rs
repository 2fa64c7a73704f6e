//! The explicit decoding state of the language model: a preallocated key/value cache per
//! layer, and each batch row's left padding (rows of different prompt lengths share a batch).

use candle_core::{Device, Result, Tensor};
use candle_nn::kv_cache::KvCache;

#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<KvCache>,
    /// Left-padding of each row: keys before it are masked and positions start after it.
    pad: Vec<usize>,
    /// Tokens written so far (padding included), the same for every row.
    len: usize,
    max_len: usize,
}

impl Cache {
    /// A cache for `pad.len()` rows, each left-padded by `pad[b]`, holding up to `max_len` tokens.
    pub fn new(num_layers: usize, pad: Vec<usize>, max_len: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| KvCache::new(2, max_len)).collect(),
            pad,
            len: 0,
            max_len,
        }
    }

    pub fn batch(&self) -> usize {
        self.pad.len()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn pad(&self) -> &[usize] {
        &self.pad
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut KvCache {
        &mut self.layers[i]
    }

    /// Positions `(b, t)` of the next `t` tokens: their index minus the row's padding.
    pub fn positions(&self, t: usize, dev: &Device) -> Result<Tensor> {
        let mut pos = Vec::with_capacity(self.batch() * t);
        for &p in &self.pad {
            for i in 0..t {
                // Padding tokens get position 0; they are masked anyway.
                pos.push((self.len + i).saturating_sub(p) as u32);
            }
        }
        Tensor::from_vec(pos, (self.batch(), t), dev)
    }

    /// Additive attention mask `(b, 1, t, len + t)` for the next `t` tokens: causal, and no
    /// attention to padding. `None` when nothing is masked (one new token, no padding).
    pub fn mask(&self, t: usize, dev: &Device) -> Result<Option<Tensor>> {
        let kv = self.len + t;
        if t == 1 && self.pad.iter().all(|&p| p == 0) {
            return Ok(None);
        }
        let mut m = Vec::with_capacity(self.batch() * t * kv);
        for &p in &self.pad {
            for i in 0..t {
                let q = self.len + i;
                m.extend((0..kv).map(|j| if j <= q && (j >= p || q < p) { 0f32 } else { f32::NEG_INFINITY }));
            }
        }
        Tensor::from_vec(m, (self.batch(), 1, t, kv), dev).map(Some)
    }

    /// Called by the model after every layer has appended `t` tokens.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
