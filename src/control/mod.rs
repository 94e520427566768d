//! Control inputs for ControlNets: hint images made from OpenPose keypoints, depth maps and edges,
//! the control-image preparation diffusers applies before the net, and per-frame strength
//! schedules over a clip's keyframes.
//!
//! Every hint is an 8-bit RGB image at the render size, drawn the way the ControlNets were trained
//! on it: coloured skeletons on black ([`pose`]), near = bright depth ([`depth`]), white edges on
//! black ([`canny`]), from PNGs, OpenPose JSON or the frames of a video ([`video`]). [`prepare`] turns hints into the f32 NHWC [0, 1] batch the net takes, and
//! [`keyframes`] says which frames the net runs on, with which hint and strength.

pub mod builtin;
pub mod canny;
pub mod depth;
pub mod image;
pub mod keyframes;
pub mod pose;
pub mod prepare;
mod raster;
pub mod video;

pub use keyframes::{Interpolation, KeyframeSchedule, default_keyframes};
pub use pose::{Person, PoseFrame, draw_pose, interpolate_pose, load_openpose, parse_openpose};

/// Largest width or height of a hint or a control image: twice SDXL's largest trained size in
/// any direction, and a bound on the memory one frame takes.
pub const MAX_SIDE: u32 = 8192;

fn check_size(width: u32, height: u32, what: &str) -> crate::Result<()> {
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return crate::input_err!("{what} of {width}x{height} pixels: both sides must be within 1..={MAX_SIDE}");
    }
    Ok(())
}
