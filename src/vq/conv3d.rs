//! Emu3's causal Conv3d, built from conv2d (candle has no conv3d).
//!
//! A video is a list of frames, each `(batch, channels, height, width)`. transformers pads time
//! with two zero frames in front (whatever the kernel) and none behind, and pads space by
//! `k - s` split `(p/2 + p%2, p/2)`; output frame `t` is then the sum over taps `k` of a conv2d
//! of padded frame `t*stride + k` with the weight slice `[:, :, k]`, plus the bias once.
//! Zero frames contribute nothing, so they are skipped.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::conv2d::Conv2d;

/// The number of zero frames transformers' `Emu3VQVAEConv3d` puts in front of the input.
const FRONT_PAD: usize = 2;

#[derive(Debug, Clone)]
pub struct CausalConv3d {
    /// One conv2d per temporal tap; only the last carries the bias.
    taps: Vec<Conv2d>,
    time_stride: usize,
}

impl CausalConv3d {
    /// `vb` points at the module holding `conv.weight [out, in, kt, kh, kw]` and `conv.bias`.
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        kernel: (usize, usize, usize),
        stride: (usize, usize, usize),
        vb: VarBuilder,
    ) -> Result<Self> {
        Self::from_conv(in_ch, out_ch, kernel, stride, vb.pp("conv"))
    }

    /// A plain (non-causal padded) `nn.Conv3d` with kernel 1: the temporal `nin_shortcut`.
    pub fn pointwise(in_ch: usize, out_ch: usize, vb: VarBuilder) -> Result<Self> {
        Self::from_conv(in_ch, out_ch, (1, 1, 1), (1, 1, 1), vb)
    }

    fn from_conv(
        in_ch: usize,
        out_ch: usize,
        (kt, kh, kw): (usize, usize, usize),
        (st, sh, sw): (usize, usize, usize),
        vb: VarBuilder,
    ) -> Result<Self> {
        if sh != sw {
            candle_core::bail!("conv3d with different spatial strides ({sh}, {sw}) is not supported");
        }
        let weight = vb.get((out_ch, in_ch, kt, kh, kw), "weight")?;
        let bias = vb.get(out_ch, "bias")?;
        let (ph, pw) = (kh - sh, kw - sw);
        let pad = [ph / 2 + ph % 2, ph / 2, pw / 2 + pw % 2, pw / 2];
        let taps = (0..kt)
            .map(|k| {
                let w = weight.narrow(2, k, 1)?.squeeze(2)?.contiguous()?;
                let b = (k == kt - 1).then(|| bias.clone());
                Ok(Conv2d::from_weights(w, b, sh, pad))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { taps, time_stride: st })
    }

    fn kt(&self) -> usize {
        self.taps.len()
    }

    /// Frames in, frames out: `T_out = (T_in + 2 - kt) / stride + 1`.
    pub fn forward(&self, frames: &[Tensor]) -> Result<Vec<Tensor>> {
        let kt = self.kt();
        // kernel-1 convs (the pointwise shortcut) are not padded in time.
        let front = if kt == 1 { 0 } else { FRONT_PAD };
        let padded_len = frames.len() + front;
        if padded_len < kt {
            candle_core::bail!("conv3d: {} frames are too few for a temporal kernel of {kt}", frames.len());
        }
        let t_out = (padded_len - kt) / self.time_stride + 1;
        let mut out = Vec::with_capacity(t_out);
        for t in 0..t_out {
            let mut acc: Option<Tensor> = None;
            // Taps on the front zero padding contribute nothing except the bias, which lives
            // on the last tap; that tap always lands on a real frame.
            for k in 0..kt {
                let Some(i) = (t * self.time_stride + k).checked_sub(front) else { continue };
                acc = Some(self.taps[k].forward_add(&frames[i], acc.as_ref())?);
            }
            match acc {
                Some(y) => out.push(y),
                None => candle_core::bail!("conv3d: output frame {t} reads only padding"),
            }
        }
        Ok(out)
    }
}
