//! Depth hints. SDXL depth ControlNets were trained on 8-bit greyscale relative depth with near =
//! bright (MiDaS and Depth Anything disparity, min-max normalised, replicated to three channels;
//! controlnet_aux `midas/__init__.py`). A depth map here is one value per pixel from an 8- or
//! 16-bit PNG or from floats; [`depth_hint`] maps a range of it onto 0..=255.
//!
//! Float maps come as NumPy `.npy` files (`numpy.save` of a depth model's output: float16/32/64,
//! shape (H, W), (1, H, W), (H, W, 1) or (1, 1, H, W), C order) or as values in memory.
//!
//! 16-bit PNGs are read at full precision (Pillow's `convert("RGB")`, which diffusers applies,
//! clips them at 255 and turns most of the map white). A PNG with colour channels is accepted
//! only when they are equal: a colour-mapped depth image (an INFERNO preview) is not a hint.

use std::path::Path;

use super::check_size;
use crate::error::{Error, Result};
use crate::output::RgbImage;

/// Largest depth PNG read, in bytes.
const PNG_LIMIT: u64 = 256 << 20;
/// Largest depth `.npy` read: a float64 map of the largest size.
const NPY_LIMIT: u64 = 8 * (super::MAX_SIDE as u64).pow(2) + 4096;

/// One depth value per pixel, row-major, as read (not normalised).
#[derive(Clone, Debug, PartialEq)]
pub struct DepthMap {
    width: u32,
    height: u32,
    values: Vec<f32>,
}

/// The values mapped onto 0 (dark) ..= 255 (bright).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DepthRange {
    /// Each map's own minimum and maximum (what the annotators do per image). Steady within a
    /// frame, but a video's range moves from frame to frame and the hint flickers.
    PerImage,
    /// One range for a whole clip (say, the union of its maps' [`DepthMap::range`]s): frames keep
    /// their relative brightness.
    Fixed { low: f32, high: f32 },
}

