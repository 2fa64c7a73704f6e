//! Linear layers tuned for the CPU.
//!
//! A decode step multiplies a handful of rows (two per image with guidance, sixteen for
//! `-n 8`) by every weight matrix. With few rows its cost is reading the weights once; with
//! sixteen it is also 2 x 16 FLOPs per weight, so the kernel must keep the FMA units busy.
//! At load every f32 weight on the CPU is repacked once into [`Panels`]: blocks of [`PANEL`]
//! output columns stored input-major (`panel[i][c] = W[p * PANEL + c][i]`). A kernel then
//! keeps a tile of up to 16 rows x [`PANEL`] sums in registers for the whole reduction: every
//! weight vector it loads feeds one FMA per row, every input element is broadcast once per
//! panel, no horizontal sums are needed, and the weights are prefetched a fixed distance ahead.
//! The same kernel serves the prompt's prefill (many rows) and the steps; other devices and
//! dtypes go through candle's matmul.
//! Results differ from candle's only by summation order (each sum runs over the inputs in
//! order, so it does not depend on the number of threads).

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, Module, Result, Storage, Tensor};
use rayon::prelude::*;

/// Output columns per panel: one 16-lane register, one cache line per input element.
pub const PANEL: usize = 16;
/// Output columns per parallel task of a decode step: enough work to amortise scheduling.
const COLS_PER_TASK: usize = 64;
/// How many input elements (panel cache lines) ahead the x86 kernels prefetch the weights:
/// with it the hardware keeps streaming from memory while the FMAs run (measured on the
/// default model's step: 16 rows 7.7 -> 4.5-5.6 ms, 2 rows 3.6-4.4 -> 3.1-3.4 ms).
#[cfg(target_arch = "x86_64")]
const AHEAD: usize = 32;
/// Input rows per parallel task when there are many (a prefill).
const ROWS_PER_TASK: usize = 64;

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum Weight {
    /// `(out, in)`, contiguous: other devices and dtypes.
    Dense(Tensor),
    /// f32 on the CPU, repacked for the kernels below.
    Packed(Arc<Panels>),
}

impl Linear {
    /// `weight` is `(out, in)`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let weight = if weight.device().is_cpu() && weight.dtype() == DType::F32 {
            let (n, k) = weight.dims2()?;
            let w = weight.contiguous()?;
            Weight::Packed(Arc::new(with_f32(&w, |ws| Panels::pack(ws, n, k))?))
        } else {
            Weight::Dense(weight.contiguous()?)
        };
        Ok(Self { weight, bias })
    }

    /// One layer from several stacked along the output dimension (q|k|v, gate|up), so a
    /// decode step reads them in one pass.
    pub fn fused(parts: &[candle_nn::Linear]) -> Result<Self> {
        let weights: Vec<&Tensor> = parts.iter().map(|p| p.weight()).collect();
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|p| p.bias()).collect();
        Self::new(Tensor::cat(&weights, 0)?, biases.map(|b| Tensor::cat(&b, 0)).transpose()?)
    }

    pub fn out_features(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.dim(0).unwrap_or(0),
            Weight::Packed(p) => p.n,
        }
    }

    fn in_features(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.dim(1).unwrap_or(0),
            Weight::Packed(p) => p.k,
        }
    }
}

impl Module for Linear {
    /// x `(..., in)` -> `(..., out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let rows = dims[..dims.len().saturating_sub(1)].iter().product::<usize>();
        let (n, wk) = (self.out_features(), self.in_features());
        if wk != k {
            candle_core::bail!("linear: input has {k} features, the weight expects {wk}");
        }
        let mut out_dims = dims.clone();
        *out_dims.last_mut().expect("rank >= 1") = n;
        let y = match &self.weight {
            Weight::Packed(p) => {
                let dtype = x.dtype();
                let x = x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
                let out = with_f32(&x, |xs| p.matmul(xs, rows))?;
                Tensor::from_vec(out, out_dims, &Device::Cpu)?.to_dtype(dtype)?
            }
            Weight::Dense(w) => x.reshape((rows, k))?.contiguous()?.matmul(&w.t()?)?.reshape(out_dims)?,
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

/// An `n x k` weight matrix as `ceil(n / PANEL)` panels of `k x PANEL` floats (the last one
/// padded with zero columns), each starting on a 64-byte boundary.
pub struct Panels {
    data: Vec<f32>,
    /// Index of the first panel's first float in `data` (for the alignment).
    start: usize,
    n: usize,
    k: usize,
}

impl std::fmt::Debug for Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Panels({}x{})", self.n, self.k)
    }
}

