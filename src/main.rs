use std::process::ExitCode;

use celframe::cli::render::RenderArgs;
use celframe::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Demo(args) => celframe::cli::demo::run(args),
        Command::Info => celframe::cli::info::run(),
        Command::Bench(args) => celframe::cli::bench::run(args),
        Command::Tokenize(args) => celframe::cli::tokenize::run(args),
        Command::Schedule(args) => celframe::cli::schedule::run(args),
        // One worker process per GPU; exits with the workers' worst code (`cli::gpus`).
        Command::Render(args @ RenderArgs { gpus: Some(gpus), .. }) => return celframe::cli::gpus::main(args, gpus),
        Command::Render(args) => celframe::cli::render::run(args),
        Command::Control(args) => celframe::cli::control::run(args),
        Command::MergeReport(args) => celframe::cli::merge_report::run(args),
        // Also exits 1 (an output outside its tolerance or not finite); errors map as below.
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
