//! Command-line interface: `celframe demo` (the most complete thing the engine runs until the
//! renderer exists) and `celframe info` (device and compiled kernels).

pub mod demo;
pub mod info;

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
}
