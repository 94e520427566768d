//! Control images as the diffusers SDXL ControlNet pipelines prepare them before the net
//! (`pipelines/controlnet/pipeline_controlnet_sd_xl.py` `prepare_image` with
//! `VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)`, diffusers
//! 0.42.1 `image_processor.py`): an RGB image is resized to the render size with Pillow's LANCZOS
//! filter (the processor's default `resample`), stretched without keeping the aspect ratio, then
//! divided by 255 into [0, 1] (not [-1, 1]).
//!
//! The resize is Pillow's separable resampling (`libImaging/Resample.c`), reproduced to the bit:
//! Lanczos with a = 3 whose support widens by the scale factor when shrinking (so shrinking
//! antialiases), weights normalised per output pixel and rounded to 22-bit fixed point, two passes
//! (rows then columns; columns first when the width grows and the height shrinks) with the
//! intermediate rounded to 8 bits. The hints this module's siblings draw are already at the render
//! size, where the resize does nothing.

use std::f64::consts::PI;

use super::check_size;
use crate::error::Result;
use crate::output::RgbImage;

/// Fixed-point bits of Pillow's 8-bit resampling weights.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Lanczos lobes (Pillow's LANCZOS is Lanczos-3).
const LANCZOS_SUPPORT: f64 = 3.0;

/// The batch for the ControlNet: every frame resized to `width` x `height` and scaled to [0, 1],
/// f32 NHWC `[frames, height, width, 3]` (our activations' layout; diffusers' tensor is the same
/// values in NCHW).
pub fn prepare_control_images(frames: &[RgbImage], width: u32, height: u32) -> Result<Vec<f32>> {
    check_size(width, height, "control image")?;
    let mut out = Vec::with_capacity(frames.len() * width as usize * height as usize * 3);
    for frame in frames {
        let resized = resize_lanczos(frame, width, height)?;
        out.extend(resized.pixels().iter().map(|&v| v as f32 / 255.0));
    }
    Ok(out)
}

/// `image` resized to `width` x `height` as Pillow's `Image.resize(size, Image.LANCZOS)` does.
pub fn resize_lanczos(image: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    check_size(width, height, "resized image")?;
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    let pixels = image.pixels();
    // Pillow 13 runs the vertical pass first when the width grows and the height shrinks (found by
    // comparing both orders with its output: the order changes the 8-bit intermediate).
    let pixels = if out_w > in_w && out_h < in_h {
        resize_rows(&resize_columns(pixels, in_w, in_h, out_h), in_w, out_h, out_w)
    } else {
        resize_columns(&resize_rows(pixels, in_w, in_h, out_w), out_w, in_h, out_h)
    };
    RgbImage::new(width, height, pixels)
}

/// Each row of a `w` x `h` image resampled to `out_w` pixels (a copy when `out_w == w`).
fn resize_rows(pixels: &[u8], w: usize, h: usize, out_w: usize) -> Vec<u8> {
    if out_w == w {
        return pixels.to_vec();
    }
    let taps = taps(w, out_w);
    let mut out = vec![0u8; out_w * h * 3];
    for y in 0..h {
        for (x, tap) in taps.iter().enumerate() {
            for c in 0..3 {
                out[(y * out_w + x) * 3 + c] = tap.apply(|k| pixels[(y * w + k) * 3 + c]);
            }
        }
    }
    out
}

/// Each column of a `w` x `h` image resampled to `out_h` pixels (a copy when `out_h == h`).
fn resize_columns(pixels: &[u8], w: usize, h: usize, out_h: usize) -> Vec<u8> {
    if out_h == h {
        return pixels.to_vec();
    }
    let taps = taps(h, out_h);
    let mut out = vec![0u8; w * out_h * 3];
    for (y, tap) in taps.iter().enumerate() {
        for x in 0..w {
            for c in 0..3 {
                out[(y * w + x) * 3 + c] = tap.apply(|k| pixels[(k * w + x) * 3 + c]);
            }
        }
    }
    out
}

/// The input samples one output sample reads: `first..first + weights.len()`, weights in fixed
/// point.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

impl Taps {
    fn apply(&self, sample: impl Fn(usize) -> u8) -> u8 {
        let sum = self
            .weights
            .iter()
            .enumerate()
            .fold(1i64 << (PRECISION_BITS - 1), |acc, (k, &w)| acc + sample(self.first + k) as i64 * w as i64);
        (sum >> PRECISION_BITS).clamp(0, 255) as u8
    }
}

fn lanczos(x: f64) -> f64 {
    let sinc = |x: f64| if x == 0.0 { 1.0 } else { (x * PI).sin() / (x * PI) };
    if (-LANCZOS_SUPPORT..LANCZOS_SUPPORT).contains(&x) { sinc(x) * sinc(x / LANCZOS_SUPPORT) } else { 0.0 }
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for a resize of `input` samples
/// to `output`.
fn taps(input: usize, output: usize) -> Vec<Taps> {
    let scale = input as f64 / output as f64;
    let filter_scale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filter_scale;
    (0..output)
        .map(|x| {
            let center = (x as f64 + 0.5) * scale;
            let first = ((center - support + 0.5).trunc().max(0.0)) as usize;
            let end = ((center + support + 0.5).trunc() as usize).min(input);
            let raw: Vec<f64> = (first..end).map(|k| lanczos((k as f64 - center + 0.5) / filter_scale)).collect();
            let total: f64 = raw.iter().sum();
            let one = (1u32 << PRECISION_BITS) as f64;
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    // Rounded half away from zero, as Pillow's (int)(w * one ± 0.5).
                    (if w < 0.0 { w * one - 0.5 } else { w * one + 0.5 }) as i32
                })
                .collect();
            Taps { first, weights }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_shrinking_widens_the_support() {
        let one = 1i64 << PRECISION_BITS;
        for (input, output) in [(37, 64), (37, 24), (100, 7), (5, 5)] {
            for tap in taps(input, output) {
                let sum: i64 = tap.weights.iter().map(|&w| w as i64).sum();
                assert!((sum - one).abs() <= tap.weights.len() as i64, "{input}->{output}: {sum}");
            }
        }
        // Upscaling reads 6 neighbours, shrinking 100 -> 7 about 6 * 100 / 7.
        assert_eq!(taps(37, 64)[30].weights.len(), 6);
        assert!(taps(100, 7)[3].weights.len() >= 85);
    }

    #[test]
    fn a_constant_image_stays_constant_and_the_same_size_is_a_copy() {
        let flat = RgbImage::new(9, 7, [17u8, 130, 250].repeat(63)).unwrap();
        let resized = resize_lanczos(&flat, 20, 3).unwrap();
        assert!(resized.pixels().chunks(3).all(|p| p == [17, 130, 250]));
        let varied = RgbImage::new(3, 2, (0..18).map(|v| v * 13).collect()).unwrap();
        assert_eq!(resize_lanczos(&varied, 3, 2).unwrap().pixels(), varied.pixels());
        let batch = prepare_control_images(&[varied.clone(), flat], 3, 2).unwrap();
        assert_eq!(batch.len(), 2 * 3 * 2 * 3);
        assert_eq!(batch[1], 13.0 / 255.0);
        assert!(prepare_control_images(&[varied], 0, 2).is_err());
    }
}
