//! NCHW (diffusers, reference files) <-> NHWC (the engine) for host tensors at the boundary.

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
