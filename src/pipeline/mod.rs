//! The renderer: its configuration, context windows over long clips, the initial noise (FreeNoise,
//! FreeInit), and the render loop itself (`render`).

pub mod batch;
pub mod config;
pub mod free_init;
pub mod lora_switch;
pub mod noise_init;
pub mod random_models;
pub mod render;
pub mod resume;
pub mod windows;

pub use render::{ClipOutcome, RenderOptions, RenderReport, render, render_batch};
