//! The fused CUDA path of a decode step (one new token per row), kernels in `decode_kernels.cu`.
//! Per layer, five launches in place of about 25 candle ops: one normalises the residual stream
//! (the RMSNorm), does the q|k|v product, rotates the new queries and keys and writes the keys
//! and values into the cache; one does the whole grouped-query attention of the new token;
//! `o_proj` adds its product to the residual stream; one normalises that, does the gate|up
//! product and SwiGLU's `silu(gate) * up`; and `down_proj` adds its product to the residual
//! stream. The products are a GEMV kernel (a few rows against a weight, in one launch where
//! cuBLAS takes a split-K GEMM and a reduction). On compute capability 9.0 and newer the kernels
//! go out with programmatic dependent launch: each may start while the one before it finishes.
//!
//! Used when built with `cuda`, on a CUDA device, for f32/bf16/f16 weights, head dimensions of
//! 32, 64 or 128 and caches short enough for the attention's shared memory (the GEMV: at most
//! [`GEMV_MAX_ROWS`] rows); every other case takes the generic path in `attention.rs` and
//! candle's ops. `TESSERA_CUDA_FUSED=0` turns it all off, `TESSERA_CUDA_GEMV_MAX` sets the
//! GEMV's largest weight (0: cuBLAS for every product) and `TESSERA_CUDA_PROJ_FUSED=0` keeps the
//! q|k|v and gate|up products apart from RoPE and SwiGLU (for before/after measurements in one
//! binary), `TESSERA_CUDA_PDL=0` launches the kernels one after the other and
//! `TESSERA_CUDA_NORM_FOLD=0` keeps the residual adds and RMSNorms in their own launches
//! (`add_rms_norm`: seven launches per layer);
//! `scripts/check_decode_kernels.py` checks each kernel against a float64 reference on a GPU.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::RmsNorm;

use super::cache::LayerCache;
use super::linear::Linear;

/// Shared memory of the attention kernel, in floats, must stay under the 48 KiB every CUDA
/// GPU gives a block without opting in: kv_len + hd + 32 hd + 32.
const SHARED_FLOATS: usize = 48 * 1024 / 4;

/// Whether a decode step with `kv_len` keys (the new token included) takes the fused path.
pub fn usable(dev: &Device, dtype: DType, heads: usize, kv_heads: usize, head_dim: usize, kv_len: usize) -> bool {
    dev.is_cuda()
        && cfg!(feature = "cuda")
        && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && matches!(head_dim, 32 | 64 | 128)
        && kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && kv_len + 33 * head_dim + 32 <= SHARED_FLOATS
        && enabled()
}

fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TESSERA_CUDA_FUSED").map(|v| v != "0").unwrap_or(true))
}

/// The attention of one decode step: `x` `(b, 1, d)` (the normed residual stream, or with
/// `norm` the residual stream itself, which the product then norms), `qkv_proj` the fused
/// q|k|v projection, cos/sin `(b, 1, hd / 2)`, `pad` `(b,)` u32 (each row's left padding).
/// Appends the new key and value to `cache`; returns the attention output `(b, 1, h hd)`
/// (before `o_proj`). The product runs inside the RoPE + cache-write kernel when it fits the
/// GEMV (see [`gemv`]).
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
pub fn attend(
    x: &Tensor,
    norm: Option<&RmsNorm>,
    qkv_proj: &Linear,
    cos: &Tensor,
    sin: &Tensor,
    pad: &Tensor,
    cache: &mut LayerCache,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<Tensor> {
    let b = x.dim(0)?;
    let pos = cache.len();
    let (k, v) = cache.buffers(b, kv_heads, head_dim, x.dtype(), x.device())?;
    let (k, v) = (k.clone(), v.clone());
    let max_len = cache.max_len();
    let dims = Dims { heads, kv_heads, head_dim, max_len };
    let fused = match qkv_proj.dense_weight() {
        Some(w) if proj_fused() => gemv_shape(x, w)?.map(|(rows, _, k)| (w, rows, k)),
        _ => None,
    };
    let fused = fused.filter(|&(_, _, kdim)| norm.is_none_or(|n| norm_fits(n, x, kdim)));
    let q = match fused {
        Some((w, rows, kdim)) => {
            let norm = norm.map(|n| (n.weight().clone(), n.eps() as f32));
            let op = kernels::GemvRope { w: w.clone(), k: k.clone(), v: v.clone(), dims, pos, rows, kdim, norm };
            x.apply_op3_no_bwd(cos, sin, &op)?
        }
        None => {
            let x = match norm {
                Some(n) => normed(x, n)?,
                None => x.clone(),
            };
            let qkv = candle_core::Module::forward(qkv_proj, &x)?;
            qkv.apply_op3_no_bwd(cos, sin, &kernels::RopeAppend { k: k.clone(), v: v.clone(), dims, pos })?
        }
    };
    cache.advanced(1)?;
    let y = q.apply_op3_no_bwd(&k, &v, &kernels::Attention { pad: pad.clone(), dims, kv_len: pos + 1 })?;
    y.reshape((b, 1, heads * head_dim))
}

#[cfg(not(feature = "cuda"))]
#[allow(clippy::too_many_arguments)]
pub fn attend(
    _x: &Tensor,
    _norm: Option<&RmsNorm>,
    _qkv_proj: &Linear,
    _cos: &Tensor,
    _sin: &Tensor,
    _pad: &Tensor,
    _cache: &mut LayerCache,
    _heads: usize,
    _kv_heads: usize,
    _head_dim: usize,
) -> Result<Tensor> {
    candle_core::bail!("the fused CUDA decode path needs a build with the `cuda` feature")
}

/// Most rows [`gemv`] takes (a decode step with guidance has two per image).
pub const GEMV_MAX_ROWS: usize = 8;

/// Largest weight, in elements, that [`gemv`] takes by default: every weight. On an H200 the
/// kernel alone beats cuBLAS up to a 4096 x 4096 matrix and trails it by 5-10% on larger ones,
/// but a whole Emu3-Gen decode step is 4% faster with the GEMV for every product (fewer
/// launches, no split-K reductions; BENCHMARKS.md, "CUDA"). `TESSERA_CUDA_GEMV_MAX` overrides it
/// (0: cuBLAS for every product).
const GEMV_MAX_ELEMENTS: usize = usize::MAX;

/// `x (.., k) . w (n, k)^T` with the decode step's GEMV kernel, when `x` has at most
/// [`GEMV_MAX_ROWS`] rows on a CUDA device, the weight is no larger than the GEMV's limit and
/// the kernel's layout needs hold (same dtype, contiguous, 16-byte aligned rows); `None`
/// otherwise (the caller takes candle's matmul).
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let Some((rows, n, k)) = gemv_shape(x, w)? else {
        return Ok(None);
    };
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank >= 1") = n;
    gemv_launch(x, w, rows, n, k)?.reshape(out_dims).map(Some)
}

