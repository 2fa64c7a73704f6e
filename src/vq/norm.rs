//! The VQ-VAE's normalisations: GroupNorm(32) in the encoder, MoVQ's SpatialNorm in the
//! decoder (GroupNorm modulated by the quantized latent), and BatchNorm3d (eval) in the
//! temporal blocks.

use std::mem::MaybeUninit;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::conv2d::Conv2d;
use super::cpu::{is_cpu_f32, silu_f32, simd, tensor, with_f32};

const GROUPS: usize = 32;
const GN_EPS: f64 = 1e-6;
const BN_EPS: f64 = 1e-5;

/// `nn.GroupNorm(32, ch, eps=1e-6)`. On the CPU in f32 the statistics, the affine map, an
/// optional SpatialNorm modulation and the SiLU that usually follows are one kernel, parallel
/// over (image, group), instead of candle's chain of element-wise ops.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// SpatialNorm's modulation `* y + b`, with `y`, `b`: `(b, ch, h', w')` at a resolution that
/// divides the normalised map's, upsampled (nearest) on the fly.
struct Modulation<'a> {
    y: &'a Tensor,
    b: &'a Tensor,
}

impl GroupNorm {
    pub fn new(ch: usize, vb: VarBuilder) -> Result<Self> {
        Self::from_weights(vb.get(ch, "weight")?, vb.get(ch, "bias")?, GROUPS, GN_EPS)
    }

    pub fn from_weights(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let ch = weight.dim(0)?;
        if ch % groups != 0 {
            candle_core::bail!("GroupNorm: {groups} groups do not divide {ch} channels");
        }
        Ok(Self { weight, bias, groups, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, None, false)
    }

    /// `silu(group_norm(x))`.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, None, true)
    }

    /// candle's GroupNorm, then the modulation and SiLU as separate ops: the reference, and
    /// the path for other devices and dtypes.
    fn forward_candle(&self, x: &Tensor, modulation: Option<&Modulation>, silu: bool) -> Result<Tensor> {
        let ch = self.weight.dim(0)?;
        let gn = candle_nn::GroupNorm::new(self.weight.clone(), self.bias.clone(), ch, self.groups, self.eps)?;
        let mut h = candle_core::Module::forward(&gn, x)?;
        if let Some(m) = modulation {
            let (_, _, hh, ww) = x.dims4()?;
            h = h.mul(&m.y.upsample_nearest2d(hh, ww)?)?.add(&m.b.upsample_nearest2d(hh, ww)?)?;
        }
        if silu { h.silu() } else { Ok(h) }
    }

    fn forward_fused(&self, x: &Tensor, modulation: Option<&Modulation>, silu: bool) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let low = match modulation {
            Some(m) => Some((m.y.dims4()?, m.b.dims4()?)),
            None => None,
        };
        let integer_factor = low.is_none_or(|(yd, bd)| {
            yd == bd && yd.0 == b && yd.1 == c && yd.2 > 0 && yd.3 > 0 && h % yd.2 == 0 && w % yd.3 == 0
        });
        let cpu = is_cpu_f32(x)
            && is_cpu_f32(&self.weight)
            && is_cpu_f32(&self.bias)
            && modulation.is_none_or(|m| is_cpu_f32(m.y) && is_cpu_f32(m.b));
        if !cpu || !integer_factor || c != self.weight.dim(0)? {
            return self.forward_candle(x, modulation, silu);
        }
        let gamma = with_f32(&self.weight, |v| v.to_vec())?;
        let beta = with_f32(&self.bias, |v| v.to_vec())?;
        let (ym, bm) = match modulation {
            Some(m) => (Some(with_f32(m.y, |v| v.to_vec())?), Some(with_f32(m.b, |v| v.to_vec())?)),
            None => (None, None),
        };
        let (hq, wq) = low.map_or((h, w), |(yd, _)| (yd.2, yd.3));
        let shape = GroupShape { c, h, w, cpg: c / self.groups, groups: self.groups, hq, wq };
        let mut out: Vec<f32> = Vec::with_capacity(b * c * h * w);
        with_f32(x, |x| {
            let len = shape.cpg * h * w;
            let spare = &mut out.spare_capacity_mut()[..b * c * h * w];
            spare.par_chunks_mut(len).zip(x.par_chunks(len)).enumerate().for_each(|(i, (o, xg))| {
                let (bi, gi) = (i / self.groups, i % self.groups);
                let m = match (&ym, &bm) {
                    (Some(y), Some(bb)) => {
                        let plane = c * hq * wq;
                        Some((&y[bi * plane..(bi + 1) * plane], &bb[bi * plane..(bi + 1) * plane]))
                    }
                    _ => None,
                };
                simd(#[inline(always)] || normalise_group(&shape, gi, xg, o, &gamma, &beta, m, self.eps, silu));
            })
        })?;
        // SAFETY: normalise_group wrote every element of every group.
        unsafe { out.set_len(b * c * h * w) };
        tensor(out, (b, c, h, w))
    }
}

