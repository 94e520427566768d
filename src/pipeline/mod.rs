//! The renderer: its configuration, context windows over long clips and the initial noise.

pub mod config;
pub mod noise_init;
pub mod windows;