/// `(rows, n, k)` when [`gemv`] can take `x . w^T`; `None` otherwise.
fn gemv_shape(x: &Tensor, w: &Tensor) -> Result<Option<(usize, usize, usize)>> {
    if !(x.device().is_cuda() && cfg!(feature = "cuda") && enabled()) {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let rows = x.elem_count() / k.max(1);
    let dtype = x.dtype();
    let vec = 16 / dtype.size_in_bytes();
    let aligned = |t: &Tensor| {
        t.layout().contiguous_offsets().is_some_and(|(a, _)| (a * dtype.size_in_bytes()).is_multiple_of(16))
    };
    let fits = matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && w.dtype() == dtype
        && n * k <= gemv_max_elements()
        && (1..=GEMV_MAX_ROWS).contains(&rows)
        && x.dim(candle_core::D::Minus1)? == k
        && k.is_multiple_of(vec)
        && aligned(x)
        && aligned(w);
    Ok(fits.then_some((rows, n, k)))
}

/// `silu(x . gate^T) * (x . up^T)` from the fused gate|up weight `(2 inter, k)` in one GEMV
/// kernel, when the product fits [`gemv`]; `None` otherwise (the caller projects and applies
/// SwiGLU). With `norm`, `x` is the residual stream and the kernel applies the RMSNorm to it.
pub fn swiglu(x: &Tensor, norm: Option<&RmsNorm>, w: &Tensor) -> Result<Option<Tensor>> {
    if !proj_fused() {
        return Ok(None);
    }
    let Some((rows, n, k)) = gemv_shape(x, w)? else {
        return Ok(None);
    };
    if !n.is_multiple_of(2) || norm.is_some_and(|nm| !norm_fits(nm, x, k)) {
        return Ok(None);
    }
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank >= 1") = n / 2;
    swiglu_launch(x, norm, w, rows, n / 2, k)?.reshape(out_dims).map(Some)
}

/// Whether a decode step folds each RMSNorm into the product after it (`gemv_rope`,
/// `gemv_swiglu` norm their input themselves) and each output projection adds the residual
/// (the default; `TESSERA_CUDA_NORM_FOLD=0`: separate `add_rms_norm` launches). Layers then go
/// through `Attention::forward_residual` and `Mlp::forward_residual`.
pub fn norm_fold(dev: &Device) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    dev.is_cuda()
        && cfg!(feature = "cuda")
        && enabled()
        && proj_fused()
        && *ON.get_or_init(|| !std::env::var("TESSERA_CUDA_NORM_FOLD").is_ok_and(|v| v == "0"))
}

/// `resid + proj(y)`: the output projection and the residual add in one GEMV kernel when they
/// fit it, else the projection and candle's add.
pub fn project_add(proj: &Linear, y: &Tensor, resid: &Tensor) -> Result<Tensor> {
    if let Some(w) = proj.dense_weight()
        && let Some((rows, n, k)) = gemv_shape(y, w)?
        && resid.dtype() == y.dtype()
        && resid.is_contiguous()
        && resid.elem_count() == rows * n
    {
        return gemv_add_launch(y, w, resid, rows, n, k)?.reshape(resid.dims());
    }
    resid + candle_core::Module::forward(proj, y)?
}

/// `rms_norm(x)` (our kernel on a GPU, candle's op elsewhere).
pub fn normed(x: &Tensor, norm: &RmsNorm) -> Result<Tensor> {
    match add_rms_norm(x, None, norm)? {
        Some((_, h)) => Ok(h),
        None => candle_core::Module::forward(norm, x),
    }
}

