//! The VQ-VAE's 2-D convolution (`nn.Conv2d`), with a CPU f32 kernel.
//!
//! candle's CPU conv2d builds its im2col one element at a time (43% of a VQ decode in the
//! profile of BENCHMARKS.md). Here the input of a band of output rows is unfolded with whole
//! row copies into a `(C*kh*kw, rows*W_out)` matrix and multiplied by the weight
//! `(C_out, C*kh*kw)` with one `gemm` call; bands run in parallel on rayon. A 1x1 conv
//! multiplies the input directly. The bias, and optionally a residual to add (the ResNet
//! skip connection), are written into the output first and accumulated into, so neither
//! needs an extra pass. A conv of a nearest-upsampled input (the decoder's `Upsample`) reads
//! the small input directly. Other devices and dtypes go through candle's conv2d.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::cpu::{SendPtr, is_cpu_f32, simd, tensor, with_f32};

/// About this many f32 of unfolded input per band: 1 MiB, so a band and the weight stay in
/// the L2 cache while gemm works on them.
const BAND_ELEMS: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct Conv2d {
    /// `(out, in, kh, kw)`
    weight: Tensor,
    /// `(out,)`
    bias: Option<Tensor>,
    stride: usize,
    /// Zero padding `[top, bottom, left, right]`.
    pad: [usize; 4],
}

/// The shape of one convolution on one input size.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    c_in: usize,
    c_out: usize,
    /// The input size the conv sees: `up` times the stored input's.
    h: usize,
    w: usize,
    /// Nearest upsampling factor of the input (1: none).
    up: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    /// top, left padding (bottom and right only shape `h_out`, `w_out`).
    pt: usize,
    pl: usize,
    h_out: usize,
    w_out: usize,
}

impl Geometry {
    /// Rows of the unfolded matrix: `c_in * kh * kw`.
    fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// Floats per channel of the stored input.
    fn in_plane(&self) -> usize {
        (self.h / self.up) * (self.w / self.up)
    }

    fn pointwise(&self) -> bool {
        self.up == 1
            && self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pt == 0 && self.pl == 0 && self.h_out == self.h
            && self.w_out == self.w
    }
}

impl Conv2d {
    /// A square `kernel`, `stride`, and zero padding `[top, bottom, left, right]`; `vb` holds
    /// `weight (out, in, k, k)` and `bias (out,)`.
    pub fn new(in_ch: usize, out_ch: usize, kernel: usize, stride: usize, pad: [usize; 4], vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((out_ch, in_ch, kernel, kernel), "weight")?;
        let bias = vb.get(out_ch, "bias")?;
        Ok(Self::from_weights(weight, Some(bias), stride, pad))
    }

