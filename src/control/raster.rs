//! The three drawing primitives of the OpenPose skeleton, rasterised as OpenCV draws them without
//! antialiasing (LINE_8, integer coordinates): an ellipse as a polygon of one vertex per degree
//! (`cv2.ellipse2Poly`), a filled convex polygon (`cv2.fillConvexPoly`: its outline as 8-connected
//! lines plus the spans between its edges on each row) and a filled midpoint circle
//! (`cv2.circle` with thickness -1). Everything is clipped to the canvas.

/// An RGB canvas being drawn on.
pub(crate) struct Canvas {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl Canvas {
    /// A black canvas.
    pub fn new(width: u32, height: u32) -> Canvas {
        let (width, height) = (width as usize, height as usize);
        Canvas { width, height, pixels: vec![0; width * height * 3] }
    }

    fn put(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let at = (y as usize * self.width + x as usize) * 3;
            self.pixels[at..at + 3].copy_from_slice(&color);
        }
    }

    /// Pixels `x0..=x1` of row `y`, clipped.
    fn span(&mut self, y: i64, x0: i64, x1: i64, color: [u8; 3]) {
        if y < 0 || y as usize >= self.height || x1 < 0 || x0 >= self.width as i64 {
            return;
        }
        for x in x0.max(0)..=x1.min(self.width as i64 - 1) {
            self.put(x, y, color);
        }
    }

    /// An 8-connected Bresenham line, both ends included; only its pixels on the canvas are
    /// visited, so a far-away end costs no more than the visible part.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), color: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), (y1 - y0).abs());
        let (sx, sy) = ((x1 - x0).signum(), (y1 - y0).signum());
        let steps = dx.max(dy);
        // Skip to where the line may enter the canvas, step along the major axis.
        let margin = |p: i64, size: usize| if p < 0 { -p } else { (p - size as i64 + 1).max(0) };
        let mut err = 2 * dy.min(dx) - steps;
        let (mut x, mut y) = (x0, y0);
        for _ in 0..=steps {
            self.put(x, y, color);
            if margin(x, self.width) > steps && margin(y, self.height) > steps {
                break;
            }
            if dx >= dy {
                if err >= 0 {
                    y += sy;
                    err -= 2 * dx;
                }
                x += sx;
                err += 2 * dy;
            } else {
                if err >= 0 {
                    x += sx;
                    err -= 2 * dy;
                }
                y += sy;
                err += 2 * dx;
            }
        }
    }

    /// A filled convex polygon with integer vertices: the outline, then on each row the span
    /// between the edges' crossings rounded to the nearest pixel.
    pub fn fill_convex_polygon(&mut self, vertices: &[(i64, i64)], color: [u8; 3]) {
        let n = vertices.len();
        for i in 0..n {
            self.line(vertices[(i + n - 1) % n], vertices[i], color);
        }
        if n < 3 {
            return;
        }
        let top = vertices.iter().map(|v| v.1).min().unwrap_or(0).max(0);
        let bottom = vertices.iter().map(|v| v.1).max().unwrap_or(0).min(self.height as i64 - 1);
        for y in top..=bottom {
            let (mut left, mut right) = (f64::INFINITY, f64::NEG_INFINITY);
            for i in 0..n {
                let (a, b) = (vertices[(i + n - 1) % n], vertices[i]);
                if a.1 == b.1 || y < a.1.min(b.1) || y > a.1.max(b.1) {
                    continue;
                }
                let x = a.0 as f64 + (y - a.1) as f64 * (b.0 - a.0) as f64 / (b.1 - a.1) as f64;
                left = left.min(x);
                right = right.max(x);
            }
            if left <= right {
                self.span(y, (left + 0.5).floor() as i64, (right + 0.5).floor() as i64, color);
            }
        }
    }

    /// A filled circle by the midpoint algorithm: spans at rows cy ± dy and cy ± dx.
    pub fn fill_circle(&mut self, (cx, cy): (i64, i64), radius: i64, color: [u8; 3]) {
        let (mut dx, mut dy) = (radius, 0);
        let (mut err, mut plus, mut minus) = (0, 1, 2 * radius - 1);
        while dx >= dy {
            self.span(cy - dy, cx - dx, cx + dx, color);
            self.span(cy + dy, cx - dx, cx + dx, color);
            self.span(cy - dx, cx - dy, cx + dy, color);
            self.span(cy + dx, cx - dy, cx + dy, color);
            dy += 1;
            err += plus;
            plus += 2;
            if err > 0 {
                err -= minus;
                dx -= 1;
                minus -= 2;
            }
        }
    }
}

