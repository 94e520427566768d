//! The drawing primitives of the OpenPose skeleton, rasterised as OpenCV draws them without
//! antialiasing (LINE_8, integer coordinates): an ellipse as a polygon of one vertex per degree
//! (`cv2.ellipse2Poly`), a filled convex polygon (`cv2.fillConvexPoly`: its outline as 8-connected
//! lines plus the spans between its edges on each row), a filled midpoint circle (`cv2.circle`
//! with thickness -1) and a thick line (`cv2.line` with thickness 2, the hands' edges), following
//! opencv `modules/imgproc/src/drawing.cpp`. Everything is clipped to the canvas.

/// Fractional bits of OpenCV's fixed-point drawing coordinates.
const XY_SHIFT: u32 = 16;
const XY_ONE: i64 = 1 << XY_SHIFT;

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

    /// An 8-connected Bresenham line, both ends included, as OpenCV's LineIterator draws it:
    /// clipped to the canvas first (so a far-away end costs nothing), walked from its left end,
    /// stepping along the minor axis when the error term is negative.
    fn line(&mut self, a: (i64, i64), b: (i64, i64), color: [u8; 3]) {
        let Some((a, b)) = clip_line(self.width as i64, self.height as i64, a, b) else { return };
        let ((mut x, mut y), end) = if b.0 < a.0 { (b, a) } else { (a, b) };
        let (dx, dy, sy) = (end.0 - x, (end.1 - y).abs(), (end.1 - y).signum());
        let x_major = dy <= dx;
        let (major, minor) = if x_major { (dx, dy) } else { (dy, dx) };
        let mut err = major - 2 * minor;
        for _ in 0..=major {
            self.put(x, y, color);
            let minor_step = err < 0;
            err += if minor_step { 2 * major - 2 * minor } else { -2 * minor };
            match (x_major, minor_step) {
                (true, false) => x += 1,
                (true, true) => (x, y) = (x + 1, y + sy),
                (false, false) => y += sy,
                (false, true) => (x, y) = (x + 1, y + sy),
            }
        }
    }

    /// A filled convex polygon with integer vertices (`cv2.fillConvexPoly` with shift 0).
    pub fn fill_convex_polygon(&mut self, vertices: &[(i64, i64)], color: [u8; 3]) {
        self.fill_convex_fixed(vertices, 0, color);
    }

    /// A filled convex polygon whose vertices have `shift` fractional bits (at most 16): the
    /// outline, then rows filled between two chains of edges walked down from the topmost vertex
    /// (one forward through the vertices, one backward), x stepped per row in 16.16 fixed point
    /// from the edge's upper vertex with the step rounded, and each span's ends rounded to the
    /// nearest pixel. This is OpenCV's `FillConvexPoly`; exact crossings in floating point differ
    /// from it by a pixel at a few span ends.
    fn fill_convex_fixed(&mut self, vertices: &[(i64, i64)], shift: u32, color: [u8; 3]) {
        let n = vertices.len();
        if n == 0 {
            return;
        }
        let up = |p: (i64, i64)| (p.0 << (XY_SHIFT - shift), p.1 << (XY_SHIFT - shift));
        for i in 0..n {
            let (from, to) = (up(vertices[(i + n - 1) % n]), up(vertices[i]));
            if shift == 0 {
                self.line((from.0 >> XY_SHIFT, from.1 >> XY_SHIFT), (to.0 >> XY_SHIFT, to.1 >> XY_SHIFT), color);
            } else {
                self.line_fixed(from, to, color);
            }
        }
        if n < 3 {
            return;
        }
        let delta = (1i64 << shift) >> 1;
        let row = |y: i64| (y + delta) >> shift;
        // The first topmost vertex; the rows to fill, clipped below.
        let top = (0..n).min_by_key(|&i| vertices[i].1).unwrap_or(0);
        let bottom = row(vertices.iter().map(|v| v.1).max().unwrap_or(0)).min(self.height as i64 - 1);
        struct Chain {
            vertex: usize,
            step: usize,
            x: i64,
            dx: i64,
            end_y: i64,
        }
        let first_y = row(vertices[top].1);
        let mut chains = [1, n - 1].map(|step| Chain { vertex: top, step, x: -XY_ONE, dx: 0, end_y: first_y });
        // Both chains together walk each edge once.
        let mut edges_left = n;
        for y in first_y..=bottom {
            for chain in &mut chains {
                if y < chain.end_y {
                    continue;
                }
                let mut from = chain.vertex;
                loop {
                    if edges_left == 0 {
                        return;
                    }
                    edges_left -= 1;
                    let to = (from + chain.step) % n;
                    let end_y = row(vertices[to].1);
                    if end_y > y {
                        let (xs, xe) = (up(vertices[from]).0, up(vertices[to]).0);
                        let rows = end_y - y;
                        *chain = Chain {
                            vertex: to,
                            step: chain.step,
                            x: xs,
                            dx: ((xe - xs) * 2 + rows) / (2 * rows),
                            end_y,
                        };
                        break;
                    }
                    from = to;
                }
            }
            if y >= 0 {
                let (left, right) = (chains[0].x.min(chains[1].x), chains[0].x.max(chains[1].x));
                self.span(y, (left + XY_ONE / 2) >> XY_SHIFT, (right + XY_ONE / 2) >> XY_SHIFT, color);
            }
            for chain in &mut chains {
                chain.x += chain.dx;
            }
        }
    }

    /// A one-pixel line between 16.16 fixed-point ends (OpenCV's `Line2`, the outline of a
    /// polygon with fractional vertices): clipped, stepped one pixel along the major axis with the
    /// minor coordinate advanced in fixed point, plus the far end rounded.
    fn line_fixed(&mut self, a: (i64, i64), b: (i64, i64), color: [u8; 3]) {
        let Some((a, b)) = clip_line((self.width as i64) << XY_SHIFT, (self.height as i64) << XY_SHIFT, a, b) else {
            return;
        };
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let x_major = dx.abs() > dy.abs();
        // Walked from the end with the smaller major coordinate.
        let swap = if x_major { dx < 0 } else { dy < 0 };
        let (start, end) = if swap { (b, a) } else { (a, b) };
        let (dx, dy) = if swap { (-dx, -dy) } else { (dx, dy) };
        self.put((end.0 + XY_ONE / 2) >> XY_SHIFT, (end.1 + XY_ONE / 2) >> XY_SHIFT, color);
        let (mut x, mut y) = (start.0 + XY_ONE / 2, start.1 + XY_ONE / 2);
        if x_major {
            let step = (dy << XY_SHIFT) / (dx.abs() | 1);
            x >>= XY_SHIFT;
            for _ in 0..=(end.0 - start.0) >> XY_SHIFT {
                self.put(x, y >> XY_SHIFT, color);
                x += 1;
                y += step;
            }
        } else {
            let step = (dx << XY_SHIFT) / (dy.abs() | 1);
            y >>= XY_SHIFT;
            for _ in 0..=(end.1 - start.1) >> XY_SHIFT {
                self.put(x >> XY_SHIFT, y, color);
                x += step;
                y += 1;
            }
        }
    }

    /// A line `thickness` (at least 2) pixels wide with round caps between integer points, as
    /// `cv2.line` draws it (OpenCV's `ThickLine`): a rectangle of half-width thickness / 2 about
    /// the segment, its corners in 16.16 fixed point (offsets rounded half to even), filled as a
    /// convex polygon, then a filled circle of radius thickness / 2 on each end. The ends are first
    /// clipped to the canvas grown by `thickness` on every side, as OpenCV 5.1 does (found by
    /// comparing with its output: clipping moves the ends, and with them the pixels lit).
    pub fn thick_line(&mut self, a: (i64, i64), b: (i64, i64), thickness: i64, color: [u8; 3]) {
        let grow = |p: (i64, i64), by: i64| (p.0 + by, p.1 + by);
        let (w, h) = (self.width as i64 + 2 * thickness, self.height as i64 + 2 * thickness);
        let Some((a, b)) = clip_line(w, h, grow(a, thickness), grow(b, thickness)) else { return };
        let (a, b) = (grow(a, -thickness), grow(b, -thickness));
        let (p0, p1) = ((a.0 << XY_SHIFT, a.1 << XY_SHIFT), (b.0 << XY_SHIFT, b.1 << XY_SHIFT));
        let dx = (p0.0 - p1.0) as f64 / XY_ONE as f64;
        let dy = (p1.1 - p0.1) as f64 / XY_ONE as f64;
        let length_sq = dx * dx + dy * dy;
        let half = thickness << (XY_SHIFT - 1);
        if length_sq.abs() > f64::EPSILON {
            let r = (half as f64 + (thickness & 1) as f64 * XY_ONE as f64 * 0.5) / length_sq.sqrt();
            let (ox, oy) = ((dy * r).round_ties_even() as i64, (dx * r).round_ties_even() as i64);
            let corners =
                [(p0.0 + ox, p0.1 + oy), (p0.0 - ox, p0.1 - oy), (p1.0 - ox, p1.1 - oy), (p1.0 + ox, p1.1 + oy)];
            self.fill_convex_fixed(&corners, XY_SHIFT, color);
        }
        for end in [a, b] {
            self.fill_circle(end, (half + XY_ONE / 2) >> XY_SHIFT, color);
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

/// The part of the segment a-b inside a `width` x `height` canvas, or `None` when it misses it:
/// Cohen-Sutherland with integer divisions, OpenCV's `clipLine` (whose rounding decides which
/// pixels a clipped line lights).
fn clip_line(width: i64, height: i64, a: (i64, i64), b: (i64, i64)) -> Option<((i64, i64), (i64, i64))> {
    let (right, bottom) = (width - 1, height - 1);
    let (mut x1, mut y1, mut x2, mut y2) = (a.0, a.1, b.0, b.1);
    let side_code = |x: i64| (x < 0) as u8 | ((x > right) as u8) << 1;
    let code = |x: i64, y: i64| side_code(x) | ((y < 0) as u8) << 2 | ((y > bottom) as u8) << 3;
    let (mut c1, mut c2) = (code(x1, y1), code(x2, y2));
    if c1 & c2 == 0 && c1 | c2 != 0 {
        if c1 & 12 != 0 {
            let edge = if c1 < 8 { 0 } else { bottom };
            x1 += (edge - y1) * (x2 - x1) / (y2 - y1);
            y1 = edge;
            c1 = side_code(x1);
        }
        if c2 & 12 != 0 {
            let edge = if c2 < 8 { 0 } else { bottom };
            x2 += (edge - y2) * (x2 - x1) / (y2 - y1);
            y2 = edge;
            c2 = side_code(x2);
        }
        if c1 & c2 == 0 && c1 | c2 != 0 {
            if c1 != 0 {
                let edge = if c1 == 1 { 0 } else { right };
                y1 += (edge - x1) * (y2 - y1) / (x2 - x1);
                x1 = edge;
                c1 = 0;
            }
            if c2 != 0 {
                let edge = if c2 == 1 { 0 } else { right };
                y2 += (edge - x2) * (y2 - y1) / (x2 - x1);
                x2 = edge;
                c2 = 0;
            }
        }
    }
    (c1 | c2 == 0).then_some(((x1, y1), (x2, y2)))
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
    fn clipped_segments_end_on_the_border() {
        // Expected values from cv2.clipLine((0, 0, 20, 20), ...): the far end's y is computed
        // from the already clipped near end, with truncating division (19, 10), not 9.5 rounded.
        assert_eq!(clip_line(20, 20, (-10, -5), (30, 15)), Some(((0, 0), (19, 10))));
        assert_eq!(clip_line(20, 20, (3, 4), (5, 6)), Some(((3, 4), (5, 6))));
        assert_eq!(clip_line(20, 20, (-5, -5), (-1, 30)), None);
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
