//! The language model: transformers' `Emu3TextModel` with its `lm_head`.

mod attention;
mod cache;
mod cuda_decode;
pub mod linear;
mod mlp;
mod model;
mod rope;

pub use cache::Cache;
pub use cuda_decode::guided_argmax;
pub use model::Emu3TextModel;
