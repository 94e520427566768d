//! Model graphs on the ops: configs, checkpoint loading and name maps, blocks, and the UNet.
//! Forward functions read like diffusers' (numbered steps, a shape comment at each boundary) and
//! take an `Exec`, so the same code runs on the CPU twins or the CUDA ops.

pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod embeddings;
mod fields;
mod files;
pub mod layout;
pub mod ldm;
pub mod resnet;
pub mod transformer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use checkpoint::{UnetCheckpoint, UnetFormat, open_unet};
pub use config::UnetConfig;
pub use fields::{Limits, MAX_LAYERS, MAX_LEVELS, MAX_WIDTH};
pub use unet::{Unet, UnetInputs, UnetResiduals};
pub use weights::{ModelWeights, Place};
