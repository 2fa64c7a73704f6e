//! `tessera world ...`: sample training data, write the benchmark, render a samples file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use rayon::prelude::*;

use tessera::judge;
use tessera::world::{self, BENCH_SEED, Category, EditKind, Format, SampleOptions, Task};

#[derive(Debug, Args)]
pub struct WorldArgs {
    #[command(subcommand)]
    pub command: WorldCommand,
}

#[derive(Debug, Subcommand)]
pub enum WorldCommand {
    /// Sample scenes with captions (t2i) or edit triples, as samples.jsonl plus images.
    Sample(SampleArgs),
    /// Write the fixed benchmark (prompts and specs only; images are rendered on demand).
    Bench(BenchArgs),
    /// Render the images of a samples or bench file as PNGs, optionally degraded.
    Render(RenderArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TaskArg {
    T2i,
    Edit,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    Png,
    Raw,
    Both,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Number of samples (lines of samples.jsonl).
    #[arg(long)]
    pub count: u64,
    /// Seed; the same seed and arguments give byte-identical output.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image size, WIDTHxHEIGHT.
    #[arg(long, default_value = "128x128", value_parser = parse_size)]
    pub size: (u32, u32),
    /// Text-to-image samples or edit triples.
    #[arg(long, value_enum, default_value_t = TaskArg::T2i)]
    pub task: TaskArg,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// png: one PNG per image; raw: images.u8 (RGB uint8, H*W*3 per image, line order); both.
    #[arg(long, value_enum, default_value_t = FormatArg::Png)]
    pub format: FormatArg,
    /// Comma-separated t2i categories (single_object, two_objects, counting, colors, position,
    /// color_attr, text, scene) or, with --task edit, edit kinds (recolor, remove, add, move,
    /// resize, background, text). Default: all, uniformly.
    #[arg(long, value_delimiter = ',')]
    pub categories: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Output JSONL file.
    #[arg(long, default_value = "eval/bench.jsonl")]
    pub out: PathBuf,
    /// Seed of the benchmark.
    #[arg(long, default_value_t = BENCH_SEED)]
    pub seed: u64,
    /// Prompts per t2i category, and number of edits.
    #[arg(long, default_value_t = 100)]
    pub per_category: usize,
    /// Image size, WIDTHxHEIGHT.
    #[arg(long, default_value = "128x128", value_parser = parse_size)]
    pub size: (u32, u32),
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// A samples.jsonl or bench file.
    #[arg(long)]
    pub samples: PathBuf,
    /// Output directory for the PNGs (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Gaussian blur sigma applied to every image (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub blur: f32,
    /// Round-trip every image through JPEG at this quality (after the blur).
    #[arg(long)]
    pub jpeg: Option<u8>,
}

pub fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| format!("`{s}` is not WIDTHxHEIGHT (e.g. 128x128)"))?;
    let p = |v: &str| v.trim().parse::<u32>().map_err(|_| format!("`{s}` is not WIDTHxHEIGHT (e.g. 128x128)"));
    Ok((p(w)?, p(h)?))
}

pub fn run(args: WorldArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        WorldCommand::Sample(a) => sample(a),
        WorldCommand::Bench(a) => bench(a),
        WorldCommand::Render(a) => render(a),
    }
}

fn sample(a: SampleArgs) -> anyhow::Result<ExitCode> {
    let task = match a.task {
        TaskArg::T2i => Task::T2i,
        TaskArg::Edit => Task::Edit,
    };
    let mut categories = Vec::new();
    let mut kinds = Vec::new();
    for name in a.categories.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match task {
            Task::T2i => match Category::from_name(name).filter(|c| *c != Category::Edit) {
                Some(c) => categories.push(c),
                None => bail!(
                    "unknown t2i category `{name}` (expected one of: {})",
                    Category::T2I.map(|c| c.name()).join(", ")
                ),
            },
            Task::Edit => match EditKind::ALL.into_iter().find(|k| k.name() == name) {
                Some(k) => kinds.push(k),
                None => bail!(
                    "unknown edit kind `{name}` (expected one of: {})",
                    EditKind::ALL.map(|k| k.name()).join(", ")
                ),
            },
        }
    }
    let format = match a.format {
        FormatArg::Png => Format::Png,
        FormatArg::Raw => Format::Raw,
        FormatArg::Both => Format::Both,
    };
    let opts = SampleOptions {
        seed: a.seed,
        width: a.size.0,
        height: a.size.1,
        task,
        categories,
        kinds,
        exclude_bench: true,
    };
    let start = Instant::now();
    let stats = world::write_samples(&opts, a.count, &a.out, format)
        .with_context(|| format!("writing samples to {}", a.out.display()))?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} samples ({} images) to {} in {secs:.2} s ({:.0} images/s)",
        stats.samples,
        stats.images,
        a.out.display(),
        stats.images as f64 / secs.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

fn bench(a: BenchArgs) -> anyhow::Result<ExitCode> {
    let samples = world::bench(a.seed, a.per_category, a.size.0, a.size.1).context("sampling the benchmark")?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    world::writer::write_jsonl(&samples, &a.out)?;
    eprintln!("wrote {} benchmark prompts to {}", samples.len(), a.out.display());
    Ok(ExitCode::SUCCESS)
}

fn render(a: RenderArgs) -> anyhow::Result<ExitCode> {
    let samples = world::read_jsonl(&a.samples)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let n: usize = samples
        .par_iter()
        .map(|s| -> anyhow::Result<usize> {
            let images = s.render();
            for (img, name) in images.iter().zip(s.file_names()) {
                let img = judge::degrade(img, a.blur, a.jpeg)?;
                world::writer::save_png(&img, &a.out.join(name))?;
            }
            Ok(images.len())
        })
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .sum();
    eprintln!("rendered {n} images of {} samples into {}", samples.len(), a.out.display());
    Ok(ExitCode::SUCCESS)
}
