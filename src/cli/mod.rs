//! Command-line interface: one file per subcommand, each with its clap `Args` and a `run`.

pub mod eval;
pub mod world;

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
    /// The procedural world: training samples, the benchmark, rendering.
    World(world::WorldArgs),
    /// Score images against a bench file with the judge.
    Eval(eval::EvalArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::World(args) => world::run(args),
        Command::Eval(args) => eval::run(args),
    }
}
