//! The world: determinism, output formats, the benchmark, and the properties the training
//! pipeline relies on (exact palette, sizes, no overlaps, contrasting backgrounds). See: #3

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use tessera::world::palette::{self, Tint};
use tessera::world::render::object_box;
use tessera::world::{
    self, BENCH_SEED, Background, Category, Color, EditKind, Format, Sample, SampleOptions, Size, Task,
};

fn opts(task: Task, seed: u64, w: u32, h: u32) -> SampleOptions {
    SampleOptions { seed, width: w, height: h, task, categories: vec![], kinds: vec![], exclude_bench: true }
}

fn samples(o: &SampleOptions, n: u64) -> Vec<Sample> {
    (0..n).map(|i| world::generate(o, i).expect("sample")).collect()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn output_is_identical_whatever_the_thread_count() {
    let dirs: Vec<tempfile::TempDir> = [1, 2, 3]
        .into_iter()
        .map(|threads| {
            let dir = tempfile::tempdir().unwrap();
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for (task, sub) in [(Task::T2i, "t2i"), (Task::Edit, "edit")] {
                let out = dir.path().join(sub);
                pool.install(|| world::write_samples(&opts(task, 11, 96, 64), 40, &out, Format::Both)).unwrap();
            }
            dir
        })
        .collect();
    for sub in ["t2i", "edit"] {
        let first = dirs[0].path().join(sub);
        let mut names: Vec<_> = std::fs::read_dir(&first).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert!(names.len() > 40, "{sub}: only {} files", names.len());
        for d in &dirs[1..] {
            for name in &names {
                assert!(read(&first.join(name)) == read(&d.path().join(sub).join(name)), "{sub}/{name:?} differs");
            }
        }
    }
}

#[test]
fn raw_shard_holds_every_image_in_line_order() {
    let dir = tempfile::tempdir().unwrap();
    for task in [Task::T2i, Task::Edit] {
        let out = dir.path().join(format!("{task:?}"));
        let stats = world::write_samples(&opts(task, 5, 80, 112), 17, &out, Format::Both).unwrap();
        let lines = world::read_jsonl(&out.join("samples.jsonl")).unwrap();
        assert_eq!(lines.len(), 17);
        let raw = read(&out.join("images.u8"));
        let per = 80 * 112 * 3;
        assert_eq!(raw.len() as u64, stats.images * per as u64);
        let mut offset = 0;
        for s in &lines {
            let names = s.file_names();
            assert_eq!(names.len(), if task == Task::T2i { 1 } else { 2 });
            for name in names {
                let png = image::open(out.join(name)).unwrap().to_rgb8();
                assert_eq!(png.dimensions(), (80, 112));
                assert!(png.as_raw()[..] == raw[offset..offset + per], "{name} differs from images.u8");
                offset += per;
            }
        }
        assert_eq!(offset, raw.len());
        // `raw` alone writes the same shard and no PNG.
        let out2 = dir.path().join(format!("{task:?}-raw"));
        world::write_samples(&opts(task, 5, 80, 112), 17, &out2, Format::Raw).unwrap();
        assert!(read(&out2.join("images.u8")) == raw);
        assert_eq!(std::fs::read_dir(&out2).unwrap().count(), 2);
    }
}

/// The keys of one JSON line, in order.
fn keys(line: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let mut ks: Vec<(usize, String)> = v
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (line.find(&format!("\"{k}\":")).unwrap(), k.clone()))
        .collect();
    ks.sort();
    ks.into_iter().map(|(_, k)| k).collect()
}

#[test]
fn samples_jsonl_lines_have_the_documented_fields() {
    let t2i = serde_json::to_string(&world::generate(&opts(Task::T2i, 1, 128, 128), 0).unwrap()).unwrap();
    assert_eq!(keys(&t2i), ["id", "task", "category", "caption", "image", "width", "height", "spec"]);
    let edit = serde_json::to_string(&world::generate(&opts(Task::Edit, 1, 128, 128), 0).unwrap()).unwrap();
    assert_eq!(
        keys(&edit),
        ["id", "task", "category", "edit_kind", "instruction", "source", "target", "width", "height", "source_spec", "spec"]
    );
    assert!(edit.contains("\"task\":\"edit\"") && edit.contains("\"category\":\"edit\""));
    // A line reads back into the same sample.
    let back: Sample = serde_json::from_str(&edit).unwrap();
    assert_eq!(serde_json::to_string(&back).unwrap(), edit);
}

