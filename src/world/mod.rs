//! The world: a seeded, deterministic generator of simple scenes (shapes, colours, counts,
//! positions, signs with text), their captions, and edit triples, for training and for the
//! benchmark the judge scores.
//!
//! - `spec`: the structured scene and claim types (what `samples.jsonl` holds)
//! - `palette`, `shapes`, `font`: the fixed colours, outlines and 5x7 font
//! - `render`: scene -> image
//! - `sampler`, `caption`, `edit`: random scenes with captions, and edits with instructions
//! - `writer`: `samples.jsonl` + PNG / raw uint8 shards, in parallel, and the fixed benchmark

pub mod caption;
pub mod edit;
pub mod font;
pub mod palette;
pub mod render;
pub mod sampler;
pub mod shapes;
pub mod spec;
pub mod writer;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use image::RgbImage;
use serde::{Deserialize, Serialize};

pub use palette::{Color, Tint};
pub use render::render;
pub use spec::{
    Background, Cell, Claims, EditKind, EditSpec, Object, ObjectClaim, Rel, Relation, Scene, Shape, Sign, Size, Spec,
    TextClaim,
};
pub use writer::{Format, Stats, bench, write_samples};

/// The seed of `eval/bench.jsonl` (`tessera world bench`). Training data may use any seed: the
/// generator refuses benchmark prompts whatever the seed.
pub const BENCH_SEED: u64 = 20_260_101;

/// Smallest and largest supported image side.
pub const MIN_SIDE: u32 = 64;
pub const MAX_SIDE: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    #[error("image size {0}x{1} is not supported: each side must be between {MIN_SIDE} and {MAX_SIDE} pixels")]
    Size(u32, u32),
    #[error("could not lay out a {what} scene after many tries (is the image too small?)")]
    Placement { what: String },
    #[error("`edit` is not a text-to-image category; use --task edit")]
    NotT2i,
    #[error("no caption outside the benchmark after {0} tries")]
    BenchCollision(usize),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {msg}")]
    Line { path: PathBuf, line: usize, msg: String },
    #[error("{path}: {source}")]
    Image { path: PathBuf, source: image::ImageError },
}

/// What a sample asks for: an image from a caption, or an edit of a source image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Task {
    #[serde(rename = "t2i")]
    T2i,
    #[serde(rename = "edit")]
    Edit,
}

/// The benchmark categories (GenEval's six, plus text and edit) and the general `scene`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    SingleObject,
    TwoObjects,
    Counting,
    Colors,
    Position,
    ColorAttr,
    Text,
    Scene,
    Edit,
}

impl Category {
    /// The t2i categories of the benchmark, in report order.
    pub const BENCH: [Category; 7] = [
        Category::SingleObject,
        Category::TwoObjects,
        Category::Counting,
        Category::Colors,
        Category::Position,
        Category::ColorAttr,
        Category::Text,
    ];
    /// Every t2i category (the benchmark's plus `scene`), the default mix of `world sample`.
    pub const T2I: [Category; 8] = [
        Category::SingleObject,
        Category::TwoObjects,
        Category::Counting,
        Category::Colors,
        Category::Position,
        Category::ColorAttr,
        Category::Text,
        Category::Scene,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Category::SingleObject => "single_object",
            Category::TwoObjects => "two_objects",
            Category::Counting => "counting",
            Category::Colors => "colors",
            Category::Position => "position",
            Category::ColorAttr => "color_attr",
            Category::Text => "text",
            Category::Scene => "scene",
            Category::Edit => "edit",
        }
    }

    pub fn from_name(name: &str) -> Option<Category> {
        Category::T2I.into_iter().chain([Category::Edit]).find(|c| c.name() == name)
    }
}

/// One line of `samples.jsonl` (and of the benchmark).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub id: String,
    pub task: Task,
    pub category: Category,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit_kind: Option<EditKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instruction: Option<String>,
    /// The t2i image file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The edit's source image file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The edit's target image file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub width: u32,
    pub height: u32,
    /// The edit's source scene.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_spec: Option<Scene>,
    /// The (target) scene and what the prompt claims about it.
    pub spec: Spec,
}

impl Sample {
    /// Check the fields a task needs are there and the size is supported.
    pub fn validate(&self) -> Result<(), String> {
        let side = MIN_SIDE..=MAX_SIDE;
        if !side.contains(&self.width) || !side.contains(&self.height) {
            return Err(format!("size {}x{} is outside {MIN_SIDE}..={MAX_SIDE}", self.width, self.height));
        }
        let task = if self.task == Task::T2i { "t2i" } else { "edit" };
        let missing = |f: &str| Err(format!("{task} sample `{}` has no `{f}`", self.id));
        match self.task {
            Task::T2i if self.caption.is_none() => missing("caption"),
            Task::T2i if self.image.is_none() => missing("image"),
            Task::Edit if self.instruction.is_none() => missing("instruction"),
            Task::Edit if self.target.is_none() => missing("target"),
            Task::Edit if self.source_spec.is_none() => missing("source_spec"),
            Task::Edit if self.spec.edit.is_none() => missing("spec.edit"),
            _ => Ok(()),
        }
    }

    /// The caption (t2i) or the instruction (edit).
    pub fn prompt(&self) -> &str {
        self.caption.as_deref().or(self.instruction.as_deref()).unwrap_or("")
    }

    /// The file the judge scores: `image` for t2i, `target` for edits.
    pub fn judged_file(&self) -> Option<&str> {
        match self.task {
            Task::T2i => self.image.as_deref(),
            Task::Edit => self.target.as_deref(),
        }
    }

