//! Speed of the decode loop and its neighbours on one checkpoint (issue 6, "measure first").
//!
//! ```sh
//! python scripts/make_random_model.py --preset default --out DIR --tessera-grids
//! TESSERA_BENCH_MODEL=DIR RAYON_NUM_THREADS=2 cargo bench --bench decode [-- SECTION...]
//! TESSERA_BENCH_MODEL=shipped RAYON_NUM_THREADS=2 cargo bench --bench decode -- vq vqenc
//! ```
//!
//! `TESSERA_BENCH_MODEL=shipped` times the model shipped in this repository (`weights/` and
//! `tokenizer/`), any other value is a transformers checkpoint directory.
//!
//! Sections (all by default): `step` one decode step at batch 2 (conditional + unconditional
//! row, after the prefill of a ~20-token prompt, and again near the end of a 16x16 image),
//! `image` a whole 16x16-token image with CFG, `batch8` eight such images in one batch,
//! `vq` VQ decode of one 16x16 code grid (128x128 pixels with the default model), `vqenc` VQ
//! encode of one image of that size (a smooth synthetic pattern) into codes, `load`
//! model load (mmap + build). Every figure is the median over repeats
//! (`TESSERA_BENCH_REPEATS` scales them). A plain harness: `cargo bench --no-run` only
//! builds it, and without `TESSERA_BENCH_MODEL` it measures nothing.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use tessera::generate::{HeadRows, ImageJob, generate};
use tessera::model::{LoadOptions, Model, ModelFiles};
use tessera::pipeline::T2iRequest;
use tessera::sampler::{Sampler, SamplingParams};
use tessera::text::Cache;

const PROMPT: &str = "a red circle above a blue square, masterpiece, film grained, best quality.";
const GRID: (usize, usize) = (16, 16);

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { 0.5 * (xs[n / 2 - 1] + xs[n / 2]) }
}

/// Run `f` `warmup` + `n` times; the median and the spread (min, max) of the timed runs, in seconds.
fn time_it(warmup: usize, n: usize, mut f: impl FnMut()) -> (f64, f64, f64) {
    for _ in 0..warmup {
        f();
    }
    let mut ts: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    let (lo, hi) = ts.iter().fold((f64::MAX, 0f64), |(lo, hi), &t| (lo.min(t), hi.max(t)));
    (median(&mut ts), lo, hi)
}

fn report(name: &str, n: usize, (med, lo, hi): (f64, f64, f64), extra: &str) {
    println!("{name:<34} median {:>10.3} ms  (min {:.3}, max {:.3}, n={n}){extra}", med * 1e3, lo * 1e3, hi * 1e3);
}

fn repeats(base: usize) -> usize {
    let scale: f64 = std::env::var("TESSERA_BENCH_REPEATS").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    ((base as f64 * scale).round() as usize).max(1)
}

fn jobs(model: &Model, n: usize, params: SamplingParams) -> Vec<ImageJob> {
    let s = model.spatial_factor() as u32;
    (0..n)
        .map(|i| {
            model
                .t2i_job(&T2iRequest {
                    prompt: PROMPT.into(),
                    negative: None,
                    width: GRID.1 as u32 * s,
                    height: GRID.0 as u32 * s,
                    params,
                    seed: i as u64,
                })
                .expect("t2i job")
        })
        .collect()
}

/// The prefill `generate` does for one guided job: rows [cond, uncond], left-padded.
fn prefill(model: &Model, job: &ImageJob, max_len: usize) -> (Cache, Tensor) {
    let rows = [&job.prompt, &job.negative];
    let longest = rows.iter().map(|r| r.len()).max().unwrap();
    let pad: Vec<usize> = rows.iter().map(|r| longest - r.len()).collect();
    let mut ids = Vec::new();
    for (r, &p) in rows.iter().zip(&pad) {
        ids.extend(std::iter::repeat_n(model.prompter.vocab.pad, p));
        ids.extend_from_slice(r);
    }
    let mut cache = model.text.new_cache(pad, max_len);
    let input = Tensor::from_vec(ids, (2, longest), model.device()).unwrap();
    let hidden = model.text.forward_hidden(&input, &mut cache).unwrap();
    let last = hidden.narrow(1, longest - 1, 1).unwrap();
    (cache, last)
}

