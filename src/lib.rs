//! Tessera: autoregressive text-to-image generation with the Emu3 architecture.

pub mod config;
pub mod error;
pub mod text;
pub mod vq;
pub mod weights;

pub use error::{Error, Result};
pub mod generate;
pub mod sampler;
pub mod tokens;
pub mod image_io;
pub mod model;
pub mod pipeline;
pub mod metadata;
pub mod judge;
pub mod world;
