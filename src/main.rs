use std::process::ExitCode;

use celframe::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Demo(args) => celframe::cli::demo::run(args),
        Command::Info => celframe::cli::info::run(),
        Command::Bench(args) => celframe::cli::bench::run(args),
        Command::Tokenize(args) => celframe::cli::tokenize::run(args),
        // Its own exit codes: 0 within tolerance, 1 outside, 2 when it cannot compare.
        Command::Verify(args) => return celframe::cli::verify::main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
