//! Canny edges as ControlNet canny models were trained on them: controlnet_aux's CannyDetector runs
//! `cv2.Canny(image, 100, 200)` on the RGB image, with OpenCV's defaults (3x3 Sobel, L1 gradient
//! |gx| + |gy|, no blur before it) and gives white edges on black.
//!
//! Steps, as OpenCV's `Canny` does them (opencv `modules/imgproc/src/canny.cpp`): Sobel
//! derivatives per channel with replicated borders, each pixel taking the channel of largest
//! magnitude (the first on ties); non-maximum suppression along the gradient quantised to 0, 45,
//! 90 and 135 degrees (tan 22.5 degrees in 15-bit fixed point); pixels above the high threshold
//! start edges, which grow through 8-connected pixels above the low one. A grey image (three
//! equal channels) is a plain single-channel Canny.

use crate::error::Result;
use crate::output::RgbImage;

/// controlnet_aux's CannyDetector defaults.
pub const CANNY_LOW: f32 = 100.0;
pub const CANNY_HIGH: f32 = 200.0;

/// tan(22.5 degrees) in the 15-bit fixed point of the direction test.
const TAN_22_5: i64 = 13573;
const SHIFT: u32 = 15;

/// White (255) edges on black, three equal channels, the size of `image`. Thresholds are on the
/// L1 gradient magnitude (floored to integers; swapped when `low > high`).
pub fn canny(image: &RgbImage, low: f32, high: f32) -> Result<RgbImage> {
    if !(low.is_finite() && high.is_finite() && low >= 0.0 && high >= 0.0) {
        return crate::input_err!("Canny thresholds {low}, {high}: both must be finite and at least 0");
    }
    let (low, high) = (low.min(high).floor() as i32, low.max(high).floor() as i32);
    let (w, h) = (image.width() as usize, image.height() as usize);
    let (dx, dy, magnitude) = gradients(image.pixels(), w, h);

    // Magnitudes with a zero border, so neighbours of edge pixels need no bounds checks.
    let pw = w + 2;
    let mut padded = vec![0i32; pw * (h + 2)];
    for y in 0..h {
        padded[(y + 1) * pw + 1..][..w].copy_from_slice(&magnitude[y * w..][..w]);
    }
    let mag = |x: isize, y: isize| padded[(y + 1) as usize * pw + (x + 1) as usize];

    // 0: not an edge, 1: candidate (a local maximum above `low`), 2: edge.
    let mut class = vec![0u8; w * h];
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let m = magnitude[i];
            if m <= low {
                continue;
            }
            let (gx, gy) = (dx[i] as i64, dy[i] as i64);
            let (xi, yi) = (x as isize, y as isize);
            let tan_x = gx.abs() * TAN_22_5;
            let scaled_y = gy.abs() << SHIFT;
            let local_max = if scaled_y < tan_x {
                m > mag(xi - 1, yi) && m >= mag(xi + 1, yi)
            } else if scaled_y > tan_x + (gx.abs() << (SHIFT + 1)) {
                m > mag(xi, yi - 1) && m >= mag(xi, yi + 1)
            } else {
                // Diagonal: along the main diagonal when gx and gy share a sign (y grows down).
                let s = if (gx < 0) != (gy < 0) { -1 } else { 1 };
                m > mag(xi - s, yi - 1) && m > mag(xi + s, yi + 1)
            };
            if local_max {
                if m > high {
                    class[i] = 2;
                    stack.push(i);
                } else {
                    class[i] = 1;
                }
            }
        }
    }

    // Hysteresis: grow edges into connected candidates.
    while let Some(i) = stack.pop() {
        let (x, y) = ((i % w) as isize, (i / w) as isize);
        for (ox, oy) in [(-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)] {
            let (nx, ny) = (x + ox, y + oy);
            if nx >= 0 && ny >= 0 && (nx as usize) < w && (ny as usize) < h {
                let j = ny as usize * w + nx as usize;
                if class[j] == 1 {
                    class[j] = 2;
                    stack.push(j);
                }
            }
        }
    }
    let pixels = class.iter().flat_map(|&c| [if c == 2 { 255 } else { 0 }; 3]).collect();
    RgbImage::new(image.width(), image.height(), pixels)
}

