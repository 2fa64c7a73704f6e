//! Linear layers (no bias) tuned for decoding on the CPU.
//!
//! A decode step multiplies a handful of rows (two per image with guidance) by every weight
//! matrix, so its cost is reading the weights from memory once. candle computes `x.matmul(W^T)`
//! through a general GEMM that repacks the whole weight matrix on every call; for up to
//! [`MAX_GEMV_ROWS`] rows of f32 on the CPU this module instead streams each weight row once
//! and keeps every input row in registers (AVX2/FMA when the processor has it). Larger products
//! (the prompt's prefill) and other devices or dtypes go through candle's matmul.
//! Results differ from candle's only by summation order.

use candle_core::{CpuStorage, DType, Device, Module, Result, Storage, Tensor};
use rayon::prelude::*;

/// The most input rows handled by the streaming kernel (8 images with guidance).
pub const MAX_GEMV_ROWS: usize = 16;
/// Output columns per parallel task: enough work to amortise scheduling.
const COLS_PER_TASK: usize = 64;

#[derive(Debug, Clone)]
pub struct Linear {
    /// `(out, in)`, contiguous.
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self { weight: weight.contiguous()?, bias })
    }

    /// One layer from several stacked along the output dimension (q|k|v, gate|up), so a
    /// decode step reads them in one pass.
    pub fn fused(parts: &[candle_nn::Linear]) -> Result<Self> {
        let weights: Vec<&Tensor> = parts.iter().map(|p| p.weight()).collect();
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|p| p.bias()).collect();
        Self::new(Tensor::cat(&weights, 0)?, biases.map(|b| Tensor::cat(&b, 0)).transpose()?)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn out_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    fn use_gemv(&self, x: &Tensor, rows: usize) -> bool {
        matches!(self.weight.device(), Device::Cpu)
            && self.weight.dtype() == DType::F32
            && x.dtype() == DType::F32
            && rows <= MAX_GEMV_ROWS
    }
}

impl Module for Linear {
    /// x `(..., in)` -> `(..., out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let rows = dims[..dims.len().saturating_sub(1)].iter().product::<usize>();
        let (n, wk) = self.weight.dims2()?;
        if wk != k {
            candle_core::bail!("linear: input has {k} features, the weight expects {wk}");
        }
        let mut out_dims = dims.clone();
        *out_dims.last_mut().expect("rank >= 1") = n;
        let y = if self.use_gemv(x, rows) {
            let x = x.contiguous()?;
            let out = with_f32(&x, |xs| with_f32(&self.weight, |ws| gemv(xs, rows, k, ws, n)))??;
            Tensor::from_vec(out, out_dims, &Device::Cpu)?
        } else {
            x.reshape((rows, k))?.contiguous()?.matmul(&self.weight.t()?)?.reshape(out_dims)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Run `f` on the f32 data of a contiguous CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => candle_core::bail!("expected a contiguous f32 CPU tensor"),
    }
}

/// `out[r, j] = sum_i x[r, i] * w[j, i]` for `rows` rows of `x` (`rows x k`) and `w` (`n x k`).
pub fn gemv(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    // Each task owns a range of output columns and writes them straight into the row-major
    // result (tasks never write the same element).
    let mut out = vec![0f32; rows * n];
    let all = Out { ptr: out.as_mut_ptr(), ld: n, col0: 0, rows, cols: n };
    (0..n.div_ceil(COLS_PER_TASK)).into_par_iter().for_each(|t| {
        let j0 = t * COLS_PER_TASK;
        let cols = COLS_PER_TASK.min(n - j0);
        block(x, rows, k, &w[j0 * k..(j0 + cols) * k], cols, all.window(j0, cols));
    });
    out
}

/// The part of a row-major `rows x ld` output that one task writes: columns
/// `col0..col0 + cols`. Tasks get disjoint columns, so their writes never overlap.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    ld: usize,
    col0: usize,
    rows: usize,
    cols: usize,
}

// Safety: an `Out` is only a window of one live buffer; the tasks sharing a buffer write
// disjoint elements, and the buffer is read only after every task has finished.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Columns `col0..col0 + cols` of this window.
    fn window(&self, col0: usize, cols: usize) -> Out {
        assert!(col0 + cols <= self.cols);
        Out { col0: self.col0 + col0, cols, ..*self }
    }

    /// Write element (row `r`, task column `c`).
    #[inline(always)]
    fn set(&self, r: usize, c: usize, v: f32) {
        assert!(r < self.rows && c < self.cols, "output ({r}, {c}) outside {}x{}", self.rows, self.cols);
        // Safety: checked just above that the element lies inside this window of the buffer.
        unsafe { *self.ptr.add(r * self.ld + self.col0 + c) = v }
    }
}

