//! NCHW (diffusers, reference files) <-> NHWC (the engine) for host tensors at the boundary, and
//! diffusers' video layout [videos, C, F, H, W] <-> the engine's frame rows.

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// [N, C, H, W] -> [N, H, W, C], same dtype (values are moved, not rounded).
pub fn nchw_to_nhwc(t: &Tensor) -> Result<Tensor> {
    let &[n, c, h, w] = t.shape() else {
        return Err(Error::Input(format!("{t:?} must be 4-d NCHW")));
    };
    let v = t.to_f32_vec()?;
    let mut out = vec![0f32; v.len()];
    for (i, o) in out.iter_mut().enumerate() {
        let (ch, x, y, img) = (i % c, (i / c) % w, (i / (c * w)) % h, i / (c * w * h));
        *o = v[((img * c + ch) * h + y) * w + x];
    }
    Tensor::from_f32(&[n, h, w, c], t.dtype(), &out)
}

/// [N, H, W, C] -> [N, C, H, W], same dtype.
pub fn nhwc_to_nchw(t: &Tensor) -> Result<Tensor> {
    let &[n, h, w, c] = t.shape() else {
        return Err(Error::Input(format!("{t:?} must be 4-d NHWC")));
    };
    let v = t.to_f32_vec()?;
    let mut out = vec![0f32; v.len()];
    for (i, o) in out.iter_mut().enumerate() {
        let (x, y, ch, img) = (i % w, (i / w) % h, (i / (w * h)) % c, i / (w * h * c));
        *o = v[((img * h + y) * w + x) * c + ch];
    }
    Tensor::from_f32(&[n, c, h, w], t.dtype(), &out)
}

/// [videos, C, F, H, W] -> [videos * F, H, W, C] (row = video * F + frame), same dtype.
pub fn video_to_rows(t: &Tensor) -> Result<Tensor> {
    let &[b, c, f, h, w] = t.shape() else {
        return Err(Error::Input(format!("{t:?} must be 5-d [videos, channels, frames, height, width]")));
    };
    let v = t.to_f32_vec()?;
    let mut out = vec![0f32; v.len()];
    for (i, o) in out.iter_mut().enumerate() {
        let (ch, x, y, frame, video) =
            (i % c, (i / c) % w, (i / (c * w)) % h, (i / (c * w * h)) % f, i / (c * w * h * f));
        *o = v[(((video * c + ch) * f + frame) * h + y) * w + x];
    }
    Tensor::from_f32(&[b * f, h, w, c], t.dtype(), &out)
}

/// [videos * F, H, W, C] -> [videos, C, F, H, W], same dtype.
pub fn rows_to_video(t: &Tensor, frames: usize) -> Result<Tensor> {
    let &[n, h, w, c] = t.shape() else {
        return Err(Error::Input(format!("{t:?} must be 4-d NHWC")));
    };
    let v = t.to_f32_vec()?;
    let mut out = vec![0f32; v.len()];
    for (i, o) in out.iter_mut().enumerate() {
        let (x, y, frame, ch, video) =
            (i % w, (i / w) % h, (i / (w * h)) % frames, (i / (w * h * frames)) % c, i / (w * h * frames * c));
        *o = v[(((video * frames + frame) * h + y) * w + x) * c + ch];
    }
    Tensor::from_f32(&[n / frames, c, frames, h, w], t.dtype(), &out)
}
