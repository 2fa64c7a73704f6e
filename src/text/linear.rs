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
//!
//! A weight matrix whose every value is exact in f16 (a checkpoint stored in f16 and widened
//! to f32 at load, like the shipped model) is packed as f16 panels: half the bytes to stream
//! per step. The kernels widen each weight vector to f32 as they load it (exact) and run the
//! same FMAs in the same order, so the results are bit-identical to f32 panels. Any other
//! matrix keeps f32 panels. `--dtype q8` (or `TESSERA_CPU_WEIGHTS=q8_0`) quantizes them to
//! GGML's Q8_0 for candle's quantized matmul instead (lossy: the speed/quality table is in
//! BENCHMARKS.md). `TESSERA_CPU_WEIGHTS=f32` keeps f32 panels for every matrix (for
//! before/after measurements in one binary); `auto` (the default) picks f16 where lossless.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Device, Module, Result, Storage, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Output columns per panel: one 16-lane register, one cache line of f32 per input element.
pub const PANEL: usize = 16;
/// Output columns per parallel task of a decode step: enough work to amortise scheduling.
const COLS_PER_TASK: usize = 64;
/// How many bytes of a panel ahead the x86 kernels prefetch the weights (32 input elements
/// of f32 panels, 64 of f16 panels): with it the hardware keeps streaming from memory while
/// the FMAs run (measured on the default model's step with f32 panels: 16 rows 7.7 ->
/// 4.5-5.6 ms, 2 rows 3.6-4.4 -> 3.1-3.4 ms).
#[cfg(target_arch = "x86_64")]
const AHEAD_BYTES: usize = 32 * 64;
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
    /// f32 on the CPU, repacked for the kernels below (as f16 where that is exact).
    Packed(Arc<Panels>),
    /// Quantized to GGML's Q8_0 on the CPU (`--dtype q8`): candle's quantized matmul, which
    /// quantizes the inputs to 8 bits too. Lossy.
    Quantized { mm: Arc<QMatMul>, n: usize, k: usize },
}

/// How [`Linear::with_cpu_weights`] holds f32 weights on the CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CpuWeights {
    /// `TESSERA_CPU_WEIGHTS` (`auto`, `f32` or `q8_0`), `auto` when unset.
    #[default]
    FromEnv,
    /// Panels, as f16 where every value is exact in f16 (lossless).
    Auto,
    /// f32 panels.
    F32,
    /// GGML Q8_0 blocks of 32 weights (8 bits + one f16 scale each), candle's quantized matmul.
    Q8_0,
}

impl CpuWeights {
    fn resolve(self) -> Result<Self> {
        if self != CpuWeights::FromEnv {
            return Ok(self);
        }
        match std::env::var("TESSERA_CPU_WEIGHTS").as_deref() {
            Err(_) | Ok("" | "auto") => Ok(CpuWeights::Auto),
            Ok("f32") => Ok(CpuWeights::F32),
            Ok("q8_0") => Ok(CpuWeights::Q8_0),
            Ok(other) => candle_core::bail!("TESSERA_CPU_WEIGHTS={other}: expected auto, f32 or q8_0"),
        }
    }
}

