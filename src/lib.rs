//! Tessera: autoregressive text-to-image generation with the Emu3 architecture.
//!
//! - [`model`]: a checkpoint (transformers Emu3 format) loaded as [`text::Emu3TextModel`] +
//!   [`vq::Emu3VqVae`] + [`tokens::Prompter`].
//! - [`generate`]: the one decode loop (CFG rows batched, prefix constraint, forced codes),
//!   with [`sampler`] the one sampler; [`pipeline`] turns requests into its jobs.
//! - [`world`] and [`judge`]: the procedural training world and the prompt-adherence judge.

pub mod config;
pub mod device;
pub mod error;
pub mod evaluate;
pub mod generate;
pub mod image_io;
pub mod judge;
pub mod metadata;
pub mod model;
pub mod pipeline;
pub mod sampler;
pub mod text;
pub mod tokens;
pub mod vq;
pub mod weights;
pub mod world;

pub use error::{Error, Result};
