//! Flags shared by the commands that load a model, and their resolution.

use std::io::IsTerminal;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use tessera::model::{LoadOptions, Model, ModelFiles};
use tessera::text::linear::CpuWeights;

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Checkpoint: a transformers Emu3 directory, a Hugging Face repo id (owner/name), or
    /// nothing (or "default") for the model shipped with Tessera.
    #[arg(long, env = "TESSERA_MODEL")]
    pub model: Option<String>,

    /// Where to run: auto picks CUDA or Metal when built with it and present, else the CPU.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,

    /// Compute precision of the language model (on the CPU, f32 is the fast one; q8: the
    /// projections quantized to 8 bits, CPU only, lossy).
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
    Metal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
    /// f32 compute with the decoder's projection weights in GGML Q8_0 (CPU only).
    Q8,
}

impl DTypeArg {
    pub fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 | DTypeArg::Q8 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DTypeArg::F32 => "f32",
            DTypeArg::F16 => "f16",
            DTypeArg::Bf16 => "bf16",
            DTypeArg::Q8 => "q8",
        }
    }
}

/// Resolve `--device`, telling the user on stderr what `auto` chose.
pub fn device(arg: DeviceArg, quiet: bool) -> anyhow::Result<Device> {
    let dev = match arg {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => {
            if !candle_core::utils::cuda_is_available() {
                bail!("--device cuda: this tessera was built without CUDA; rebuild with `--features cuda` (see README)");
            }
            tessera::device::cuda(0).context("--device cuda: no usable CUDA GPU")?
        }
        DeviceArg::Metal => {
            if !candle_core::utils::metal_is_available() {
                bail!("--device metal: this tessera was built without Metal; rebuild with `--features metal` on macOS");
            }
            Device::new_metal(0).context("--device metal: no usable Metal GPU")?
        }
        DeviceArg::Auto => {
            let dev = if candle_core::utils::cuda_is_available() {
                tessera::device::cuda(0).unwrap_or(Device::Cpu)
            } else if candle_core::utils::metal_is_available() {
                Device::new_metal(0).unwrap_or(Device::Cpu)
            } else {
                Device::Cpu
            };
            if !quiet {
                eprintln!("device: {}", device_name(&dev));
            }
            dev
        }
    };
    Ok(dev)
}

pub fn device_name(dev: &Device) -> &'static str {
    match dev {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

impl ModelArgs {
    pub fn load(&self, quiet: bool) -> anyhow::Result<Model> {
        let device = device(self.device, quiet)?;
        let files = ModelFiles::resolve(self.model.as_deref())?;
        let name = files.name.clone();
        let mut opts = LoadOptions { device, dtype: self.dtype.dtype(), ..Default::default() };
        if self.dtype == DTypeArg::Q8 {
            if !opts.device.is_cpu() {
                bail!("--dtype q8 runs on the CPU only; add --device cpu, or use f32/bf16 on the GPU");
            }
            opts.cpu_weights = CpuWeights::Q8_0;
        }
        Model::load(files, opts).with_context(|| format!("loading model {name}"))
    }
}

/// Progress bars only on a terminal and when not asked to be quiet.
pub fn show_progress(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}
