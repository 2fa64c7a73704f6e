//! `tessera edit`: change an image by instruction, regenerate a masked region, or continue an
//! image from its top rows.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use sha2::{Digest, Sha256};
use tessera::image_io;
use tessera::metadata::ImageRecord;
use tessera::pipeline::{EditMode, EditRequest, mask_cells};

use super::common::ModelArgs;
use super::generate::{OutputArgs, SamplingArgs, check_output_path, parse_size, random_seed, render_and_save};

#[derive(Debug, Args)]
pub struct EditArgs {
    /// The image to edit (PNG or JPEG).
    pub image: PathBuf,

    /// The instruction ("make the circle green"), or with --mask / --keep-rows the text
    /// prompt that describes the whole new image.
    pub prompt: String,

    /// Output PNG; with -n N the files are NAME-0.png ... NAME-(N-1).png.
    #[arg(short, long, default_value = "out.png")]
    pub output: PathBuf,

    /// Regenerate only where this mask is white (token cells whose mask pixels are mostly
    /// white are sampled, the rest are copied from the source). Works with any model.
    #[arg(long, value_name = "PNG", conflicts_with = "keep_rows")]
    pub mask: Option<PathBuf>,

    /// Keep the top K token rows of the source and continue the image below them.
    #[arg(long, value_name = "K")]
    pub keep_rows: Option<usize>,

    /// Work at this size WIDTHxHEIGHT (pixels) instead of the trained grid closest to the
    /// image's aspect ratio; the source is resized to it.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<(u32, u32)>,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    /// Number of edits of the same image, decoded together; edit i uses seed+i.
    #[arg(short = 'n', long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub count: u32,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub output_opts: OutputArgs,
}

fn sha256_file(path: &std::path::Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

pub fn run(args: EditArgs) -> anyhow::Result<ExitCode> {
    args.sampling.check()?;
    tessera::pipeline::check_prompt(&args.prompt)?;
    check_output_path(&args.output)?;
    let source = image_io::load_image(&args.image)?;
    let mask = args.mask.as_deref().map(image_io::load_image).transpose()?;
    let quiet = args.output_opts.quiet;
    let t_load = Instant::now();
    let model = args.model.load(quiet)?;
    let load_secs = t_load.elapsed().as_secs_f64();
    let (width, height) = model.edit_size(source.width(), source.height(), args.size)?;
    let grid = model.grid_for(width, height)?;
    let source = image_io::resize(&source, width, height);
    let mode = match (&mask, args.keep_rows) {
        (Some(m), _) => EditMode::Mask(mask_cells(m, width, height, grid)),
        (None, Some(k)) => EditMode::KeepRows(k),
        (None, None) => EditMode::Instruction,
    };
    if let EditMode::Mask(cells) = &mode
        && !cells.iter().any(|&c| c) {
            bail!("mask {} has no white region: nothing to regenerate", args.mask.as_ref().unwrap().display());
        }
    let params = match &mode {
        EditMode::Instruction => args.sampling.resolve_edit(&model),
        _ => args.sampling.resolve(&model, None),
    };
    let seed = args.sampling.seed.unwrap_or_else(random_seed);
    let n = args.count as usize;
    let requests: Vec<EditRequest> = (0..n)
        .map(|i| EditRequest {
            prompt: args.prompt.clone(),
            negative: args.sampling.negative.clone(),
            source: source.clone(),
            mode: mode.clone(),
            params,
            seed: seed.wrapping_add(i as u64),
        })
        .collect();
    let jobs = requests.iter().map(|r| model.edit_job(r)).collect::<tessera::Result<Vec<_>>>()?;
    let model_hash = model.content_hash()?;
    let source_sha = sha256_file(&args.image)?;
    let mask_sha = args.mask.as_deref().map(sha256_file).transpose()?;
    if !quiet {
        eprintln!("seed: {seed}");
    }
    let records: Vec<ImageRecord> = requests
        .iter()
        .map(|r| ImageRecord {
            task: "edit".into(),
            source_sha256: Some(source_sha.clone()),
            mask_sha256: mask_sha.clone(),
            keep_rows: args.keep_rows,
            ..ImageRecord::t2i(&r.prompt, r.negative.clone(), (width, height), r.seed, params, &model.files.name, &model_hash, args.model.dtype.name())
        })
        .collect();
    render_and_save(&model, &jobs, &records, &args.output, &args.output_opts, load_secs)?;
    Ok(ExitCode::SUCCESS)
}
