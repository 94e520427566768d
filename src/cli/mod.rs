//! Command-line interface: `celframe demo` (the most complete thing the engine runs until the
//! renderer exists), `celframe info` (device and compiled kernels) and `celframe verify` (a
//! component against a reference file).

mod arenas;
pub mod bench;
pub mod demo;
pub mod info;
pub mod tokenize;
pub mod verify;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "celframe", version, about = "SDXL anime video rendering on hand-written CUDA kernels")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run one SDXL UNet ResNet block (random weights at real shapes) on CUDA and on the CPU
    /// twins, compare them and time the CUDA run; CPU only where there is no GPU.
    Demo(demo::DemoArgs),
    /// Show the CUDA device and every compiled kernel with its registers and spills (sm_90a).
    Info,
    /// Time whole forwards of a component on CUDA with a checkpoint's weights and random inputs.
    Bench(bench::BenchArgs),
    /// Run a component on a reference file's inputs and compare with its outputs (max abs and
    /// relative L2 error). Exit 0 within tolerance, 1 outside it, 2 on bad input.
    Verify(verify::VerifyArgs),
    /// Print a prompt's token ids as JSON, one array of 77 per chunk (A1111 prompt syntax and
    /// chunking; --raw for the text as transformers tokenizes it, --weights for weights and LoRAs).
    Tokenize(tokenize::TokenizeArgs),
}
