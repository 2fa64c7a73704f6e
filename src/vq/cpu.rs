//! Small helpers for the VQ-VAE's CPU f32 kernels (`conv2d.rs`, `norm.rs`): borrowing a
//! tensor's f32 data, a vectorisable SiLU, and a raw pointer that rayon tasks may share.
//!
//! The kernels only run for contiguous f32 tensors on the CPU; everything else (CUDA, Metal,
//! f16/bf16) goes through candle's own ops.

use candle_core::{CpuStorage, DType, Device, Result, Shape, Storage, Tensor};

/// Whether the CPU kernels can take `t`: f32 on the CPU.
pub fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Run `f` on the contiguous f32 data of `t` (made contiguous first if it is not).
/// `t` must be an f32 CPU tensor.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() { t.clone() } else { t.contiguous()? };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        candle_core::bail!("vq cpu kernel: expected f32 CPU storage, got {:?} on {:?}", t.dtype(), t.device())
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("vq cpu kernel: tensor is not contiguous")
    };
    Ok(f(&data[start..end]))
}

/// A CPU tensor from `data` (row-major).
pub fn tensor(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// A pointer into an output buffer that parallel tasks write disjoint parts of.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);
// SAFETY: every user writes through it only to ranges no other task touches, and the buffer
// outlives the parallel region.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so that closures capture the whole `SendPtr`).
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// exp(x) for f32, Cephes' `expf` polynomial (about 1 ulp in the normal range), written so
/// that a loop of it vectorises. Inputs are clamped to [-87.3, 88.3], so the result stays a
/// normal finite float.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4; // ln 2, high part (exact in 9 bits)
    const C2: f32 = -2.121_944_4e-4; // ln 2 - C1
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + ROUND; // n = round(x * log2 e) sits in the low mantissa bits of t
    let n = t - ROUND;
    let r = x - n * C1 - n * C2;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from the bits of t, with integer ops only (n is in -126..=127).
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    y * scale
}

/// silu(x) = x * sigmoid(x) = x / (1 + exp(-x)).
#[inline(always)]
pub fn silu_f32(x: f32) -> f32 {
    x / (1.0 + exp_f32(-x))
}

/// Run `f` with AVX2 + FMA enabled for the code inlined into it when the CPU has them, so
/// that the element loops of the kernels vectorise 8 wide. The results are the same either
/// way: Rust never fuses a multiply and an add on its own.
#[inline(always)]
pub fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { avx2(f) };
        }
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_silu_are_within_float_rounding() {
        let mut worst_exp = 0f64;
        let mut worst_silu = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 4.3e-4; // -86 .. 86
            let e = exp_f32(x) as f64;
            let r = (x as f64).exp();
            worst_exp = worst_exp.max(((e - r) / r).abs());
            let s = silu_f32(x) as f64;
            let rs = x as f64 / (1.0 + (-x as f64).exp());
            if rs != 0.0 {
                worst_silu = worst_silu.max(((s - rs) / rs).abs());
            }
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        assert!(worst_silu < 5e-7, "silu relative error {worst_silu}");
        assert_eq!(silu_f32(0.0), 0.0);
        assert!(silu_f32(-1000.0).abs() < 1e-30 && silu_f32(1000.0) == 1000.0);
        assert!(silu_f32(f32::NAN).is_nan());
    }
}