/// Bytes one decode step reads at batch `rows` with `kv_len` cached positions: every LM
/// weight except the embedding table (of which only `rows` rows), the visual rows of the
/// LM head, and the K/V cache. The linear layers' weights are counted as the head streams
/// them (2 bytes for f16 CPU panels, 34/32 for Q8_0), the rest in the model's dtype.
fn step_bytes(model: &Model, head: &HeadRows, rows: usize, kv_len: usize) -> (usize, usize) {
    let c = &model.config.text_config;
    let (d, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
    let (h, kv) = (c.num_attention_heads, c.num_kv_heads());
    let linear = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * i;
    let k = model.prompter.vocab.codebook_size();
    let elt = model.text.dtype().size_in_bytes();
    let lin_bytes = ((c.num_hidden_layers * linear + k * d) as f64 * head.bytes_per_weight()) as usize;
    let weights = lin_bytes + (c.num_hidden_layers * 2 * d + d + rows * d) * elt;
    let kv_bytes = c.num_hidden_layers * 2 * rows * kv * kv_len * hd * elt;
    (weights, kv_bytes)
}

fn bench_step(model: &Model) {
    let job = &jobs(model, 1, SamplingParams::greedy(3.0))[0];
    let vocab = &model.prompter.vocab;
    let head = model.text.head_rows(vocab.visual_ids()).unwrap();
    let max_len = job.prompt.len().max(job.negative.len()) + tessera::tokens::block_len(GRID.0, GRID.1);
    let (cache0, last0) = prefill(model, job, max_len);
    let prompt_len = cache0.len();
    let mut sampler = Sampler::new(job.params, 0);
    let mut guided = Vec::new();
    let code_tok = vocab.code_id(7);
    let n = repeats(30);

    // Cloned caches share their storage (candle's KvCache writes in place), so each timed
    // step writes the same slot of the same buffers; nothing grows between repeats.
    let mut at = |cache: &Cache, last: &Tensor, label: &str| {
        let kv_len = cache.len() + 1;
        let (wb, kb) = step_bytes(model, &head, 2, kv_len);
        let full = time_it(3, n, || {
            let mut c = cache.clone();
            let logits = head.forward_rows(last).unwrap();
            sampler.guide(&logits[0], Some(&logits[1]), &mut guided);
            let code = sampler.sample(&guided) as u32;
            let t = vocab.code_id(code);
            let input = Tensor::from_vec(vec![t, t], (2, 1), model.device()).unwrap();
            model.text.forward_hidden(&input, &mut c).unwrap();
        });
        let extra = format!("  {:.1} steps/s, reads {:.1} MB weights + {:.2} MB KV", 1.0 / full.0, wb as f64 / 1e6, kb as f64 / 1e6);
        report(&format!("step b=2 {label} (kv {kv_len})"), n, full, &extra);
        let fwd = time_it(3, n, || {
            let mut c = cache.clone();
            let input = Tensor::from_vec(vec![code_tok, code_tok], (2, 1), model.device()).unwrap();
            model.text.forward_hidden(&input, &mut c).unwrap();
        });
        report("  of which forward_hidden", n, fwd, "");
        let hd = time_it(3, n, || {
            let logits = head.forward_rows(last).unwrap();
            sampler.guide(&logits[0], Some(&logits[1]), &mut guided);
            sampler.sample(&guided);
        });
        report("  of which head + CFG + argmax", n, hd, "");
    };
    at(&cache0, &last0, "after prefill");

    // Near the end of the image: feed the rows, then time the step from there.
    let mut cache = cache0.clone();
    let mut last = last0.clone();
    let feed = tessera::tokens::block_len(GRID.0, GRID.1) - 4;
    for _ in 0..feed {
        let input = Tensor::from_vec(vec![code_tok, code_tok], (2, 1), model.device()).unwrap();
        last = model.text.forward_hidden(&input, &mut cache).unwrap();
    }
    at(&cache, &last, "at image end");
    println!("  (prompt rows: {} tokens after padding)", prompt_len);
}

fn bench_image(model: &Model, count: usize, base_repeats: usize) {
    // What `gen` uses: the model's recommended settings (the shipped model: cfg 3,
    // temperature 1, top-k 64).
    let params = model.recommended_params();
    let js = jobs(model, count, params);
    let n = repeats(base_repeats);
    let mut steps = 0;
    // Wall time between consecutive progress callbacks = one step of the loop (head,
    // sampling, forward), as the real decode sees it.
    let mut step_times: Vec<f64> = Vec::new();
    let r = time_it(if count == 1 { 1 } else { 0 }, n, || {
        let mut last = Instant::now();
        let mut on_step = |_: &tessera::generate::Progress| {
            let now = Instant::now();
            step_times.push((now - last).as_secs_f64());
            last = now;
        };
        let (_, stats) = generate(&model.text, &model.prompter.vocab, &js, &mut on_step).unwrap();
        steps = stats.steps;
    });
    let tokens = tessera::tokens::block_len(GRID.0, GRID.1);
    let label = format!("image {}x{} cfg 3, n={count}", GRID.0, GRID.1);
    let extra = format!(
        "  {:.1} tokens/s, {:.3} images/s ({steps} forward steps + prefill)",
        (tokens * count) as f64 / r.0,
        count as f64 / r.0
    );
    report(&label, n, r, &extra);
    let m = median(&mut step_times);
    println!("  median loop step inside the image: {:.3} ms ({} steps timed)", m * 1e3, step_times.len());
}

fn bench_vq(model: &Model) {
    let k = model.prompter.vocab.codebook_size() as u32;
    let codes: Vec<u32> = (0..(GRID.0 * GRID.1) as u32).map(|i| (i * 2654435761u32) % k).collect();
    let s = model.spatial_factor();
    let n = repeats(5);
    let r = time_it(1, n, || {
        model.decode_codes(std::slice::from_ref(&codes), GRID.0, GRID.1).unwrap();
    });
    report(&format!("vq decode {}x{} codes -> {}x{} px", GRID.0, GRID.1, GRID.1 * s, GRID.0 * s), n, r, "");
}

fn bench_vq_encode(model: &Model) {
    let s = model.spatial_factor();
    let (h, w) = (GRID.0 * s, GRID.1 * s);
    let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        image::Rgb([(x * 255 / w as u32) as u8, (y * 255 / h as u32) as u8, ((x + y) * 7 % 256) as u8])
    });
    let n = repeats(5);
    let r = time_it(1, n, || {
        model.encode_image(&img).unwrap();
    });
    report(&format!("vq encode {w}x{h} px -> {}x{} codes", GRID.1, GRID.0), n, r, "");
}