/// Sobel x and y derivatives and L1 magnitude per pixel, from the channel of largest magnitude.
fn gradients(rgb: &[u8], w: usize, h: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let at = |x: isize, y: isize, c: usize| {
        let (x, y) = (x.clamp(0, w as isize - 1) as usize, y.clamp(0, h as isize - 1) as usize);
        rgb[(y * w + x) * 3 + c] as i32
    };
    let (mut dx, mut dy, mut magnitude) = (vec![0; w * h], vec![0; w * h], vec![0; w * h]);
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            for c in 0..3 {
                let gx = (at(x + 1, y - 1, c) + 2 * at(x + 1, y, c) + at(x + 1, y + 1, c))
                    - (at(x - 1, y - 1, c) + 2 * at(x - 1, y, c) + at(x - 1, y + 1, c));
                let gy = (at(x - 1, y + 1, c) + 2 * at(x, y + 1, c) + at(x + 1, y + 1, c))
                    - (at(x - 1, y - 1, c) + 2 * at(x, y - 1, c) + at(x + 1, y - 1, c));
                let m = gx.abs() + gy.abs();
                if c == 0 || m > magnitude[i] {
                    (dx[i], dy[i], magnitude[i]) = (gx, gy, m);
                }
            }
        }
    }
    (dx, dy, magnitude)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> RgbImage {
        let f = &f;
        let pixels = (0..h).flat_map(|y| (0..w).flat_map(move |x| [f(x, y); 3])).collect::<Vec<_>>();
        RgbImage::new(w, h, pixels).unwrap()
    }

    fn edge_columns(image: &RgbImage, row: u32) -> Vec<u32> {
        (0..image.width()).filter(|&x| image.pixels()[((row * image.width() + x) * 3) as usize] == 255).collect()
    }

    #[test]
    fn a_vertical_step_gives_one_thin_edge() {
        // Step from 10 to 200 between columns 7 and 8: Sobel responds 4 * 190 at both columns and
        // suppression keeps the left one (m > left, m >= right). Expected values in these tests
        // are what cv2.Canny gives on the same arrays (OpenCV 5.1).
        let image = gray(16, 8, |x, _| if x < 8 { 10 } else { 200 });
        let edges = canny(&image, CANNY_LOW, CANNY_HIGH).unwrap();
        for row in 0..8 {
            assert_eq!(edge_columns(&edges, row), vec![7], "row {row}");
        }
    }

    #[test]
    fn weak_edges_survive_only_when_connected_to_strong_ones() {
        // Left half of the step is strong (contrast 100 -> Sobel 400), right half weak (40 -> 160):
        // the weak part joins the strong one along the edge. A separate weak step stays out.
        let image = gray(24, 24, |x, y| match (x, y) {
            (_, 0..=11) if x < 12 => 0,
            (_, 0..=11) => 100,
            (_, 12..=23) if x < 12 => 60,
            _ => 100,
        });
        let edges = canny(&image, 100.0, 300.0).unwrap();
        assert_eq!(edge_columns(&edges, 3), vec![11]);
        assert_eq!(edge_columns(&edges, 20), vec![11]);
        let isolated = gray(24, 24, |x, _| if x < 12 { 60 } else { 100 });
        assert!(edge_columns(&canny(&isolated, 100.0, 300.0).unwrap(), 10).is_empty());
        assert_eq!(edge_columns(&canny(&isolated, 100.0, 150.0).unwrap(), 10), vec![11]);
    }

    #[test]
    fn thresholds_are_checked() {
        let image = gray(4, 4, |x, y| (x * 50 + y) as u8);
        assert!(canny(&image, f32::NAN, 1.0).is_err());
        assert!(canny(&image, -1.0, 1.0).is_err());
        assert_eq!(canny(&image, 200.0, 100.0).unwrap().pixels(), canny(&image, 100.0, 200.0).unwrap().pixels());
    }
}
