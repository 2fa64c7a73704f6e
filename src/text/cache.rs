//! The explicit decoding state of the language model: a preallocated key/value cache per
//! layer, and each batch row's left padding (rows of different prompt lengths share a batch).

use candle_core::{DType, Device, Result, Tensor};

/// One layer's keys and values, `(b, kv_heads, max_len, head_dim)` each, allocated at the first
/// append; the first `len` positions are filled.
#[derive(Debug, Clone)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
    len: usize,
    max_len: usize,
}

impl LayerCache {
    fn new(max_len: usize) -> Self {
        Self { kv: None, len: 0, max_len }
    }

    /// The whole buffers, `(b, kv_heads, max_len, head_dim)`, allocated on first use.
    pub(crate) fn buffers(&mut self, b: usize, kv_heads: usize, head_dim: usize, dtype: DType, dev: &Device) -> Result<(&Tensor, &Tensor)> {
        if self.kv.is_none() {
            let z = || Tensor::zeros((b, kv_heads, self.max_len, head_dim), dtype, dev);
            self.kv = Some((z()?, z()?));
        }
        let (k, v) = self.kv.as_ref().expect("allocated above");
        Ok((k, v))
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Append `k`, `v` `(b, kv_heads, t, hd)` (contiguous); returns views of every cached
    /// key and value, `(b, kv_heads, len, hd)`.
    pub(crate) fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let at = self.len;
        if at + t > self.max_len {
            candle_core::bail!("key/value cache of {} positions overflows at {}", self.max_len, at + t);
        }
        let (b, kvh, _, hd) = k.dims4()?;
        let (kb, vb) = self.buffers(b, kvh, hd, k.dtype(), k.device())?;
        kb.slice_set(k, 2, at)?;
        vb.slice_set(v, 2, at)?;
        self.advanced(t)
    }

    /// Record `t` tokens written into the buffers directly (by a fused kernel); returns the
    /// views as [`Self::append`] does.
    pub(crate) fn advanced(&mut self, t: usize) -> Result<(Tensor, Tensor)> {
        self.len += t;
        let (k, v) = self.kv.as_ref().ok_or_else(|| candle_core::Error::Msg("cache not allocated".into()))?;
        Ok((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?))
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn max_len(&self) -> usize {
        self.max_len
    }
}

#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<LayerCache>,
    /// Left-padding of each row: keys before it are masked and positions start after it.
    pad: Vec<usize>,
    /// `pad` as a u32 tensor on the model's device, made once (for the fused CUDA step).
    pad_tensor: Option<Tensor>,
    /// Tokens written so far (padding included), the same for every row.
    len: usize,
    max_len: usize,
}

impl Cache {
    /// A cache for `pad.len()` rows, each left-padded by `pad[b]`, holding up to `max_len` tokens.
    pub fn new(num_layers: usize, pad: Vec<usize>, max_len: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerCache::new(max_len)).collect(),
            pad,
            pad_tensor: None,
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

    /// Each row's padding as a `(b,)` u32 tensor on `dev`.
    pub(crate) fn pad_tensor(&mut self, dev: &Device) -> Result<Tensor> {
        if self.pad_tensor.is_none() {
            let pad: Vec<u32> = self.pad.iter().map(|&p| p as u32).collect();
            self.pad_tensor = Some(Tensor::from_vec(pad, self.pad.len(), dev)?);
        }
        Ok(self.pad_tensor.clone().expect("made above"))
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut LayerCache {
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
