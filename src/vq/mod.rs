//! `Emu3VQVAE`: Emu3's MoVQ-style image tokenizer (transformers `models/emu3/modeling_emu3.py`).
//!
//! encode: pixels in [-1, 1] -> encoder -> quant_conv -> nearest code -> code grid.
//! decode: code grid -> codebook vectors -> post_quant_conv -> decoder (SpatialNorm on the
//! codes) -> pixels. Images are single frames; the temporal layers see the frame repeated
//! `temporal_downsample_factor` times on the way in, and decode returns the first frame.

mod attention;
mod conv2d;
mod conv3d;
mod cpu;
mod decoder;
mod encoder;
mod norm;
mod quantizer;
mod resnet;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::VqConfig;
use conv3d::CausalConv3d;
use decoder::Decoder;
use encoder::Encoder;
pub use quantizer::VectorQuantizer;

#[derive(Debug, Clone)]
pub struct Emu3VqVae {
    encoder: Encoder,
    decoder: Decoder,
    quantize: VectorQuantizer,
    quant_conv: CausalConv3d,
    post_quant_conv: CausalConv3d,
    cfg: VqConfig,
}

impl Emu3VqVae {
    /// `vb` points at the VQ's root (`vqmodel` in a full checkpoint).
    pub fn new(cfg: &VqConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("{e}")
        }
        let (z, e) = (cfg.latent_channels, cfg.embed_dim);
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            quantize: VectorQuantizer::new(cfg.codebook_size, e, vb.pp("quantize"))?,
            quant_conv: CausalConv3d::new(z, e, (3, 1, 1), (1, 1, 1), vb.pp("quant_conv"))?,
            post_quant_conv: CausalConv3d::new(e, z, (3, 1, 1), (1, 1, 1), vb.pp("post_quant_conv"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VqConfig {
        &self.cfg
    }

    /// Pixels per code along each axis.
    pub fn spatial_factor(&self) -> usize {
        self.cfg.spatial_factor()
    }

    pub fn device(&self) -> &Device {
        self.quantize_embedding().device()
    }

    pub fn dtype(&self) -> DType {
        self.quantize_embedding().dtype()
    }

    fn quantize_embedding(&self) -> &Tensor {
        self.quantize.embedding()
    }

    /// The continuous latents that the quantizer sees: `(b, 3, H, W)` -> `(b, E, H/s, W/s)`.
    pub fn encode_latents(&self, pixels: &Tensor) -> Result<Tensor> {
        let s = self.spatial_factor();
        let (_, _, h, w) = pixels.dims4()?;
        if h % s != 0 || w % s != 0 {
            candle_core::bail!("image size {w}x{h} is not a multiple of the VQ's spatial factor {s}");
        }
        let pixels = pixels.to_dtype(self.dtype())?;
        // An image is `temporal_downsample_factor` identical frames, so the 2-D stack (the
        // expensive part) runs once and its output is repeated.
        let frame = self.encoder.forward_frame(&pixels)?;
        let frames = vec![frame; self.cfg.temporal_downsample_factor];
        let frames = self.encoder.forward_time(frames)?;
        let frames = self.quant_conv.forward(&frames)?;
        match frames.as_slice() {
            [z] => Ok(z.clone()),
            other => candle_core::bail!("encoder produced {} latent frames for an image, expected 1", other.len()),
        }
    }

    /// Pixels `(b, 3, H, W)` in [-1, 1] -> codes `(b, H/s, W/s)` (u32).
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        self.quantize.encode(&self.encode_latents(pixels)?)
    }

    /// Codes `(b, h, w)` -> pixels `(b, 3, h*s, w*s)`, roughly in [-1, 1] (not clamped).
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let quant = self.quantize.lookup(codes)?;
        let latent = self.post_quant_conv.forward(std::slice::from_ref(&quant))?;
        let mut frames = self.decoder.forward(&latent, &[quant], false)?;
        Ok(frames.swap_remove(0))
    }

    pub fn quantizer(&self) -> &VectorQuantizer {
        &self.quantize
    }
}
