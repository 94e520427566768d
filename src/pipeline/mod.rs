//! The renderer: its configuration, context windows over long clips, the initial noise (FreeNoise,
//! FreeInit), the render loop itself (`render`) and one clip over several devices (`devices`).

pub mod batch;
pub mod config;
pub mod devices;
pub mod free_init;
mod graphs;
pub mod lora_switch;
pub mod noise_init;
pub mod random_models;
pub mod render;
pub mod resume;
pub mod windows;

pub use render::{ClipOutcome, RenderOptions, RenderReport, render, render_batch};
