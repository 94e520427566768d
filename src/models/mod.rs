//! Model graphs on the ops: configs, checkpoint loading and name maps, blocks, the UNet and the
//! models built on its parts (motion modules, ControlNet).
//! Forward functions read like diffusers' (numbered steps, a shape comment at each boundary) and
//! take an `Exec`, so the same code runs on the CPU twins or the CUDA ops.

pub mod clip;
pub mod controlnet;
pub mod embeddings;
mod fields;
mod files;
pub mod layout;
pub mod lora;
pub mod motion;
pub mod resnet;
pub mod transformer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use controlnet::{
    ControlNet, ControlNetCheckpoint, ControlNetConfig, ControlNetFormat, ControlNetUnion, ControlScale, ControlType,
    UnionCondition, UnionConfig, UnionEmbedded, UnionOptions, open_controlnet,
};
pub use fields::Limits;
pub use motion::{MotionCheckpoint, MotionConfig, MotionFormat, MotionModules, open_motion};
pub use unet::{Frames, Unet, UnetCheckpoint, UnetConfig, UnetFormat, UnetInputs, UnetResiduals, open_unet};
pub use weights::{ModelWeights, Place, with_loras};
