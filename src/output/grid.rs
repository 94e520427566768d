//! The prompt grid: the first frame of each clip, shrunk, in a grid, with its prompt printed under
//! it in our 5x7 bitmap font (word-wrapped, cut with "..." past a few lines).

use crate::error::{Error, Result};

use super::RgbImage;
use super::font::{GLYPH_H, GLYPH_W, glyph};

/// One grid cell: an image and the caption under it (the clip's prompt).
#[derive(Clone, Debug)]
pub struct GridCell {
    pub image: RgbImage,
    pub caption: String,
}

const PAPER: [u8; 3] = [255, 255, 255];
const INK: [u8; 3] = [24, 24, 24];
const PAD: usize = 16;
/// Widest grid, pixels: thumbnails shrink (by whole factors) to keep the grid within it.
const MAX_GRID_WIDTH: usize = 4096;
const MAX_THUMB_WIDTH: usize = 512;
const MAX_CELLS: usize = 1024;
const MAX_CAPTION_LINES: usize = 6;

/// Shrinks `image` by the whole factor `f` (mean of each f x f block; edge blocks use the pixels
/// they have).
fn shrink(image: &RgbImage, f: usize) -> (usize, usize, Vec<u8>) {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let (tw, th) = (w.div_ceil(f), h.div_ceil(f));
    let src = image.pixels();
    let mut out = vec![0u8; tw * th * 3];
    for ty in 0..th {
        for tx in 0..tw {
            let mut sum = [0u32; 3];
            let mut n = 0u32;
            for y in ty * f..((ty + 1) * f).min(h) {
                for x in tx * f..((tx + 1) * f).min(w) {
                    let p = &src[(y * w + x) * 3..(y * w + x) * 3 + 3];
                    for c in 0..3 {
                        sum[c] += p[c] as u32;
                    }
                    n += 1;
                }
            }
            for c in 0..3 {
                out[(ty * tw + tx) * 3 + c] = ((sum[c] + n / 2) / n) as u8;
            }
        }
    }
    (tw, th, out)
}

/// Splits `text` into lines of at most `width` characters at spaces (a longer word is cut), at
/// most `max_lines`, the last ending in "..." when text is left over.
fn wrap(text: &str, width: usize, max_lines: usize) -> Vec<String> {
    let width = width.max(4);
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    let words: Vec<String> = text.split_whitespace().map(|w| w.chars().collect()).collect();
    let mut truncated = false;
    'words: for word in words {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let used = current.chars().count();
            let gap = usize::from(used > 0);
            if used + gap + word.len() <= width {
                if gap == 1 {
                    current.push(' ');
                }
                current.extend(word.iter());
                break;
            }
            if used == 0 {
                // A word longer than a line: cut it.
                let rest = word.split_off(width);
                lines.push(word.iter().collect());
                word = rest;
            } else {
                lines.push(std::mem::take(&mut current));
            }
            if lines.len() == max_lines {
                truncated = true;
                break 'words;
            }
        }
    }
    if !current.is_empty() {
        if lines.len() < max_lines {
            lines.push(current);
        } else {
            truncated = true;
        }
    }
    if truncated && let Some(last) = lines.last_mut() {
        let keep = width.saturating_sub(3).min(last.chars().count());
        *last = last.chars().take(keep).collect::<String>() + "...";
    }
    lines
}

/// Draws `text` at (x, y) with each font cell `scale` x `scale` pixels.
fn draw_text(canvas: &mut [u8], canvas_w: usize, x: usize, y: usize, text: &str, scale: usize) {
    for (i, c) in text.chars().enumerate() {
        let rows = glyph(c);
        let gx = x + i * (GLYPH_W + 1) * scale;
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..GLYPH_W {
                if bits & (1 << (GLYPH_W - 1 - col)) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (px, py) = (gx + col * scale + dx, y + r * scale + dy);
                        let at = (py * canvas_w + px) * 3;
                        canvas[at..at + 3].copy_from_slice(&INK);
                    }
                }
            }
        }
    }
}