    /// The image file names in `render` order: `[image]` for t2i, `[source, target]` for edits.
    pub fn file_names(&self) -> Vec<&str> {
        [self.image.as_deref(), self.source.as_deref(), self.target.as_deref()].into_iter().flatten().collect()
    }

    /// The ground-truth images: `[image]` for t2i, `[source, target]` for edits.
    pub fn render(&self) -> Vec<RgbImage> {
        let mut out = Vec::with_capacity(2);
        if let Some(src) = &self.source_spec {
            out.push(render(src, self.width, self.height));
        }
        out.push(render(&self.spec.scene, self.width, self.height));
        out
    }
}

/// How `generate` draws samples.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub task: Task,
    /// t2i categories to draw from (uniformly); empty means `Category::T2I`.
    pub categories: Vec<Category>,
    /// Edit kinds to draw from (uniformly); empty means all.
    pub kinds: Vec<EditKind>,
    /// Resample any caption or instruction that appears in the benchmark (true for training).
    pub exclude_bench: bool,
}

impl SampleOptions {
    pub fn check(&self) -> Result<(), WorldError> {
        let ok = |v: u32| (MIN_SIDE..=MAX_SIDE).contains(&v);
        if ok(self.width) && ok(self.height) { Ok(()) } else { Err(WorldError::Size(self.width, self.height)) }
    }
}

/// Sample `index` of the run described by `opts` (its images are `Sample::render`).
pub fn generate(opts: &SampleOptions, index: u64) -> Result<Sample, WorldError> {
    opts.check()?;
    let mut rng = sampler::sample_rng(opts.seed, index);
    let (w, h) = (opts.width, opts.height);
    let id = format!("{}-s{}-{index:07}", if opts.task == Task::T2i { "t2i" } else { "edit" }, opts.seed);
    const TRIES: usize = 1000;
    for _ in 0..TRIES {
        let sample = match opts.task {
            Task::T2i => {
                let cats = if opts.categories.is_empty() { &Category::T2I[..] } else { &opts.categories[..] };
                let category = sampler::pick(&mut rng, cats);
                let d = sampler::sample_t2i(&mut rng, category, w, h)?;
                t2i_sample(id.clone(), category, d, w, h)
            }
            Task::Edit => {
                let kinds = if opts.kinds.is_empty() { &EditKind::ALL[..] } else { &opts.kinds[..] };
                let kind = sampler::pick(&mut rng, kinds);
                edit_sample(id.clone(), edit::sample_edit(&mut rng, kind, w, h)?, w, h)
            }
        };
        if !opts.exclude_bench || !in_bench(sample.prompt()) {
            return Ok(sample);
        }
    }
    Err(WorldError::BenchCollision(TRIES))
}

pub(crate) fn t2i_sample(id: String, category: Category, d: sampler::Draft, w: u32, h: u32) -> Sample {
    Sample {
        image: Some(format!("{id}.png")),
        id,
        task: Task::T2i,
        category,
        edit_kind: None,
        caption: Some(d.caption),
        instruction: None,
        source: None,
        target: None,
        width: w,
        height: h,
        source_spec: None,
        spec: Spec { scene: d.scene, claims: d.claims, edit: None },
    }
}

pub(crate) fn edit_sample(id: String, d: edit::EditDraft, w: u32, h: u32) -> Sample {
    Sample {
        source: Some(format!("{id}-source.png")),
        target: Some(format!("{id}-target.png")),
        id,
        task: Task::Edit,
        category: Category::Edit,
        edit_kind: Some(d.kind),
        caption: None,
        instruction: Some(d.instruction),
        image: None,
        width: w,
        height: h,
        source_spec: Some(d.source),
        spec: d.target,
    }
}

/// Read a samples.jsonl or bench file. Errors name the file and the 1-based line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Sample>, WorldError> {
    Ok(read_jsonl_numbered(path)?.into_iter().map(|(_, s)| s).collect())
}

/// `read_jsonl`, with each sample's 1-based line number.
pub fn read_jsonl_numbered(path: &Path) -> Result<Vec<(usize, Sample)>, WorldError> {
    let text = std::fs::read_to_string(path).map_err(|source| WorldError::Io { path: path.to_path_buf(), source })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| WorldError::Line { path: path.to_path_buf(), line: i + 1, msg };
        let s: Sample = serde_json::from_str(line).map_err(|e| err(format!("malformed sample: {e}")))?;
        s.validate().map_err(err)?;
        out.push((i + 1, s));
    }
    Ok(out)
}

/// The benchmark, embedded so that training data can never repeat one of its prompts.
const BENCH_JSONL: &str = include_str!("../../eval/bench.jsonl");

/// Lowercase, drop quotes and trailing full stops, collapse whitespace.
pub fn normalize_prompt(p: &str) -> String {
    let cleaned: String = p.chars().filter(|c| *c != '"').collect::<String>().to_lowercase();
    cleaned.split_whitespace().collect::<Vec<_>>().join(" ").trim_end_matches('.').to_string()
}

/// Whether `prompt` (normalized) is a caption or instruction of the embedded benchmark.
pub fn in_bench(prompt: &str) -> bool {
    static SET: OnceLock<HashSet<String>> = OnceLock::new();
    let set = SET.get_or_init(|| {
        BENCH_JSONL
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| {
                let p = v.get("caption").or_else(|| v.get("instruction"))?;
                p.as_str().map(normalize_prompt)
            })
            .collect()
    });
    set.contains(&normalize_prompt(prompt))
}