impl Linear {
    /// `weight` is `(out, in)`; CPU f32 weights held as `TESSERA_CPU_WEIGHTS` says.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::with_cpu_weights(weight, bias, CpuWeights::FromEnv)
    }

    /// [`Linear::new`] with CPU f32 weights held as `mode` says (other devices and dtypes keep
    /// the dense tensor).
    pub fn with_cpu_weights(weight: Tensor, bias: Option<Tensor>, mode: CpuWeights) -> Result<Self> {
        if !(weight.device().is_cpu() && weight.dtype() == DType::F32) {
            return Ok(Self { weight: Weight::Dense(weight.contiguous()?), bias });
        }
        let (n, k) = weight.dims2()?;
        let w = weight.contiguous()?;
        let weight = match mode.resolve()? {
            CpuWeights::Q8_0 => {
                let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
                Weight::Quantized { mm: Arc::new(QMatMul::from_qtensor(q)?), n, k }
            }
            m => Weight::Packed(Arc::new(with_f32(&w, |ws| Panels::new(ws, n, k, m == CpuWeights::Auto))?)),
        };
        Ok(Self { weight, bias })
    }

    /// One layer from several stacked along the output dimension (q|k|v, gate|up), so a
    /// decode step reads them in one pass.
    pub fn fused(parts: &[candle_nn::Linear], mode: CpuWeights) -> Result<Self> {
        let weights: Vec<&Tensor> = parts.iter().map(|p| p.weight()).collect();
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|p| p.bias()).collect();
        Self::with_cpu_weights(Tensor::cat(&weights, 0)?, biases.map(|b| Tensor::cat(&b, 0)).transpose()?, mode)
    }

    pub fn out_features(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.dim(0).unwrap_or(0),
            Weight::Packed(p) => p.n,
            Weight::Quantized { n, .. } => *n,
        }
    }

    /// Bytes a product streams per weight: 2 for f16 panels, 34/32 for Q8_0, otherwise the
    /// weight's dtype size.
    pub fn bytes_per_weight(&self) -> f64 {
        match &self.weight {
            Weight::Dense(w) => w.dtype().size_in_bytes() as f64,
            Weight::Packed(p) => p.dtype().size_in_bytes() as f64,
            Weight::Quantized { .. } => 34.0 / 32.0,
        }
    }

    /// The dense weight `(out, in)` of a layer without a bias (what a fused GPU kernel can take
    /// in place of [`Module::forward`]); `None` for CPU panels, quantized weights or a bias.
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match (&self.weight, &self.bias) {
            (Weight::Dense(w), None) => Some(w),
            _ => None,
        }
    }

    fn in_features(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.dim(1).unwrap_or(0),
            Weight::Packed(p) => p.k,
            Weight::Quantized { k, .. } => *k,
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
            Weight::Dense(w) => match super::cuda_decode::gemv(x, w)? {
                Some(y) => y.reshape(out_dims)?,
                None => x.reshape((rows, k))?.contiguous()?.matmul(&w.t()?)?.reshape(out_dims)?,
            },
            Weight::Quantized { mm, .. } => {
                let dtype = x.dtype();
                mm.forward(&x.to_dtype(DType::F32)?.reshape((rows, k))?.contiguous()?)?.reshape(out_dims)?.to_dtype(dtype)?
            }
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

/// An `n x k` weight matrix as `ceil(n / PANEL)` panels of `k x PANEL` weights (the last one
/// padded with zero columns), each starting on a 64-byte boundary: f32, or f16 when every
/// weight is exact in f16 (rows of 32 bytes).
pub struct Panels {
    data: Data,
    n: usize,
    k: usize,
}

enum Data {
    F32(Buf<f32>),
    F16(Buf<f16>),
}

/// Panel storage: `data[start..]`, with `start` chosen for the 64-byte alignment.
struct Buf<T> {
    data: Vec<T>,
    start: usize,
}

impl<T: Elem> Buf<T> {
    /// The panels of the row-major `n x k` matrix `w`, every value exact in `T`.
    fn pack(w: &[f32], n: usize, k: usize) -> Self {
        let size = n.div_ceil(PANEL) * k * PANEL;
        let per_line = 64 / size_of::<T>();
        let mut data = vec![T::ZERO; size + per_line];
        let start = data.as_ptr().align_offset(64).min(per_line);
        let panels = data[start..start + size].par_chunks_mut((k * PANEL).max(1)).enumerate();
        panels.for_each_init(Vec::new, |buf, (p, panel)| {
            let cols = PANEL.min(n - p * PANEL);
            for c in 0..cols {
                let row = T::narrow(&w[(p * PANEL + c) * k..(p * PANEL + c + 1) * k], buf);
                for (i, &v) in row.iter().enumerate() {
                    panel[i * PANEL + c] = v;
                }
            }
        });
        Self { data, start }
    }

    fn panel(&self, p: usize, k: usize) -> &[T] {
        let len = k * PANEL;
        &self.data[self.start + p * len..self.start + (p + 1) * len]
    }
}

impl std::fmt::Debug for Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Panels({:?} {}x{})", self.dtype(), self.n, self.k)
    }
}

