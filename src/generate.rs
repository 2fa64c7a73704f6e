//! The decode loop: one for text-to-image, edits, masked regeneration and batches.
//!
//! Every job of a call shares a token grid. The conditional rows of all jobs and the
//! unconditional rows of the guided ones go through the model together, left-padded to one
//! length. At each offset of the image block the prefix constraint either forces a token
//! (EOL, EOF, EOV, EOS), or the job forces a known code (edit masks, kept rows), or the
//! sampler draws a visual token; an unconditional row is fed the token its job took.

use std::time::Instant;

use candle_core::{D, DType, Module, Tensor};

use crate::error::{Error, Result};
use crate::sampler::{Sampler, SamplingParams};
use crate::text::Emu3TextModel;
use crate::text::linear::Linear;
use crate::tokens::{Slot, Vocabulary, block_len, slot};

/// One image to generate.
#[derive(Debug, Clone)]
pub struct ImageJob {
    /// Conditional prompt ids, ending with SOT.
    pub prompt: Vec<u32>,
    /// Unconditional (negative) prompt ids, ending with SOT; used when guidance is on.
    pub negative: Vec<u32>,
    /// Token grid (height, width).
    pub grid: (usize, usize),
    /// Codes to force, row-major `h*w`: `Some(code)` is kept, `None` is sampled.
    pub forced: Option<Vec<Option<u32>>>,
    pub params: SamplingParams,
    pub seed: u64,
}

/// What one job produced.
#[derive(Debug, Clone)]
pub struct ImageTokens {
    /// The code grid, row-major `h*w`.
    pub codes: Vec<u32>,
    /// Every token after SOT, EOS included.
    pub tokens: Vec<u32>,
}

/// Timings of one call.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeStats {
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Model forward steps after the prefill.
    pub steps: usize,
}

/// Reported after every step.
pub struct Progress<'a> {
    pub step: usize,
    pub total: usize,
    /// Complete token rows so far.
    pub rows_done: usize,
    /// Codes so far for each job (row-major, partial).
    pub codes: &'a [Vec<u32>],
}

/// Where the sampler's inputs are prepared each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SamplerPlace {
    /// [`SamplerPlace::Device`] when the model runs on a GPU, [`SamplerPlace::Host`] on the CPU.
    #[default]
    Auto,
    /// Every row's candidate logits are copied to the host, which applies guidance.
    Host,
    /// Guidance runs as tensor ops where the logits are, and so does the argmax when every job is
    /// greedy: only the guided scores of each job (or the chosen codes) reach the host, not the
    /// logits of every row. When every job is greedy and none forces codes, the chosen codes also
    /// feed the next step on the device and reach the host once per token row, so the host never
    /// waits for a step. Same arithmetic as the host's, so the same tokens on the CPU.
    Device,
}

/// Run the decode loop for `jobs` (all with the same grid).
pub fn generate(
    model: &Emu3TextModel,
    vocab: &Vocabulary,
    jobs: &[ImageJob],
    on_step: &mut dyn FnMut(&Progress),
) -> Result<(Vec<ImageTokens>, DecodeStats)> {
    generate_with(model, vocab, jobs, SamplerPlace::Auto, on_step)
}

