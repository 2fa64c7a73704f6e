//! Device set-up.

use candle_core::{Device, Result};

/// The CUDA GPU `ordinal`, with cudarc's event tracking off. candle runs every op of a device on
/// that device's one stream, where cudarc only tracks events across several streams, yet it
/// still creates and destroys two events with every tensor it allocates: host time on each of
/// the ~25 ops per layer of a decode step, which on a GPU is bound by the host issuing kernels.
/// `TESSERA_CUDA_EVENTS=1` keeps them (for before/after measurements in one binary).
pub fn cuda(ordinal: usize) -> Result<Device> {
    let dev = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &dev
        && std::env::var("TESSERA_CUDA_EVENTS").as_deref() != Ok("1")
    {
        // SAFETY: no tensor of this device exists yet, and all its work goes to one stream, so
        // there is no cross-stream use for the events to order.
        unsafe { d.disable_event_tracking() };
    }
    Ok(dev)
}