impl Panels {
    /// Repack the row-major `n x k` matrix `w` (`w[j * k + i]` = output j, input i): as f16
    /// when every value is exact in f16, as f32 otherwise.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        Self::new(w, n, k, true)
    }

    /// [`Panels::pack`], always as f32.
    pub fn pack_f32(w: &[f32], n: usize, k: usize) -> Self {
        Self::new(w, n, k, false)
    }

    fn new(w: &[f32], n: usize, k: usize, half: bool) -> Self {
        assert_eq!(w.len(), n * k, "weight of {} floats is not {n}x{k}", w.len());
        let data = if half && all_exact_in_f16(w) { Data::F16(Buf::pack(w, n, k)) } else { Data::F32(Buf::pack(w, n, k)) };
        Self { data, n, k }
    }

    /// What the panels hold: `F16` or `F32`.
    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::F16(_) => DType::F16,
        }
    }

    /// `out[r, j] = sum_i x[r, i] * W[j, i]` for the `rows x k` matrix `x`; row-major `rows x n`.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.matmul_with(Kernel::detect(), x, rows)
    }

    fn matmul_with(&self, kernel: Kernel, x: &[f32], rows: usize) -> Vec<f32> {
        match &self.data {
            Data::F32(buf) => self.product(kernel, buf, x, rows),
            Data::F16(buf) => self.product(kernel, buf, x, rows),
        }
    }

    fn product<T: Elem>(&self, kernel: Kernel, buf: &Buf<T>, x: &[f32], rows: usize) -> Vec<f32> {
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
        (0..col_tasks * row_tasks).into_par_iter().for_each(|t| {
            let (ct, rt) = (t % col_tasks, t / col_tasks);
            let r0 = rt * ROWS_PER_TASK;
            let nr = ROWS_PER_TASK.min(rows - r0);
            let xs = &x[r0 * k..(r0 + nr) * k];
            for p in ct * per_task..((ct + 1) * per_task).min(n.div_ceil(PANEL)) {
                let j0 = p * PANEL;
                let out = all.window(r0, nr, j0, PANEL.min(n - j0));
                kernel.run(xs, nr, k, buf.panel(p, k), out);
            }
        });
        out
    }
}

/// Whether every value of `w` is exactly an f16 value (a branch-free test per value that
/// vectorises on any x86-64: a few ms for the shipped model's 20M weights).
fn all_exact_in_f16(w: &[f32]) -> bool {
    w.par_chunks(1 << 16).all(|c| c.iter().fold(true, |ok, &v| ok & exact_in_f16(v)))
}

/// `v` is ±0, ±infinity, or finite and exactly an f16 value (normal or subnormal); NaNs count
/// as not exact.
#[inline(always)]
fn exact_in_f16(v: f32) -> bool {
    const MIN_NORMAL: f32 = 1.0 / 16384.0; // 2^-14
    const TWO_23: f32 = 8_388_608.0;
    let a = v.abs();
    let bits = a.to_bits();
    // f16's normals, 2^-14 ..= 65504: nothing in the 13 mantissa bits f16 lacks.
    let normal = (bits >= MIN_NORMAL.to_bits()) & (bits <= 65504f32.to_bits()) & (bits & 0x1fff == 0);
    // Below, f16's subnormals and zero: whole multiples of 2^-24 (so a * 2^24 < 1024 is exact
    // and an integer, which adding and taking away 2^23 leaves unchanged).
    let scaled = a * 16_777_216.0;
    let tiny = (a < MIN_NORMAL) & ((scaled + TWO_23) - TWO_23 == scaled);
    normal | tiny | (a == f32::INFINITY)
}

/// What a panel holds. Widening to f32 is exact, so a kernel gives the same sums for both.
trait Elem: Copy + Send + Sync + 'static {
    /// f16: the x86 kernels widen each weight vector as they load it (`vcvtph2ps`).
    const HALF: bool;
    const ZERO: Self;
    /// `row` in this type (the caller checked that every value is exact in it), in `buf` if
    /// it needs converting.
    fn narrow<'a>(row: &'a [f32], buf: &'a mut Vec<Self>) -> &'a [Self];
    /// One panel row (`PANEL` weights) as f32.
    fn widen(row: &[Self]) -> [f32; PANEL];
}