/// [`generate`] with the sampler's inputs prepared at `place`.
pub fn generate_with(
    model: &Emu3TextModel,
    vocab: &Vocabulary,
    jobs: &[ImageJob],
    place: SamplerPlace,
    on_step: &mut dyn FnMut(&Progress),
) -> Result<(Vec<ImageTokens>, DecodeStats)> {
    let Some(first) = jobs.first() else { return Ok((Vec::new(), DecodeStats::default())) };
    let (h, w) = first.grid;
    if h == 0 || w == 0 {
        return Err(Error::Invalid(format!("empty token grid {h}x{w}")));
    }
    if let Some(j) = jobs.iter().find(|j| j.grid != (h, w)) {
        return Err(Error::Invalid(format!("jobs of one batch must share a grid: {:?} and {:?}", (h, w), j.grid)));
    }
    let k = vocab.codebook_size();
    for job in jobs {
        if let Some(f) = &job.forced {
            if f.len() != h * w {
                return Err(Error::Invalid(format!("forced codes cover {} cells, the grid has {}", f.len(), h * w)));
            }
            if let Some(c) = f.iter().flatten().find(|&&c| c as usize >= k) {
                return Err(Error::Invalid(format!("forced code {c} is outside the codebook of {k}")));
            }
        }
    }

    // Rows: the conditional prompt of every job, then the negatives of the guided jobs.
    let mut prompts: Vec<&[u32]> = jobs.iter().map(|j| j.prompt.as_slice()).collect();
    let mut uncond_row = vec![None; jobs.len()];
    for (i, job) in jobs.iter().enumerate() {
        if job.params.uses_guidance() {
            uncond_row[i] = Some(prompts.len());
            prompts.push(&job.negative);
        }
    }
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    if longest == 0 {
        return Err(Error::Invalid("empty prompt ids".into()));
    }
    let n_rows = prompts.len();
    let pad: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut ids = Vec::with_capacity(n_rows * longest);
    for (p, &np) in prompts.iter().zip(&pad) {
        ids.extend(std::iter::repeat_n(vocab.pad, np));
        ids.extend_from_slice(p);
    }
    let dev = model.device();
    let total = block_len(h, w);
    let mut cache = model.new_cache(pad, longest + total);
    let head = model.head_rows(vocab.visual_ids())?;

    let t0 = Instant::now();
    let input = Tensor::from_vec(ids, (n_rows, longest), dev)?;
    let hidden = model.forward_hidden(&input, &mut cache)?;
    let mut last = hidden.narrow(1, longest - 1, 1)?;
    let mut stats = DecodeStats { prompt_tokens: longest, ..Default::default() };
    stats.prefill_secs = t0.elapsed().as_secs_f64();

    let on_device = match place {
        SamplerPlace::Auto => !dev.is_cpu(),
        SamplerPlace::Host => false,
        SamplerPlace::Device => true,
    };
    let guidance = if on_device { Some(DeviceGuidance::new(jobs, &uncond_row, dev)?) } else { None };
    // Every job greedy with no forced codes: the picks stay on the device and become the next
    // step's input there, so the host never waits for a step; it reads the codes once a row.
    let feed = match &guidance {
        Some(g) if g.all_greedy && jobs.iter().all(|j| j.forced.is_none()) => Some(DeviceFeed::new(vocab, &uncond_row, dev)?),
        _ => None,
    };
    let mut pending: Vec<Tensor> = Vec::new();

    let t1 = Instant::now();
    let mut samplers: Vec<Sampler> = jobs.iter().map(|j| Sampler::new(j.params, j.seed)).collect();
    let mut codes: Vec<Vec<u32>> = vec![Vec::with_capacity(h * w); jobs.len()];
    let mut tokens: Vec<Vec<u32>> = vec![Vec::with_capacity(total); jobs.len()];
    let mut guided = Vec::with_capacity(k);
    let last_cell = (w + 1) * h - 1;
    for o in 1..=total {
        let slot = slot(vocab, o, h, w);
        let mut step_tokens = vec![vocab.pad; n_rows];
        let mut step_input = None; // the step's input ids when they stay on the device
        match slot {
            Slot::Forced(t) => {
                flush_picks(&mut pending, vocab, &mut codes, &mut tokens)?;
                for (i, toks) in tokens.iter_mut().enumerate() {
                    toks.push(t);
                    step_tokens[i] = t;
                }
            }
            Slot::Cell { .. } if feed.is_some() => {
                let (Some(g), Some(f)) = (&guidance, &feed) else { unreachable!("feed implies guidance") };
                let picked = g.pick(&head.scores(&last)?)?;
                step_input = Some(f.ids(&picked)?);
                pending.push(picked);
            }
            Slot::Cell { row, col } => {
                let cell = row * w + col;
                let needs_logits = jobs.iter().any(|j| forced_code(j, cell).is_none());
                let scores = if !needs_logits {
                    None
                } else if let Some(g) = &guidance {
                    Some(g.scores(&head.scores(&last)?)?)
                } else {
                    Some(Scores::Rows(head.forward_rows(&last)?))
                };
                for (i, job) in jobs.iter().enumerate() {
                    let code = match (forced_code(job, cell), &scores) {
                        (Some(c), _) => c,
                        (None, Some(Scores::Rows(l))) => {
                            let uncond = uncond_row[i].map(|r| l[r].as_slice());
                            samplers[i].guide(&l[i], uncond, &mut guided);
                            samplers[i].sample(&guided) as u32
                        }
                        (None, Some(Scores::Guided(g))) => samplers[i].sample(&g[i]) as u32,
                        (None, Some(Scores::Picked(p))) => p[i],
                        (None, None) => unreachable!("logits are computed when a cell is sampled"),
                    };
                    codes[i].push(code);
                    let t = vocab.code_id(code);
                    tokens[i].push(t);
                    step_tokens[i] = t;
                }
            }
        }
        for (i, r) in uncond_row.iter().enumerate() {
            if let Some(r) = r {
                step_tokens[*r] = step_tokens[i];
            }
        }
        let rows_done = (o / (w + 1)).min(h);
        on_step(&Progress { step: o, total, rows_done, codes: &codes });
        // Tokens after the last cell are all forced: no need to run the model for them.
        if o <= last_cell {
            let input = match step_input {
                Some(ids) => ids,
                None => Tensor::from_vec(step_tokens, (n_rows, 1), dev)?,
            };
            last = model.forward_hidden(&input, &mut cache)?;
            stats.steps += 1;
        }
    }
    flush_picks(&mut pending, vocab, &mut codes, &mut tokens)?;
    stats.decode_secs = t1.elapsed().as_secs_f64();
    let out = codes.into_iter().zip(tokens).map(|(codes, tokens)| ImageTokens { codes, tokens }).collect();
    Ok((out, stats))
}

