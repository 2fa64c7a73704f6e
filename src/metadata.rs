//! What Tessera writes into every image it makes: a `parameters` text chunk in the
//! AUTOMATIC1111 style and a `tessera` JSON chunk with every setting, from which
//! `gen --from` re-runs the image exactly.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image_io;
use crate::sampler::SamplingParams;

pub const JSON_KEY: &str = "tessera";
pub const A1111_KEY: &str = "parameters";

/// Everything needed to reproduce one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Tessera version that made it.
    pub version: String,
    /// "t2i" or "edit".
    pub task: String,
    pub prompt: String,
    #[serde(default)]
    pub negative: Option<String>,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub params: SamplingParams,
    /// The model as the user named it, and SHA-256 of its config and weights.
    pub model: String,
    pub model_hash: String,
    pub dtype: String,
    /// Edits: the source image's SHA-256, the mask's, rows kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_rows: Option<usize>,
}

impl ImageRecord {
    /// A text-to-image record for `model`; edits override `task` and the source fields.
    #[allow(clippy::too_many_arguments)]
    pub fn t2i(
        prompt: &str,
        negative: Option<String>,
        (width, height): (u32, u32),
        seed: u64,
        params: SamplingParams,
        model: &str,
        model_hash: &str,
        dtype: &str,
    ) -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").into(),
            task: "t2i".into(),
            prompt: prompt.into(),
            negative,
            width,
            height,
            seed,
            params,
            model: model.into(),
            model_hash: model_hash.into(),
            dtype: dtype.into(),
            source_sha256: None,
            mask_sha256: None,
            keep_rows: None,
        }
    }

    /// AUTOMATIC1111's `parameters` text.
    pub fn a1111(&self) -> String {
        let mut s = self.prompt.clone();
        if let Some(n) = self.negative.as_deref().filter(|n| !n.is_empty()) {
            s.push_str(&format!("\nNegative prompt: {n}"));
        }
        let p = &self.params;
        s.push_str(&format!(
            "\nSampler: Emu3 autoregressive, Temperature: {}, Top-k: {}, Top-p: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {}, Model: {}, Version: tessera {}",
            p.temperature,
            p.top_k,
            p.top_p,
            p.cfg,
            self.seed,
            self.width,
            self.height,
            &self.model_hash[..self.model_hash.len().min(10)],
            self.model,
            self.version
        ));
        s
    }

    pub fn save_png(&self, path: &Path, img: &image::RgbImage) -> Result<()> {
        let json = serde_json::to_string(self).map_err(|e| Error::Invalid(e.to_string()))?;
        image_io::save_png(path, img, &[(A1111_KEY, &self.a1111()), (JSON_KEY, &json)])
    }

    /// The record in a PNG written by Tessera.
    pub fn read_png(path: &Path) -> Result<Self> {
        let chunks = image_io::read_png_text(path)?;
        let json = chunks.iter().find(|(k, _)| k == JSON_KEY).ok_or_else(|| Error::Image {
            path: path.to_path_buf(),
            message: "has no tessera metadata (was it made by tessera gen?)".into(),
        })?;
        serde_json::from_str(&json.1)
            .map_err(|e| Error::Image { path: path.to_path_buf(), message: format!("bad tessera metadata: {e}") })
    }
}
