//! Reading a hint or a source image from a PNG of any colour type, as diffusers' control-image
//! processor sees it after Pillow's `convert("RGB")`: grey is replicated to three channels and
//! alpha is dropped (not composited). Unlike Pillow, 16-bit samples are scaled to 8 bits
//! (round(v / 257)) rather than clipped at 255, which would turn most of a 16-bit map white.
//! Line art, soft edges or Canny maps made elsewhere come in this way; so do images for [`canny`].
//!
//! [`canny`]: super::canny::canny

use std::path::Path;

use super::check_size;
use crate::error::{Error, Result};
use crate::output::RgbImage;

/// Largest image file read, in bytes.
const PNG_LIMIT: u64 = 256 << 20;

/// Reads a PNG as 8-bit RGB.
pub fn load_image_png(path: &Path) -> Result<RgbImage> {
    let bytes = crate::io::read_regular(path, PNG_LIMIT, "image PNG")?;
    decode_image_png(&bytes, &path.display().to_string())
}

/// [`load_image_png`] on the file's bytes; `name` names it in errors.
pub fn decode_image_png(bytes: &[u8], name: &str) -> Result<RgbImage> {
    let bad = |why: String| Error::Input(format!("{name}: PNG: {why}"));
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(|e| bad(e.to_string()))?;
    let (width, height) = (reader.info().width, reader.info().height);
    check_size(width, height, &format!("{name}: PNG"))?;
    let (color, depth) = reader.output_color_type();
    let channels = color.samples();
    let size = reader.output_buffer_size().ok_or_else(|| bad("image too large".into()))?;
    let mut data = vec![0u8; size];
    reader.next_frame(&mut data).map_err(|e| bad(e.to_string()))?;
    let sample = |i: usize| -> u8 {
        if depth == png::BitDepth::Sixteen {
            ((u16::from_be_bytes([data[2 * i], data[2 * i + 1]]) as u32 * 2 + 257) / 514) as u8
        } else {
            data[i]
        }
    };
    let pixels = (0..width as usize * height as usize)
        .flat_map(|p| match channels {
            1 | 2 => [sample(p * channels); 3],
            _ => [sample(p * channels), sample(p * channels + 1), sample(p * channels + 2)],
        })
        .collect();
    RgbImage::new(width, height, pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(width: u32, color: png::ColorType, depth: png::BitDepth, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width, 1);
        encoder.set_color(color);
        encoder.set_depth(depth);
        encoder.write_header().unwrap().write_image_data(data).unwrap();
        out
    }

    #[test]
    fn every_colour_type_becomes_rgb() {
        use png::{BitDepth::*, ColorType::*};
        let read = |bytes: Vec<u8>| decode_image_png(&bytes, "x.png").unwrap().pixels().to_vec();
        assert_eq!(read(encode(2, Grayscale, Eight, &[9, 200])), [9, 9, 9, 200, 200, 200]);
        assert_eq!(read(encode(1, GrayscaleAlpha, Eight, &[70, 0])), [70, 70, 70]);
        assert_eq!(read(encode(1, Rgba, Eight, &[1, 2, 3, 4])), [1, 2, 3]);
        // 16-bit: 65535 -> 255, 32896 (128 * 257) -> 128, 128 -> round(0.498) = 0, 129 -> 1.
        let levels: Vec<u8> = [65535u16, 32896, 128, 129].iter().flat_map(|v| v.to_be_bytes()).collect();
        assert_eq!(read(encode(4, Grayscale, Sixteen, &levels)), [255, 255, 255, 128, 128, 128, 0, 0, 0, 1, 1, 1]);
        let message = decode_image_png(b"GIF89a", "pic.gif").unwrap_err().to_string();
        assert!(message.contains("pic.gif"), "{message}");
    }
}