impl DepthMap {
    /// `values`: `width * height` finite floats, row-major.
    pub fn from_values(width: u32, height: u32, values: Vec<f32>, name: &str) -> Result<DepthMap> {
        check_size(width, height, name)?;
        if values.len() as u64 != width as u64 * height as u64 {
            return crate::input_err!("{name}: {} depth values for {width}x{height} pixels", values.len());
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return crate::input_err!(
                "{name}: depth value {} at pixel ({}, {}) is not finite",
                values[i],
                i as u32 % width,
                i as u32 / width
            );
        }
        Ok(DepthMap { width, height, values })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Smallest and largest value.
    pub fn range(&self) -> (f32, f32) {
        self.values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
    }
}

/// Reads a greyscale depth PNG (8 or 16 bits; with alpha, which is ignored; or colour with equal
/// channels). Values are the PNG's levels: 0..=255 or 0..=65535.
pub fn load_depth_png(path: &Path) -> Result<DepthMap> {
    let bytes = crate::io::read_regular(path, PNG_LIMIT, "depth PNG")?;
    decode_depth_png(&bytes, &path.display().to_string())
}

/// [`load_depth_png`] on the file's bytes; `name` names it in errors.
pub fn decode_depth_png(bytes: &[u8], name: &str) -> Result<DepthMap> {
    let bad = |why: String| Error::Input(format!("{name}: depth PNG: {why}"));
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    // Palettes and 1/2/4-bit greys become 8-bit samples; 16-bit samples stay 16-bit.
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(|e| bad(e.to_string()))?;
    let (width, height) = (reader.info().width, reader.info().height);
    check_size(width, height, &format!("{name}: depth PNG"))?;
    let (color, depth) = reader.output_color_type();
    let channels = match color {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err(bad("indexed colour left after expansion".into())),
    };
    let size = reader.output_buffer_size().ok_or_else(|| bad("image too large".into()))?;
    let mut data = vec![0u8; size];
    reader.next_frame(&mut data).map_err(|e| bad(e.to_string()))?;
    let sample_bytes = if depth == png::BitDepth::Sixteen { 2 } else { 1 };
    let sample = |i: usize| {
        if sample_bytes == 2 { u16::from_be_bytes([data[2 * i], data[2 * i + 1]]) } else { data[i] as u16 }
    };
    let pixels = width as usize * height as usize;
    let mut values = Vec::with_capacity(pixels);
    for p in 0..pixels {
        let first = sample(p * channels);
        if channels >= 3 && (sample(p * channels + 1) != first || sample(p * channels + 2) != first) {
            return Err(bad(format!(
                "pixel ({}, {}) has unequal colour channels: a colour-mapped depth image is not a depth map; give greyscale",
                p as u32 % width,
                p as u32 / width
            )));
        }
        values.push(first as f32);
    }
    DepthMap::from_values(width, height, values, name)
}

/// Reads a float depth map saved by `numpy.save`.
pub fn load_depth_npy(path: &Path) -> Result<DepthMap> {
    let bytes = crate::io::read_regular(path, NPY_LIMIT, "depth .npy")?;
    decode_depth_npy(&bytes, &path.display().to_string())
}

/// [`load_depth_npy`] on the file's bytes; `name` names it in errors. The format: magic
/// `\x93NUMPY`, version, header length (2 bytes in version 1, 4 after), a Python dict literal
/// with `descr`, `fortran_order` and `shape`, then the data (numpy `lib/format.py`).
pub fn decode_depth_npy(bytes: &[u8], name: &str) -> Result<DepthMap> {
    let bad = |why: String| Error::Input(format!("{name}: depth .npy: {why}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a NumPy .npy file (no \\x93NUMPY magic)".into()));
    }
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(bad(format!("format version {v} is not 1, 2 or 3"))),
    };
    let header = bytes
        .get(header_start..header_start.saturating_add(header_len))
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("header cut short or not text".into()))?;
    let field = |key: &str| {
        let at = header.find(&format!("'{key}':")).ok_or_else(|| bad(format!("header has no '{key}'")))?;
        Ok::<&str, Error>(header[at + key.len() + 3..].trim_start())
    };
    let descr = field("descr")?;
    let sample_bytes = ["<f2", "<f4", "<f8"]
        .iter()
        .position(|d| descr.starts_with(&format!("'{d}'")))
        .map(|i| 2usize << i)
        .ok_or_else(|| {
            bad(format!(
                "dtype {}: only little-endian float16/32/64 maps are read",
                descr.split(',').next().unwrap_or("")
            ))
        })?;
    if !field("fortran_order")?.starts_with("False") {
        return Err(bad("fortran_order is True; save the map in C order".into()));
    }
    let shape_text = field("shape")?;
    let shape_text = shape_text
        .strip_prefix('(')
        .and_then(|t| t.split(')').next())
        .ok_or_else(|| bad("shape is not a tuple".into()))?;
    let shape: Vec<u64> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.parse().map_err(|_| bad(format!("shape ({shape_text}) is not whole numbers"))))
        .collect::<Result<_>>()?;
    let (height, width) = match shape[..] {
        [h, w] | [1, h, w] | [1, 1, h, w] => (h, w),
        [h, w, 1] => (h, w),
        _ => return Err(bad(format!("shape ({shape_text}); expected (H, W), (1, H, W), (H, W, 1) or (1, 1, H, W)"))),
    };
    if width == 0 || height == 0 || width > super::MAX_SIDE as u64 || height > super::MAX_SIDE as u64 {
        return Err(bad(format!("a {width}x{height} map: both sides must be within 1..={}", super::MAX_SIDE)));
    }
    let count = (width * height) as usize;
    let data = &bytes[header_start + header_len..];
    if data.len() != count * sample_bytes {
        return Err(bad(format!("{} data bytes for {count} values of {sample_bytes} bytes", data.len())));
    }
    let values = data
        .chunks_exact(sample_bytes)
        .map(|b| match sample_bytes {
            2 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            4 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            _ => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32,
        })
        .collect();
    DepthMap::from_values(width as u32, height as u32, values, name)
}

