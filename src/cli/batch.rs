//! `tessera batch`: render a prompt file with one loaded model.
//!
//! Input: a text file (one prompt per line) or JSONL (`prompt`, `seed`, `size`, `cfg`,
//! `negative`, `n`, `name`, `temperature`, `top_k`, `top_p`, and for edits `image` with
//! `edit` (an instruction), `mask` or `keep_rows`). Output: one PNG per image in `--out-dir`
//! and `manifest.jsonl`, a line per finished image. Re-running skips what the manifest lists;
//! images are written to a temporary file and renamed, and listed only once they exist, so a
//! killed run leaves no partial PNG. `--shard I/N` renders every N-th item from I.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tessera::generate::{ImageJob, batches};
use tessera::image_io;
use tessera::metadata::ImageRecord;
use tessera::model::Model;
use tessera::pipeline::{EditMode, EditRequest, T2iRequest, mask_cells};

use super::common::ModelArgs;
use super::generate::{SamplingArgs, parse_size};
use super::progress::Reporter;

#[derive(Debug, Args)]
pub struct BatchArgs {
    /// Prompt file: plain text (one prompt per line) or JSONL (one request object per line).
    pub prompts: PathBuf,

    /// Directory for the images and manifest.jsonl (created if missing).
    #[arg(long)]
    pub out_dir: PathBuf,

    /// Images decoded together in one batch.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub batch_size: u32,

    /// Render only share I of N (0-based), e.g. 3/10: item k is rendered by shard k mod N.
    #[arg(long, value_parser = parse_shard, default_value = "0/1")]
    pub shard: (usize, usize),

    /// Default size WIDTHxHEIGHT for lines that give none [default: the model's].
    #[arg(long, value_parser = parse_size)]
    pub size: Option<(u32, u32)>,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    #[command(flatten)]
    pub model: ModelArgs,

    /// No progress bar or messages on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("shard {s:?} must look like I/N with 0 <= I < N, e.g. 0/4");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// One line of a JSONL prompt file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    prompt: Option<String>,
    seed: Option<u64>,
    size: Option<String>,
    cfg: Option<f64>,
    negative: Option<String>,
    n: Option<u32>,
    name: Option<String>,
    temperature: Option<f64>,
    top_k: Option<usize>,
    top_p: Option<f64>,
    /// An instruction: edit `image` by it.
    edit: Option<String>,
    image: Option<PathBuf>,
    mask: Option<PathBuf>,
    keep_rows: Option<usize>,
}

/// One image to render.
struct Item {
    line: usize,
    name: String,
    record: ImageRecord,
    kind: ItemKind,
}

enum ItemKind {
    T2i(T2iRequest),
    Edit(EditRequest),
}

/// A file-name slug: lowercase letters, digits and '-', at most 60 characters.
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().flat_map(|c| c.to_lowercase()) {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
        if out.len() >= 60 {
            break;
        }
    }
    let out = out.trim_matches('-').to_string();
    if out.is_empty() { "image".into() } else { out }
}

fn default_seed(line: usize, i: usize, text: &str) -> u64 {
    let h = Sha256::digest(format!("{line}\0{i}\0{text}").as_bytes());
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) >> 11
}

fn read_lines(path: &Path) -> anyhow::Result<Vec<(usize, String)>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading prompt file {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: not valid UTF-8 text", path.display(), i + 1))?;
        if !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            out.push((i + 1, line));
        }
    }
    Ok(out)
}

fn is_jsonl(path: &Path, lines: &[(usize, String)]) -> bool {
    path.extension().is_some_and(|e| e == "jsonl" || e == "json")
        || lines.first().is_some_and(|(_, l)| l.trim_start().starts_with('{'))
}

/// Manifest lines already written: the names of images that exist.
fn read_manifest(path: &Path, out_dir: &Path) -> anyhow::Result<HashSet<String>> {
    let mut done = HashSet::new();
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(done) };
    // A run killed mid-append can leave a partial last line: cut it off.
    if !text.is_empty() && !text.ends_with('\n') {
        let keep = text.rfind('\n').map_or(0, |i| i + 1);
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(keep as u64)?;
    }
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
            && let Some(name) = v["file"].as_str()
                && out_dir.join(name).is_file() {
                    done.insert(name.to_string());
                }
    }
    Ok(done)
}

