//! Writing samples: `samples.jsonl`, PNG files and the raw uint8 shard, and the benchmark.
//!
//! Samples are generated in parallel (rayon) in chunks; every sample has its own generator
//! seeded from (seed, index), and results are written in index order, so the output is
//! byte-identical whatever the number of threads.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use image::RgbImage;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use rayon::prelude::*;

use super::{Category, EditKind, Sample, SampleOptions, WorldError, edit, generate, sampler};

/// Which image files `write_samples` produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One PNG per image.
    Png,
    /// `images.u8` only: every image's RGB bytes (H*W*3, row-major), in line order; an edit
    /// line contributes its source then its target.
    Raw,
    Both,
}

/// What a run wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub samples: u64,
    pub images: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WorldError + '_ {
    move |source| WorldError::Io { path: path.to_path_buf(), source }
}

/// Encode `img` as a PNG with fast compression (the world's images are flat and compress well).
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>, image::ImageError> {
    let mut buf = Vec::with_capacity(img.len() / 8);
    let enc = PngEncoder::new_with_quality(&mut buf, CompressionType::Fast, FilterType::Sub);
    img.write_with_encoder(enc)?;
    Ok(buf)
}

/// Write `count` samples of `opts` into `out`: `samples.jsonl` plus images in `format`.
pub fn write_samples(opts: &SampleOptions, count: u64, out: &Path, format: Format) -> Result<Stats, WorldError> {
    opts.check()?;
    fs::create_dir_all(out).map_err(io_err(out))?;
    let jsonl_path = out.join("samples.jsonl");
    let mut jsonl = BufWriter::new(File::create(&jsonl_path).map_err(io_err(&jsonl_path))?);
    let raw_path = out.join("images.u8");
    let mut raw = match format {
        Format::Raw | Format::Both => Some(BufWriter::new(File::create(&raw_path).map_err(io_err(&raw_path))?)),
        Format::Png => None,
    };
    let png = matches!(format, Format::Png | Format::Both);
    let mut stats = Stats::default();
    const CHUNK: u64 = 1024;
    let mut start = 0;
    while start < count {
        let end = (start + CHUNK).min(count);
        // (JSON line, images for the raw shard, number of images)
        type Written = (String, Vec<RgbImage>, u64);
        let results: Vec<Result<Written, WorldError>> = (start..end)
            .into_par_iter()
            .map(|i| {
                let sample = generate(opts, i)?;
                let images = sample.render();
                if png {
                    for (img, name) in images.iter().zip(sample.file_names()) {
                        save_png(img, &out.join(name))?;
                    }
                }
                let line = serde_json::to_string(&sample).expect("samples serialize to JSON");
                let n = images.len() as u64;
                Ok((line, if raw.is_some() { images } else { Vec::new() }, n))
            })
            .collect();
        for r in results {
            let (line, images, n) = r?;
            writeln!(jsonl, "{line}").map_err(io_err(&jsonl_path))?;
            stats.samples += 1;
            stats.images += n;
            if let Some(raw) = raw.as_mut() {
                for img in &images {
                    raw.write_all(img.as_raw()).map_err(io_err(&raw_path))?;
                }
            }
        }
        start = end;
    }
    jsonl.flush().map_err(io_err(&jsonl_path))?;
    if let Some(mut raw) = raw {
        raw.flush().map_err(io_err(&raw_path))?;
    }
    Ok(stats)
}

/// Save `img` as a fast-compressed PNG.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<(), WorldError> {
    let bytes = encode_png(img).map_err(|source| WorldError::Image { path: path.to_path_buf(), source })?;
    fs::write(path, bytes).map_err(io_err(path))
}

/// The fixed benchmark: `per_category` prompts for each t2i category of `Category::BENCH`, then
/// `per_category` edits (kinds in turn), at `width` x `height`, all prompts distinct.
pub fn bench(seed: u64, per_category: usize, width: u32, height: u32) -> Result<Vec<Sample>, WorldError> {
    let opts = SampleOptions {
        seed,
        width,
        height,
        task: super::Task::T2i,
        categories: vec![],
        kinds: vec![],
        exclude_bench: false,
    };
    opts.check()?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut index: u64 = 0;
    for category in Category::BENCH.into_iter().chain([Category::Edit]) {
        for k in 0..per_category {
            let id = format!("bench-{}-{k:03}", category.name());
            let sample = loop {
                index += 1;
                let mut rng = sampler::sample_rng(seed, index);
                let s = if category == Category::Edit {
                    let kind = EditKind::ALL[k % EditKind::ALL.len()];
                    super::edit_sample(id.clone(), edit::sample_edit(&mut rng, kind, width, height)?, width, height)
                } else {
                    super::t2i_sample(id.clone(), category, sampler::sample_t2i(&mut rng, category, width, height)?, width, height)
                };
                if seen.insert(super::normalize_prompt(s.prompt())) {
                    break s;
                }
            };
            out.push(sample);
        }
    }
    Ok(out)
}

/// Write samples as JSON lines.
pub fn write_jsonl(samples: &[Sample], path: &PathBuf) -> Result<(), WorldError> {
    let mut f = BufWriter::new(File::create(path).map_err(io_err(path))?);
    for s in samples {
        let line = serde_json::to_string(s).expect("samples serialize to JSON");
        writeln!(f, "{line}").map_err(io_err(path))?;
    }
    f.flush().map_err(io_err(path))
}
