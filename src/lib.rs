//! celframe: SDXL anime video rendering on hand-written CUDA kernels.
//! See docs/ARCHITECTURE.md for the map of this crate.

pub mod cli;
pub mod control;
pub mod error;
pub mod gpu;
pub mod io;
pub mod models;
pub mod ops;
pub mod output;
pub mod pipeline;
pub(crate) mod process;
pub mod sampling;
pub mod tensor;
pub mod text;
pub mod verify;
pub mod weights;

pub use error::{Error, Result};
pub use tensor::{DType, Tensor};
