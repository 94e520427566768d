//! RGB -> Y'CbCr 4:2:0 with the ITU-R BT.709 matrix in limited ("TV") range, 8 bits: what the
//! built-in H.264 path encodes, and what its SPS (VUI) and the mp4's `colr` box declare.
//!
//! ITU-R BT.709-6, "Signal format" (derivation of the luminance and colour-difference signals):
//!   E'Y = 0.2126 E'R + 0.7152 E'G + 0.0722 E'B
//!   E'CB = (E'B - E'Y) / 1.8556        E'CR = (E'R - E'Y) / 1.5748
//! and "Digital representation" (8-bit quantisation levels):
//!   D'Y = round(219 E'Y + 16) in 16..=235      D'CB, D'CR = round(224 E'C + 128) in 16..=240.
//! A frame's 8-bit values are taken as the non-linear signals, E' = D / 255: the sRGB-encoded
//! values go through the matrix unchanged (no transfer-curve conversion), as ffmpeg's swscale does
//! with `out_color_matrix=bt709:out_range=tv`.
//!
//! 4:2:0: each Cb and Cr sample is computed from the mean of the 2x2 block of RGB pixels it covers
//! (centre-sited, as libyuv's ARGBToI420 and JPEG do). H.264's default chroma location
//! (`chroma_sample_loc_type` 0, ITU-T H.264 Annex E) is a quarter chroma sample further left;
//! decoders do not correct for it, and the shift is below what 4:2:0 itself blurs.
//!
//! The arithmetic is exact: integer numerators over the standard's own denominators
//! (the weights as 2126/7152/722 over 10000, 1.8556 as 18556/10000, ...), rounded half up by one
//! integer division by a constant, which the compiler turns into a multiply and a shift.

use crate::error::{Error, Result};

use super::RgbImage;

/// A planar Y'CbCr 4:2:0 image (I420): `y` is `width * height` bytes, `u` (Cb) and `v` (Cr) are
/// `(width / 2) * (height / 2)` bytes each, all row-major without padding.
#[derive(Clone, Debug, Default)]
pub struct Yuv420 {
    pub width: u32,
    pub height: u32,
    pub y: Vec<u8>,
    pub u: Vec<u8>,
    pub v: Vec<u8>,
}

// E'Y numerator S = 2126 R + 7152 G + 722 B (R, G, B in 0..=255) over 10000 * 255.
const KR: u32 = 2126;
const KG: u32 = 7152;
const KB: u32 = 722;
/// D'Y = 16 + 219 S / (10000 * 255).
const Y_DEN: u32 = 10_000 * 255;
/// D'CB = 128 + 224 (10000 B - S) / (18556 * 255)   (1.8556 = 2 (1 - 0.0722)).
const CB_DEN: u64 = 18_556 * 255;
/// D'CR = 128 + 224 (10000 R - S) / (15748 * 255)   (1.5748 = 2 (1 - 0.2126)).
const CR_DEN: u64 = 15_748 * 255;

/// Luma of one pixel (exact BT.709 limited range, rounded half up).
#[inline(always)]
fn luma(r: u32, g: u32, b: u32) -> u8 {
    let s = KR * r + KG * g + KB * b;
    // Largest numerator: 219 * 2_550_000 + 16 * 2_550_000 + 1_275_000 < 2^31.
    ((219 * s + 16 * Y_DEN + Y_DEN / 2) / Y_DEN) as u8
}

/// Cb and Cr of the mean of four pixels, from the sums of their R, G and B (each 0..=1020).
#[inline(always)]
fn chroma(sr: u32, sg: u32, sb: u32) -> (u8, u8) {
    // Over 4 pixels the denominators gain a factor 4; the offsets keep every numerator positive
    // (the most negative colour difference is -(KR + KG) * 1020 for Cb, -(KG + KB) * 1020 for Cr).
    let s4 = (KR * sr + KG * sg + KB * sb) as i64;
    let cb_num = 224 * (10_000 * sb as i64 - s4) + (128 * 4 * CB_DEN + 2 * CB_DEN) as i64;
    let cr_num = 224 * (10_000 * sr as i64 - s4) + (128 * 4 * CR_DEN + 2 * CR_DEN) as i64;
    ((cb_num as u64 / (4 * CB_DEN)) as u8, (cr_num as u64 / (4 * CR_DEN)) as u8)
}

/// Converts an RGB image with even width and height to Y'CbCr 4:2:0, BT.709 limited range.
pub fn rgb_to_yuv420(image: &RgbImage) -> Result<Yuv420> {
    let mut out = Yuv420::default();
    rgb_to_yuv420_into(image, &mut out)?;
    Ok(out)
}

/// As [`rgb_to_yuv420`], reusing `out`'s buffers.
pub(crate) fn rgb_to_yuv420_into(image: &RgbImage, out: &mut Yuv420) -> Result<()> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    if w % 2 != 0 || h % 2 != 0 {
        return Err(Error::Input(format!(
            "{w}x{h} frame: 4:2:0 video needs an even width and height (one chroma sample per 2x2 pixels)"
        )));
    }
    out.width = w as u32;
    out.height = h as u32;
    out.y.resize(w * h, 0);
    out.u.resize(w / 2 * (h / 2), 0);
    out.v.resize(w / 2 * (h / 2), 0);
    let rgb = image.pixels();
    let row_bytes = w * 3;
    for cy in 0..h / 2 {
        let top = &rgb[2 * cy * row_bytes..(2 * cy + 1) * row_bytes];
        let bottom = &rgb[(2 * cy + 1) * row_bytes..(2 * cy + 2) * row_bytes];
        let (y_top, y_bottom) = out.y[2 * cy * w..(2 * cy + 2) * w].split_at_mut(w);
        let u_row = &mut out.u[cy * (w / 2)..(cy + 1) * (w / 2)];
        let v_row = &mut out.v[cy * (w / 2)..(cy + 1) * (w / 2)];
        for cx in 0..w / 2 {
            let (mut sr, mut sg, mut sb) = (0u32, 0u32, 0u32);
            for (row, y_row) in [(top, &mut *y_top), (bottom, &mut *y_bottom)] {
                for dx in 0..2 {
                    let x = 2 * cx + dx;
                    let p = &row[3 * x..3 * x + 3];
                    let (r, g, b) = (p[0] as u32, p[1] as u32, p[2] as u32);
                    y_row[x] = luma(r, g, b);
                    sr += r;
                    sg += g;
                    sb += b;
                }
            }
            (u_row[cx], v_row[cx]) = chroma(sr, sg, sb);
        }
    }
    Ok(())
}
