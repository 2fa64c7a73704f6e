//! Generate one image's tokens with the library and print them as one JSON line, with
//! timings: the Tessera side of `scripts/compare_torch.py`.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release --example greedy_tokens -- \
//!     --model DIR --prompt "a red cat sits on a mat." --grid 16x16 --cfg 3
//! ```
//!
//! Greedy (`--temperature 0`) by default, so the tokens can be compared with transformers'
//! `generate`. The JSON has the generated ids after SOT (EOS included, like
//! `scripts/torch_reference.py`'s `generated_ids`), the code grid, the prompt ids, and per
//! repeat the prefill, decode-loop and VQ-decode seconds.

use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use tessera::generate::{SamplerPlace, generate_with};
use tessera::model::{LoadOptions, Model, ModelFiles};
use tessera::pipeline::T2iRequest;
use tessera::sampler::SamplingParams;

#[derive(Debug, Parser)]
struct Args {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json), a root in the shipped
    /// layout (weights/ + tokenizer/, e.g. a training export) or a Hugging Face repo id.
    #[arg(long)]
    model: String,
    /// Caption.
    #[arg(long, default_value = "a red cat sits on a mat.")]
    prompt: String,
    /// Negative (unconditional) caption [default: the model's unconditional prompt].
    #[arg(long)]
    negative: Option<String>,
    /// Token grid HEIGHTxWIDTH.
    #[arg(long, default_value = "16x16")]
    grid: String,
    /// Guidance scale (1 = no unconditional row).
    #[arg(long, default_value_t = 3.0)]
    cfg: f64,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per batch (all with the same prompt; image i uses seed + i).
    #[arg(short = 'n', long, default_value_t = 1)]
    count: usize,
    /// How many times to run the decode loop (the model is loaded once).
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Skip the VQ decode of the generated codes.
    #[arg(long)]
    no_vq: bool,
    /// cpu, or cuda (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Language model compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Where guidance (and a greedy argmax) runs: auto (the device on a GPU), host or device.
    #[arg(long, default_value = "auto")]
    sampler: String,
}

fn parse_grid(s: &str) -> anyhow::Result<(usize, usize)> {
    let (h, w) = s.split_once(['x', 'X']).context("--grid must look like 16x16")?;
    Ok((h.trim().parse()?, w.trim().parse()?))
}

/// Peak resident set size of this process (VmHWM), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (h, w) = parse_grid(&args.grid)?;
    if args.count == 0 || args.repeats == 0 {
        bail!("--count and --repeats must be at least 1");
    }
    let t0 = Instant::now();
    let files = ModelFiles::resolve(Some(&args.model))?;
    let device = match args.device.as_str() {
        "cpu" => candle_core::Device::Cpu,
        "cuda" => tessera::device::cuda(0)?,
        other => bail!("--device {other}: expected cpu or cuda"),
    };
    let dtype = match args.dtype.as_str() {
        "f32" => candle_core::DType::F32,
        "f16" => candle_core::DType::F16,
        "bf16" => candle_core::DType::BF16,
        other => bail!("--dtype {other}: expected f32, f16 or bf16"),
    };
    let place = match args.sampler.as_str() {
        "auto" => SamplerPlace::Auto,
        "host" => SamplerPlace::Host,
        "device" => SamplerPlace::Device,
        other => bail!("--sampler {other}: expected auto, host or device"),
    };
    let model = Model::load(files, LoadOptions { device, dtype, ..LoadOptions::default() })?;
    let load_s = t0.elapsed().as_secs_f64();
    let peak_after_load = peak_rss_bytes();

    let s = model.spatial_factor() as u32;
    let params = SamplingParams { cfg: args.cfg, temperature: args.temperature, top_k: args.top_k, top_p: 1.0 };
    let jobs = (0..args.count)
        .map(|i| {
            model.t2i_job(&T2iRequest {
                prompt: args.prompt.clone(),
                negative: args.negative.clone(),
                width: w as u32 * s,
                height: h as u32 * s,
                params,
                seed: args.seed + i as u64,
            })
        })
        .collect::<tessera::Result<Vec<_>>>()?;

    let mut runs = Vec::new();
    let mut out = None;
    for _ in 0..args.repeats {
        let t = Instant::now();
        let (tokens, stats) = generate_with(&model.text, &model.prompter.vocab, &jobs, place, &mut |_| {})?;
        let gen_s = t.elapsed().as_secs_f64();
        let vq_decode_s = if args.no_vq {
            None
        } else {
            let codes: Vec<Vec<u32>> = tokens.iter().map(|t| t.codes.clone()).collect();
            let t = Instant::now();
            model.decode_codes(&codes, h, w)?;
            Some(t.elapsed().as_secs_f64())
        };
        runs.push(serde_json::json!({
            "gen_s": gen_s,
            "prefill_s": stats.prefill_secs,
            "decode_s": stats.decode_secs,
            "steps": stats.steps,
            "vq_decode_s": vq_decode_s,
        }));
        out = Some(tokens);
    }
    let tokens = out.expect("at least one repeat");
    let json = serde_json::json!({
        "threads": candle_core::utils::get_num_threads(),
        "grid": [h, w],
        "cfg": args.cfg,
        "temperature": args.temperature,
        "count": args.count,
        "device": args.device,
        "dtype": args.dtype,
        "sampler": args.sampler,
        "cond_ids": jobs[0].prompt,
        "neg_ids": jobs[0].negative,
        "generated_ids": tokens[0].tokens,
        "image_codes": tokens[0].codes.chunks(w).collect::<Vec<_>>(),
        "all_generated_ids": tokens.iter().map(|t| &t.tokens).collect::<Vec<_>>(),
        "load_s": load_s,
        "runs": runs,
        "peak_rss_after_load_bytes": peak_after_load,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{json}");
    Ok(())
}
