//! `tessera info`, `tessera tokenize`, `tessera reconstruct`: look at a model and its image
//! tokenizer.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tessera::image_io;

use super::common::{ModelArgs, device_name};
use super::generate::{check_output_path, parse_size};

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn info(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let model = args.model.load(true)?;
    let t = &model.config.text_config;
    let v = &model.config.vq_config;
    let lm_params = lm_parameters(t);
    let s = model.spatial_factor();
    let grids: Vec<String> = model.trained_grids().iter().map(|(h, w)| format!("{}x{} px ({h}x{w} tokens)", w * s, h * s)).collect();
    let tokenizer_size = model.prompter.tokenizer().get_vocab_size(true);
    let info = serde_json::json!({
        "model": model.files.name,
        "family": "emu3",
        "device": device_name(model.device()),
        "dtype": args.model.dtype.name(),
        "lm": {"parameters": lm_params, "layers": t.num_hidden_layers, "hidden_size": t.hidden_size,
               "heads": t.num_attention_heads, "kv_heads": t.num_kv_heads(), "vocab_size": t.vocab_size,
               "max_positions": t.max_position_embeddings},
        "vq": {"codebook_size": v.codebook_size, "embed_dim": v.embed_dim, "spatial_factor": s,
               "temporal_downsample_factor": v.temporal_downsample_factor, "base_channels": v.base_channels,
               "channel_multiplier": v.channel_multiplier},
        "grids": grids,
        "instruction_edits": model.supports_instruction_edits(),
        "tokenizer_size": tokenizer_size,
    });
    if args.json {
        println!("{info}");
    } else {
        println!("model:        {}", model.files.name);
        println!("family:       Emu3 (VQ-VAE + Llama-style decoder)");
        println!(
            "language:     {} parameters ({:.1}M), {} layers, hidden {}, {} heads ({} kv), vocab {}",
            lm_params,
            lm_params as f64 / 1e6,
            t.num_hidden_layers,
            t.hidden_size,
            t.num_attention_heads,
            t.num_kv_heads(),
            t.vocab_size
        );
        println!(
            "image tokens: {} codes, {}x downsampling, temporal factor {}",
            v.codebook_size, s, v.temporal_downsample_factor
        );
        if grids.is_empty() {
            println!("sizes:        any multiple of {s} px per side (the checkpoint names no trained grids)");
        } else {
            println!("sizes:        {}", grids.join(", "));
        }
        println!("edits:        {}", if model.supports_instruction_edits() { "instruction, mask, keep-rows" } else { "mask, keep-rows" });
        println!("tokenizer:    {tokenizer_size} tokens");
        println!("device/dtype: {} / {}", device_name(model.device()), args.model.dtype.name());
    }
    Ok(ExitCode::SUCCESS)
}

/// Parameter count of the language model, from its config.
fn lm_parameters(t: &tessera::config::TextConfig) -> usize {
    let (d, i, hd) = (t.hidden_size, t.intermediate_size, t.head_dim());
    let attn = d * t.num_attention_heads * hd * 2 + d * t.num_kv_heads() * hd * 2;
    let layer = attn + 3 * d * i + 2 * d;
    let head = if t.tie_word_embeddings { 0 } else { t.vocab_size * d };
    t.vocab_size * d + t.num_hidden_layers * layer + d + head
}

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// Image to encode (PNG or JPEG).
    pub image: PathBuf,

    /// Resize to WIDTHxHEIGHT first [default: the image's size rounded to the VQ factor].
    #[arg(long, value_parser = parse_size)]
    pub size: Option<(u32, u32)>,

    #[command(flatten)]
    pub model: ModelArgs,
}

fn load_resized(model: &tessera::model::Model, path: &std::path::Path, size: Option<(u32, u32)>) -> anyhow::Result<image::RgbImage> {
    let img = image_io::load_image(path)?;
    let s = model.spatial_factor() as u32;
    let (w, h) = size.unwrap_or(((img.width() / s).max(1) * s, (img.height() / s).max(1) * s));
    if w % s != 0 || h % s != 0 {
        anyhow::bail!("size {w}x{h} is not a multiple of the VQ factor {s}");
    }
    Ok(image_io::resize(&img, w, h))
}

pub fn tokenize(args: TokenizeArgs) -> anyhow::Result<ExitCode> {
    let model = args.model.load(true)?;
    let img = load_resized(&model, &args.image, args.size)?;
    let (h, w, codes) = model.encode_image(&img)?;
    let rows: Vec<&[u32]> = codes.chunks(w).collect();
    println!("{}", serde_json::json!({"height": h, "width": w, "codes": rows}));
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct ReconstructArgs {
    /// Image to send through the VQ round trip (encode, decode).
    pub image: PathBuf,

    /// Output PNG.
    #[arg(short, long, default_value = "reconstructed.png")]
    pub output: PathBuf,

    /// Resize to WIDTHxHEIGHT first [default: the image's size rounded to the VQ factor].
    #[arg(long, value_parser = parse_size)]
    pub size: Option<(u32, u32)>,

    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn reconstruct(args: ReconstructArgs) -> anyhow::Result<ExitCode> {
    check_output_path(&args.output)?;
    let model = args.model.load(true)?;
    let img = load_resized(&model, &args.image, args.size)?;
    let (h, w, codes) = model.encode_image(&img)?;
    let out = model.decode_codes(&[codes], h, w)?.swap_remove(0);
    image_io::save_png(&args.output, &out, &[]).with_context(|| format!("writing {}", args.output.display()))?;
    println!("PSNR {:.2} dB ({}x{} px, {}x{} tokens) -> {}", image_io::psnr(&img, &out), img.width(), img.height(), w, h, args.output.display());
    Ok(ExitCode::SUCCESS)
}
