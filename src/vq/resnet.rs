//! Residual blocks: the 2-D `Emu3VQVAEResnetBlock` (GroupNorm in the encoder, SpatialNorm in
//! the decoder) and the temporal `Emu3VQVAETemporalResnetBlock` (BatchNorm3d + causal Conv3d).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::conv2d::Conv2d;
use super::conv3d::CausalConv3d;
use super::norm::{BatchNorm, Norm};

#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: Norm,
    conv1: Conv2d,
    norm2: Norm,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn new(in_ch: usize, out_ch: usize, quant_ch: Option<usize>, vb: VarBuilder) -> Result<Self> {
        let nin_shortcut = if in_ch != out_ch {
            Some(Conv2d::new(in_ch, out_ch, 1, 1, [0; 4], vb.pp("nin_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: Norm::new(in_ch, quant_ch, vb.pp("norm1"))?,
            conv1: Conv2d::new(in_ch, out_ch, 3, 1, [1; 4], vb.pp("conv1"))?,
            norm2: Norm::new(out_ch, quant_ch, vb.pp("norm2"))?,
            conv2: Conv2d::new(out_ch, out_ch, 3, 1, [1; 4], vb.pp("conv2"))?,
            nin_shortcut,
        })
    }

    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x, zq)?;
        let h = self.conv1.forward(&h)?;
        let h = self.norm2.forward_silu(&h, zq)?;
        // The skip connection is added inside conv2's output pass.
        let residual = match &self.nin_shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        self.conv2.forward_add(&h, Some(&residual))
    }
}

#[derive(Debug, Clone)]
pub struct TemporalResnetBlock {
    norm1: BatchNorm,
    conv1: CausalConv3d,
    norm2: BatchNorm,
    conv2: CausalConv3d,
    nin_shortcut: Option<CausalConv3d>,
}

impl TemporalResnetBlock {
    pub fn new(in_ch: usize, out_ch: usize, vb: VarBuilder) -> Result<Self> {
        let k = (3, 3, 3);
        let s = (1, 1, 1);
        let nin_shortcut = if in_ch != out_ch {
            Some(CausalConv3d::pointwise(in_ch, out_ch, vb.pp("nin_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: BatchNorm::new(in_ch, vb.pp("norm1"))?,
            conv1: CausalConv3d::new(in_ch, out_ch, k, s, vb.pp("conv1"))?,
            norm2: BatchNorm::new(out_ch, vb.pp("norm2"))?,
            conv2: CausalConv3d::new(out_ch, out_ch, k, s, vb.pp("conv2"))?,
            nin_shortcut,
        })
    }

    pub fn forward(&self, frames: &[Tensor]) -> Result<Vec<Tensor>> {
        let h = frames
            .iter()
            .map(|f| self.norm1.forward(f)?.silu())
            .collect::<Result<Vec<_>>>()?;
        let h = self.conv1.forward(&h)?;
        let h = h.iter().map(|f| self.norm2.forward(f)?.silu()).collect::<Result<Vec<_>>>()?;
        let h = self.conv2.forward(&h)?;
        let residual = match &self.nin_shortcut {
            Some(s) => s.forward(frames)?,
            None => frames.to_vec(),
        };
        residual.iter().zip(h.iter()).map(|(r, h)| r + h).collect()
    }
}
