pub mod noise_init;
pub mod windows;
