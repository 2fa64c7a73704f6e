//! The library's error type. Every variant's message names the value at fault and, where there
//! is one, the fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },

    /// The model directory or checkpoint is incomplete or inconsistent.
    #[error("{0}")]
    Checkpoint(String),

    /// A request the model cannot serve (bad size, empty prompt, ...).
    #[error("{0}")]
    Invalid(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("image {path}: {message}")]
    Image { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}
