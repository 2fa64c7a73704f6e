//! Tessera: autoregressive text-to-image generation with the Emu3 architecture.

pub mod config;
pub mod error;
pub mod vq;
pub mod weights;

pub use error::{Error, Result};
