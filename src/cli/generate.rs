//! `tessera gen`: text to image.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use tessera::metadata::ImageRecord;
use tessera::model::Model;
use tessera::pipeline::T2iRequest;
use tessera::sampler::SamplingParams;

use super::common::ModelArgs;
use super::progress::Reporter;

#[derive(Debug, Args)]
pub struct GenArgs {
    /// What to draw, e.g. "a red circle above a blue square".
    pub prompt: Option<String>,

    /// Output PNG; with -n N the files are NAME-0.png ... NAME-(N-1).png.
    #[arg(short, long, default_value = "out.png")]
    pub output: PathBuf,

    /// Re-run the settings recorded in a PNG made by tessera (prompt, seed, size, sampling,
    /// model); flags given explicitly override them.
    #[arg(long, value_name = "PNG")]
    pub from: Option<PathBuf>,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    /// Image size WIDTHxHEIGHT in pixels; must map to a token grid the model supports.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<(u32, u32)>,

    /// Number of images, decoded together in one batch; image i uses seed+i.
    #[arg(short = 'n', long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub count: u32,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub output_opts: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Random seed (default: a random one, always printed and recorded in the PNG).
    #[arg(long)]
    pub seed: Option<u64>,

    /// Classifier-free guidance scale; 1 turns guidance off [default: the model's
    /// recommendation (its own one for instruction edits), else 3].
    #[arg(long)]
    pub cfg: Option<f64>,

    /// Negative prompt that guidance steers away from [default: the model's unconditional prompt].
    #[arg(long)]
    pub negative: Option<String>,

    /// Sampling temperature; 0 is greedy [default: the model's recommendation, else 1].
    #[arg(long)]
    pub temperature: Option<f64>,

    /// Sample only among the k most likely visual tokens; 0 means all [default: the model's
    /// recommendation, else 0].
    #[arg(long)]
    pub top_k: Option<usize>,

    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long)]
    pub top_p: Option<f64>,
}

#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// No progress bar or messages on stderr.
    #[arg(short, long)]
    pub quiet: bool,

    /// Print one JSON line per image (path, seed, timings, tokens/s, the code grid) on stdout.
    #[arg(long)]
    pub json: bool,

    /// Show the image in the terminal row by row while it is sampled.
    #[arg(long)]
    pub preview: bool,
}

pub fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("size {s:?} must look like WIDTHxHEIGHT, e.g. 128x128");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let w: u32 = w.trim().parse().map_err(|_| bad())?;
    let h: u32 = h.trim().parse().map_err(|_| bad())?;
    if w == 0 || h == 0 {
        return Err(bad());
    }
    Ok((w, h))
}

impl SamplingArgs {
    /// Flags over the recorded settings over the model's recommendation over the defaults.
    pub fn resolve(&self, model: &Model, recorded: Option<&SamplingParams>) -> SamplingParams {
        self.over(recorded.copied().unwrap_or_else(|| model.recommended_params()))
    }

    /// The same for an instruction edit: flags over the model's recommendation for edits.
    pub fn resolve_edit(&self, model: &Model) -> SamplingParams {
        self.over(model.recommended_edit_params())
    }

    fn over(&self, base: SamplingParams) -> SamplingParams {
        SamplingParams {
            cfg: self.cfg.unwrap_or(base.cfg),
            temperature: self.temperature.unwrap_or(base.temperature),
            top_k: self.top_k.unwrap_or(base.top_k),
            top_p: self.top_p.unwrap_or(base.top_p),
        }
    }

    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(t) = self.temperature.filter(|t| !(*t >= 0.0 && t.is_finite())) {
            bail!("--temperature {t} must be a finite number >= 0");
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            bail!("--top-p {p} must be in (0, 1]");
        }
        if let Some(c) = self.cfg.filter(|c| !c.is_finite()) {
            bail!("--cfg {c} must be a finite number");
        }
        Ok(())
    }
}

/// `out.png` -> `out-3.png` when several images are written.
pub fn numbered(path: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let ext = path.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_else(|| "png".into());
    path.with_file_name(format!("{stem}-{i}.{ext}"))
}

/// Fail before loading the model if the output cannot be written.
pub fn check_output_path(path: &Path) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!("output directory {} does not exist; create it first", dir.display());
    }
    if path.is_dir() {
        bail!("output {} is a directory; give a file name like out.png", path.display());
    }
    Ok(())
}

pub fn random_seed() -> u64 {
    rand::random::<u64>() >> 11 // keep seeds exactly representable as JSON numbers
}

