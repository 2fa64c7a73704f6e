//! `Emu3VQVAEEncoder`: the 2-D down-sampling stack applied to every frame, then the temporal
//! down-sampling convolutions and temporal residual blocks over the latent frames.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::VqAttention;
use super::conv2d::Conv2d;
use super::conv3d::CausalConv3d;
use super::norm::{GroupNorm, Norm};
use super::resnet::{ResnetBlock, TemporalResnetBlock};
use crate::config::VqConfig;

/// The pre-attention norm plus the attention block, with the residual connection.
#[derive(Debug, Clone)]
pub struct AttnLayer {
    norm: Norm,
    attn: VqAttention,
}

impl AttnLayer {
    pub fn new(norm: Norm, attn: VqAttention) -> Self {
        Self { norm, attn }
    }

    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        x + self.attn.forward(&self.norm.forward(x, zq)?)?
    }
}

/// block_1, attention, block_2 at the lowest resolution (shared by encoder and decoder).
#[derive(Debug, Clone)]
pub struct MiddleBlock {
    block_1: ResnetBlock,
    attn: AttnLayer,
    block_2: ResnetBlock,
}

impl MiddleBlock {
    pub fn new(cfg: &VqConfig, ch: usize, quant_ch: Option<usize>, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::new(ch, ch, quant_ch, vb.pp("block_1"))?,
            attn: AttnLayer::new(
                Norm::new(ch, quant_ch, vb.pp("attn_norm"))?,
                VqAttention::new(cfg.hidden_size, cfg.num_attention_heads, vb.pp("attn_1"))?,
            ),
            block_2: ResnetBlock::new(ch, ch, quant_ch, vb.pp("block_2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        let x = self.block_1.forward(x, zq)?;
        let x = self.attn.forward(&x, zq)?;
        self.block_2.forward(&x, zq)
    }
}

/// Zero-pad right and bottom by one, then a stride-2 3x3 conv (the padding is the conv's).
#[derive(Debug, Clone)]
struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    fn new(ch: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: Conv2d::new(ch, ch, 3, 2, [0, 1, 0, 1], vb.pp("conv"))? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x)
    }
}

#[derive(Debug, Clone)]
struct DownLevel {
    blocks: Vec<ResnetBlock>,
    attns: Vec<AttnLayer>,
    downsample: Option<Downsample>,
}

#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    levels: Vec<DownLevel>,
    middle: MiddleBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    time_conv: Vec<CausalConv3d>,
    time_res_stack: Vec<TemporalResnetBlock>,
}

impl Encoder {
    pub fn new(cfg: &VqConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.base_channels;
        let mult = &cfg.channel_multiplier;
        let conv_in = Conv2d::new(cfg.in_channels, c, 3, 1, [1; 4], vb.pp("conv_in"))?;
        let vb_down = vb.pp("down_block").pp("down");
        let mut levels = Vec::with_capacity(mult.len());
        for (i, &m) in mult.iter().enumerate() {
            let vb_l = vb_down.pp(i);
            let mut block_in = if i == 0 { c } else { c * mult[i - 1] };
            let block_out = c * m;
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for j in 0..cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(block_in, block_out, None, vb_l.pp("block").pp(j))?);
                block_in = block_out;
                if cfg.attn_resolutions.contains(&i) {
                    attns.push(AttnLayer::new(
                        Norm::new(block_in, None, vb_l.pp("attn_norms").pp(j))?,
                        VqAttention::new(cfg.hidden_size, cfg.num_attention_heads, vb_l.pp("attn").pp(j))?,
                    ));
                }
            }
            let downsample =
                if i + 1 != mult.len() { Some(Downsample::new(block_in, vb_l.pp("downsample"))?) } else { None };
            levels.push(DownLevel { blocks, attns, downsample });
        }
        let top = c * mult[mult.len() - 1];
        let z = cfg.latent_channels;
        let time_conv = (0..cfg.temporal_layers())
            .map(|n| CausalConv3d::new(z, z, (4, 3, 3), (2, 1, 1), vb.pp("time_conv").pp(n).pp("conv")))
            .collect::<Result<Vec<_>>>()?;
        let time_res_stack = (0..cfg.num_res_blocks)
            .map(|r| TemporalResnetBlock::new(z, z, vb.pp("time_res_stack").pp(r)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in,
            levels,
            middle: MiddleBlock::new(cfg, top, None, vb.pp("middle_block"))?,
            norm_out: GroupNorm::new(top, vb.pp("norm_out"))?,
            conv_out: Conv2d::new(top, z, 3, 1, [1; 4], vb.pp("conv_out"))?,
            time_conv,
            time_res_stack,
        })
    }

    /// The 2-D stack on one frame: `(b, 3, H, W)` -> `(b, Z, H/s, W/s)`.
    pub fn forward_frame(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.levels {
            for (j, block) in level.blocks.iter().enumerate() {
                h = block.forward(&h, None)?;
                if let Some(attn) = level.attns.get(j) {
                    h = attn.forward(&h, None)?;
                }
            }
            if let Some(d) = &level.downsample {
                h = d.forward(&h)?;
            }
        }
        let h = self.middle.forward(&h, None)?;
        let h = self.norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }

    /// The temporal layers over latent frames: `T` frames in, `T / temporal_downsample_factor` out.
    pub fn forward_time(&self, frames: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let mut frames = frames;
        for conv in &self.time_conv {
            frames = conv.forward(&frames)?.iter().map(|f| f.silu()).collect::<Result<Vec<_>>>()?;
        }
        for block in &self.time_res_stack {
            frames = block.forward(&frames)?;
        }
        Ok(frames)
    }
}
