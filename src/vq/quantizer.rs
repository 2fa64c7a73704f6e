//! `Emu3VQVAEVectorQuantizer`: nearest codebook entry by squared euclidean distance
//! (`|z|^2 + |e|^2 - 2 z.e`, first minimum on ties), and the codebook lookup for decoding.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct VectorQuantizer {
    /// `(codebook_size, embed_dim)`
    embedding: Tensor,
    /// `|e|^2` per code, `(1, codebook_size)`
    embedding_sq: Tensor,
}

impl VectorQuantizer {
    pub fn new(codebook_size: usize, embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        let embedding = vb.pp("embedding").get((codebook_size, embed_dim), "weight")?;
        let embedding_sq = embedding.sqr()?.sum_keepdim(1)?.t()?.contiguous()?;
        Ok(Self { embedding, embedding_sq })
    }

    /// The codebook `(codebook_size, embed_dim)`.
    pub fn embedding(&self) -> &Tensor {
        &self.embedding
    }

    pub fn codebook_size(&self) -> usize {
        self.embedding.dim(0).unwrap_or(0)
    }

    /// z: `(b, embed_dim, h, w)` -> codes `(b, h, w)` as u32.
    pub fn encode(&self, z: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = z.dims4()?;
        self.distances(z)?.argmin(1)?.to_dtype(DType::U32)?.reshape((b, h, w))
    }

    /// The (squared) distance of each latent to every code, `(b*h*w, codebook_size)`.
    pub fn distances(&self, z: &Tensor) -> Result<Tensor> {
        let (b, e, h, w) = z.dims4()?;
        let flat = z.permute((0, 2, 3, 1))?.reshape((b * h * w, e))?.to_dtype(self.embedding.dtype())?;
        let z_sq = flat.sqr()?.sum_keepdim(1)?;
        let dot = flat.matmul(&self.embedding.t()?)?;
        z_sq.broadcast_add(&self.embedding_sq)?.sub(&(dot * 2.0)?)
    }

    /// codes `(b, h, w)` -> quantized latent `(b, embed_dim, h, w)`.
    pub fn lookup(&self, codes: &Tensor) -> Result<Tensor> {
        let (b, h, w) = codes.dims3()?;
        let e = self.embedding.dim(1)?;
        let flat = codes.flatten_all()?.to_dtype(DType::U32)?;
        self.embedding
            .index_select(&flat, 0)?
            .reshape((b, h, w, e))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }
}