impl Panels {
    /// Repack the row-major `n x k` matrix `w` (`w[j * k + i]` = output j, input i).
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight of {} floats is not {n}x{k}", w.len());
        let size = n.div_ceil(PANEL) * k * PANEL;
        let mut data = vec![0f32; size + 16];
        let start = data.as_ptr().align_offset(64).min(16);
        data[start..start + size].par_chunks_mut((k * PANEL).max(1)).enumerate().for_each(|(p, panel)| {
            let cols = PANEL.min(n - p * PANEL);
            for c in 0..cols {
                let row = &w[(p * PANEL + c) * k..(p * PANEL + c + 1) * k];
                for (i, &v) in row.iter().enumerate() {
                    panel[i * PANEL + c] = v;
                }
            }
        });
        Self { data, start, n, k }
    }

    fn panel(&self, p: usize) -> &[f32] {
        let len = self.k * PANEL;
        &self.data[self.start + p * len..self.start + (p + 1) * len]
    }

    /// `out[r, j] = sum_i x[r, i] * W[j, i]` for the `rows x k` matrix `x`; row-major `rows x n`.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), rows * k, "input of {} floats is not {rows}x{k}", x.len());
        let mut out = vec![0f32; rows * n];
        if rows == 0 || n == 0 {
            return out;
        }
        // Tasks own disjoint (panel range, row range) blocks and write them straight into the
        // row-major result.
        let all = Out { ptr: out.as_mut_ptr(), ld: n, row0: 0, col0: 0, rows, cols: n };
        let per_task = COLS_PER_TASK / PANEL;
        let col_tasks = n.div_ceil(PANEL).div_ceil(per_task);
        let row_tasks = rows.div_ceil(ROWS_PER_TASK);
        let kernel = Kernel::detect();
        (0..col_tasks * row_tasks).into_par_iter().for_each(|t| {
            let (ct, rt) = (t % col_tasks, t / col_tasks);
            let r0 = rt * ROWS_PER_TASK;
            let nr = ROWS_PER_TASK.min(rows - r0);
            let xs = &x[r0 * k..(r0 + nr) * k];
            for p in ct * per_task..((ct + 1) * per_task).min(n.div_ceil(PANEL)) {
                let j0 = p * PANEL;
                let out = all.window(r0, nr, j0, PANEL.min(n - j0));
                kernel.run(xs, nr, k, self.panel(p), out);
            }
        });
        out
    }
}

/// The part of a row-major `? x ld` buffer that one task writes: rows `row0..row0 + rows`,
/// columns `col0..col0 + cols`. Tasks get disjoint windows, so their writes never overlap.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    ld: usize,
    row0: usize,
    col0: usize,
    rows: usize,
    cols: usize,
}

// Safety: an `Out` is only a window of one live buffer; the tasks sharing a buffer write
// disjoint windows, and the buffer is read only after every task has finished.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Rows `row0..row0 + rows` and columns `col0..col0 + cols` of this window.
    fn window(&self, row0: usize, rows: usize, col0: usize, cols: usize) -> Out {
        assert!(row0 + rows <= self.rows && col0 + cols <= self.cols, "window outside its buffer");
        Out { row0: self.row0 + row0, col0: self.col0 + col0, rows, cols, ..*self }
    }

    /// Write `v[..self.cols]` as row `r` of the window.
    #[inline(always)]
    fn set_row(&self, r: usize, v: &[f32; PANEL]) {
        assert!(r < self.rows && self.cols <= PANEL, "row {r} outside the window");
        // Safety: row r and columns 0..cols lie inside this window of the buffer (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(v.as_ptr(), self.ptr.add((self.row0 + r) * self.ld + self.col0), self.cols);
        }
    }
}