/// The 8-bit hint: `range` mapped linearly onto 0..=255 (rounded, clamped), replicated to three
/// channels. Near must come out bright: maps of disparity or relative inverse depth (MiDaS, Depth
/// Anything) are near = large already; metric depth (far = large, ZoeDepth, a renderer's Z buffer)
/// needs `invert`. A flat range gives black.
pub fn depth_hint(map: &DepthMap, range: DepthRange, invert: bool) -> Result<RgbImage> {
    let (low, high) = match range {
        DepthRange::PerImage => map.range(),
        DepthRange::Fixed { low, high } => {
            if !(low.is_finite() && high.is_finite() && low <= high) {
                return crate::input_err!("depth range {low}..{high}: needs finite bounds, low <= high");
            }
            (low, high)
        }
    };
    let span = (high - low) as f64;
    let pixels = map
        .values
        .iter()
        .flat_map(|&v| {
            let t = if span > 0.0 { ((v - low) as f64 / span).clamp(0.0, 1.0) } else { 0.0 };
            let t = if invert && span > 0.0 { 1.0 - t } else { t };
            [(t * 255.0).round() as u8; 3]
        })
        .collect();
    RgbImage::new(map.width, map.height, pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(width: u32, height: u32, color: png::ColorType, depth: png::BitDepth, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(color);
        encoder.set_depth(depth);
        encoder.write_header().unwrap().write_image_data(data).unwrap();
        out
    }

    #[test]
    fn sixteen_bit_levels_are_kept_whole() {
        let levels: [u16; 4] = [0, 257, 40000, 65535];
        let data: Vec<u8> = levels.iter().flat_map(|v| v.to_be_bytes()).collect();
        let png = encode(2, 2, png::ColorType::Grayscale, png::BitDepth::Sixteen, &data);
        let map = decode_depth_png(&png, "d16.png").unwrap();
        assert_eq!(map.values(), &[0.0, 257.0, 40000.0, 65535.0]);
        let hint = depth_hint(&map, DepthRange::PerImage, false).unwrap();
        // 40000 / 65535 * 255 = 155.6 -> 156; 257 / 65535 * 255 = 1.
        assert_eq!(hint.pixels(), &[0, 0, 0, 1, 1, 1, 156, 156, 156, 255, 255, 255]);
        let inverted = depth_hint(&map, DepthRange::PerImage, true).unwrap();
        assert_eq!(inverted.pixels()[6..9], [99, 99, 99]);
    }

    #[test]
    fn grey_alpha_and_equal_rgb_read_the_grey_and_colour_maps_are_refused() {
        let ga = encode(2, 1, png::ColorType::GrayscaleAlpha, png::BitDepth::Eight, &[10, 255, 90, 0]);
        assert_eq!(decode_depth_png(&ga, "ga.png").unwrap().values(), &[10.0, 90.0]);
        let rgb = encode(2, 1, png::ColorType::Rgb, png::BitDepth::Eight, &[7, 7, 7, 200, 200, 200]);
        assert_eq!(decode_depth_png(&rgb, "rgb.png").unwrap().values(), &[7.0, 200.0]);
        let inferno = encode(2, 1, png::ColorType::Rgb, png::BitDepth::Eight, &[7, 7, 7, 250, 200, 30]);
        let message = decode_depth_png(&inferno, "inferno.png").unwrap_err().to_string();
        assert!(message.contains("inferno.png") && message.contains("(1, 0)"), "{message}");
        assert!(decode_depth_png(b"not a png", "junk.png").unwrap_err().to_string().contains("junk.png"));
    }

    fn npy(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
        let header = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}\n",
            if fortran { "True" } else { "False" }
        );
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn npy_maps_of_each_float_width_and_shape() {
        let f16: Vec<u8> = [0.5f32, 2.0, -1.0].iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let map = decode_depth_npy(&npy("<f2", false, "(1, 3)", &f16), "h.npy").unwrap();
        assert_eq!((map.width(), map.height(), map.values()), (3, 1, &[0.5, 2.0, -1.0][..]));
        let f64s: Vec<u8> = [1.25f64, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        for shape in ["(2, 1)", "(1, 2, 1)", "(2, 1, 1)", "(1, 1, 2, 1)"] {
            let map = decode_depth_npy(&npy("<f8", false, shape, &f64s), "d.npy").unwrap();
            assert_eq!((map.width(), map.height(), map.values()), (1, 2, &[1.25, 3.0][..]), "{shape}");
        }
        let cases = [
            (npy("<i4", false, "(2,)", &[0; 8]), "dtype '<i4'"),
            (npy(">f4", false, "(1, 1)", &[0; 4]), "only little-endian"),
            (npy("<f4", true, "(1, 1)", &[0; 4]), "fortran_order"),
            (npy("<f4", false, "(2, 2, 2)", &[0; 32]), "shape (2, 2, 2)"),
            (npy("<f4", false, "(2, 2)", &[0; 12]), "12 data bytes"),
            (npy("<f4", false, "(0, 2)", &[]), "2x0 map"),
            (b"\x93NUMPY\x01\x00\xff\x00{".to_vec(), "cut short"),
            (b"PK\x03\x04 zip".to_vec(), "magic"),
        ];
        for (bytes, needle) in cases {
            let message = decode_depth_npy(&bytes, "bad.npy").unwrap_err().to_string();
            assert!(message.contains("bad.npy") && message.contains(needle), "{message} lacks {needle}");
        }
    }

    #[test]
    fn fixed_range_clamps_and_flat_maps_are_black() {
        let map = DepthMap::from_values(3, 1, vec![-1.0, 0.5, 3.0], "f").unwrap();
        let hint = depth_hint(&map, DepthRange::Fixed { low: 0.0, high: 1.0 }, false).unwrap();
        assert_eq!(hint.pixels(), &[0, 0, 0, 128, 128, 128, 255, 255, 255]);
        let flat = DepthMap::from_values(2, 1, vec![4.0, 4.0], "flat").unwrap();
        assert_eq!(depth_hint(&flat, DepthRange::PerImage, true).unwrap().pixels(), &[0; 6]);
        assert!(depth_hint(&map, DepthRange::Fixed { low: 2.0, high: 1.0 }, false).is_err());
        assert!(DepthMap::from_values(2, 1, vec![0.0, f32::NAN], "nan").is_err());
        assert!(DepthMap::from_values(2, 2, vec![0.0], "short").is_err());
    }
}
