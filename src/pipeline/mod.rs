//! The renderer: the configuration it runs from.

pub mod config;
