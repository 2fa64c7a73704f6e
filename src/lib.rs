//! Tessera: autoregressive text-to-image generation with the Emu3 architecture.
pub mod world;
pub mod judge;