/// Lays the cells out in a grid of about square shape (columns = ceil(sqrt(n))), each image
/// shrunk by the smallest whole factor that makes it at most 512 pixels wide (less when many
/// columns would make the grid wider than 4096), its caption under it.
pub fn prompt_grid(cells: &[GridCell]) -> Result<RgbImage> {
    if cells.is_empty() {
        return Err(Error::Input("prompt grid: no images given".into()));
    }
    if cells.len() > MAX_CELLS {
        return Err(Error::Input(format!("prompt grid: {} images, at most {MAX_CELLS}", cells.len())));
    }
    let n = cells.len();
    let columns = (1..=n).find(|c| c * c >= n).unwrap_or(n);
    let rows = n.div_ceil(columns);
    let max_thumb = MAX_THUMB_WIDTH.min((MAX_GRID_WIDTH - PAD) / columns - PAD);
    let widest = cells.iter().map(|c| c.image.width() as usize).max().unwrap_or(1);
    let factor = widest.div_ceil(max_thumb).max(1);
    let thumbs: Vec<(usize, usize, Vec<u8>)> = cells.iter().map(|c| shrink(&c.image, factor)).collect();
    let cell_w = thumbs.iter().map(|t| t.0).max().unwrap_or(1);
    let thumb_h = thumbs.iter().map(|t| t.1).max().unwrap_or(1);

    // Text: 2x font where a line still holds 24 characters, else 1x.
    let scale = if cell_w >= 24 * (GLYPH_W + 1) * 2 { 2 } else { 1 };
    let chars_per_line = (cell_w / ((GLYPH_W + 1) * scale)).max(1);
    let line_h = (GLYPH_H + 3) * scale;
    let captions: Vec<Vec<String>> =
        cells.iter().map(|c| wrap(&c.caption, chars_per_line, MAX_CAPTION_LINES)).collect();
    let text_h = captions.iter().map(|l| l.len()).max().unwrap_or(0) * line_h;
    let cell_h = thumb_h + if text_h > 0 { PAD / 2 + text_h } else { 0 };

    let grid_w = PAD + columns * (cell_w + PAD);
    let grid_h = PAD + rows * (cell_h + PAD);
    let mut canvas: Vec<u8> = PAPER.iter().copied().cycle().take(grid_w * grid_h * 3).collect();
    for (i, ((tw, th, pixels), lines)) in thumbs.iter().zip(&captions).enumerate() {
        let (col, row) = (i % columns, i / columns);
        let (x0, y0) = (PAD + col * (cell_w + PAD), PAD + row * (cell_h + PAD));
        for y in 0..*th {
            let dst = ((y0 + y) * grid_w + x0) * 3;
            canvas[dst..dst + tw * 3].copy_from_slice(&pixels[y * tw * 3..(y + 1) * tw * 3]);
        }
        for (k, line) in lines.iter().enumerate() {
            draw_text(&mut canvas, grid_w, x0, y0 + thumb_h + PAD / 2 + k * line_h, line, scale);
        }
    }
    RgbImage::new(grid_w as u32, grid_h as u32, canvas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_breaks_at_spaces_cuts_long_words_and_marks_truncation() {
        assert_eq!(wrap("a cat on a mat", 6, 6), vec!["a cat", "on a", "mat"]);
        assert_eq!(wrap("abcdefghij", 4, 6), vec!["abcd", "efgh", "ij"]);
        assert_eq!(wrap("one two three four", 5, 2), vec!["one", "tw..."]);
        assert_eq!(wrap("   ", 8, 3), Vec::<String>::new());
    }

    #[test]
    fn shrink_averages_blocks() {
        let img = RgbImage::new(3, 1, vec![0, 0, 0, 100, 50, 10, 7, 7, 7]).unwrap();
        let (w, h, px) = shrink(&img, 2);
        assert_eq!((w, h), (2, 1));
        assert_eq!(px, vec![50, 25, 5, 7, 7, 7]);
    }
}
