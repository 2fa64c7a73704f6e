//! `Emu3VQVAEDecoder`: temporal residual blocks and temporal up-sampling over the latent frames,
//! then the 2-D up-sampling stack whose every norm is a SpatialNorm conditioned on the
//! (temporally processed) quantized latent.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::VqAttention;
use super::conv2d::Conv2d;
use super::conv3d::CausalConv3d;
use super::encoder::{AttnLayer, MiddleBlock};
use super::norm::{Norm, SpatialNorm};
use super::resnet::{ResnetBlock, TemporalResnetBlock};
use crate::config::VqConfig;

/// Nearest x2 in time (each frame duplicated), then a causal 3x3x3 conv.
#[derive(Debug, Clone)]
struct TemporalUpsample {
    conv: CausalConv3d,
}

impl TemporalUpsample {
    fn forward(&self, frames: &[Tensor]) -> Result<Vec<Tensor>> {
        let doubled: Vec<Tensor> = frames.iter().flat_map(|f| [f.clone(), f.clone()]).collect();
        self.conv.forward(&doubled)
    }
}

/// Nearest x2 in space, then a 3x3 conv (which reads the small input directly).
#[derive(Debug, Clone)]
struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward_upsampled(x, 2)
    }
}

#[derive(Debug, Clone)]
struct UpLevel {
    blocks: Vec<ResnetBlock>,
    attns: Vec<AttnLayer>,
    upsample: Option<Upsample>,
}

#[derive(Debug, Clone)]
pub struct Decoder {
    time_res_stack: Vec<TemporalResnetBlock>,
    time_conv: Vec<TemporalUpsample>,
    conv_in: Conv2d,
    middle: MiddleBlock,
    /// In execution order: the lowest resolution (stored index L-1) first.
    levels: Vec<UpLevel>,
    norm_out: SpatialNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(cfg: &VqConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.base_channels;
        let mult = &cfg.channel_multiplier;
        let z = cfg.latent_channels;
        let q = Some(cfg.embed_dim);
        let time_res_stack = (0..cfg.num_res_blocks)
            .map(|r| TemporalResnetBlock::new(z, z, vb.pp("time_res_stack").pp(r)))
            .collect::<Result<Vec<_>>>()?;
        let time_conv = (0..cfg.temporal_layers())
            .map(|n| {
                let conv = CausalConv3d::new(z, z, (3, 3, 3), (1, 1, 1), vb.pp("time_conv").pp(n).pp("conv"))?;
                Ok(TemporalUpsample { conv })
            })
            .collect::<Result<Vec<_>>>()?;
        let top = c * mult[mult.len() - 1];
        let conv_in = Conv2d::new(z, top, 3, 1, [1; 4], vb.pp("conv_in"))?;
        let middle = MiddleBlock::new(cfg, top, q, vb.pp("middle_block"))?;
        let vb_up = vb.pp("up_block").pp("up");
        let mut levels = Vec::with_capacity(mult.len());
        let mut block_in = top;
        for i in (0..mult.len()).rev() {
            let vb_l = vb_up.pp(i);
            let block_out = c * mult[i];
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(block_in, block_out, q, vb_l.pp("block").pp(j))?);
                block_in = block_out;
                if cfg.attn_resolutions.contains(&i) {
                    attns.push(AttnLayer::new(
                        Norm::new(block_in, q, vb_l.pp("attn_norms").pp(j))?,
                        VqAttention::new(cfg.hidden_size, cfg.num_attention_heads, vb_l.pp("attn").pp(j))?,
                    ));
                }
            }
            let upsample = if i != 0 {
                Some(Upsample { conv: Conv2d::new(block_in, block_in, 3, 1, [1; 4], vb_l.pp("upsample").pp("conv"))? })
            } else {
                None
            };
            levels.push(UpLevel { blocks, attns, upsample });
        }
        Ok(Self {
            time_res_stack,
            time_conv,
            conv_in,
            middle,
            levels,
            norm_out: SpatialNorm::new(cfg.embed_dim, c * mult[0], vb.pp("norm_out"))?,
            conv_out: Conv2d::new(c * mult[0], cfg.out_channels, 3, 1, [1; 4], vb.pp("conv_out"))?,
        })
    }

    /// latent, quant: frames `(b, Z, h, w)` (after post_quant_conv, and the codebook vectors).
    /// Returns every decoded frame `(b, 3, H, W)` if `all_frames`, else only the first.
    pub fn forward(&self, latent: &[Tensor], quant: &[Tensor], all_frames: bool) -> Result<Vec<Tensor>> {
        let b = latent.first().map(|t| t.dim(0)).transpose()?.unwrap_or(0);
        // transformers runs the latent and the quant through the temporal layers as one batch.
        let mut frames = latent
            .iter()
            .zip(quant)
            .map(|(l, q)| Tensor::cat(&[l, q], 0))
            .collect::<Result<Vec<_>>>()?;
        for block in &self.time_res_stack {
            frames = block.forward(&frames)?;
        }
        for up in &self.time_conv {
            frames = up.forward(&frames)?.iter().map(|f| f.silu()).collect::<Result<Vec<_>>>()?;
        }
        let keep = if all_frames { frames.len() } else { 1 };
        frames
            .iter()
            .take(keep)
            .map(|f| self.forward_frame(&f.narrow(0, 0, b)?, &f.narrow(0, b, b)?))
            .collect()
    }

    fn forward_frame(&self, latent: &Tensor, quant: &Tensor) -> Result<Tensor> {
        let zq = Some(quant);
        let mut h = self.conv_in.forward(latent)?;
        h = self.middle.forward(&h, zq)?;
        for level in &self.levels {
            for (j, block) in level.blocks.iter().enumerate() {
                h = block.forward(&h, zq)?;
                if let Some(attn) = level.attns.get(j) {
                    h = attn.forward(&h, zq)?;
                }
            }
            if let Some(up) = &level.upsample {
                h = up.forward(&h)?;
            }
        }
        let h = self.norm_out.forward_silu(&h, quant)?;
        self.conv_out.forward(&h)
    }
}