/// Jobs grouped for decoding together, in chunks of at most `batch`: one grid per call (as
/// `generate` requires) and one kind of prompt (an edit prompt holds a whole source image, so
/// mixing it with text prompts would pad every text row to its length). `items` are
/// `(tag, is_edit, job)`; groups come out ordered by (kind, grid), items in their given order.
pub fn batches<T>(items: impl IntoIterator<Item = (T, bool, ImageJob)>, batch: usize) -> Vec<Vec<(T, ImageJob)>> {
    type Key = (bool, (usize, usize));
    let mut groups: std::collections::BTreeMap<Key, Vec<(T, ImageJob)>> = Default::default();
    for (tag, edit, job) in items {
        groups.entry((edit, job.grid)).or_default().push((tag, job));
    }
    let batch = batch.max(1);
    let mut out = Vec::new();
    for group in groups.into_values() {
        let mut group = group.into_iter().peekable();
        while group.peek().is_some() {
            out.push(group.by_ref().take(batch).collect());
        }
    }
    out
}

fn forced_code(job: &ImageJob, cell: usize) -> Option<u32> {
    job.forced.as_ref().and_then(|f| f[cell])
}

/// What the sampler gets for one step.
enum Scores {
    /// Candidate logits of every row (conditional rows, then unconditional ones).
    Rows(Vec<Vec<f32>>),
    /// Guided candidate scores of every job.
    Guided(Vec<Vec<f32>>),
    /// The chosen candidate of every job (all greedy).
    Picked(Vec<u32>),
}

/// Guidance as tensor ops on the logits' device: `(cond - uncond) * g + uncond` per job, with
/// `uncond = cond` for a job without guidance (so its scores stay `cond` exactly).
struct DeviceGuidance {
    cond: Tensor,
    uncond: Tensor,
    /// `(jobs, 1)`, for broadcasting; `scale_flat` is the same `(jobs,)`.
    scale: Tensor,
    scale_flat: Tensor,
    all_greedy: bool,
}

impl DeviceGuidance {
    fn new(jobs: &[ImageJob], uncond_row: &[Option<usize>], dev: &candle_core::Device) -> Result<Self> {
        let n = jobs.len();
        let cond: Vec<u32> = (0..n as u32).collect();
        let uncond: Vec<u32> = (0..n).map(|i| uncond_row[i].unwrap_or(i) as u32).collect();
        let scale: Vec<f32> = jobs.iter().map(|j| if j.params.uses_guidance() { j.params.cfg as f32 } else { 1.0 }).collect();
        Ok(Self {
            cond: Tensor::new(cond, dev)?,
            uncond: Tensor::new(uncond, dev)?,
            scale_flat: Tensor::new(scale.as_slice(), dev)?,
            scale: Tensor::from_vec(scale, (n, 1), dev)?,
            all_greedy: jobs.iter().all(|j| j.params.temperature <= 0.0),
        })
    }

    /// `scores`: the head's output in the model's dtype.
    fn guided(&self, scores: &Tensor) -> Result<Tensor> {
        let logits = scores.to_dtype(DType::F32)?;
        let cond = logits.index_select(&self.cond, 0)?;
        let uncond = logits.index_select(&self.uncond, 0)?;
        Ok((cond - &uncond)?.broadcast_mul(&self.scale)?.add(&uncond)?)
    }

