//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))` (`Emu3MLP`).

use candle_core::{D, Module, Result, Tensor};
use candle_nn::{RmsNorm, VarBuilder};

use super::linear::{CpuWeights, Linear};

use crate::config::TextConfig;

#[derive(Debug, Clone)]
pub struct Mlp {
    /// gate_proj | up_proj stacked: one pass over their weights per step.
    gate_up_proj: Linear,
    down_proj: Linear,
    intermediate: usize,
}

impl Mlp {
    pub fn new(cfg: &TextConfig, vb: VarBuilder, weights: CpuWeights) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let lin = |a, b, name| {
            if cfg.mlp_bias {
                candle_nn::linear(a, b, vb.pp(name))
            } else {
                candle_nn::linear_no_bias(a, b, vb.pp(name))
            }
        };
        let down = lin(i, d, "down_proj")?;
        Ok(Self {
            gate_up_proj: Linear::fused(&[lin(d, i, "gate_proj")?, lin(d, i, "up_proj")?], weights)?,
            down_proj: Linear::with_cpu_weights(down.weight().clone(), down.bias().cloned(), weights)?,
            intermediate: i,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj.forward(&self.swiglu(x)?)
    }

    /// A fused CUDA decode step of the block with its norm and residual: `x + mlp(norm(x))` for
    /// the residual stream `x`, with the norm applied inside the gate|up product and the residual
    /// added by `down_proj`'s (see `cuda_decode::norm_fold`).
    pub fn forward_residual(&self, x: &Tensor, norm: &RmsNorm) -> Result<Tensor> {
        let folded = match self.gate_up_proj.dense_weight() {
            Some(w) => super::cuda_decode::swiglu(x, Some(norm), w)?,
            None => None,
        };
        let h = match folded {
            Some(h) => h,
            None => self.swiglu(&super::cuda_decode::normed(x, norm)?)?,
        };
        super::cuda_decode::project_add(&self.down_proj, &h, x)
    }

    /// `silu(gate(x)) * up(x)`.
    fn swiglu(&self, x: &Tensor) -> Result<Tensor> {
        // A decode step on a GPU: the gate|up product and SwiGLU in one kernel.
        if let Some(w) = self.gate_up_proj.dense_weight()
            && let Some(h) = super::cuda_decode::swiglu(x, None, w)?
        {
            return Ok(h);
        }
        let gu = self.gate_up_proj.forward(x)?;
        match super::cuda_decode::silu_mul(&gu)? {
            Some(h) => Ok(h),
            None => {
                let g = gu.narrow(D::Minus1, 0, self.intermediate)?.silu()?;
                g.mul(&gu.narrow(D::Minus1, self.intermediate, self.intermediate)?)
            }
        }
    }
}