#[test]
fn committed_bench_is_reproducible_and_complete() {
    let bench = world::read_jsonl(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/eval/bench.jsonl"))).unwrap();
    let again = world::bench(BENCH_SEED, 100, 128, 128).unwrap();
    assert!(bench == again, "eval/bench.jsonl is not what `tessera world bench` writes");
    let mut per: BTreeMap<Category, usize> = BTreeMap::new();
    let mut kinds: BTreeMap<EditKind, usize> = BTreeMap::new();
    let mut prompts = HashSet::new();
    for s in &bench {
        *per.entry(s.category).or_default() += 1;
        if let Some(k) = s.edit_kind {
            *kinds.entry(k).or_default() += 1;
        }
        assert!(prompts.insert(world::normalize_prompt(s.prompt())), "duplicate prompt {}", s.prompt());
        assert_eq!((s.width, s.height), (128, 128));
    }
    for c in Category::BENCH.into_iter().chain([Category::Edit]) {
        assert!(per.get(&c).copied().unwrap_or(0) >= 100, "{c:?}: {:?}", per.get(&c));
    }
    assert_eq!(kinds.len(), EditKind::ALL.len());
}

#[test]
fn training_data_never_repeats_a_bench_prompt() {
    // Short captions collide often, so without the filter some bench prompts come out.
    let mut o = opts(Task::T2i, 123, 128, 128);
    o.categories = vec![Category::SingleObject, Category::Colors];
    o.exclude_bench = false;
    let unfiltered = samples(&o, 3000).iter().filter(|s| world::in_bench(s.prompt())).count();
    assert!(unfiltered > 0, "the test needs colliding captions");
    o.exclude_bench = true;
    assert_eq!(samples(&o, 3000).iter().filter(|s| world::in_bench(s.prompt())).count(), 0);
    let mut e = opts(Task::Edit, 123, 128, 128);
    e.kinds = vec![EditKind::Remove, EditKind::Background];
    assert_eq!(samples(&e, 2000).iter().filter(|s| world::in_bench(s.prompt())).count(), 0);
}

#[test]
fn scenes_are_learnable_exact_palette_sizes_no_overlap() {
    for (w, h) in [(128, 128), (192, 128), (96, 160)] {
        let unit = w.min(h) as f32 / 128.0;
        for task in [Task::T2i, Task::Edit] {
            for s in samples(&opts(task, 9, w, h), 300) {
                let scenes: Vec<&world::Scene> = s.source_spec.iter().chain([&s.spec.scene]).collect();
                for (scene, img) in scenes.iter().zip(s.render()) {
                    assert_eq!(img.dimensions(), (w, h));
                    let boxes: Vec<[f32; 4]> = scene.objects.iter().map(|o| object_box(o, w, h)).collect();
                    for (i, (o, b)) in scene.objects.iter().zip(&boxes).enumerate() {
                        // Inside the image, not touching another object.
                        assert!(b[0] >= 2.0 * unit && b[1] >= 2.0 * unit, "{}: {b:?}", s.id);
                        assert!(b[2] <= w as f32 - 2.0 * unit && b[3] <= h as f32 - 2.0 * unit, "{}: {b:?}", s.id);
                        for c in &boxes[i + 1..] {
                            let apart = b[2] + 3.0 <= c[0] || c[2] + 3.0 <= b[0] || b[3] + 3.0 <= c[1] || c[3] + 3.0 <= b[1];
                            assert!(apart, "{}: objects overlap", s.id);
                        }
                        // The extent matches the size class, and small is not tiny.
                        let px = o.extent * w.min(h) as f64 / unit as f64;
                        let (lo, hi) = match o.size {
                            Size::Small => (20.0, 22.0),
                            Size::Medium => (28.0, 32.0),
                            Size::Large => (40.0, 46.0),
                        };
                        assert!((lo - 0.05..=hi + 0.05).contains(&px), "{}: {:?} is {px} px", s.id, o.size);
                        // Interiors are exactly the palette colour.
                        let centre = img.get_pixel((o.x * w as f64) as u32, (o.y * h as f64) as u32).0;
                        assert_eq!(centre, o.color.rgb(), "{}: centre of {:?}", s.id, o.shape);
                        // The background contrasts with every object.
                        for bg in scene.background.colors() {
                            assert!(palette::dist(bg, o.color.rgb()) >= palette::TINT_CONTRAST, "{}", s.id);
                        }
                        assert_ne!(scene.background.plain(), Some(o.color));
                    }
                    if let Some(sign) = &scene.sign {
                        assert_ne!(scene.background.plain(), Some(sign.color));
                        assert!((1..=6).contains(&sign.word.len()));
                    }
                    match scene.background {
                        Background::Stripes { period, .. }
                        | Background::Checkerboard { period, .. }
                        | Background::Dots { period, .. } => assert_eq!(period % 8, 0),
                        _ => {}
                    }
                }
            }
        }
    }
}

#[test]
fn background_tints_are_never_mistaken_for_objects() {
    // Every point of every gradient the sampler can draw is nearer a tint than any palette
    // colour, with margin, so the judge sees background there.
    for fam in [Tint::LIGHT, Tint::DARK] {
        for a in fam {
            for b in fam {
                for k in 0..=20 {
                    let t = k as f32 / 20.0;
                    let p = [0, 1, 2].map(|i| (a.rgb()[i] as f32 + (b.rgb()[i] as f32 - a.rgb()[i] as f32) * t).round() as u8);
                    let near_tint = Tint::ALL.iter().map(|x| palette::dist(p, x.rgb())).fold(f32::MAX, f32::min);
                    let near_obj = Color::ALL.iter().map(|x| palette::dist(p, x.rgb())).fold(f32::MAX, f32::min);
                    assert!(near_obj > near_tint + 15.0, "{a:?}->{b:?} at {t}: {p:?}");
                }
            }
        }
    }
}

#[test]
fn captions_have_real_variety() {
    let all = samples(&opts(Task::T2i, 77, 128, 128), 3000);
    let caps: Vec<&str> = all.iter().map(|s| s.prompt()).collect();
    let has = |needle: &str| caps.iter().any(|c| c.contains(needle));
    for phrase in [
        "draw ", "to the left of", " left of", "above", "below", "three", " 3 ", "background", "that says", "reads",
        "grey", "gray", "in the top left", "and a", "there are", "stripes",
    ] {
        assert!(has(phrase), "no caption contains {phrase:?}");
    }
    // Many different shapes of sentence, not one template per category.
    let skeleton = |c: &str| -> String {
        c.split_whitespace()
            .map(|w| if w.chars().all(|ch| ch.is_ascii_lowercase() || ch == '-') { w } else { "_" })
            .filter(|w| !["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey", "violet"].contains(w))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let distinct: HashSet<String> = caps.iter().map(|c| skeleton(c)).collect();
    assert!(distinct.len() > 500, "only {} caption skeletons", distinct.len());
    let edits = samples(&opts(Task::Edit, 77, 128, 128), 700);
    let first: HashSet<&str> = edits.iter().filter_map(|s| s.prompt().split_whitespace().next()).collect();
    assert!(first.len() >= 15, "edit instructions start with only {first:?}");
}

#[test]
fn bad_sizes_are_errors_not_panics() {
    assert!(world::generate(&opts(Task::T2i, 0, 8, 8), 0).is_err());
    assert!(world::generate(&opts(Task::Edit, 0, 128, 100_000), 0).is_err());
    let mut o = opts(Task::T2i, 0, 128, 128);
    o.categories = vec![Category::Edit];
    assert!(world::generate(&o, 0).is_err());
}