    fn scores(&self, scores: &Tensor) -> Result<Scores> {
        Ok(if self.all_greedy {
            Scores::Picked(self.pick(scores)?.to_vec1::<u32>()?)
        } else {
            Scores::Guided(self.guided(scores)?.to_vec2::<f32>()?)
        })
    }

    /// Each job's greedy code `(jobs,)` u32, left on the device: one kernel on a GPU
    /// (`text::guided_argmax`), else guidance as tensor ops and an argmax.
    fn pick(&self, scores: &Tensor) -> Result<Tensor> {
        if let Some(picked) = crate::text::guided_argmax(scores, &self.cond, &self.uncond, &self.scale_flat)? {
            return Ok(picked);
        }
        Ok(self.guided(scores)?.argmax(D::Minus1)?)
    }
}

/// Turns the jobs' picked codes into the next step's input ids on the device: each row (a
/// job's conditional row, or a guided job's unconditional one) gets its job's code's token id.
struct DeviceFeed {
    row_job: Tensor,
    code_ids: Tensor,
}

impl DeviceFeed {
    fn new(vocab: &Vocabulary, uncond_row: &[Option<usize>], dev: &candle_core::Device) -> Result<Self> {
        let mut row_job: Vec<u32> = (0..uncond_row.len() as u32).collect();
        row_job.extend(uncond_row.iter().enumerate().filter(|(_, r)| r.is_some()).map(|(i, _)| i as u32));
        Ok(Self { row_job: Tensor::new(row_job, dev)?, code_ids: Tensor::new(vocab.visual_ids(), dev)? })
    }

    /// picked `(jobs,)` -> input ids `(rows, 1)`.
    fn ids(&self, picked: &Tensor) -> Result<Tensor> {
        let codes = picked.index_select(&self.row_job, 0)?;
        Ok(self.code_ids.index_select(&codes, 0)?.unsqueeze(1)?)
    }
}

/// Append the codes picked on the device since the last call (one host read for all of them).
fn flush_picks(pending: &mut Vec<Tensor>, vocab: &Vocabulary, codes: &mut [Vec<u32>], tokens: &mut [Vec<u32>]) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let picks = Tensor::stack(pending, 0)?.to_vec2::<u32>()?;
    pending.clear();
    for step in picks {
        for (i, code) in step.into_iter().enumerate() {
            codes[i].push(code);
            tokens[i].push(vocab.code_id(code));
        }
    }
    Ok(())
}

/// The LM head restricted to some token rows (the visual tokens).
pub struct HeadRows {
    head: Linear,
}

impl HeadRows {
    pub fn new(weight: Tensor) -> candle_core::Result<Self> {
        Ok(Self { head: Linear::new(weight, None)? })
    }

    /// hidden `(b, 1, d)` -> f32 logits `(b, rows)` of the selected rows, on the model's device.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.scores(hidden)?.to_dtype(DType::F32)?)
    }

    /// [`HeadRows::forward`] in the model's dtype.
    pub fn scores(&self, hidden: &Tensor) -> Result<Tensor> {
        // CUDA matmul needs a contiguous lhs; the last position of a (b, t, d) batch is strided.
        let x = hidden.squeeze(1)?.contiguous()?;
        Ok(self.head.forward(&x)?)
    }

    /// Bytes the head's product reads per weight (see [`Linear::bytes_per_weight`]).
    pub fn bytes_per_weight(&self) -> f64 {
        self.head.bytes_per_weight()
    }

    /// [`HeadRows::forward`] copied to the host: one f32 vector per batch row.
    pub fn forward_rows(&self, hidden: &Tensor) -> Result<Vec<Vec<f32>>> {
        Ok(self.forward(hidden)?.to_vec2::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(grid: (usize, usize)) -> ImageJob {
        ImageJob {
            prompt: vec![1],
            negative: vec![1],
            grid,
            forced: None,
            params: SamplingParams::greedy(1.0),
            seed: 0,
        }
    }

    #[test]
    fn batches_share_kind_and_grid_and_keep_order() {
        let items = vec![
            (0, false, job((16, 16))),
            (1, true, job((16, 16))),
            (2, false, job((12, 20))),
            (3, false, job((16, 16))),
            (4, false, job((16, 16))),
            (5, true, job((16, 16))),
        ];
        let tags: Vec<Vec<i32>> =
            batches(items, 2).into_iter().map(|b| b.into_iter().map(|(t, _)| t).collect()).collect();
        assert_eq!(tags, vec![vec![2], vec![0, 3], vec![4], vec![1, 5]]);
        assert!(batches(Vec::<((), bool, ImageJob)>::new(), 0).is_empty());
    }
}