/// Each job's greedy pick `(jobs,)` u32 from the head's scores `(rows, n)` (f32, bf16 or f16):
/// the first index of the largest `(s[cond] - s[uncond]) * scale + s[uncond]`, in f32 one
/// rounded operation at a time, as the scores cast to f32, guidance as tensor ops and an argmax
/// keeping the first maximum compute it. One kernel on a CUDA device; `None` elsewhere, with the
/// fused path off or with `TESSERA_CUDA_GUIDED_ARGMAX=0`. `cond`, `uncond`: `(jobs,)` u32 rows
/// of `scores`; `scale`: `(jobs,)` f32.
pub fn guided_argmax(scores: &Tensor, cond: &Tensor, uncond: &Tensor, scale: &Tensor) -> Result<Option<Tensor>> {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let jobs = cond.elem_count();
    let ok = scores.device().is_cuda()
        && cfg!(feature = "cuda")
        && enabled()
        && *ON.get_or_init(|| !std::env::var("TESSERA_CUDA_GUIDED_ARGMAX").is_ok_and(|v| v == "0"))
        && matches!(scores.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && scores.rank() == 2
        && scores.is_contiguous()
        && jobs > 0
        && [cond, uncond].iter().all(|t| t.dtype() == DType::U32 && t.is_contiguous() && t.elem_count() == jobs)
        && scale.dtype() == DType::F32
        && scale.is_contiguous()
        && scale.elem_count() == jobs;
    if !ok {
        return Ok(None);
    }
    guided_argmax_launch(scores, cond, uncond, scale).map(Some)
}

/// Whether a GEMV of `x`'s rows can apply `norm` to them (the norm's weight covers the `k`
/// inputs, in x's dtype).
fn norm_fits(norm: &RmsNorm, x: &Tensor, k: usize) -> bool {
    let w = norm.weight();
    w.dtype() == x.dtype() && w.is_contiguous() && w.elem_count() == k
}

/// `silu(gate) * up` of the fused gate|up projection `(.., 2 inter)` in one kernel on a CUDA
/// device; `None` elsewhere (or when the fused path is off).
pub fn silu_mul(gu: &Tensor) -> Result<Option<Tensor>> {
    let ok = gu.device().is_cuda()
        && cfg!(feature = "cuda")
        && enabled()
        && matches!(gu.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && gu.is_contiguous();
    if !ok {
        return Ok(None);
    }
    silu_mul_launch(gu).map(Some)
}

/// `(x + pending, rms_norm(x + pending))` (just the norm without `pending`) in one kernel on a
/// CUDA device; `None` elsewhere (or when the fused path is off).
pub fn add_rms_norm(x: &Tensor, pending: Option<&Tensor>, norm: &candle_nn::RmsNorm) -> Result<Option<(Tensor, Tensor)>> {
    let dtype = x.dtype();
    let ok = x.device().is_cuda()
        && cfg!(feature = "cuda")
        && enabled()
        && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && x.is_contiguous()
        && norm.weight().dtype() == dtype
        && norm.weight().is_contiguous()
        && pending.is_none_or(|p| p.dtype() == dtype && p.is_contiguous() && p.dims() == x.dims());
    if !ok {
        return Ok(None);
    }
    add_rms_norm_launch(x, pending, norm).map(Some)
}

fn proj_fused() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TESSERA_CUDA_PROJ_FUSED").map(|v| v != "0").unwrap_or(true))
}

fn gemv_max_elements() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("TESSERA_CUDA_GEMV_MAX").ok().and_then(|v| v.parse().ok()).unwrap_or(GEMV_MAX_ELEMENTS)
    })
}

#[cfg(feature = "cuda")]
fn gemv_launch(x: &Tensor, w: &Tensor, rows: usize, n: usize, k: usize) -> Result<Tensor> {
    x.apply_op2_no_bwd(w, &kernels::Gemv { rows, out: n, k, swiglu: false, norm: None, resid: None })
}

#[cfg(not(feature = "cuda"))]
fn gemv_launch(_: &Tensor, _: &Tensor, _: usize, _: usize, _: usize) -> Result<Tensor> {
    candle_core::bail!("the CUDA GEMV needs a build with the `cuda` feature")
}

#[cfg(feature = "cuda")]
fn swiglu_launch(x: &Tensor, norm: Option<&RmsNorm>, w: &Tensor, rows: usize, inter: usize, k: usize) -> Result<Tensor> {
    let norm = norm.map(|n| (n.weight().clone(), n.eps() as f32));
    x.apply_op2_no_bwd(w, &kernels::Gemv { rows, out: inter, k, swiglu: true, norm, resid: None })
}

#[cfg(not(feature = "cuda"))]
fn swiglu_launch(_: &Tensor, _: Option<&RmsNorm>, _: &Tensor, _: usize, _: usize, _: usize) -> Result<Tensor> {
    candle_core::bail!("the fused SwiGLU GEMV needs a build with the `cuda` feature")
}

#[cfg(feature = "cuda")]
fn gemv_add_launch(x: &Tensor, w: &Tensor, resid: &Tensor, rows: usize, n: usize, k: usize) -> Result<Tensor> {
    let op = kernels::Gemv { rows, out: n, k, swiglu: false, norm: None, resid: Some(resid.clone()) };
    x.apply_op2_no_bwd(w, &op)
}

