//! Command-line interface: one file per subcommand, each with its clap `Args` and a `run`.

mod batch;
mod common;
mod edit;
mod generate;
mod inspect;
mod progress;
mod eval;
mod world;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "tessera", version, about = "Autoregressive text-to-image generation (Emu3 architecture)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Draw an image from a text prompt.
    Gen(generate::GenArgs),
    /// Edit an image: by instruction, inside a mask, or below its top rows.
    Edit(edit::EditArgs),
    /// Render a file of prompts (text or JSONL) with one loaded model; resumable and shardable.
    Batch(batch::BatchArgs),
    /// Describe a model: family, sizes, parameters, tokenizer.
    Info(inspect::InfoArgs),
    /// Print an image's VQ code grid as JSON.
    Tokenize(inspect::TokenizeArgs),
    /// Run an image through the VQ round trip and print the PSNR.
    Reconstruct(inspect::ReconstructArgs),
    /// The procedural world: training samples, the benchmark, rendering.
    World(world::WorldArgs),
    /// Score images against a bench file with the judge.
    Eval(eval::EvalArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Gen(args) => generate::run(args),
        Command::Edit(args) => edit::run(args),
        Command::Batch(args) => batch::run(args),
        Command::Info(args) => inspect::info(args),
        Command::Tokenize(args) => inspect::tokenize(args),
        Command::Reconstruct(args) => inspect::reconstruct(args),
        Command::World(args) => world::run(args),
        Command::Eval(args) => eval::run(args),
    }
}