#[derive(Debug, Clone, Copy)]
struct GroupShape {
    c: usize,
    h: usize,
    w: usize,
    /// channels per group
    cpg: usize,
    groups: usize,
    /// the modulation's resolution (h, w when there is none)
    hq: usize,
    wq: usize,
}

/// One group of one image: `xg`, `out` are its `cpg` channel planes. `modulation` is that
/// image's `(y, b)`, `(c, hq, wq)` each.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn normalise_group(
    s: &GroupShape,
    gi: usize,
    xg: &[f32],
    out: &mut [MaybeUninit<f32>],
    gamma: &[f32],
    beta: &[f32],
    modulation: Option<(&[f32], &[f32])>,
    eps: f64,
    silu: bool,
) {
    debug_assert_eq!(s.c, s.cpg * s.groups);
    let n = xg.len();
    // One pass of f64 sums around the group's first value (f64 keeps E[d^2] - E[d]^2 exact
    // enough for any f32 activations; the shift guards against a large common offset).
    let pivot = xg.first().copied().unwrap_or(0.0) as f64;
    let (sum, sum_sq) = sums_f64(xg, pivot);
    let mean_d = sum / n as f64;
    let var = (sum_sq / n as f64 - mean_d * mean_d).max(0.0);
    let mean = pivot + mean_d;
    let rstd = 1.0 / (var + eps).sqrt();
    let mean = mean as f32;
    let hw = s.h * s.w;
    let (fh, fw) = (s.h / s.hq, s.w / s.wq);
    let mut ywide = vec![0f32; if modulation.is_some() { s.w } else { 0 }];
    let mut bwide = ywide.clone();
    for cc in 0..s.cpg {
        let ch = gi * s.cpg + cc;
        let scale = (gamma[ch] as f64 * rstd) as f32;
        let shift = beta[ch];
        let xc = &xg[cc * hw..(cc + 1) * hw];
        let oc = &mut out[cc * hw..(cc + 1) * hw];
        match modulation {
            None => {
                for (o, &v) in oc.iter_mut().zip(xc) {
                    let v = (v - mean) * scale + shift;
                    o.write(if silu { silu_f32(v) } else { v });
                }
            }
            Some((y, b)) => {
                let (yc, bc) = (&y[ch * s.hq * s.wq..][..s.hq * s.wq], &b[ch * s.hq * s.wq..][..s.hq * s.wq]);
                for yq in 0..s.hq {
                    // The modulation row at full width, shared by the fh rows it covers.
                    for (xq, (yw, bw)) in ywide.chunks_exact_mut(fw).zip(bwide.chunks_exact_mut(fw)).enumerate() {
                        yw.fill(yc[yq * s.wq + xq]);
                        bw.fill(bc[yq * s.wq + xq]);
                    }
                    let rows = yq * fh * s.w..(yq + 1) * fh * s.w;
                    for (orow, xrow) in oc[rows.clone()].chunks_exact_mut(s.w).zip(xc[rows].chunks_exact(s.w)) {
                        for (((o, &v), &ym), &bm) in orow.iter_mut().zip(xrow).zip(&ywide).zip(&bwide) {
                            let v = ((v - mean) * scale + shift) * ym + bm;
                            o.write(if silu { silu_f32(v) } else { v });
                        }
                    }
                }
            }
        }
    }
}