#[cfg(not(feature = "cuda"))]
fn gemv_add_launch(_: &Tensor, _: &Tensor, _: &Tensor, _: usize, _: usize, _: usize) -> Result<Tensor> {
    candle_core::bail!("the GEMV with the residual add needs a build with the `cuda` feature")
}

#[cfg(feature = "cuda")]
fn guided_argmax_launch(scores: &Tensor, cond: &Tensor, uncond: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let op = kernels::GuidedArgmax { cond: cond.clone(), uncond: uncond.clone(), scale: scale.clone() };
    scores.apply_op1_no_bwd(&op)
}

#[cfg(not(feature = "cuda"))]
fn guided_argmax_launch(_: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Tensor> {
    candle_core::bail!("the fused guidance and argmax need a build with the `cuda` feature")
}

#[cfg(feature = "cuda")]
fn silu_mul_launch(gu: &Tensor) -> Result<Tensor> {
    gu.apply_op1_no_bwd(&kernels::SiluMul)
}

#[cfg(not(feature = "cuda"))]
fn silu_mul_launch(_: &Tensor) -> Result<Tensor> {
    candle_core::bail!("the fused SwiGLU needs a build with the `cuda` feature")
}

#[cfg(feature = "cuda")]
fn add_rms_norm_launch(x: &Tensor, pending: Option<&Tensor>, norm: &candle_nn::RmsNorm) -> Result<(Tensor, Tensor)> {
    let op = kernels::AddRmsNorm { pending: pending.cloned(), eps: norm.eps() as f32 };
    let out = x.apply_op2_no_bwd(norm.weight(), &op)?;
    match pending {
        // (2, ..): the sum, then the normed sum.
        Some(_) => Ok((out.get(0)?, out.get(1)?)),
        None => Ok((x.clone(), out)),
    }
}

#[cfg(not(feature = "cuda"))]
fn add_rms_norm_launch(_: &Tensor, _: Option<&Tensor>, _: &candle_nn::RmsNorm) -> Result<(Tensor, Tensor)> {
    candle_core::bail!("the fused add + RMSNorm needs a build with the `cuda` feature")
}

#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Dims {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    max_len: usize,
}