/// The best kernel this processor runs, chosen once per product.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// Every kernel this processor can run (for the tests).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut v = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                v.push(Kernel::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Kernel::Avx512);
            }
        }
        v
    }

    /// `rows` rows of `x` (`rows x k`) times one panel, into `out` (`rows x cols`).
    fn run(self, x: &[f32], rows: usize, k: usize, panel: &[f32], out: Out) {
        assert!(x.len() >= rows * k && panel.len() >= k * PANEL && out.rows == rows);
        match self {
            Kernel::Portable => portable::panel(x, rows, k, panel, out),
            // Safety: these variants exist only when detect() found the features.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::panel(x, rows, k, panel, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { avx512::panel(x, rows, k, panel, out) },
        }
    }
}

mod portable {
    use super::{Out, PANEL};

    /// One row at a time, `PANEL` sums that the compiler vectorises on any target.
    pub fn panel(x: &[f32], rows: usize, k: usize, panel: &[f32], out: Out) {
        for r in 0..rows {
            let mut acc = [0f32; PANEL];
            for (&xv, w) in x[r * k..(r + 1) * k].iter().zip(panel.chunks_exact(PANEL)) {
                for (a, &wv) in acc.iter_mut().zip(w) {
                    *a += xv * wv;
                }
            }
            out.set_row(r, &acc);
        }
    }
}