impl Elem for f32 {
    const HALF: bool = false;
    const ZERO: Self = 0.0;
    fn narrow<'a>(row: &'a [f32], _: &'a mut Vec<Self>) -> &'a [Self] {
        row
    }
    #[inline(always)]
    fn widen(row: &[Self]) -> [f32; PANEL] {
        row.try_into().expect("a panel row")
    }
}

impl Elem for f16 {
    const HALF: bool = true;
    const ZERO: Self = f16::ZERO;
    fn narrow<'a>(row: &'a [f32], buf: &'a mut Vec<Self>) -> &'a [Self] {
        buf.resize(row.len(), f16::ZERO);
        buf.convert_from_f32_slice(row);
        buf
    }
    #[inline(always)]
    fn widen(row: &[Self]) -> [f32; PANEL] {
        std::array::from_fn(|c| row[c].to_f32())
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
            if Self::has_avx2() {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// AVX2 with FMA, and F16C to widen f16 panels (every AVX2 processor has it).
    #[cfg(target_arch = "x86_64")]
    fn has_avx2() -> bool {
        use std::arch::is_x86_feature_detected as has;
        has!("avx2") && has!("fma") && has!("f16c")
    }

    /// Every kernel this processor can run (for the tests).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut v = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if Self::has_avx2() {
                v.push(Kernel::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Kernel::Avx512);
            }
        }
        v
    }

    /// `rows` rows of `x` (`rows x k`) times one panel, into `out` (`rows x cols`).
    fn run<T: Elem>(self, x: &[f32], rows: usize, k: usize, panel: &[T], out: Out) {
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
    use super::{Elem, Out, PANEL};

    /// Tiles of up to 16 rows: each panel row is widened once and feeds `PANEL` sums per row,
    /// which the compiler vectorises on any target (a multiply, then an add).
    pub fn panel<T: Elem>(x: &[f32], rows: usize, k: usize, panel: &[T], out: Out) {
        for r0 in (0..rows).step_by(16) {
            let tile = 16.min(rows - r0);
            let mut acc = [[0f32; PANEL]; 16];
            for (i, w) in panel.chunks_exact(PANEL).take(k).enumerate() {
                let w = T::widen(w);
                for (b, a) in acc[..tile].iter_mut().enumerate() {
                    let xv = x[(r0 + b) * k + i];
                    for (a, &wv) in a.iter_mut().zip(&w) {
                        *a += xv * wv;
                    }
                }
            }
            for (b, a) in acc[..tile].iter().enumerate() {
                out.set_row(r0 + b, a);
            }
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

/// Panel rows of `T` that the x86 kernels prefetch ahead.
#[cfg(target_arch = "x86_64")]
const fn ahead<T>() -> usize {
    AHEAD_BYTES / (PANEL * size_of::<T>())
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Elem, Out, PANEL};
    use std::arch::x86_64::*;

    /// Tiles of up to 16 rows x 16 columns: one accumulator per row; per input element one
    /// weight load (one cache line of an f32 panel, half of an f16 one) and one broadcast per row
    /// feed one FMA per row. Sixteen rows (`-n 8`) use every weight vector once, so the FMAs hide
    /// under the stream.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn panel<T: Elem>(x: &[f32], rows: usize, k: usize, panel: &[T], out: Out) {
        // Safety: the caller checked avx512f and the lengths (see Kernel::run).
        super::for_tiles(rows, &[16, 8, 4, 2, 1], |size, r| unsafe {
            match size {
                16 => tile::<T, 16>(x, r, k, panel, out),
                8 => tile::<T, 8>(x, r, k, panel, out),
                4 => tile::<T, 4>(x, r, k, panel, out),
                2 => tile::<T, 2>(x, r, k, panel, out),
                _ => tile::<T, 1>(x, r, k, panel, out),
            }
        });
    }

    /// The `PANEL` weights at `p` as f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load<T: Elem>(p: *const T) -> __m512 {
        // Safety: the caller reads inside its panel.
        unsafe { if T::HALF { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) } else { _mm512_loadu_ps(p.cast()) } }
    }

    /// Rows `r..r + R` of `x`; reads `x[(r + b) * k + i]` and `panel[i * PANEL..][..PANEL]` for
    /// i < k, inside the slices the caller checked.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<T: Elem, const R: usize>(x: &[f32], r: usize, k: usize, panel: &[T], out: Out) {
        unsafe {
            let xp: [*const f32; R] = std::array::from_fn(|b| x.as_ptr().add((r + b) * k));
            let wp = panel.as_ptr();
            let mut acc = [_mm512_setzero_ps(); R];
            for i in 0..k {
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((i + super::ahead::<T>()) * PANEL) as *const i8);
                let w = load(wp.add(i * PANEL));
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
    use super::{Elem, Out, PANEL};
    use std::arch::x86_64::*;

    /// Tiles of up to 6 rows x 16 columns: 12 accumulators of 8 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn panel<T: Elem>(x: &[f32], rows: usize, k: usize, panel: &[T], out: Out) {
        // Safety: the caller checked avx2/fma/f16c and the lengths (see Kernel::run).
        super::for_tiles(rows, &[6, 4, 2, 1], |size, r| unsafe {
            match size {
                6 => tile::<T, 6>(x, r, k, panel, out),
                4 => tile::<T, 4>(x, r, k, panel, out),
                2 => tile::<T, 2>(x, r, k, panel, out),
                _ => tile::<T, 1>(x, r, k, panel, out),
            }
        });
    }

    /// The 8 weights at `p` as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load<T: Elem>(p: *const T) -> __m256 {
        // Safety: the caller reads inside its panel.
        unsafe { if T::HALF { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) } else { _mm256_loadu_ps(p.cast()) } }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<T: Elem, const R: usize>(x: &[f32], r: usize, k: usize, panel: &[T], out: Out) {
        unsafe {
            let xp: [*const f32; R] = std::array::from_fn(|b| x.as_ptr().add((r + b) * k));
            let wp = panel.as_ptr();
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for i in 0..k {
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((i + super::ahead::<T>()) * PANEL) as *const i8);
                let w0 = load(wp.add(i * PANEL));
                let w1 = load(wp.add(i * PANEL + 8));
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

    /// Uniform in [-0.5, 0.5), deterministic.
    fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        }
    }

    fn check(name: &str, got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{name}");
        for (g, e) in got.iter().zip(want) {
            assert!((*g as f64 - e).abs() < 1e-4 * (1.0 + e.abs()), "{name}: {g} vs {e}");
        }
    }

    #[test]
    fn every_kernel_matches_a_double_precision_reference() {
        let mut rnd = uniform(1);
        let shapes = [(1, 8, 1), (2, 384, 640), (3, 13, 7), (16, 1024, 130), (5, 100, 67), (2, 7, 3), (7, 40, 9), (13, 384, 66), (70, 33, 97), (9, 1, 32)];
        for &(rows, k, n) in &shapes {
            let x: Vec<f32> = (0..rows * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let want = reference(&x, rows, k, &w, n);
            let panels = Panels::pack(&w, n, k);
            assert_eq!(panels.dtype(), DType::F32, "weights that are not exact in f16 keep f32 panels");
            check(&format!("matmul {rows}x{k}x{n}"), &panels.matmul(&x, rows), &want);
            // Every kernel this processor can run, not only the one matmul picks, on every
            // panel (the last one is partly padding).
            for kernel in Kernel::available() {
                check(&format!("{kernel:?} {rows}x{k}x{n}"), &panels.matmul_with(kernel, &x, rows), &want);
            }
        }
    }

    #[test]
    fn f16_panels_give_the_bits_of_f32_panels() {
        let mut rnd = uniform(7);
        for rows in [1, 2, 3, 7, 16, 17, 70] {
            for (k, n) in [(1, 5), (7, 33), (13, 16), (64, 47), (129, 130), (384, 20)] {
                let x: Vec<f32> = (0..rows * k).map(|_| rnd()).collect();
                // Values exact in f16, with zeros and f16 subnormals among them.
                let w: Vec<f32> = (0..n * k)
                    .map(|i| match i % 29 {
                        0 => 0.0,
                        1 => -(i as f32 % 1024.0) * 2f32.powi(-24),
                        _ => f16::from_f32(rnd()).to_f32(),
                    })
                    .collect();
                let want = reference(&x, rows, k, &w, n);
                let (half, full) = (Panels::pack(&w, n, k), Panels::pack_f32(&w, n, k));
                assert_eq!((half.dtype(), full.dtype()), (DType::F16, DType::F32));
                let shape = format!("{rows}x{k}x{n}");
                assert_eq!(half.matmul(&x, rows), full.matmul(&x, rows), "matmul {shape}");
                for kernel in Kernel::available() {
                    let got = half.matmul_with(kernel, &x, rows);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&full.matmul_with(kernel, &x, rows)), "{kernel:?} {shape}");
                    check(&format!("{kernel:?} f16 {shape}"), &got, &want);
                }
            }
        }
    }

    #[test]
    fn exact_in_f16_agrees_with_a_round_trip() {
        let round_trips = |v: f32| f16::from_f32(v).to_f32().to_bits() == v.to_bits();
        // Every f16 value is exact; the f32 values next to a finite one are not.
        for h in (0..=u16::MAX).map(f16::from_bits) {
            let v = h.to_f32();
            assert_eq!(exact_in_f16(v), !v.is_nan(), "{h:?}");
            if v.is_finite() {
                for near in [v.to_bits() - (v != 0.0) as u32, v.to_bits() + 1].map(f32::from_bits) {
                    assert!(!exact_in_f16(near) || near == v, "{near:e} next to {h:?}");
                }
            }
        }
        // Arbitrary bit patterns, and values near f16's range and precision.
        let mut seed = 3u64;
        for i in 0..2_000_000u32 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let bits = (seed >> 32) as u32;
            let v = if i % 2 == 0 {
                f32::from_bits(bits)
            } else {
                // Exponent 2^-27..2^20, 0 to 23 low mantissa bits cleared.
                let (e, keep) = ((seed >> 24) as u32 % 48 + 100, !((1u32 << ((seed >> 16) % 24)) - 1));
                f32::from_bits((bits & 0x8000_0000) | (e << 23) | (bits & 0x7f_ffff & keep))
            };
            if !v.is_nan() {
                assert_eq!(exact_in_f16(v), round_trips(v), "{v:e} ({:#x})", v.to_bits());
            }
        }
        assert!(all_exact_in_f16(&[0.0, -0.0, 1.5, -65504.0, 2f32.powi(-24), f32::INFINITY]));
        assert!(!all_exact_in_f16(&[0.0, 1.5, 0.1]));
        assert!(!all_exact_in_f16(&[65520.0]));
        assert!(!all_exact_in_f16(&[f32::NAN]));
    }

    #[test]
    fn linear_packs_f16_only_where_exact() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (70, 48), &dev).unwrap();
        let dtype = |w: &Tensor, mode| match Linear::with_cpu_weights(w.clone(), None, mode).unwrap().weight {
            Weight::Packed(p) => p.dtype(),
            _ => panic!("not packed"),
        };
        assert_eq!(dtype(&w, CpuWeights::Auto), DType::F32);
        let exact = w.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(dtype(&exact, CpuWeights::Auto), DType::F16);
        assert_eq!(dtype(&exact, CpuWeights::F32), DType::F32);
    }

    #[test]
    fn q8_0_weights_stay_within_quantization_error() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (70, 64), &dev).unwrap();
        let q8 = Linear::with_cpu_weights(w.clone(), None, CpuWeights::Q8_0).unwrap();
        assert!(matches!(q8.weight, Weight::Quantized { n: 70, k: 64, .. }));
        let f32 = Linear::with_cpu_weights(w, None, CpuWeights::F32).unwrap();
        for rows in [1usize, 2, 16] {
            let x = Tensor::randn(0f32, 1.0, (rows, 1, 64), &dev).unwrap();
            let (a, b) = (q8.forward(&x).unwrap(), f32.forward(&x).unwrap());
            assert_eq!(a.dims(), &[rows, 1, 70]);
            // 8-bit weights and inputs: ~1% of the output's scale (sqrt(64) = 8 here), not more.
            let err = (a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err > 0.0 && err < 0.03 * scale, "rows {rows}: max error {err} at scale {scale}");
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