/// `shipped` is the model of this repository, anything else a checkpoint directory.
fn model_files(spec: &Path) -> ModelFiles {
    if spec == Path::new("shipped") {
        ModelFiles::shipped(&tessera::model::shipped_model_dir()).expect("shipped model")
    } else {
        ModelFiles::from_dir(spec).expect("model dir")
    }
}

fn bench_load(dir: &Path) {
    let n = repeats(10);
    let r = time_it(1, n, || {
        let files = model_files(dir);
        std::hint::black_box(Model::load(files, LoadOptions::default()).unwrap());
    });
    report("model load (mmap + build)", n, r, "");
}

fn main() {
    let Some(dir) = std::env::var_os("TESSERA_BENCH_MODEL").map(PathBuf::from) else {
        println!("TESSERA_BENCH_MODEL is not set: nothing measured. Make a random model of the default shape with");
        println!("  python scripts/make_random_model.py --preset default --out DIR --tessera-grids");
        println!("and run  TESSERA_BENCH_MODEL=DIR RAYON_NUM_THREADS=2 cargo bench --bench decode");
        return;
    };
    let known = ["step", "image", "batch8", "vq", "vqenc", "load"];
    let mut chosen: Vec<String> = std::env::args().skip(1).filter(|a| known.contains(&a.as_str())).collect();
    if chosen.is_empty() {
        chosen = known.iter().map(|s| s.to_string()).collect();
    }
    let model = Model::load(model_files(&dir), LoadOptions::default()).expect("load");
    let c = &model.config.text_config;
    println!(
        "model: hidden {} x {} layers, heads {}/{}, intermediate {}, vocab {}, {} codes; threads {}",
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_kv_heads(),
        c.intermediate_size,
        c.vocab_size,
        model.prompter.vocab.codebook_size(),
        candle_core::utils::get_num_threads()
    );
    for s in &chosen {
        match s.as_str() {
            "step" => bench_step(&model),
            "image" => bench_image(&model, 1, 5),
            "batch8" => bench_image(&model, 8, 2),
            "vq" => bench_vq(&model),
            "vqenc" => bench_vq_encode(&model),
            "load" => bench_load(&dir),
            _ => unreachable!(),
        }
    }
}