/// Sums of `x - pivot` and of its square in f64, eight lanes so that they vectorise.
#[inline(always)]
fn sums_f64(x: &[f32], pivot: f64) -> (f64, f64) {
    let mut acc = [0f64; 8];
    let mut acc_sq = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let (mut sum, mut sum_sq) = (0f64, 0f64);
    for &v in chunks.remainder() {
        let d = v as f64 - pivot;
        sum += d;
        sum_sq += d * d;
    }
    for c in chunks {
        for ((a, q), &v) in acc.iter_mut().zip(acc_sq.iter_mut()).zip(c) {
            let d = v as f64 - pivot;
            *a += d;
            *q += d * d;
        }
    }
    (sum + acc.iter().sum::<f64>(), sum_sq + acc_sq.iter().sum::<f64>())
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
        Ok(Self {
            norm_layer: GroupNorm::new(ch, vb.pp("norm_layer"))?,
            conv_y: Conv2d::new(quant_ch, ch, 1, 1, [0; 4], vb.pp("conv_y"))?,
            conv_b: Conv2d::new(quant_ch, ch, 1, 1, [0; 4], vb.pp("conv_b"))?,
        })
    }

    /// x: `(b, ch, h, w)`, zq: `(b, quant_ch, h', w')` with h, w multiples of h', w'.
    pub fn forward(&self, x: &Tensor, zq: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, zq, false)
    }

    /// `silu(SpatialNorm(x, zq))`.
    pub fn forward_silu(&self, x: &Tensor, zq: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, zq, true)
    }

    fn forward_fused(&self, x: &Tensor, zq: &Tensor, silu: bool) -> Result<Tensor> {
        // 1x1 convs commute with nearest upsampling: apply them at the latent's resolution.
        let y = self.conv_y.forward(zq)?;
        let b = self.conv_b.forward(zq)?;
        self.norm_layer.forward_fused(x, Some(&Modulation { y: &y, b: &b }), silu)
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
            None => Norm::Group(GroupNorm::new(ch, vb)?),
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

    /// `silu(norm(x))`, in one pass on the CPU.
    pub fn forward_silu(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        match (self, zq) {
            (Norm::Group(n), _) => n.forward_silu(x),
            (Norm::Spatial(n), Some(zq)) => n.forward_silu(x, zq),
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn norm(c: usize, groups: usize) -> GroupNorm {
        let dev = Device::Cpu;
        let w = Tensor::randn(1f32, 0.5, c, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.5, c, &dev).unwrap();
        GroupNorm::from_weights(w, b, groups, GN_EPS).unwrap()
    }

    #[test]
    fn group_norm_matches_candle() {
        let dev = Device::Cpu;
        // (batch, channels, groups, h, w): odd, non-square, one channel per group, offset means.
        for &(b, c, g, h, w) in &[(1, 64, 32, 17, 9), (2, 12, 4, 5, 7), (1, 32, 32, 1, 3), (2, 96, 32, 8, 8)] {
            let x = (Tensor::randn(0f32, 2.0, (b, c, h, w), &dev).unwrap() + 3.0).unwrap();
            let n = norm(c, g);
            for silu in [false, true] {
                let fast = n.forward_fused(&x, None, silu).unwrap();
                let reference = n.forward_candle(&x, None, silu).unwrap();
                let d = max_abs_diff(&fast, &reference);
                assert!(d < 2e-5, "group norm {:?} silu {silu}: max abs diff {d}", (b, c, g, h, w));
            }
        }
    }

    #[test]
    fn spatial_modulation_matches_candle() {
        let dev = Device::Cpu;
        // (batch, channels, h, w, h', w'): factors 1, 2, 8 and unequal ones.
        for &(b, c, h, w, hq, wq) in &[(1, 64, 16, 24, 2, 3), (2, 32, 6, 10, 3, 5), (1, 32, 5, 7, 5, 7), (1, 64, 16, 8, 2, 1)] {
            let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev).unwrap();
            let y = Tensor::randn(0f32, 1.0, (b, c, hq, wq), &dev).unwrap();
            let bb = Tensor::randn(0f32, 1.0, (b, c, hq, wq), &dev).unwrap();
            let m = Modulation { y: &y, b: &bb };
            let n = norm(c, 32);
            for silu in [false, true] {
                let fast = n.forward_fused(&x, Some(&m), silu).unwrap();
                let reference = n.forward_candle(&x, Some(&m), silu).unwrap();
                let d = max_abs_diff(&fast, &reference);
                assert!(d < 2e-5, "spatial norm {:?} silu {silu}: max abs diff {d}", (b, c, h, w, hq, wq));
            }
        }
    }
}
