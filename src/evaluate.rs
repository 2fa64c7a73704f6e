//! Model evaluation on world samples: generate an image per bench prompt (text to image, or an
//! instruction edit of the rendered source scene), or send the ground truth through the VQ round
//! trip, so the judge can score what the model makes.


use image::RgbImage;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::generate::{ImageJob, batches};
use crate::image_io;
use crate::model::Model;
use crate::pipeline::{EditMode, EditRequest, T2iRequest};
use crate::sampler::SamplingParams;
use crate::world::{Sample, Task, render};

/// The seed of one sample: derived from the run's seed and the sample id, so it does not
/// depend on the order, the batch or `--limit`.
pub fn sample_seed(seed: u64, id: &str) -> u64 {
    let h = Sha256::digest(format!("{seed}\0{id}").as_bytes());
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) >> 11
}

/// The sampling settings of a run: one for text-to-image samples, one for instruction edits
/// (`Model::recommended_edit_params`: an edit's guidance pushes away from copying its source,
/// so a model can recommend another scale for it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskParams {
    pub t2i: SamplingParams,
    pub edit: SamplingParams,
}

/// The decode-loop job for one sample.
pub fn sample_job(model: &Model, sample: &Sample, params: TaskParams, seed: u64) -> Result<ImageJob> {
    let seed = sample_seed(seed, &sample.id);
    match sample.task {
        Task::T2i => model.t2i_job(&T2iRequest {
            prompt: sample.prompt().to_string(),
            negative: None,
            width: sample.width,
            height: sample.height,
            params: params.t2i,
            seed,
        }),
        Task::Edit => {
            let scene = sample
                .source_spec
                .as_ref()
                .ok_or_else(|| Error::Invalid(format!("edit sample `{}` has no source_spec", sample.id)))?;
            let source = render(scene, sample.width, sample.height);
            model.edit_job(&EditRequest {
                prompt: sample.prompt().to_string(),
                negative: None,
                source,
                mode: EditMode::Instruction,
                params: params.edit,
                seed,
            })
        }
    }
}

/// Generate an image for every sample, decoding up to `batch` samples of one task and grid
/// together. `on_image(index, image)` is called as images finish.
pub fn generate_for(
    model: &Model,
    samples: &[Sample],
    params: TaskParams,
    seed: u64,
    batch: usize,
    on_image: &mut dyn FnMut(usize, &RgbImage),
) -> Result<Vec<RgbImage>> {
    let mut items = Vec::with_capacity(samples.len());
    for (i, s) in samples.iter().enumerate() {
        items.push((i, s.task == Task::Edit, sample_job(model, s, params, seed)?));
    }
    let mut out: Vec<Option<RgbImage>> = vec![None; samples.len()];
    for chunk in batches(items, batch) {
        let jobs: Vec<ImageJob> = chunk.iter().map(|(_, j)| j.clone()).collect();
        let (images, _, _) = model.run_jobs(&jobs, &mut |_| {})?;
        for ((i, _), img) in chunk.iter().zip(images) {
            on_image(*i, &img);
            out[*i] = Some(img);
        }
    }
    Ok(out.into_iter().map(|o| o.expect("every sample is generated")).collect())
}

/// The ground truth of every sample after the VQ round trip (encode, decode), with its PSNR.
pub fn roundtrip(model: &Model, samples: &[Sample]) -> Result<Vec<(RgbImage, f64)>> {
    samples
        .iter()
        .map(|s| {
            let truth = s.render().pop().expect("a sample renders at least one image");
            let (h, w, codes) = model.encode_image(&truth)?;
            let back = model.decode_codes(&[codes], h, w)?.swap_remove(0);
            let psnr = image_io::psnr(&truth, &back);
            Ok((back, psnr))
        })
        .collect()
}
