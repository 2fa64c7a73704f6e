//! `tessera eval`: judge the images named by a bench (or samples) file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use rayon::prelude::*;

use tessera::judge::{self, Report, Verdict};
use tessera::world;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Bench file (eval/bench.jsonl, or any samples.jsonl written by `world sample`).
    #[arg(long)]
    pub bench: PathBuf,
    /// Directory holding the images the bench names (`image` for t2i, `target` for edits).
    #[arg(long)]
    pub images: PathBuf,
    /// Print one JSON object: a field per category and `overall`.
    #[arg(long)]
    pub json: bool,
    /// Also print every failing sample with the reason, to stderr.
    #[arg(long)]
    pub failures: bool,
}

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let bench = args.bench.display().to_string();
    let samples = world::read_jsonl_numbered(&args.bench)?;
    if samples.is_empty() {
        bail!("{bench}: no samples");
    }
    let verdicts: Vec<Verdict> = samples
        .par_iter()
        .map(|(line, s)| -> anyhow::Result<Verdict> {
            let at = || format!("{bench}:{line}");
            let name = s.judged_file().with_context(|| format!("{}: sample `{}` names no image", at(), s.id))?;
            let path = args.images.join(name);
            let img = image::open(&path)
                .with_context(|| format!("{}: cannot read image {}", at(), path.display()))?
                .to_rgb8();
            if img.dimensions() != (s.width, s.height) {
                bail!(
                    "{}: image {} is {}x{}, the sample says {}x{}",
                    at(),
                    path.display(),
                    img.width(),
                    img.height(),
                    s.width,
                    s.height
                );
            }
            Ok(judge::judge(s, &img))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut report = Report::new();
    for ((line, s), v) in samples.iter().zip(&verdicts) {
        report.add(s.category, v);
        if args.failures && !v.pass {
            eprintln!("FAIL {bench}:{line} {} [{}] \"{}\": {}", s.id, s.category.name(), s.prompt(), v.reason);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}