/// Split `rows` into tiles of the sizes in `sizes` (largest first; the last must be 1) and call
/// `tile(size, first_row)` for each.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn for_tiles(rows: usize, sizes: &[usize], mut tile: impl FnMut(usize, usize)) {
    let mut r = 0;
    for &size in sizes {
        while rows - r >= size {
            tile(size, r);
            r += size;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{AHEAD, Out, PANEL};
    use std::arch::x86_64::*;

    /// Tiles of up to 16 rows x 16 columns: one accumulator per row; per input element one
    /// weight load (one cache line of the panel) and one broadcast per row feed one FMA per row.
    /// Sixteen rows (`-n 8`) use every weight line once, so the FMAs hide under the stream.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn panel(x: &[f32], rows: usize, k: usize, panel: &[f32], out: Out) {
        // Safety: the caller checked avx512f and the lengths (see Kernel::run).
        super::for_tiles(rows, &[16, 8, 4, 2, 1], |size, r| unsafe {
            match size {
                16 => tile::<16>(x, r, k, panel, out),
                8 => tile::<8>(x, r, k, panel, out),
                4 => tile::<4>(x, r, k, panel, out),
                2 => tile::<2>(x, r, k, panel, out),
                _ => tile::<1>(x, r, k, panel, out),
            }
        });
    }

    /// Rows `r..r + R` of `x`; reads `x[(r + b) * k + i]` and `panel[i * PANEL..][..PANEL]` for
    /// i < k, inside the slices the caller checked.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize>(x: &[f32], r: usize, k: usize, panel: &[f32], out: Out) {
        unsafe {
            let xp: [*const f32; R] = std::array::from_fn(|b| x.as_ptr().add((r + b) * k));
            let wp = panel.as_ptr();
            let mut acc = [_mm512_setzero_ps(); R];
            for i in 0..k {
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((i + AHEAD) * PANEL) as *const i8);
                let w = _mm512_loadu_ps(wp.add(i * PANEL));
                for (a, xb) in acc.iter_mut().zip(&xp) {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*xb.add(i)), w, *a);
                }
            }
            let mut row = [0f32; PANEL];
            for (b, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(row.as_mut_ptr(), *a);
                out.set_row(r + b, &row);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{AHEAD, Out, PANEL};
    use std::arch::x86_64::*;

    /// Tiles of up to 6 rows x 16 columns: 12 accumulators of 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panel(x: &[f32], rows: usize, k: usize, panel: &[f32], out: Out) {
        // Safety: the caller checked avx2/fma and the lengths (see Kernel::run).
        super::for_tiles(rows, &[6, 4, 2, 1], |size, r| unsafe {
            match size {
                6 => tile::<6>(x, r, k, panel, out),
                4 => tile::<4>(x, r, k, panel, out),
                2 => tile::<2>(x, r, k, panel, out),
                _ => tile::<1>(x, r, k, panel, out),
            }
        });
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(x: &[f32], r: usize, k: usize, panel: &[f32], out: Out) {
        unsafe {
            let xp: [*const f32; R] = std::array::from_fn(|b| x.as_ptr().add((r + b) * k));
            let wp = panel.as_ptr();
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for i in 0..k {
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((i + AHEAD) * PANEL) as *const i8);
                let w0 = _mm256_loadu_ps(wp.add(i * PANEL));
                let w1 = _mm256_loadu_ps(wp.add(i * PANEL + 8));
                for (a, xb) in acc.iter_mut().zip(&xp) {
                    let xv = _mm256_broadcast_ss(&*xb.add(i));
                    a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
                }
            }
            let mut row = [0f32; PANEL];
            for (b, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(row.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(row.as_mut_ptr().add(8), a[1]);
                out.set_row(r + b, &row);
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
    fn every_kernel_matches_a_double_precision_reference() {
        let mut seed = 1u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let shapes = [(1, 8, 1), (2, 384, 640), (3, 13, 7), (16, 1024, 130), (5, 100, 67), (2, 7, 3), (7, 40, 9), (13, 384, 66), (70, 33, 97), (9, 1, 32)];
        for &(rows, k, n) in &shapes {
            let x: Vec<f32> = (0..rows * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let want = reference(&x, rows, k, &w, n);
            let panels = Panels::pack(&w, n, k);
            let check = |name: &str, got: &[f32]| {
                for (g, e) in got.iter().zip(&want) {
                    assert!((*g as f64 - e).abs() < 1e-4 * (1.0 + e.abs()), "{name} {rows}x{k}x{n}: {g} vs {e}");
                }
            };
            check("matmul", &panels.matmul(&x, rows));
            // Every kernel this processor can run, not only the one matmul picks, on every
            // panel (the last one is partly padding).
            for kernel in Kernel::available() {
                let mut got = vec![f32::NAN; rows * n];
                let all = Out { ptr: got.as_mut_ptr(), ld: n, row0: 0, col0: 0, rows, cols: n };
                for r0 in (0..rows).step_by(ROWS_PER_TASK) {
                    let nr = ROWS_PER_TASK.min(rows - r0);
                    for p in 0..n.div_ceil(PANEL) {
                        let out = all.window(r0, nr, p * PANEL, PANEL.min(n - p * PANEL));
                        kernel.run(&x[r0 * k..(r0 + nr) * k], nr, k, panels.panel(p), out);
                    }
                }
                check(&format!("{kernel:?}"), &got);
            }
        }
    }

    #[test]
    fn forward_matches_candle_matmul_and_ignores_the_thread_count() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (70, 48), &dev).unwrap();
        let lin = Linear::new(w.clone(), None).unwrap();
        for rows in [1usize, 2, 16, 17, 40, 130] {
            let x = Tensor::randn(0f32, 1.0, (rows, 1, 48), &dev).unwrap();
            let got = lin.forward(&x).unwrap();
            let want = x.reshape((rows, 48)).unwrap().matmul(&w.t().unwrap()).unwrap().reshape((rows, 1, 70)).unwrap();
            let d = (&got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "rows {rows}: {d}");
            let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            let solo = one.install(|| lin.forward(&x)).unwrap();
            assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), solo.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
    }
}