/// sin of a whole number of degrees as OpenCV's drawing code has it: a table of f32 values.
fn sin_degrees(degrees: i32) -> f64 {
    (degrees as f64).to_radians().sin() as f32 as f64
}

/// The closed polygon approximating an ellipse: centre, half-axes, rotation in whole degrees,
/// one vertex per degree, rounded half to even, repeated neighbours merged (`cv2.ellipse2Poly`
/// with arc 0..360 and delta 1).
pub(crate) fn ellipse_polygon(center: (i64, i64), half_axes: (i64, i64), angle: i32) -> Vec<(i64, i64)> {
    let angle = angle.rem_euclid(360);
    let (cos_a, sin_a) = (sin_degrees(90 - angle), sin_degrees(angle));
    let mut points: Vec<(i64, i64)> = Vec::with_capacity(361);
    for degree in 0..=360 {
        let x = half_axes.0 as f64 * sin_degrees(90 - degree);
        let y = half_axes.1 as f64 * sin_degrees(degree);
        let px = (center.0 as f64 + x * cos_a - y * sin_a).round_ties_even() as i64;
        let py = (center.1 as f64 + x * sin_a + y * cos_a).round_ties_even() as i64;
        if points.last() != Some(&(px, py)) {
            points.push((px, py));
        }
    }
    if points.len() == 1 {
        points.push(points[0]);
    }
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(canvas: &Canvas) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for y in 0..canvas.height {
            for x in 0..canvas.width {
                if canvas.pixels[(y * canvas.width + x) * 3] != 0 {
                    out.push((x, y));
                }
            }
        }
        out
    }

    #[test]
    fn circle_of_radius_4_is_the_midpoint_disc() {
        let mut canvas = Canvas::new(16, 16);
        canvas.fill_circle((8, 8), 4, [255, 0, 0]);
        // Half-widths of the rows 0..=4 away from the centre in what cv2.circle(img, (8, 8), 4,
        // 255, -1) draws (printed with OpenCV 5.1).
        let half = [4, 3, 3, 2, 0];
        let mut expected = Vec::new();
        for y in 4..=12i64 {
            let h = half[(y - 8).unsigned_abs() as usize];
            for x in 8 - h..=8 + h {
                expected.push((x as usize, y as usize));
            }
        }
        expected.sort_by_key(|&(x, y)| (y, x));
        assert_eq!(lit(&canvas), expected);
    }

    #[test]
    fn a_far_line_is_clipped_without_walking_it() {
        let mut canvas = Canvas::new(8, 8);
        canvas.line((-1_000_000, 3), (1_000_000, 3), [9, 9, 9]);
        let row: Vec<_> = lit(&canvas).into_iter().map(|(_, y)| y).collect();
        assert!(row.len() <= 8 && row.iter().all(|&y| y == 3));
    }

    #[test]
    fn ellipse_polygon_spans_its_axes() {
        let points = ellipse_polygon((50, 40), (20, 4), 90);
        // Rotated by 90 degrees the long axis is vertical.
        let ys: Vec<i64> = points.iter().map(|p| p.1).collect();
        let xs: Vec<i64> = points.iter().map(|p| p.0).collect();
        assert_eq!((ys.iter().min(), ys.iter().max()), (Some(&20), Some(&60)));
        assert_eq!((xs.iter().min(), xs.iter().max()), (Some(&46), Some(&54)));
    }
}