    /// `weight (out, in, kh, kw)`, `bias (out,)`.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>, stride: usize, pad: [usize; 4]) -> Self {
        Self { weight, bias, stride, pad }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_add(x, None)
    }

    /// `conv(upsample_nearest(x, up))`, without building the upsampled input on the CPU.
    pub fn forward_upsampled(&self, x: &Tensor, up: usize) -> Result<Tensor> {
        if up == 1 {
            return self.forward(x);
        }
        if is_cpu_f32(x) && is_cpu_f32(&self.weight) {
            return self.forward_cpu(x, None, up);
        }
        let (_, _, h, w) = x.dims4()?;
        self.forward_candle(&x.upsample_nearest2d(h * up, w * up)?)
    }

    /// `conv(x) + residual`; the residual has the output's shape.
    pub fn forward_add(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        if is_cpu_f32(x) && is_cpu_f32(&self.weight) && residual.is_none_or(is_cpu_f32) {
            return self.forward_cpu(x, residual, 1);
        }
        let y = self.forward_candle(x)?;
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }

    /// candle's conv2d: the reference, and the path for other devices and dtypes.
    pub fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        let [top, bottom, left, right] = self.pad;
        let (x, padding) = if top == bottom && left == right && top == left {
            (x.clone(), top)
        } else {
            (x.pad_with_zeros(2, top, bottom)?.pad_with_zeros(3, left, right)?, 0)
        };
        let y = x.conv2d(&self.weight, padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }

    fn geometry(&self, x: &Tensor, up: usize) -> Result<(usize, Geometry)> {
        let (b, c_in, h, w) = x.dims4()?;
        let (h, w) = (h * up, w * up);
        let (c_out, wc_in, kh, kw) = self.weight.dims4()?;
        if c_in != wc_in {
            candle_core::bail!("conv2d: input has {c_in} channels, the weight expects {wc_in}");
        }
        let [pt, pb, pl, pr] = self.pad;
        let s = self.stride;
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        if hp < kh || wp < kw {
            candle_core::bail!("conv2d: input {h}x{w} (padded {hp}x{wp}) is smaller than the kernel {kh}x{kw}");
        }
        let (h_out, w_out) = ((hp - kh) / s + 1, (wp - kw) / s + 1);
        Ok((b, Geometry { c_in, c_out, h, w, up, kh, kw, stride: s, pt, pl, h_out, w_out }))
    }

    fn forward_cpu(&self, x: &Tensor, residual: Option<&Tensor>, up: usize) -> Result<Tensor> {
        let (b, g) = self.geometry(x, up)?;
        let hw_out = g.h_out * g.w_out;
        let out_shape = (b, g.c_out, g.h_out, g.w_out);
        if let Some(r) = residual
            && r.dims() != [b, g.c_out, g.h_out, g.w_out]
        {
            candle_core::bail!("conv2d: residual {:?} does not match the output {out_shape:?}", r.dims());
        }
        let bias = self.bias.as_ref().map(|t| with_f32(t, |v| v.to_vec())).transpose()?;
        let len = b * g.c_out * hw_out;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let dst = SendPtr(out.as_mut_ptr());
        with_f32(x, |x| {
            with_f32(&self.weight, |wt| {
                with_f32_opt(residual, |residual| {
                    let (rows_per_band, bands) = bands(&g);
                    (0..b * bands).into_par_iter().for_each(|task| {
                        let (bi, band) = (task / bands, task % bands);
                        let oy0 = band * rows_per_band;
                        let oy1 = (oy0 + rows_per_band).min(g.h_out);
                        let image = g.c_in * g.in_plane();
                        let input = &x[bi * image..(bi + 1) * image];
                        let at = bi * g.c_out * hw_out + oy0 * g.w_out;
                        // SAFETY: this task writes only output rows oy0..oy1 of image bi, every
                        // element of them, and out has room for all images.
                        unsafe {
                            let dst = dst.get().add(at);
                            let accumulate = init_band(&g, dst, oy1 - oy0, bias.as_deref(), residual.map(|r| &r[at..]));
                            band_product(&g, input, wt, oy0, oy1, dst, accumulate);
                        }
                    })
                })
            })
        })???;
        // SAFETY: the bands cover every output row of every image, and each wrote all of its
        // elements (init_band or gemm with read_dst = false).
        unsafe { out.set_len(len) };
        tensor(out, out_shape)
    }
}

/// Run `f` on the f32 data of `t`, if there is one.
fn with_f32_opt<R>(t: Option<&Tensor>, f: impl FnOnce(Option<&[f32]>) -> R) -> Result<R> {
    match t {
        Some(t) => with_f32(t, |v| f(Some(v))),
        None => Ok(f(None)),
    }
}

/// Write the starting value of a band's output, bias + residual, and say whether there was
/// one (gemm then accumulates into it; otherwise gemm overwrites the uninitialised band).
/// `dst` and `residual` point at the band's first element of channel 0.
///
/// # Safety
/// `dst` must be valid for writes of `c_out` rows of `rows * w_out` floats, `h_out * w_out`
/// apart.
unsafe fn init_band(g: &Geometry, dst: *mut f32, rows: usize, bias: Option<&[f32]>, residual: Option<&[f32]>) -> bool {
    let n = rows * g.w_out;
    let hw_out = g.h_out * g.w_out;
    if bias.is_none() && residual.is_none() {
        return false;
    }
    for co in 0..g.c_out {
        let bv = bias.map_or(0.0, |b| b[co]);
        // SAFETY: in the rows the caller owns.
        let d = unsafe { dst.add(co * hw_out) };
        match residual {
            Some(r) => {
                for (i, &v) in r[co * hw_out..co * hw_out + n].iter().enumerate() {
                    unsafe { d.add(i).write(v + bv) };
                }
            }
            None => {
                for i in 0..n {
                    unsafe { d.add(i).write(bv) };
                }
            }
        }
    }
    true
}

/// Output rows per band and the number of bands for one image.
fn bands(g: &Geometry) -> (usize, usize) {
    let threads = rayon::current_num_threads().max(1);
    let by_cache = (BAND_ELEMS / g.k().max(1) / g.w_out.max(1)).max(1);
    // At least two bands per thread when the image allows, so the threads stay balanced.
    let by_threads = g.h_out.div_ceil(2 * threads).max(1);
    let rows = by_cache.min(by_threads);
    (rows, g.h_out.div_ceil(rows))
}

