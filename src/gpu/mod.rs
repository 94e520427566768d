//! GPU runtime: device and stream, lazily loaded kernel modules, checked launches, memory arenas,
//! CUDA-event timing and profiles, NVTX ranges, TMA tensor maps, CUDA graphs, and the vendor libraries (cuBLASLt,
//! cuDNN).

pub mod blas;
pub mod device;
pub mod dnn;
pub mod graph;
pub mod memory;
pub mod nvtx;
pub mod params;
pub mod profile;
pub mod timing;
pub mod tma;
pub mod tuning;

pub use device::{ClusterScheduling, DeviceInfo, Gpu, KERNEL_MODULES, KernelParams};
pub use graph::{Graph, GraphPool};
pub use memory::Arena;

macro_rules! kernel_params {
    ($($t:ty),*) => { $(unsafe impl KernelParams for $t {})* };
}
kernel_params!(
    params::ElementwiseParams,
    params::ResidualAddParams,
    params::GegluParams,
    params::GroupNormParams,
    params::GroupNormClusterParams,
    params::LayerNormParams,
    params::Upsample2xParams,
    params::SubpixelWeightsParams,
    params::SubpixelShuffleParams,
    params::Rgb8Params,
    params::ConcatParams,
    params::TimestepEmbeddingParams,
    params::RandomParams,
    params::TemporalAttentionParams,
    params::FlashAttentionParams,
    params::FlashTmaParams,
    params::GegluLinearParams,
    params::SoftmaxRowsParams,
    params::EmbeddingParams,
    params::LoraMergeParams,
    params::LoraDoraParams,
    params::Fp8AmaxParams,
    params::Fp8QuantizeParams,
    params::Fp8QuantizeRowsParams,
    params::GegluE4m3Params
);
