//! The `tessera` command line: parse, dispatch, print errors. All work happens in the library.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // candle's quantized matmul (`--dtype q8`) runs on its own worker pool, whose idle workers
    // spin 25,000 times before parking: between the many small products of a decode step they
    // keep the cores from Tessera's own threads and from other jobs (a q8 `gen` decoded in
    // 0.80-0.85 s against 0.83-0.97 s on an idle machine, 3.1 s against 8.3 s beside a build).
    // A user's setting wins.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: the first statement of main, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000") };
    }
    // Output piped into a reader that stops early (`tessera eval --compare A B | head`) ends the
    // process quietly, as `cat` does, instead of Rust's default: ignore SIGPIPE, then panic on
    // the failed print.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