pub fn run(args: GenArgs) -> anyhow::Result<ExitCode> {
    args.sampling.check()?;
    let recorded = match &args.from {
        Some(p) => Some(ImageRecord::read_png(p)?),
        None => None,
    };
    if let Some(r) = &recorded
        && r.task != "t2i" {
            bail!("{} was made by `tessera {}`; re-run it with that command", args.from.as_ref().unwrap().display(), r.task);
        }
    let prompt = match (&args.prompt, &recorded) {
        (Some(p), _) => p.clone(),
        (None, Some(r)) => r.prompt.clone(),
        (None, None) => bail!("no prompt given: tessera gen \"a red circle\" -o out.png"),
    };
    tessera::pipeline::check_prompt(&prompt)?;
    check_output_path(&args.output)?;
    let quiet = args.output_opts.quiet;
    let mut model_args = args.model.clone();
    if model_args.model.is_none()
        && let Some(r) = recorded.as_ref().filter(|r| r.model != "default") {
            model_args.model = Some(r.model.clone());
        }
    let t_load = Instant::now();
    let model = model_args.load(quiet)?;
    let load_secs = t_load.elapsed().as_secs_f64();
    let params = args.sampling.resolve(&model, recorded.as_ref().map(|r| &r.params));
    let (width, height) = args.size.or(recorded.as_ref().map(|r| (r.width, r.height))).unwrap_or(model.default_size());
    let seed = args.sampling.seed.or(recorded.as_ref().map(|r| r.seed)).unwrap_or_else(random_seed);
    let negative = args.sampling.negative.clone().or(recorded.as_ref().and_then(|r| r.negative.clone()));
    let n = args.count as usize;
    let requests: Vec<T2iRequest> = (0..n)
        .map(|i| T2iRequest {
            prompt: prompt.clone(),
            negative: negative.clone(),
            width,
            height,
            params,
            seed: seed.wrapping_add(i as u64),
        })
        .collect();
    let jobs = requests.iter().map(|r| model.t2i_job(r)).collect::<tessera::Result<Vec<_>>>()?;
    let model_hash = model.content_hash()?;
    if let Some(r) = &recorded
        && r.model_hash != model_hash && !quiet {
            eprintln!("warning: {} was made with a different model (hash {}), the image will differ", args.from.as_ref().unwrap().display(), &r.model_hash[..10]);
        }
    if !quiet {
        eprintln!("seed: {seed}{}", if n > 1 { format!(" .. {}", seed.wrapping_add(n as u64 - 1)) } else { String::new() });
    }
    let records: Vec<ImageRecord> = requests
        .iter()
        .map(|req| {
            let name = &model.files.name;
            ImageRecord::t2i(&req.prompt, req.negative.clone(), (width, height), req.seed, params, name, &model_hash, model_args.dtype.name())
        })
        .collect();
    render_and_save(&model, &jobs, &records, &args.output, &args.output_opts, load_secs)?;
    Ok(ExitCode::SUCCESS)
}

/// Run the jobs with progress, then write each image with its record; print a line per image.
pub fn render_and_save(
    model: &Model,
    jobs: &[tessera::generate::ImageJob],
    records: &[ImageRecord],
    output: &Path,
    opts: &OutputArgs,
    load_secs: f64,
) -> anyhow::Result<()> {
    let n = jobs.len();
    let mut reporter = Reporter::new(model, jobs, opts);
    let t_gen = Instant::now();
    let (images, codes, stats) = model.run_jobs(jobs, &mut |p| reporter.step(p))?;
    reporter.finish();
    let total_secs = t_gen.elapsed().as_secs_f64();
    for (i, ((img, record), codes)) in images.iter().zip(records).zip(&codes).enumerate() {
        let path = numbered(output, i, n);
        record.save_png(&path, img).with_context(|| format!("writing {}", path.display()))?;
        if opts.json {
            println!(
                "{}",
                serde_json::json!({
                    "path": path, "seed": record.seed, "width": record.width, "height": record.height,
                    "load_secs": load_secs, "prefill_secs": stats.prefill_secs, "decode_secs": stats.decode_secs,
                    "total_secs": total_secs,
                    "tokens_per_sec": (stats.steps as f64 + 1.0) * n as f64 / stats.decode_secs.max(1e-9),
                    "device": super::common::device_name(model.device()), "codes": codes,
                })
            );
        } else if !opts.quiet {
            eprintln!("wrote {} (seed {})", path.display(), record.seed);
        }
    }
    Ok(())
}
