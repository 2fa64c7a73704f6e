//! The fused CUDA path of a decode step (one new token per row), kernels in `decode_kernels.cu`:
//! per layer, one launch rotates the new queries and keys and writes the keys and values into the
//! cache, and one launch does the whole grouped-query attention of the new token. Together they
//! replace about 14 small candle ops per layer; a decode step on a GPU is bound by the host
//! issuing kernels, not by the GPU (BENCHMARKS.md, "CUDA").
//!
//! Used when built with `cuda`, on a CUDA device, for f32/bf16/f16 weights, head dimensions of
//! 32, 64 or 128 and caches short enough for the attention's shared memory; every other case
//! takes the generic path in `attention.rs`. `TESSERA_CUDA_FUSED=0` turns it off (for before/after
//! measurements in one binary).

use candle_core::{DType, Device, Result, Tensor};

use super::cache::LayerCache;

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

/// The attention of one decode step: `qkv` `(b, 1, (h + 2 kvh) hd)` from the fused projection,
/// cos/sin `(b, 1, hd / 2)`, `pad` `(b,)` u32 (each row's left padding). Appends the new key and
/// value to `cache`; returns the attention output `(b, 1, h hd)` (before `o_proj`).
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
pub fn attend(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    pad: &Tensor,
    cache: &mut LayerCache,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<Tensor> {
    let b = qkv.dim(0)?;
    let pos = cache.len();
    let (k, v) = cache.buffers(b, kv_heads, head_dim, qkv.dtype(), qkv.device())?;
    let (k, v) = (k.clone(), v.clone());
    let max_len = cache.max_len();
    let dims = Dims { heads, kv_heads, head_dim, max_len };
    let q = qkv.apply_op3_no_bwd(cos, sin, &kernels::RopeAppend { k: k.clone(), v: v.clone(), dims, pos })?;
    cache.advanced(1)?;
    let y = q.apply_op3_no_bwd(&k, &v, &kernels::Attention { pad: pad.clone(), dims, kv_len: pos + 1 })?;
    y.reshape((b, 1, heads * head_dim))
}

#[cfg(not(feature = "cuda"))]
#[allow(clippy::too_many_arguments)]
pub fn attend(
    _qkv: &Tensor,
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
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
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
            let mut builder = func.builder();
            builder.arg(&qkv_v);
            builder.arg(&cos_v);
            builder.arg(&sin_v);
            builder.arg(&q);
            // The cache is written through these views: the op owns the step, nothing else
            // reads the buffers until the stream reaches the attention launch.
            builder.arg(&k);
            builder.arg(&v);
            candle_core::builder_arg!(builder, b as u32, h as u32, kvh as u32, hd as u32, max_len as u32, self.pos as u32);
            // SAFETY: arguments match the kernel's signature; sizes checked by the caller.
            unsafe { builder.launch(LaunchConfig::for_num_elems(n)) }.w()?;
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
            let mut builder = func.builder();
            builder.arg(&q_v);
            builder.arg(&k_v);
            builder.arg(&v_v);
            builder.arg(&pad);
            builder.arg(&out);
            candle_core::builder_arg!(builder, h as u32, kvh as u32, hd as u32, max_len as u32, self.kv_len as u32, scale);
            // SAFETY: arguments match the kernel's signature; shared memory checked by usable().
            unsafe { builder.launch(cfg) }.w()?;
            Ok((T::wrap_cuda_slice(out, dev), Shape::from((b, h, 1, hd))))
        }
    }

    cuda_op3!(Attention, "tessera-decode-attention");
}
