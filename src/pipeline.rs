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
        if width == 0 || height == 0 || !width.is_multiple_of(s) || !height.is_multiple_of(s) {
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

/// How an edit uses its source image.
#[derive(Debug, Clone)]
pub enum EditMode {
    /// Instruction editing: the model reads the source block and the instruction and writes
    /// the edited image (models trained for it).
    Instruction,
    /// Regenerate the cells where the mask is set (true), under the text prompt; keep the rest.
    Mask(Vec<bool>),
    /// Keep the top `k` token rows, continue the rest under the text prompt.
    KeepRows(usize),
}

/// An edit request on an image already resized to the model's grid.
#[derive(Debug, Clone)]
pub struct EditRequest {
    /// The instruction (Instruction mode) or the text prompt (Mask, KeepRows).
    pub prompt: String,
    pub negative: Option<String>,
    pub source: RgbImage,
    pub mode: EditMode,
    pub params: SamplingParams,
    pub seed: u64,
}

impl Model {
    /// Whether the checkpoint was trained for instruction edits (Tessera's metadata says so).
    pub fn supports_instruction_edits(&self) -> bool {
        self.config.tessera.as_ref().is_some_and(|t| t.edit_layout.is_some())
    }

    /// The pixel size an edit source is resized to: `size` if given, else the trained grid
    /// whose aspect ratio is closest to the image's, else the image rounded to the VQ factor.
    pub fn edit_size(&self, img_w: u32, img_h: u32, size: Option<(u32, u32)>) -> Result<(u32, u32)> {
        if let Some((w, h)) = size {
            self.grid_for(w, h)?;
            return Ok((w, h));
        }
        let s = self.spatial_factor() as u32;
        let aspect = img_w as f64 / img_h.max(1) as f64;
        let best = self.trained_grids().into_iter().min_by(|a, b| {
            let da = ((a.1 as f64 / a.0 as f64).ln() - aspect.ln()).abs();
            let db = ((b.1 as f64 / b.0 as f64).ln() - aspect.ln()).abs();
            da.total_cmp(&db)
        });
        Ok(match best {
            Some((h, w)) => (w as u32 * s, h as u32 * s),
            None => ((img_w / s).max(1) * s, (img_h / s).max(1) * s),
        })
    }

    pub fn edit_job(&self, req: &EditRequest) -> Result<ImageJob> {
        check_prompt(&req.prompt)?;
        let (w, h) = req.source.dimensions();
        let (gh, gw) = self.grid_for(w, h)?;
        let (_, _, codes) = self.encode_image(&req.source)?;
        let negative = req.negative.clone().unwrap_or_else(|| match req.mode {
            EditMode::Instruction => String::new(),
            _ => self.unconditional_prompt(),
        });
        let job = |prompt: Vec<u32>, negative: Vec<u32>, forced: Option<Vec<Option<u32>>>| ImageJob {
            prompt,
            negative,
            grid: (gh, gw),
            forced,
            params: req.params,
            seed: req.seed,
        };
        Ok(match &req.mode {
            EditMode::Instruction => {
                if !self.supports_instruction_edits() {
                    return Err(Error::Invalid(
                        "this model was not trained for instruction edits; use --mask or --keep-rows with a text prompt".into(),
                    ));
                }
                let p = &self.prompter;
                job(
                    p.edit_prompt(&codes, gh, gw, &req.prompt)?,
                    p.edit_prompt(&codes, gh, gw, &negative)?,
                    None,
                )
            }
            EditMode::Mask(mask) => {
                if mask.len() != gh * gw {
                    return Err(Error::Invalid(format!("mask covers {} cells, the grid has {}", mask.len(), gh * gw)));
                }
                let forced = codes.iter().zip(mask).map(|(&c, &m)| (!m).then_some(c)).collect();
                job(self.prompter.t2i_prompt(&req.prompt, gh, gw)?, self.prompter.t2i_prompt(&negative, gh, gw)?, Some(forced))
            }
            EditMode::KeepRows(k) => {
                if *k > gh {
                    return Err(Error::Invalid(format!("--keep-rows {k} exceeds the grid's {gh} rows")));
                }
                let forced = codes.iter().enumerate().map(|(i, &c)| (i / gw < *k).then_some(c)).collect();
                job(self.prompter.t2i_prompt(&req.prompt, gh, gw)?, self.prompter.t2i_prompt(&negative, gh, gw)?, Some(forced))
            }
        })
    }
}

/// A mask image -> one flag per token cell: a cell is regenerated when the mean brightness of
/// its pixels (mask resized to the image) is at least half.
pub fn mask_cells(mask: &RgbImage, width: u32, height: u32, grid: (usize, usize)) -> Vec<bool> {
    let mask = crate::image_io::resize(mask, width, height);
    let (gh, gw) = grid;
    let (ch, cw) = (height as usize / gh, width as usize / gw);
    let mut out = Vec::with_capacity(gh * gw);
    for r in 0..gh {
        for c in 0..gw {
            let mut sum = 0u64;
            for y in r * ch..(r + 1) * ch {
                for x in c * cw..(c + 1) * cw {
                    let p = mask.get_pixel(x as u32, y as u32);
                    sum += (p[0] as u64 + p[1] as u64 + p[2] as u64) / 3;
                }
            }
            out.push(sum * 2 >= 255 * (ch * cw) as u64);
        }
    }
    out
}
