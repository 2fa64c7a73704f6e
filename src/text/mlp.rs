//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))` (`Emu3MLP`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::config::TextConfig;

#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let lin = |a, b, name| {
            if cfg.mlp_bias {
                candle_nn::linear(a, b, vb.pp(name))
            } else {
                candle_nn::linear_no_bias(a, b, vb.pp(name))
            }
        };
        Ok(Self { gate_proj: lin(d, i, "gate_proj")?, up_proj: lin(d, i, "up_proj")?, down_proj: lin(i, d, "down_proj")? })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?.silu()?;
        self.down_proj.forward(&g.mul(&self.up_proj.forward(x)?)?)
    }
}
