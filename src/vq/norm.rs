//! The VQ-VAE's normalisations: GroupNorm(32) in the encoder, MoVQ's SpatialNorm in the
//! decoder (GroupNorm modulated by the quantized latent), and BatchNorm3d (eval) in the
//! temporal blocks.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, GroupNorm, VarBuilder};

const GROUPS: usize = 32;
const GN_EPS: f64 = 1e-6;
const BN_EPS: f64 = 1e-5;

pub fn group_norm(channels: usize, vb: VarBuilder) -> Result<GroupNorm> {
    candle_nn::group_norm(GROUPS, channels, GN_EPS, vb)
}

/// `Emu3VQVAESpatialNorm`: `GroupNorm(x) * conv_y(zq) + conv_b(zq)`, zq resized (nearest) to x.
#[derive(Debug, Clone)]
pub struct SpatialNorm {
    norm_layer: GroupNorm,
    conv_y: Conv2d,
    conv_b: Conv2d,
}

impl SpatialNorm {
    pub fn new(quant_ch: usize, ch: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Default::default();
        Ok(Self {
            norm_layer: group_norm(ch, vb.pp("norm_layer"))?,
            conv_y: candle_nn::conv2d(quant_ch, ch, 1, cfg, vb.pp("conv_y"))?,
            conv_b: candle_nn::conv2d(quant_ch, ch, 1, cfg, vb.pp("conv_b"))?,
        })
    }

    /// x: `(b, ch, h, w)`, zq: `(b, quant_ch, h', w')` with h, w multiples of h', w'.
    pub fn forward(&self, x: &Tensor, zq: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        // 1x1 convs commute with nearest upsampling: apply them at the latent's resolution.
        let y = self.conv_y.forward(zq)?.upsample_nearest2d(h, w)?;
        let b = self.conv_b.forward(zq)?.upsample_nearest2d(h, w)?;
        self.norm_layer.forward(x)?.mul(&y)?.add(&b)
    }
}

/// GroupNorm in the encoder, SpatialNorm in the decoder: one type so blocks are shared.
#[derive(Debug, Clone)]
pub enum Norm {
    Group(GroupNorm),
    Spatial(SpatialNorm),
}

impl Norm {
    /// `quant_ch` is `Some` in the decoder.
    pub fn new(ch: usize, quant_ch: Option<usize>, vb: VarBuilder) -> Result<Self> {
        Ok(match quant_ch {
            None => Norm::Group(group_norm(ch, vb)?),
            Some(q) => Norm::Spatial(SpatialNorm::new(q, ch, vb)?),
        })
    }

    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        match (self, zq) {
            (Norm::Group(n), _) => n.forward(x),
            (Norm::Spatial(n), Some(zq)) => n.forward(x, zq),
            (Norm::Spatial(_), None) => candle_core::bail!("SpatialNorm needs the quantized latent"),
        }
    }
}

/// `nn.BatchNorm3d` in eval mode, folded into a per-channel scale and shift.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    scale: Tensor,
    shift: Tensor,
}

impl BatchNorm {
    pub fn new(ch: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(ch, "weight")?;
        let bias = vb.get(ch, "bias")?;
        let mean = vb.get(ch, "running_mean")?;
        let var = vb.get(ch, "running_var")?;
        let scale = weight.div(&(var + BN_EPS)?.sqrt()?)?;
        let shift = bias.sub(&mean.mul(&scale)?)?;
        Ok(Self { scale: scale.reshape((1, ch, 1, 1))?, shift: shift.reshape((1, ch, 1, 1))? })
    }

    /// One frame `(b, ch, h, w)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)
    }
}