/// Columns `0..cols` of one task.
fn block(x: &[f32], rows: usize, k: usize, w: &[f32], cols: usize, out: Out) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // Safety: the feature was just detected.
            unsafe { avx512::block(x, rows, k, w, cols, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // Safety: the features were just detected.
            unsafe { avx2::block(x, rows, k, w, cols, out) };
            return;
        }
    }
    portable::block(x, rows, k, w, cols, out);
}

mod portable {
    /// Eight-lane accumulators that the compiler vectorises on any target.
    pub fn block(x: &[f32], rows: usize, k: usize, w: &[f32], cols: usize, out: super::Out) {
        for j in 0..cols {
            let wj = &w[j * k..(j + 1) * k];
            for r in 0..rows {
                let xr = &x[r * k..(r + 1) * k];
                let mut acc = [0f32; 8];
                let mut i = 0;
                while i + 8 <= k {
                    for l in 0..8 {
                        acc[l] += xr[i + l] * wj[i + l];
                    }
                    i += 8;
                }
                let mut s: f32 = acc.iter().sum();
                while i < k {
                    s += xr[i] * wj[i];
                    i += 1;
                }
                out.set(r, j, s);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Tiles of 4 weight rows x 2 input rows: 8 independent accumulators hide the FMA latency
    /// while every loaded weight vector is used twice; a tile's 4 weight rows stay in L1 while
    /// the next pair of input rows reuses them.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block(x: &[f32], rows: usize, k: usize, w: &[f32], cols: usize, out: super::Out) {
        // Safety: every pointer stays inside x (rows*k) and w (cols*k): rows and columns past
        // the end are clamped to the last valid one, and i < k8 <= k.
        unsafe {
            let k8 = k / 8 * 8;
            let mut j = 0;
            while j < cols {
                let nj = (cols - j).min(4);
                let mut r = 0;
                while r < rows {
                    let nr = (rows - r).min(2);
                    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                    let wp: [*const f32; 4] = std::array::from_fn(|c| w.as_ptr().add((j + c.min(nj - 1)) * k));
                    let xp: [*const f32; 2] = std::array::from_fn(|b| x.as_ptr().add((r + b.min(nr - 1)) * k));
                    let mut i = 0;
                    while i < k8 {
                        let x0 = _mm256_loadu_ps(xp[0].add(i));
                        let x1 = _mm256_loadu_ps(xp[1].add(i));
                        for c in 0..4 {
                            let wv = _mm256_loadu_ps(wp[c].add(i));
                            acc[c][0] = _mm256_fmadd_ps(x0, wv, acc[c][0]);
                            acc[c][1] = _mm256_fmadd_ps(x1, wv, acc[c][1]);
                        }
                        i += 8;
                    }
                    for c in 0..nj {
                        for b in 0..nr {
                            let mut s = hsum(acc[c][b]);
                            for t in k8..k {
                                s += *xp[b].add(t) * *wp[c].add(t);
                            }
                            out.set(r + b, j + c, s);
                        }
                    }
                    r += 2;
                }
                j += 4;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Tiles of 4 weight rows x up to 4 input rows in 16-lane registers: up to 16 independent
    /// accumulators (of the 32 registers), and every loaded vector feeds 4 FMAs, so a batch of
    /// several images (`-n 8`: 16 rows) is bound by the FMA units rather than by loads. One
    /// decode row pair (`-n 1`) uses the 4 x 2 tile and stays bound by memory.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn block(x: &[f32], rows: usize, k: usize, w: &[f32], cols: usize, out: super::Out) {
        let mut j = 0;
        while j < cols {
            let nj = (cols - j).min(4);
            let mut r = 0;
            while r < rows {
                let nr = (rows - r).min(4);
                // Safety: the caller checked avx512f; tile() stays inside x and w (see there).
                unsafe {
                    match nr {
                        4 => tile::<4>(x, r, k, w, j, nj, out),
                        3 => tile::<3>(x, r, k, w, j, nj, out),
                        2 => tile::<2>(x, r, k, w, j, nj, out),
                        _ => tile::<1>(x, r, k, w, j, nj, out),
                    }
                }
                r += nr;
            }
            j += 4;
        }
    }

    /// Input rows `r..r+R` x weight rows `j..j+nj` (nj <= 4; missing weight rows are clamped to
    /// the last valid one and their sums dropped). Pointers stay inside x (rows*k) and w
    /// (cols*k): i < k16 <= k.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize>(
        x: &[f32],
        r: usize,
        k: usize,
        w: &[f32],
        j: usize,
        nj: usize,
        out: super::Out,
    ) {
        unsafe {
            let k16 = k / 16 * 16;
            let wp: [*const f32; 4] = std::array::from_fn(|c| w.as_ptr().add((j + c.min(nj - 1)) * k));
            let xp: [*const f32; R] = std::array::from_fn(|b| x.as_ptr().add((r + b) * k));
            let mut acc = [[_mm512_setzero_ps(); R]; 4];
            let mut i = 0;
            while i < k16 {
                let xv: [__m512; R] = std::array::from_fn(|b| _mm512_loadu_ps(xp[b].add(i)));
                for (c, accs) in acc.iter_mut().enumerate() {
                    let wv = _mm512_loadu_ps(wp[c].add(i));
                    for (a, xb) in accs.iter_mut().zip(&xv) {
                        *a = _mm512_fmadd_ps(*xb, wv, *a);
                    }
                }
                i += 16;
            }
            for (c, accs) in acc.iter().enumerate().take(nj) {
                for (b, a) in accs.iter().enumerate() {
                    let mut s = _mm512_reduce_add_ps(*a);
                    for t in k16..k {
                        s += *xp[b].add(t) * *wp[c].add(t);
                    }
                    out.set(r + b, j + c, s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
        let mut out = vec![0f64; rows * n];
        for r in 0..rows {
            for j in 0..n {
                out[r * n + j] = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64).sum();
            }
        }
        out
    }

    #[test]
    fn streaming_kernel_matches_a_double_precision_reference() {
        let mut seed = 1u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for &(rows, k, n) in &[(1, 8, 1), (2, 384, 640), (3, 13, 7), (16, 1024, 130), (5, 100, 67), (2, 7, 3), (7, 40, 9), (13, 384, 66)] {
            let x: Vec<f32> = (0..rows * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let got = gemv(&x, rows, k, &w, n);
            let want = reference(&x, rows, k, &w, n);
            for (g, e) in got.iter().zip(&want) {
                assert!((*g as f64 - e).abs() < 1e-4 * (1.0 + e.abs()), "{rows}x{k}x{n}: {g} vs {e}");
            }
            // Every kernel this processor can run, not only the one gemv picks.
            let mut kernels: Vec<(&str, Vec<f32>)> = Vec::new();
            let window = |p: &mut Vec<f32>| Out { ptr: p.as_mut_ptr(), ld: n, col0: 0, rows, cols: n };
            let mut p = vec![f32::NAN; n * rows];
            portable::block(&x, rows, k, &w, n, window(&mut p));
            kernels.push(("portable", p));
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    let mut p = vec![f32::NAN; n * rows];
                    unsafe { avx2::block(&x, rows, k, &w, n, window(&mut p)) };
                    kernels.push(("avx2", p));
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    let mut p = vec![f32::NAN; n * rows];
                    unsafe { avx512::block(&x, rows, k, &w, n, window(&mut p)) };
                    kernels.push(("avx512", p));
                }
            }
            for (name, p) in &kernels {
                for j in 0..n {
                    for r in 0..rows {
                        let (g, e) = (p[r * n + j] as f64, want[r * n + j]);
                        assert!((g - e).abs() < 1e-4 * (1.0 + e.abs()), "{name} {rows}x{k}x{n}: {g} vs {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn forward_matches_candle_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (70, 48), &dev).unwrap();
        let lin = Linear::new(w.clone(), None).unwrap();
        for rows in [1usize, 2, 16, 17, 40] {
            let x = Tensor::randn(0f32, 1.0, (rows, 1, 48), &dev).unwrap();
            let got = lin.forward(&x).unwrap();
            let want = x.reshape((rows, 48)).unwrap().matmul(&w.t().unwrap()).unwrap().reshape((rows, 1, 70)).unwrap();
            let d = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "rows {rows}: {d}");
        }
    }
}