#[cfg(feature = "cuda")]
mod kernels {
    use candle_core::backend::BackendStorage;
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, sys,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CpuStorage, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor, WithDType};

    use super::Dims;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_kernels.ptx"));
    const MODULE: &str = "tessera_decode_kernels";
    const THREADS: u32 = 1024; // ATT_THREADS in the kernel

    fn suffix(dtype: DType) -> Result<&'static str> {
        Ok(match dtype {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            other => candle_core::bail!("fused decode: unsupported dtype {other:?}"),
        })
    }

    fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(T::as_cuda_slice(s)?.slice(a..b)),
            None => candle_core::bail!("fused decode: {what} must be contiguous"),
        }
    }

    /// The CUDA storage of a tensor held by an op (the cache buffers, the padding).
    fn held(t: &Tensor) -> Result<(candle_core::StorageRef<'_>, &Layout)> {
        let (s, l) = t.storage_and_layout();
        if !matches!(&*s, Storage::Cuda(_)) {
            candle_core::bail!("fused decode: tensor not on the GPU");
        }
        Ok((s, l))
    }

    fn cuda(s: &Storage) -> &CudaStorage {
        match s {
            Storage::Cuda(c) => c,
            _ => unreachable!("checked by held()"),
        }
    }

    /// Launch `$func` with `$cfg`: the pointer arguments (views, slices), then the scalars, as
    /// every kernel here takes them. With programmatic dependent launch on ([`pdl`]) the launch
    /// goes through `cuLaunchKernelEx` with that attribute; otherwise through candle's builder.
    /// Used inside an `unsafe` contract: the arguments must match the kernel's signature.
    macro_rules! launch {
        ($dev:expr, $func:expr, $cfg:expr, [$($ptr:expr),* $(,)?], [$($scalar:expr),* $(,)?]) => {{
            let cfg: LaunchConfig = $cfg;
            if pdl() {
                let stream = $dev.cuda_stream();
                let mut raw: Vec<u64> = vec![$(RawArg::raw($ptr, &stream),)* $(RawArg::raw(&$scalar, &stream),)*];
                // SAFETY: the caller's, as for the builder below.
                unsafe { launch_pdl(&$func.into_cuda_function(), cfg, &mut raw, &stream) }?;
            } else {
                let mut builder = $func.builder();
                $( builder.arg($ptr); )*
                candle_core::builder_arg!(builder, $($scalar),*);
                // SAFETY: the caller's.
                unsafe { builder.launch(cfg) }.w()?;
            }
        }};
    }

    /// Whether launches use programmatic dependent launch: kernels built for compute capability
    /// 9.0 or newer (`griddepcontrol`; such PTX loads on no older GPU), unless
    /// `TESSERA_CUDA_PDL=0`.
    fn pdl() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            let cap: u32 = option_env!("TESSERA_CUDA_CAP").and_then(|c| c.parse().ok()).unwrap_or(0);
            cap >= 90 && !std::env::var("TESSERA_CUDA_PDL").is_ok_and(|v| v == "0")
        })
    }

    /// A kernel argument as `cuLaunchKernelEx` reads it: the value in the first bytes of an
    /// 8-byte slot (the driver reads the parameter's own size; the host is little-endian).
    trait RawArg {
        fn raw(&self, stream: &Arc<CudaStream>) -> u64;
    }

    impl<T> RawArg for CudaView<'_, T> {
        fn raw(&self, stream: &Arc<CudaStream>) -> u64 {
            self.device_ptr(stream).0
        }
    }

    impl<T> RawArg for CudaSlice<T> {
        fn raw(&self, stream: &Arc<CudaStream>) -> u64 {
            self.device_ptr(stream).0
        }
    }

    impl RawArg for u32 {
        fn raw(&self, _: &Arc<CudaStream>) -> u64 {
            u64::from(*self)
        }
    }

    impl RawArg for f32 {
        fn raw(&self, _: &Arc<CudaStream>) -> u64 {
            u64::from(self.to_bits())
        }
    }

    impl RawArg for u64 {
        fn raw(&self, _: &Arc<CudaStream>) -> u64 {
            *self
        }
    }

    /// `cuLaunchKernelEx` with programmatic stream serialization allowed: the kernel may start
    /// while the previous one in the stream finishes (each kernel waits for it with
    /// `griddepcontrol.wait` before touching memory; see decode_kernels.cu).
    ///
    /// # Safety
    /// `raw` must hold the kernel's arguments, in order.
    unsafe fn launch_pdl(func: &CudaFunction, cfg: LaunchConfig, raw: &mut [u64], stream: &Arc<CudaStream>) -> Result<()> {
        stream.context().bind_to_thread().w()?;
        let mut params: Vec<*mut std::ffi::c_void> = raw.iter_mut().map(|v| (v as *mut u64).cast()).collect();
        // SAFETY: a plain C struct; zero is a valid bit pattern for each field.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: `params` points at `raw`, alive for the call; the caller vouches for them.
        unsafe { sys::cuLaunchKernelEx(&config, func.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }.result().w()
    }

    /// `CustomOp3` for an op with a `launch::<T>(a, b, c)` per dtype: CUDA only, f32/bf16/f16.
    macro_rules! cuda_op3 {
        ($op:ty, $name:literal) => {
            impl candle_core::CustomOp3 for $op {
                fn name(&self) -> &'static str {
                    $name
                }

                fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
                    candle_core::bail!("the fused decode ops run on CUDA only")
                }

                fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> Result<(CudaStorage, Shape)> {
                    match s1.dtype() {
                        DType::F32 => self.launch::<f32>((s1, l1), (s2, l2), (s3, l3)),
                        DType::BF16 => self.launch::<half::bf16>((s1, l1), (s2, l2), (s3, l3)),
                        DType::F16 => self.launch::<half::f16>((s1, l1), (s2, l2), (s3, l3)),
                        other => candle_core::bail!("fused decode: unsupported dtype {other:?}"),
                    }
                }
            }
        };
    }

    /// `CustomOp1` for an op with a `launch::<T>(storage, layout)` per dtype: CUDA only,
    /// f32/bf16/f16.
    macro_rules! cuda_op1 {
        ($op:ty, $name:literal) => {
            impl candle_core::CustomOp1 for $op {
                fn name(&self) -> &'static str {
                    $name
                }

                fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
                    candle_core::bail!("the fused decode ops run on CUDA only")
                }

                fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
                    match s.dtype() {
                        DType::F32 => self.launch::<f32>(s, l),
                        DType::BF16 => self.launch::<half::bf16>(s, l),
                        DType::F16 => self.launch::<half::f16>(s, l),
                        other => candle_core::bail!("fused decode: unsupported dtype {other:?}"),
                    }
                }
            }
        };
    }

    /// `CustomOp2` for an op with a `launch::<T>(a, b)` per dtype: CUDA only, f32/bf16/f16.
    macro_rules! cuda_op2 {
        ($op:ty, $name:literal) => {
            impl candle_core::CustomOp2 for $op {
                fn name(&self) -> &'static str {
                    $name
                }

                fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
                    candle_core::bail!("the fused decode ops run on CUDA only")
                }

                fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
                    match s1.dtype() {
                        DType::F32 => self.launch::<f32>((s1, l1), (s2, l2)),
                        DType::BF16 => self.launch::<half::bf16>((s1, l1), (s2, l2)),
                        DType::F16 => self.launch::<half::f16>((s1, l1), (s2, l2)),
                        other => candle_core::bail!("fused decode: unsupported dtype {other:?}"),
                    }
                }
            }
        };
    }

    /// Rotate the new token's queries and keys; write keys and values to the cache at `pos`.
    /// Inputs qkv, cos, sin; output q `(b, h, 1, hd)`. The cache buffers are written in place.
    pub(super) struct RopeAppend {
        pub k: Tensor,
        pub v: Tensor,
        pub dims: Dims,
        pub pos: usize,
    }

    impl RopeAppend {
        fn launch<T: CudaDType + DeviceRepr + WithDType>(
            &self,
            qkv: (&CudaStorage, &Layout),
            cos: (&CudaStorage, &Layout),
            sin: (&CudaStorage, &Layout),
        ) -> Result<(CudaStorage, Shape)> {
            let Dims { heads: h, kv_heads: kvh, head_dim: hd, max_len } = self.dims;
            let dev = qkv.0.device().clone();
            let b = qkv.1.shape().elem_count() / ((h + 2 * kvh) * hd);
            let (ks, kl) = held(&self.k)?;
            let (vs, vl) = held(&self.v)?;
            let k = view::<T>(cuda(&ks), kl, "key cache")?;
            let v = view::<T>(cuda(&vs), vl, "value cache")?;
            let qkv_v = view::<T>(qkv.0, qkv.1, "qkv")?;
            let cos_v = view::<T>(cos.0, cos.1, "cos")?;
            let sin_v = view::<T>(sin.0, sin.1, "sin")?;
            // SAFETY: every element is written by the kernel.
            let q = unsafe { dev.alloc::<T>(b * h * hd)? };
            let func = dev.get_or_load_custom_func(&format!("rope_append_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
            let n = (b * (h + 2 * kvh) * hd / 2) as u32;
            // The cache is written through the k and v views: the op owns the step, nothing else
            // reads the buffers until the stream reaches the attention launch.
            // SAFETY: arguments match the kernel's signature; sizes checked by the caller.
            launch!(dev, func, LaunchConfig::for_num_elems(n), [&qkv_v, &cos_v, &sin_v, &q, &k, &v],
                [b as u32, h as u32, kvh as u32, hd as u32, max_len as u32, self.pos as u32]);
            Ok((T::wrap_cuda_slice(q, dev), Shape::from((b, h, 1, hd))))
        }
    }

    cuda_op3!(RopeAppend, "tessera-rope-append");

    /// Attention of the new query of each row over the cache's first `kv_len` positions.
    /// Inputs q `(b, h, 1, hd)`, the key and value buffers; output `(b, h, 1, hd)`.
    pub(super) struct Attention {
        pub pad: Tensor,
        pub dims: Dims,
        pub kv_len: usize,
    }

    impl Attention {
        fn launch<T: CudaDType + DeviceRepr + WithDType>(
            &self,
            q: (&CudaStorage, &Layout),
            k: (&CudaStorage, &Layout),
            v: (&CudaStorage, &Layout),
        ) -> Result<(CudaStorage, Shape)> {
            // 1/sqrt(hd) rounded to T, as candle's affine op applies it.
            let scale = T::from_f64((self.dims.head_dim as f64).powf(-0.5)).to_f64() as f32;
            let Dims { heads: h, kv_heads: kvh, head_dim: hd, max_len } = self.dims;
            let dev = q.0.device().clone();
            let b = q.1.shape().elem_count() / (h * hd);
            let (ps, pl) = held(&self.pad)?;
            let pad = view::<u32>(cuda(&ps), pl, "padding")?;
            let q_v = view::<T>(q.0, q.1, "q")?;
            let k_v = view::<T>(k.0, k.1, "key cache")?;
            let v_v = view::<T>(v.0, v.1, "value cache")?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<T>(b * h * hd)? };
            let func = dev.get_or_load_custom_func(&format!("decode_attention_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
            let shared = ((self.kv_len + 33 * hd + 32) * 4) as u32;
            let cfg = LaunchConfig { grid_dim: ((b * h) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: shared };
            // SAFETY: arguments match the kernel's signature; shared memory checked by usable().
            launch!(dev, func, cfg, [&q_v, &k_v, &v_v, &pad, &out],
                [h as u32, kvh as u32, hd as u32, max_len as u32, self.kv_len as u32, scale]);
            Ok((T::wrap_cuda_slice(out, dev), Shape::from((b, h, 1, hd))))
        }
    }

    cuda_op3!(Attention, "tessera-decode-attention");

    /// `x (rows, k) . w (n, k)^T`: inputs x, w; output `(rows, n)`. With `swiglu`, w is the
    /// gate|up weight `(2 out, k)` and the output `(rows, out)` is `silu(x . gate^T) * (x . up^T)`;
    /// with `norm` (SwiGLU only), x is the residual stream, normed by the kernel (the norm's
    /// weight and eps); with `resid` (plain only), the output is `resid + x . w^T`.
    pub(super) struct Gemv {
        pub rows: usize,
        /// Output features: n, or inter with `swiglu`.
        pub out: usize,
        pub k: usize,
        pub swiglu: bool,
        pub norm: Option<(Tensor, f32)>,
        pub resid: Option<Tensor>,
    }

    const GEMV_THREADS: u32 = 128; // GEMV_THREADS in the kernel: one block per output feature

    impl Gemv {
        fn launch<T: CudaDType + DeviceRepr + WithDType>(
            &self,
            x: (&CudaStorage, &Layout),
            w: (&CudaStorage, &Layout),
        ) -> Result<(CudaStorage, Shape)> {
            let (rows, out, k) = (self.rows, self.out, self.k);
            let dev = x.0.device().clone();
            let x_v = view::<T>(x.0, x.1, "gemv input")?;
            let w_v = view::<T>(w.0, w.1, "gemv weight")?;
            // SAFETY: every element is written by the kernel.
            let y = unsafe { dev.alloc::<T>(rows * out)? };
            let kernel = match (self.swiglu, &self.norm, &self.resid) {
                (false, None, None) => "gemv",
                (true, None, None) => "gemv_swiglu",
                (true, Some(_), None) => "gemv_swiglu_norm",
                (false, None, Some(_)) => "gemv_add",
                _ => candle_core::bail!("gemv: no kernel for this combination"),
            };
            let func = dev.get_or_load_custom_func(&format!("{kernel}_{}_{rows}", suffix(T::DTYPE)?), MODULE, PTX)?;
            let cfg = LaunchConfig { grid_dim: (out as u32, 1, 1), block_dim: (GEMV_THREADS, 1, 1), shared_mem_bytes: 0 };
            // SAFETY (every launch below): arguments match the kernels' signatures; sizes and
            // alignment checked by `cuda_decode::gemv_shape`, the norm's and the residual's by
            // their callers.
            match (&self.norm, &self.resid) {
                (Some((g, eps)), _) => {
                    let (gs, gl) = held(g)?;
                    let g_v = view::<T>(cuda(&gs), gl, "norm weight")?;
                    launch!(dev, func, cfg, [&x_v, &w_v, &y, &g_v], [out as u32, k as u32, *eps]);
                }
                (None, Some(r)) => {
                    let (rs, rl) = held(r)?;
                    let r_v = view::<T>(cuda(&rs), rl, "residual stream")?;
                    launch!(dev, func, cfg, [&x_v, &w_v, &r_v, &y], [out as u32, k as u32]);
                }
                (None, None) => launch!(dev, func, cfg, [&x_v, &w_v, &y], [out as u32, k as u32]),
            }
            Ok((T::wrap_cuda_slice(y, dev), Shape::from((rows, out))))
        }
    }

    cuda_op2!(Gemv, "tessera-gemv");

    /// The q|k|v product of the new token, RoPE, and the key/value write into the cache at
    /// `pos`: inputs x `(rows, k)`, cos, sin; output q `(b, h, 1, hd)`. The weight and the cache
    /// buffers are held; the buffers are written in place.
    pub(super) struct GemvRope {
        pub w: Tensor,
        pub k: Tensor,
        pub v: Tensor,
        pub dims: Dims,
        pub pos: usize,
        pub rows: usize,
        pub kdim: usize,
        /// With a norm (its weight and eps), x is the residual stream, normed by the kernel.
        pub norm: Option<(Tensor, f32)>,
    }

    impl GemvRope {
        fn launch<T: CudaDType + DeviceRepr + WithDType>(
            &self,
            x: (&CudaStorage, &Layout),
            cos: (&CudaStorage, &Layout),
            sin: (&CudaStorage, &Layout),
        ) -> Result<(CudaStorage, Shape)> {
            let Dims { heads: h, kv_heads: kvh, head_dim: hd, max_len } = self.dims;
            let (b, kdim) = (self.rows, self.kdim);
            let dev = x.0.device().clone();
            let (ws, wl) = held(&self.w)?;
            let (ks, kl) = held(&self.k)?;
            let (vs, vl) = held(&self.v)?;
            let w = view::<T>(cuda(&ws), wl, "q|k|v weight")?;
            let k = view::<T>(cuda(&ks), kl, "key cache")?;
            let v = view::<T>(cuda(&vs), vl, "value cache")?;
            let x_v = view::<T>(x.0, x.1, "gemv input")?;
            let cos_v = view::<T>(cos.0, cos.1, "cos")?;
            let sin_v = view::<T>(sin.0, sin.1, "sin")?;
            // SAFETY: every element is written by the kernel.
            let q = unsafe { dev.alloc::<T>(b * h * hd)? };
            let kernel = if self.norm.is_some() { "gemv_rope_norm" } else { "gemv_rope" };
            let func = dev.get_or_load_custom_func(&format!("{kernel}_{}_{b}", suffix(T::DTYPE)?), MODULE, PTX)?;
            let blocks = ((h + 2 * kvh) * hd / 2) as u32;
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (GEMV_THREADS, 1, 1), shared_mem_bytes: 0 };
            // The cache is written through the k and v views, as in RopeAppend.
            // SAFETY: arguments match the kernel's signature; the product's sizes and alignment
            // checked by `cuda_decode::gemv_shape`, the cache's by the caller.
            let (h32, kvh32, hd32, max32, pos32, k32) = (h as u32, kvh as u32, hd as u32, max_len as u32, self.pos as u32, kdim as u32);
            match &self.norm {
                Some((g, eps)) => {
                    let (gs, gl) = held(g)?;
                    let g_v = view::<T>(cuda(&gs), gl, "norm weight")?;
                    launch!(dev, func, cfg, [&x_v, &w, &cos_v, &sin_v, &q, &k, &v, &g_v], [h32, kvh32, hd32, max32, pos32, k32, *eps]);
                }
                None => launch!(dev, func, cfg, [&x_v, &w, &cos_v, &sin_v, &q, &k, &v], [h32, kvh32, hd32, max32, pos32, k32]),
            }
            Ok((T::wrap_cuda_slice(q, dev), Shape::from((b, h, 1, hd))))
        }
    }

    cuda_op3!(GemvRope, "tessera-gemv-rope");


    /// `silu(gate) * up` of `(.., 2 inter)`; output `(.., inter)`.
    pub(super) struct SiluMul;

    impl SiluMul {
        fn launch<T: CudaDType + DeviceRepr + WithDType>(&self, gu: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let dims = l.shape().dims();
            let inter = dims[dims.len() - 1] / 2;
            let rows = l.shape().elem_count() / (2 * inter).max(1);
            let dev = gu.device().clone();
            let gu_v = view::<T>(gu, l, "gate|up")?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<T>(rows * inter)? };
            let func = dev.get_or_load_custom_func(&format!("silu_mul_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
            // SAFETY: arguments match the kernel's signature.
            launch!(dev, func, LaunchConfig::for_num_elems((rows * inter) as u32), [&gu_v, &out], [rows as u32, inter as u32]);
            let mut out_dims = dims.to_vec();
            *out_dims.last_mut().expect("rank >= 1") = inter;
            Ok((T::wrap_cuda_slice(out, dev), Shape::from(out_dims)))
        }
    }

    cuda_op1!(SiluMul, "tessera-silu-mul");

    /// `x + pending` and its RMSNorm: inputs x, the norm's weight; output `(2, ..)` (the sum,
    /// then the normed sum), or `(..)` (the norm of x) without `pending`.
    pub(super) struct AddRmsNorm {
        pub pending: Option<Tensor>,
        pub eps: f32,
    }

    impl AddRmsNorm {
        fn launch<T: CudaDType + DeviceRepr + WithDType>(
            &self,
            x: (&CudaStorage, &Layout),
            w: (&CudaStorage, &Layout),
        ) -> Result<(CudaStorage, Shape)> {
            let shape = x.1.shape().clone();
            let d = *shape.dims().last().unwrap_or(&1);
            let rows = shape.elem_count() / d.max(1);
            let dev = x.0.device().clone();
            let x_v = view::<T>(x.0, x.1, "residual stream")?;
            let w_v = view::<T>(w.0, w.1, "norm weight")?;
            let held_p = self.pending.as_ref().map(held).transpose()?;
            let p_v = match &held_p {
                Some((s, l)) => Some(view::<T>(cuda(s), l, "block output")?),
                None => None,
            };
            let parts = if p_v.is_some() { 2 } else { 1 };
            // SAFETY: every element is written by the kernel (the sum only with `pending`).
            let out = unsafe { dev.alloc::<T>(parts * rows * d)? };
            let func = dev.get_or_load_custom_func(&format!("add_rms_norm_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
            let threads = d.div_ceil(32).clamp(1, 32) as u32 * 32;
            let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
            let null: u64 = 0;
            let (sum, normed) = (out.slice(0..rows * d), out.slice((parts - 1) * rows * d..parts * rows * d));
            // SAFETY: arguments match the kernel's signature; shapes checked by
            // `cuda_decode::add_rms_norm`.
            match &p_v {
                Some(p) => launch!(dev, func, cfg, [&x_v, p, &w_v, &sum, &normed], [d as u32, self.eps]),
                None => launch!(dev, func, cfg, [&x_v, &null, &w_v, &sum, &normed], [d as u32, self.eps]),
            }
            let dims = if parts == 2 { [&[2], shape.dims()].concat() } else { shape.dims().to_vec() };
            Ok((T::wrap_cuda_slice(out, dev), Shape::from(dims)))
        }
    }

    cuda_op2!(AddRmsNorm, "tessera-add-rms-norm");

    /// Guidance and the greedy pick of every job: input the head's scores `(rows, n)`; output
    /// `(jobs,)` u32. The jobs' rows and scales are held (see `cuda_decode::guided_argmax`).
    pub(super) struct GuidedArgmax {
        pub cond: Tensor,
        pub uncond: Tensor,
        pub scale: Tensor,
    }

    const PICK_THREADS: u32 = 1024; // PICK_THREADS in the kernel: one block per job

    impl GuidedArgmax {
        fn launch<T: CudaDType + DeviceRepr + WithDType>(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let n = l.dims()[1];
            let jobs = self.cond.elem_count();
            let dev = s.device().clone();
            let scores = view::<T>(s, l, "head scores")?;
            let (cs, cl) = held(&self.cond)?;
            let (us, ul) = held(&self.uncond)?;
            let (gs, gl) = held(&self.scale)?;
            let cond = view::<u32>(cuda(&cs), cl, "conditional rows")?;
            let uncond = view::<u32>(cuda(&us), ul, "unconditional rows")?;
            let scale = view::<f32>(cuda(&gs), gl, "guidance scales")?;
            // SAFETY: every element is written by the kernel.
            let picked = unsafe { dev.alloc::<u32>(jobs)? };
            let func = dev.get_or_load_custom_func(&format!("guided_argmax_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
            let cfg = LaunchConfig { grid_dim: (jobs as u32, 1, 1), block_dim: (PICK_THREADS, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: arguments match the kernel's signature; shapes checked by
            // `cuda_decode::guided_argmax` (the rows in cond/uncond come from the caller's jobs).
            launch!(dev, func, cfg, [&scores, &cond, &uncond, &scale, &picked], [n as u32]);
            Ok((u32::wrap_cuda_slice(picked, dev), Shape::from(jobs)))
        }
    }

    cuda_op1!(GuidedArgmax, "tessera-guided-argmax");
}