pub fn run(args: BatchArgs) -> anyhow::Result<ExitCode> {
    args.sampling.check()?;
    let lines = read_lines(&args.prompts)?;
    if lines.is_empty() {
        bail!("prompt file {} has no prompts", args.prompts.display());
    }
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("creating {}", args.out_dir.display()))?;
    let manifest_path = args.out_dir.join("manifest.jsonl");
    let done = read_manifest(&manifest_path, &args.out_dir)?;
    let t_load = Instant::now();
    let model = args.model.load(args.quiet)?;
    let load_secs = t_load.elapsed().as_secs_f64();
    let model_hash = model.content_hash()?;
    let jsonl = is_jsonl(&args.prompts, &lines);
    let prompts_dir = args.prompts.parent().map(Path::to_path_buf).unwrap_or_default();

    let mut failed = 0usize;
    let mut items = Vec::new();
    let mut names = HashSet::new();
    for (ln, text) in &lines {
        let fail = |e: anyhow::Error| eprintln!("{}:{ln}: {e:#}", args.prompts.display());
        let parsed = if jsonl {
            serde_json::from_str::<Line>(text).map_err(|e| anyhow::anyhow!("malformed JSON line: {e}"))
        } else {
            Ok(Line { prompt: Some(text.trim().to_string()), ..Default::default() })
        };
        match parsed.and_then(|line| expand(&args, &model, &model_hash, &prompts_dir, *ln, line)) {
            Ok(mut new) => {
                for item in &mut new {
                    // Two lines asking for one name keep both images.
                    while !names.insert(item.name.clone()) {
                        item.name = format!("{}-l{}", item.name.trim_end_matches(".png"), item.line) + ".png";
                    }
                }
                items.extend(new)
            }
            Err(e) => {
                fail(e);
                failed += 1;
            }
        }
    }
    let (shard, shards) = args.shard;
    let total = items.len();
    let pending: Vec<Item> = items
        .into_iter()
        .enumerate()
        .filter(|(k, _)| k % shards == shard)
        .map(|(_, it)| it)
        .filter(|it| !done.contains(&it.name))
        .collect();
    if !args.quiet {
        eprintln!(
            "{} images in {}, shard {shard}/{shards}: {} to render, {} already done",
            total,
            args.prompts.display(),
            pending.len(),
            done.len()
        );
    }
    let mut manifest = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&manifest_path)
        .with_context(|| format!("opening {}", manifest_path.display()))?;

    // Decode items of one kind of job and one grid together.
    let mut items = Vec::with_capacity(pending.len());
    for item in pending {
        let job = match &item.kind {
            ItemKind::T2i(r) => model.t2i_job(r),
            ItemKind::Edit(r) => model.edit_job(r),
        };
        match job {
            Ok(job) => {
                let edit = matches!(item.kind, ItemKind::Edit(_));
                items.push((item, edit, job));
            }
            Err(e) => {
                eprintln!("{}:{}: {e}", args.prompts.display(), item.line);
                failed += 1;
            }
        }
    }
    let out_opts = super::generate::OutputArgs { quiet: args.quiet, json: false, preview: false };
    for chunk in batches(items, args.batch_size as usize) {
        let jobs: Vec<ImageJob> = chunk.iter().map(|(_, j)| j.clone()).collect();
        let mut reporter = Reporter::new(&model, &jobs, &out_opts);
        let t0 = Instant::now();
        let result = model.run_jobs(&jobs, &mut |p| reporter.step(p));
        reporter.finish();
        let (images, _, stats) = match result {
            Ok(r) => r,
            Err(e) => {
                for (item, _) in &chunk {
                    eprintln!("{}:{}: {e}", args.prompts.display(), item.line);
                }
                failed += chunk.len();
                continue;
            }
        };
        let secs = t0.elapsed().as_secs_f64() / chunk.len() as f64;
        for ((item, _), img) in chunk.iter().zip(&images) {
            let path = args.out_dir.join(&item.name);
            item.record.save_png(&path, img).with_context(|| format!("writing {}", path.display()))?;
            let line = serde_json::json!({
                "file": item.name, "line": item.line, "record": item.record,
                "secs": secs, "decode_secs": stats.decode_secs, "load_secs": load_secs,
            });
            manifest
                .write_all(format!("{line}\n").as_bytes())
                .and_then(|_| manifest.sync_data())
                .with_context(|| format!("appending to {}", manifest_path.display()))?;
            if !args.quiet {
                eprintln!("wrote {}", path.display());
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} line(s) or image(s) failed; see the messages above");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// One prompt-file line -> its images (n of them).
fn expand(
    args: &BatchArgs,
    model: &Model,
    model_hash: &str,
    prompts_dir: &Path,
    ln: usize,
    line: Line,
) -> anyhow::Result<Vec<Item>> {
    let sampling = SamplingArgs {
        seed: line.seed.or(args.sampling.seed),
        cfg: line.cfg.or(args.sampling.cfg),
        negative: line.negative.clone().or(args.sampling.negative.clone()),
        temperature: line.temperature.or(args.sampling.temperature),
        top_k: line.top_k.or(args.sampling.top_k),
        top_p: line.top_p.or(args.sampling.top_p),
    };
    sampling.check()?;
    let params = sampling.resolve(model, None);
    let edit_params = sampling.resolve_edit(model);
    let n = line.n.unwrap_or(1);
    if n == 0 || n > 256 {
        bail!("\"n\": {n} must be between 1 and 256");
    }
    let size = match &line.size {
        Some(s) => Some(parse_size(s).map_err(|e| anyhow::anyhow!(e))?),
        None => args.size,
    };
    let text = line.edit.clone().or(line.prompt.clone()).ok_or_else(|| anyhow::anyhow!("no \"prompt\" (or \"edit\")"))?;
    tessera::pipeline::check_prompt(&text)?;
    let base = match &line.name {
        Some(name) => {
            
            slug(name.trim_end_matches(".png"))
        }
        None => format!("{}-l{ln}", slug(&text)),
    };
    let resolve = |p: &PathBuf| if p.is_absolute() { p.clone() } else { prompts_dir.join(p) };
    let source = match &line.image {
        Some(p) => Some(image_io::load_image(&resolve(p))?),
        None => None,
    };
    if source.is_none() && (line.edit.is_some() || line.mask.is_some() || line.keep_rows.is_some()) {
        bail!("\"edit\", \"mask\" and \"keep_rows\" need an \"image\"");
    }
    let mut out = Vec::new();
    for i in 0..n as usize {
        let seed = match sampling.seed {
            Some(s) => s.wrapping_add(i as u64),
            None => default_seed(ln, i, &text),
        };
        let name = if n > 1 { format!("{base}-{i}.png") } else { format!("{base}.png") };
        let mut record = ImageRecord {
            keep_rows: line.keep_rows,
            ..ImageRecord::t2i(&text, sampling.negative.clone(), (0, 0), seed, params, &model.files.name, model_hash, args.model.dtype.name())
        };
        let kind = match &source {
            None => {
                let (w, h) = size.unwrap_or(model.default_size());
                model.grid_for(w, h)?;
                (record.width, record.height) = (w, h);
                ItemKind::T2i(T2iRequest { prompt: text.clone(), negative: sampling.negative.clone(), width: w, height: h, params, seed })
            }
            Some(img) => {
                let (w, h) = model.edit_size(img.width(), img.height(), size)?;
                let grid = model.grid_for(w, h)?;
                let mode = match (&line.mask, line.keep_rows) {
                    (Some(m), _) => EditMode::Mask(mask_cells(&image_io::load_image(&resolve(m))?, w, h, grid)),
                    (None, Some(k)) => EditMode::KeepRows(k),
                    (None, None) => EditMode::Instruction,
                };
                if matches!(mode, EditMode::Instruction) {
                    record.params = edit_params;
                }
                record.task = "edit".into();
                (record.width, record.height) = (w, h);
                ItemKind::Edit(EditRequest {
                    prompt: text.clone(),
                    negative: sampling.negative.clone(),
                    source: image_io::resize(img, w, h),
                    mode,
                    params: record.params,
                    seed,
                })
            }
        };
        out.push(Item { line: ln, name, record, kind });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_stay_inside_the_directory() {
        assert_eq!(slug("A Red Circle!"), "a-red-circle");
        assert_eq!(slug("../../etc/passwd"), "etc-passwd");
        assert_eq!(slug("/"), "image");
        assert_eq!(slug("..."), "image");
        assert!(slug(&"x".repeat(500)).len() <= 60);
    }

    #[test]
    fn shards_parse() {
        assert_eq!(parse_shard("3/10").unwrap(), (3, 10));
        assert!(parse_shard("10/10").is_err());
        assert!(parse_shard("1/0").is_err());
        assert!(parse_shard("x").is_err());
    }
}
