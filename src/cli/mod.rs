//! Command-line interface: `celframe demo` (the render pipeline on random weights), `celframe info`
//! (device and compiled kernels), `celframe bench` (whole forwards timed), `celframe verify` (a
//! component against a reference file, `crate::verify`), `celframe tokenize`, `celframe schedule`
//! (a sampler's timesteps and sigmas), `celframe render` (clips from a render config or batch
//! manifest, a shard of it, or one shard per GPU: `gpus`) and `celframe merge-report` (the shards'
//! reports combined).

pub mod bench;
pub mod control;
pub mod demo;
pub mod gpus;
pub mod info;
pub mod merge_report;
pub mod render;
pub mod schedule;
pub mod tokenize;
pub mod verify;

use clap::{Parser, Subcommand};

use crate::error::{Error, Result};

/// The exit codes of every command (`crate::error`), shown by `--help`.
const EXIT_CODES: &str = "Exit codes:
  0  success
  1  verify: an output is outside its tolerance or not finite (NaN or infinite)
  2  bad input: a file, field, tensor, argument or size that cannot be used (the message names it)
  3  no GPU: a CUDA driver or device is needed (--device cuda) and there is none
  4  a CUDA driver or library call failed
  5  internal error: a bug in celframe (please report it)
  130, 143  render stopped by SIGINT or SIGTERM: run the same command again to resume";

#[derive(Parser)]
#[command(
    name = "celframe",
    version,
    about = "SDXL anime video rendering on hand-written CUDA kernels",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Render a 2-second clip with the whole pipeline on an SDXL-family model with seeded random
    /// weights (full SDXL shapes on CUDA, a small model on the CPU) into outputs/demo.
    Demo(demo::DemoArgs),
    /// Show the CUDA device and every compiled kernel with its registers and spills (sm_90a).
    Info,
    /// Time whole forwards of a component on CUDA with a checkpoint's weights and random inputs.
    Bench(bench::BenchArgs),
    /// Run a component on a reference file's inputs and compare with its outputs (max abs and
    /// relative L2 error). Exit 0 within tolerance, 1 outside it or not finite, 2 on bad input, 3
    /// without a GPU for --device cuda, 4 on a CUDA failure.
    #[command(after_help = EXIT_CODES)]
    Verify(verify::VerifyArgs),
    /// Print a prompt's token ids as JSON, one array of 77 per chunk (A1111 prompt syntax and
    /// chunking; --raw for the text as transformers tokenizes it, --emphasis for emphasis weights and LoRA requests).
    Tokenize(tokenize::TokenizeArgs),
    /// Print a sampler's timesteps and sigmas as JSON (and LCM's c_skip/c_out, DDIM's targets),
    /// as diffusers' scheduler computes them for the same settings.
    Schedule(schedule::ScheduleArgs),
    /// Render the clips of a config (.toml or .json; see examples/). Overrides such as --prompt,
    /// --negative, --seed and --frames apply to every clip. --dry-run validates and prints the
    /// resolved config as JSON.
    #[command(after_help = EXIT_CODES)]
    Render(render::RenderArgs),
    /// Combine the run reports of a batch's shards (render --shard, job arrays) into
    /// configs/run_report.json and write the prompt grid. Exit 2 when a clip failed or was not
    /// reached.
    #[command(after_help = EXIT_CODES)]
    MergeReport(merge_report::MergeReportArgs),
    /// Write the hint images a render config gives its ControlNets (pose skeletons, Canny edges,
    /// depth maps), resized to the render size, as PNGs to look at before rendering.
    Control(control::ControlArgs),
}

/// The element count of a tensor whose dimensions are `dims` (each a name, such as the flag that
/// sets it, and its value), refused when it is zero or more than `limit`; `what` says which tensor
/// and `why` why the limit is what it is.
pub(crate) fn elements(what: &str, dims: &[(&str, usize)], limit: usize, why: &str) -> Result<usize> {
    let product = dims.iter().try_fold(1usize, |n, &(_, d)| n.checked_mul(d));
    match product {
        Some(n) if n > 0 && n <= limit => Ok(n),
        _ => {
            let sizes: Vec<String> = dims.iter().map(|(name, d)| format!("{name} {d}")).collect();
            Err(Error::Input(format!(
                "{}: the {what} would have {} elements; it must have 1 to {limit} ({why})",
                sizes.join(" x "),
                product.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string())
            )))
        }
    }
}