/// `out[:, oy0..oy1, :] (+)= weight · unfold(input)[:, oy0..oy1, :]` for one image.
/// `dst` points at output row `oy0` of channel 0; channels are `h_out * w_out` apart.
fn band_product(g: &Geometry, input: &[f32], weight: &[f32], oy0: usize, oy1: usize, dst: *mut f32, accumulate: bool) {
    let n = (oy1 - oy0) * g.w_out;
    let k = g.k();
    let hw_out = (g.h_out * g.w_out) as isize;
    let product = |rhs: *const f32, rhs_rs: isize| {
        // SAFETY: dst has c_out rows of n floats, hw_out apart, that only this band writes;
        // the weight is (c_out, k) row-major; rhs is (k, n) with rows rhs_rs apart.
        unsafe {
            gemm::gemm(
                g.c_out,
                n,
                k,
                dst,
                1,
                hw_out,
                accumulate,
                weight.as_ptr(),
                1,
                k as isize,
                rhs,
                1,
                rhs_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    if g.pointwise() {
        // The input itself is the (c_in, h*w) matrix.
        product(input[oy0 * g.w..].as_ptr(), (g.h * g.w) as isize);
        return;
    }
    SCRATCH.with_borrow_mut(|(buf, rows)| {
        if buf.len() < k * n {
            buf.resize(k * n, 0.0);
        }
        // unfold writes every element of the first k * n.
        simd(#[inline(always)] || unfold(g, input, oy0, oy1, &mut buf[..k * n], rows));
        product(buf.as_ptr(), n as isize);
    });
}

thread_local! {
    /// Each worker's unfolded band and upsampled input rows, reused between calls.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// im2col of output rows `oy0..oy1`: row `(c, ky, kx)` of `buf` holds, for each output pixel
/// of the band, the input pixel under tap `(ky, kx)` of channel `c` (0 in the padding).
/// With upsampling, the input rows the band reads are first widened into `rows`.
#[inline(always)]
fn unfold(g: &Geometry, input: &[f32], oy0: usize, oy1: usize, buf: &mut [f32], rows: &mut Vec<f32>) {
    let n = (oy1 - oy0) * g.w_out;
    let (h, w, s) = (g.h as isize, g.w, g.stride);
    // Input rows iy0..iy1 (of the upsampled input) are the ones the band reads.
    let iy0 = (oy0 * s).saturating_sub(g.pt).min(g.h);
    let iy1 = ((oy1 - 1) * s + g.kh).saturating_sub(g.pt).clamp(iy0, g.h);
    if g.up > 1 && rows.len() < (iy1 - iy0) * w {
        rows.resize((iy1 - iy0) * w, 0.0);
    }
    for c in 0..g.c_in {
        let stored = &input[c * g.in_plane()..(c + 1) * g.in_plane()];
        // `plane` holds rows iy0..iy1 from row `base` on.
        let (plane, base) = if g.up == 1 {
            (stored, 0)
        } else {
            let ws = w / g.up;
            for (iy, row) in (iy0..iy1).zip(rows.chunks_exact_mut(w)) {
                let src = &stored[(iy / g.up) * ws..(iy / g.up + 1) * ws];
                for (d, &v) in row.chunks_exact_mut(g.up).zip(src) {
                    d.fill(v);
                }
            }
            (&rows[..(iy1 - iy0) * w], iy0)
        };
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &mut buf[((c * g.kh + ky) * g.kw + kx) * n..][..n];
                // Output columns ox whose input column ox*s + kx - pl is inside the image.
                let off = kx as isize - g.pl as isize;
                let lo = ((-off).max(0) as usize).div_ceil(s).min(g.w_out);
                let hi = ((w as isize - off).max(0) as usize).div_ceil(s).clamp(lo, g.w_out);
                for (r, oy) in (oy0..oy1).enumerate() {
                    let dst = &mut row[r * g.w_out..(r + 1) * g.w_out];
                    let iy = (oy * s + ky) as isize - g.pt as isize;
                    if iy < 0 || iy >= h {
                        dst.fill(0.0);
                        continue;
                    }
                    let iy = iy as usize - base;
                    let src = &plane[iy * w..(iy + 1) * w];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    let first = (lo * s) as isize + off; // input column of output column lo
                    let first = first as usize;
                    if s == 1 {
                        dst[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                    } else if hi > lo {
                        // Every s-th input column; pairs of columns for s = 2 (the encoder's
                        // down-sampling), which vectorises.
                        let src = &src[first..first + (hi - lo - 1) * s + 1];
                        let dst = &mut dst[lo..hi];
                        if s == 2 {
                            let (body, last) = dst.split_at_mut(hi - lo - 1);
                            for (d, pair) in body.iter_mut().zip(src.chunks_exact(2)) {
                                *d = pair[0];
                            }
                            last[0] = src[src.len() - 1];
                        } else {
                            for (d, &v) in dst.iter_mut().zip(src.iter().step_by(s)) {
                                *d = v;
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[allow(clippy::too_many_arguments)]
    fn check(b: usize, c_in: usize, c_out: usize, h: usize, w: usize, k: usize, stride: usize, pad: [usize; 4], bias: bool) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &dev).unwrap();
        let wt = (Tensor::randn(0f32, 1.0, (c_out, c_in, k, k), &dev).unwrap() / (c_in * k * k) as f64).unwrap();
        let bias = bias.then(|| Tensor::randn(0f32, 1.0, c_out, &dev).unwrap());
        let conv = Conv2d::from_weights(wt, bias, stride, pad);
        let reference = conv.forward_candle(&x).unwrap();
        let fast = conv.forward(&x).unwrap();
        assert_eq!(fast.dims(), reference.dims(), "shape for {:?}", (b, c_in, c_out, h, w, k, stride, pad));
        let d = max_abs_diff(&fast, &reference);
        assert!(d < 1e-5, "conv {:?}: max abs diff {d}", (b, c_in, c_out, h, w, k, stride, pad));
        // With a residual.
        let r = Tensor::randn(0f32, 1.0, reference.dims(), &dev).unwrap();
        let d = max_abs_diff(&conv.forward_add(&x, Some(&r)).unwrap(), &(&reference + &r).unwrap());
        assert!(d < 1e-5, "conv + residual {:?}: max abs diff {d}", (b, c_in, c_out, h, w, k, stride, pad));
    }

    #[test]
    fn matches_candle_conv2d() {
        // 3x3, stride 1, pad 1: odd and non-square sizes, batch 2, channels not multiples of 8.
        check(1, 3, 5, 7, 11, 3, 1, [1; 4], true);
        check(2, 13, 17, 16, 9, 3, 1, [1; 4], true);
        check(1, 64, 32, 33, 20, 3, 1, [1; 4], false);
        check(1, 4, 4, 1, 1, 3, 1, [1; 4], true);
        // 1x1.
        check(2, 9, 6, 5, 7, 1, 1, [0; 4], true);
        check(1, 128, 64, 16, 16, 1, 1, [0; 4], false);
        // The encoder's down-sampling: stride 2, padded right and bottom only.
        check(1, 6, 6, 8, 12, 3, 2, [0, 1, 0, 1], true);
        check(2, 5, 7, 9, 13, 3, 2, [0, 1, 0, 1], true);
        // Other padding and strides.
        check(1, 3, 4, 10, 6, 3, 2, [1; 4], true);
        check(1, 3, 4, 10, 6, 3, 1, [0; 4], true);
        check(1, 2, 3, 9, 10, 5, 3, [2, 1, 0, 2], true);
    }

    #[test]
    fn upsampled_input_matches_candle() {
        let dev = Device::Cpu;
        for &(b, c_in, c_out, h, w, up) in &[(1, 8, 8, 5, 7, 2), (2, 3, 5, 4, 4, 2), (1, 64, 16, 9, 3, 2), (1, 4, 4, 3, 2, 3)] {
            let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &dev).unwrap();
            let wt = (Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev).unwrap() / (c_in * 9) as f64).unwrap();
            let bias = Tensor::randn(0f32, 1.0, c_out, &dev).unwrap();
            let conv = Conv2d::from_weights(wt, Some(bias), 1, [1; 4]);
            let reference = conv.forward_candle(&x.upsample_nearest2d(h * up, w * up).unwrap()).unwrap();
            let fast = conv.forward_upsampled(&x, up).unwrap();
            assert_eq!(fast.dims(), reference.dims());
            let d = max_abs_diff(&fast, &reference);
            assert!(d < 1e-5, "upsampled conv {:?}: max abs diff {d}", (b, c_in, c_out, h, w, up));
        }
    }
}
