//! Requests -> decode-loop jobs -> images: what `gen`, `edit`, `batch` and `eval` share.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::generate::{DecodeStats, ImageJob, Progress, generate};
use crate::model::Model;
use crate::sampler::SamplingParams;

/// A text-to-image request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct T2iRequest {
    pub prompt: String,
    /// Negative prompt for guidance; `None` uses the model's unconditional prompt.
    pub negative: Option<String>,
    /// Output size in pixels.
    pub width: u32,
    pub height: u32,
    pub params: SamplingParams,
    pub seed: u64,
}

/// Longest prompt accepted, in characters.
pub const MAX_PROMPT_CHARS: usize = 2000;

impl Model {
    /// The token grid `(h, w)` for an image of `width` x `height` pixels, or an error that
    /// lists the sizes the model supports.
    pub fn grid_for(&self, width: u32, height: u32) -> Result<(usize, usize)> {
        let s = self.spatial_factor() as u32;
        let trained = self.trained_grids();
        let valid = || -> String {
            if trained.is_empty() {
                format!("any multiple of {s} pixels per side")
            } else {
                trained.iter().map(|(h, w)| format!("{}x{}", *w as u32 * s, *h as u32 * s)).collect::<Vec<_>>().join(", ")
            }
        };
        if width == 0 || height == 0 || width % s != 0 || height % s != 0 {
            return Err(Error::Invalid(format!("size {width}x{height} is not supported; valid sizes: {}", valid())));
        }
        let grid = ((height / s) as usize, (width / s) as usize);
        if !trained.is_empty() && !trained.contains(&grid) {
            return Err(Error::Invalid(format!(
                "size {width}x{height} is not one this model was trained on; valid sizes: {}",
                valid()
            )));
        }
        let max = self.config.text_config.max_position_embeddings;
        let needed = 2 * (crate::tokens::block_len(grid.0, grid.1) + 8);
        if needed > max {
            return Err(Error::Invalid(format!(
                "size {width}x{height} needs about {needed} positions, more than the model's {max}"
            )));
        }
        Ok(grid)
    }

    /// The default output size: the model's first trained grid, else 64x64 tokens.
    pub fn default_size(&self) -> (u32, u32) {
        let s = self.spatial_factor() as u32;
        match self.trained_grids().first() {
            Some(&(h, w)) => (w as u32 * s, h as u32 * s),
            None => (64 * s, 64 * s),
        }
    }

    fn unconditional_prompt(&self) -> String {
        self.config.tessera.as_ref().and_then(|t| t.unconditional_prompt.clone()).unwrap_or_default()
    }

    pub fn t2i_job(&self, req: &T2iRequest) -> Result<ImageJob> {
        check_prompt(&req.prompt)?;
        let (h, w) = self.grid_for(req.width, req.height)?;
        let negative = req.negative.clone().unwrap_or_else(|| self.unconditional_prompt());
        Ok(ImageJob {
            prompt: self.prompter.t2i_prompt(&req.prompt, h, w)?,
            negative: self.prompter.t2i_prompt(&negative, h, w)?,
            grid: (h, w),
            forced: None,
            params: req.params,
            seed: req.seed,
        })
    }

    /// Run jobs that share a grid and decode their images.
    pub fn run_jobs(
        &self,
        jobs: &[ImageJob],
        on_step: &mut dyn FnMut(&Progress),
    ) -> Result<(Vec<RgbImage>, Vec<Vec<u32>>, DecodeStats)> {
        let Some(first) = jobs.first() else { return Ok((Vec::new(), Vec::new(), DecodeStats::default())) };
        let (h, w) = first.grid;
        let (tokens, stats) = generate(&self.text, &self.prompter.vocab, jobs, on_step)?;
        let codes: Vec<Vec<u32>> = tokens.into_iter().map(|t| t.codes).collect();
        let images = self.decode_codes(&codes, h, w)?;
        Ok((images, codes, stats))
    }
}

/// An empty or over-long prompt is the user's mistake: say which.
pub fn check_prompt(prompt: &str) -> Result<()> {
    if prompt.trim().is_empty() {
        return Err(Error::Invalid("the prompt is empty; describe the image, e.g. \"a red circle\"".into()));
    }
    let n = prompt.chars().count();
    if n > MAX_PROMPT_CHARS {
        return Err(Error::Invalid(format!("the prompt has {n} characters; the limit is {MAX_PROMPT_CHARS}")));
    }
    Ok(())
}
