//! OpenPose keypoints: reading OpenPose JSON and drawing the body skeleton the way ControlNet
//! openpose models were trained on it (huggingface/controlnet_aux, `open_pose/util.py`
//! `draw_bodypose`).
//!
//! JSON: `people[i].pose_keypoints_2d` holds `x, y, confidence` per point, either the 18 COCO
//! points (what sd-webui-controlnet and comfyui_controlnet_aux write) or OpenPose's default 25-point
//! BODY_25 model, mapped to the 18 by dropping MidHip and the six foot points (order as in
//! CMU-Perceptual-Computing-Lab/openpose `doc/02_output.md`). Hands and face keypoints are read
//! by neither: only the body is drawn.
//!
//! Coordinates: when every drawn point of the file lies within [0, 1] they are taken as normalised
//! (the ControlNet ecosystem's JSON, which also carries `canvas_width`/`canvas_height`); otherwise
//! they are pixels of the canvas `canvas_width` x `canvas_height` when the file gives it, else of
//! the source size the caller passes (native OpenPose JSON has no canvas size). A point is drawn
//! when its confidence exceeds 0.05, OpenPose's default body render threshold; the ecosystem's
//! files write 1 for present points and 0 for missing ones, so the rule serves both.

use std::path::Path;

use serde_json::Value;

use super::check_size;
use super::raster::{Canvas, ellipse_polygon};
use crate::error::{Error, Result};
use crate::output::RgbImage;

/// Points of the COCO-18 body: 0 nose, 1 neck, 2-4 right shoulder, elbow, wrist, 5-7 left
/// shoulder, elbow, wrist, 8-10 right hip, knee, ankle, 11-13 left hip, knee, ankle, 14 right eye,
/// 15 left eye, 16 right ear, 17 left ear.
pub const BODY_POINTS: usize = 18;

/// Index in the file of each COCO-18 point, for COCO-18 and BODY_25 files.
const COCO_TO_COCO: [usize; BODY_POINTS] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17];
const BODY25_TO_COCO: [usize; BODY_POINTS] = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18];

/// OpenPose's default `--render_threshold` for body points.
pub const RENDER_THRESHOLD: f64 = 0.05;

/// Limbs as pairs of COCO-18 indices, in controlnet_aux's drawing order; limb i takes colour i.
const LIMBS: [(usize, usize); 17] = [
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
];

/// controlnet_aux's 18 colours (RGB): limb i and keypoint i use colour i.
const COLORS: [[u8; 3]; BODY_POINTS] = [
    [255, 0, 0],
    [255, 85, 0],
    [255, 170, 0],
    [255, 255, 0],
    [170, 255, 0],
    [85, 255, 0],
    [0, 255, 0],
    [0, 255, 85],
    [0, 255, 170],
    [0, 255, 255],
    [0, 170, 255],
    [0, 85, 255],
    [0, 0, 255],
    [85, 0, 255],
    [170, 0, 255],
    [255, 0, 255],
    [255, 0, 170],
    [255, 0, 85],
];

/// Half-thickness of a limb and radius of a keypoint, in pixels at any canvas size.
const STICK_WIDTH: i64 = 4;
const POINT_RADIUS: i64 = 4;

/// Normalised coordinates further than this outside [0, 1] are refused as nonsense (and would make
/// the drawing walk far off the canvas).
const COORDINATE_BOUND: f64 = 4.0;

/// One person's body: each COCO-18 point as normalised (x, y) (x / width, y / height; 0,0 is the
/// top-left corner), or `None` when it was not detected.
#[derive(Clone, Debug, PartialEq)]
pub struct Person {
    pub body: [Option<[f64; 2]>; BODY_POINTS],
}

/// The people of one frame.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct PoseFrame {
    pub people: Vec<Person>,
}

/// Reads an OpenPose JSON file; `source_size` (width, height) is the frame the pixel coordinates
/// refer to when the file is in pixels and names no canvas.
pub fn load_openpose(path: &Path, source_size: (u32, u32)) -> Result<PoseFrame> {
    let text = crate::io::read_text(path, crate::io::JSON_LIMIT, "OpenPose JSON")?;
    parse_openpose(&text, &path.display().to_string(), source_size)
}

/// Parses OpenPose JSON text; `name` names the file in errors.
pub fn parse_openpose(text: &str, name: &str, source_size: (u32, u32)) -> Result<PoseFrame> {
    let root: Value = serde_json::from_str(text).map_err(|e| Error::Input(format!("{name}: not JSON: {e}")))?;
    let people = root
        .get("people")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::Input(format!("{name}: no `people` array (is this OpenPose JSON?)")))?;
    let canvas = match (root.get("canvas_width"), root.get("canvas_height")) {
        (None, None) => None,
        (Some(w), Some(h)) => Some((canvas_side(w, name, "canvas_width")?, canvas_side(h, name, "canvas_height")?)),
        _ => return crate::input_err!("{name}: `canvas_width` and `canvas_height` must come together"),
    };

    // Raw points first: whether the file is normalised is decided over all of its people.
    let mut raw_people = Vec::with_capacity(people.len());
    for (i, person) in people.iter().enumerate() {
        let field = format!("people[{i}].pose_keypoints_2d");
        let Some(values) = person.get("pose_keypoints_2d") else { continue };
        let values = values.as_array().ok_or_else(|| Error::Input(format!("{name}: {field} is not an array")))?;
        let mapping: &[usize] = match values.len() {
            0 => continue,
            54 => &COCO_TO_COCO,
            75 => &BODY25_TO_COCO,
            n => {
                return crate::input_err!(
                    "{name}: {field} has {n} numbers; expected 54 (COCO-18) or 75 (BODY_25), x, y, confidence per point"
                );
            }
        };
        let number = |k: usize| -> Result<f64> {
            values[k]
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or_else(|| Error::Input(format!("{name}: {field}[{k}] is {}, not a finite number", values[k])))
        };
        let mut body = [None; BODY_POINTS];
        for (point, &source) in body.iter_mut().zip(mapping) {
            let (x, y, confidence) = (number(3 * source)?, number(3 * source + 1)?, number(3 * source + 2)?);
            if confidence > RENDER_THRESHOLD {
                *point = Some([x, y]);
            }
        }
        raw_people.push((field, body));
    }

    let normalised = raw_people
        .iter()
        .flat_map(|(_, body)| body.iter().flatten())
        .all(|p| (0.0..=1.0).contains(&p[0]) && (0.0..=1.0).contains(&p[1]));
    let (width, height) = canvas.unwrap_or((source_size.0 as f64, source_size.1 as f64));
    if !normalised && (width <= 0.0 || height <= 0.0) {
        return crate::input_err!("{name}: pixel coordinates need a source size, got {width}x{height}");
    }
    let mut frame = PoseFrame::default();
    for (field, mut body) in raw_people {
        for (k, point) in body.iter_mut().enumerate() {
            if let Some(p) = point.as_mut().filter(|_| !normalised) {
                *p = [p[0] / width, p[1] / height];
            }
            if let Some(p) = point
                && (p[0].abs() > COORDINATE_BOUND || p[1].abs() > COORDINATE_BOUND)
            {
                return crate::input_err!(
                    "{name}: {field} point {k} at ({}, {}) of a {width}x{height} frame lies far outside it",
                    p[0] * width,
                    p[1] * height
                );
            }
        }
        frame.people.push(Person { body });
    }
    Ok(frame)
}

fn canvas_side(value: &Value, name: &str, field: &str) -> Result<f64> {
    value
        .as_f64()
        .filter(|v| v.is_finite() && *v >= 1.0)
        .ok_or_else(|| Error::Input(format!("{name}: {field} is {value}; expected a positive number of pixels")))
}

/// Draws every person's body skeleton on black at `width` x `height`: per person the limbs as
/// filled ellipses (half-thickness 4 px, colour x 0.6), then the keypoints as filled circles
/// (radius 4 px, full colour), as controlnet_aux's `draw_bodypose` does with OpenCV.
pub fn draw_pose(frame: &PoseFrame, width: u32, height: u32) -> Result<RgbImage> {
    check_size(width, height, "pose image")?;
    let mut canvas = Canvas::new(width, height);
    let (w, h) = (width as f64, height as f64);
    for person in &frame.people {
        for (limb, &(a, b)) in LIMBS.iter().enumerate() {
            let (Some(pa), Some(pb)) = (person.body[a], person.body[b]) else { continue };
            let (xa, ya, xb, yb) = (pa[0] * w, pa[1] * h, pb[0] * w, pb[1] * h);
            // Truncations as in the reference (Python int()).
            let center = (((xa + xb) / 2.0) as i64, ((ya + yb) / 2.0) as i64);
            let length = ((ya - yb).powi(2) + (xa - xb).powi(2)).sqrt();
            let angle = (ya - yb).atan2(xa - xb).to_degrees() as i32;
            let polygon = ellipse_polygon(center, ((length / 2.0) as i64, STICK_WIDTH), angle);
            canvas.fill_convex_polygon(&polygon, COLORS[limb].map(|c| (c as f64 * 0.6) as u8));
        }
        for (point, color) in person.body.iter().zip(COLORS) {
            if let Some(p) = point {
                canvas.fill_circle(((p[0] * w) as i64, (p[1] * h) as i64), POINT_RADIUS, color);
            }
        }
    }
    RgbImage::new(width, height, canvas.pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coco_json(points: &[(f64, f64, f64)], extra: &str) -> String {
        let flat: Vec<String> = points.iter().map(|(x, y, c)| format!("{x},{y},{c}")).collect();
        format!(r#"{{{extra}"people":[{{"pose_keypoints_2d":[{}]}}]}}"#, flat.join(","))
    }

    fn standing() -> Vec<(f64, f64, f64)> {
        (0..18).map(|k| (0.2 + 0.03 * k as f64, 0.1 + 0.04 * k as f64, 1.0)).collect()
    }

    #[test]
    fn normalised_and_pixel_coordinates_agree() {
        let points = standing();
        let normalised = parse_openpose(&coco_json(&points, ""), "a.json", (1, 1)).unwrap();
        let pixels: Vec<_> = points.iter().map(|&(x, y, c)| (x * 200.0, y * 100.0, c)).collect();
        let in_pixels = parse_openpose(&coco_json(&pixels, ""), "b.json", (200, 100)).unwrap();
        let with_canvas =
            parse_openpose(&coco_json(&pixels, r#""canvas_width":200,"canvas_height":100,"#), "c.json", (7, 7))
                .unwrap();
        for frame in [&in_pixels, &with_canvas] {
            for (p, q) in normalised.people[0].body.iter().zip(&frame.people[0].body) {
                let (p, q) = (p.unwrap(), q.unwrap());
                assert!((p[0] - q[0]).abs() < 1e-12 && (p[1] - q[1]).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn body25_maps_onto_coco18_and_low_confidence_is_missing() {
        // BODY_25 point b gets x = b, so the mapping shows in the parsed x coordinates.
        let mut points: Vec<_> = (0..25).map(|b| (b as f64 * 10.0, 50.0, 0.9)).collect();
        points[17].2 = 0.05; // REar at the threshold: not drawn
        let frame = parse_openpose(&coco_json(&points, ""), "p.json", (300, 100)).unwrap();
        let body = &frame.people[0].body;
        assert_eq!(body[8].unwrap()[0] * 300.0, 90.0); // RHip is BODY_25 point 9, after MidHip
        assert_eq!(body[13].unwrap()[0] * 300.0, 140.0); // LAnkle is BODY_25 point 14
        assert!(body[16].is_none());
        assert_eq!(body[17].unwrap()[0] * 300.0, 180.0);
    }

    #[test]
    fn bad_json_names_the_file_and_field() {
        let cases = [
            ("{}", "people"),
            (r#"{"people":[{"pose_keypoints_2d":[1,2,3]}]}"#, "people[0].pose_keypoints_2d has 3 numbers"),
            (r#"{"people":[{"pose_keypoints_2d":7}]}"#, "people[0].pose_keypoints_2d is not an array"),
            (r#"{"canvas_width":5,"people":[]}"#, "canvas_height"),
            (r#"{"canvas_width":-5,"canvas_height":4,"people":[]}"#, "canvas_width"),
        ];
        for (text, needle) in cases {
            let err = parse_openpose(text, "frame_007.json", (64, 64)).unwrap_err();
            let message = err.to_string();
            assert!(matches!(err, Error::Input(_)) && message.contains("frame_007.json"), "{message}");
            assert!(message.contains(needle), "{message} lacks {needle}");
        }
        let mut points = standing();
        points[3].0 = 1e9;
        let message = parse_openpose(&coco_json(&points, ""), "far.json", (64, 64)).unwrap_err().to_string();
        assert!(message.contains("far outside"), "{message}");
        points[3].0 = 1e300;
        assert!(parse_openpose(&coco_json(&points, ""), "far.json", (64, 64)).is_err());
    }

    #[test]
    fn a_single_limb_has_the_dimmed_colour_and_the_points_their_own() {
        let mut points = vec![(0.0, 0.0, 0.0); 18];
        points[1] = (0.3, 0.5, 1.0); // neck
        points[2] = (0.7, 0.5, 1.0); // right shoulder
        let frame = parse_openpose(&coco_json(&points, ""), "one.json", (1, 1)).unwrap();
        let image = draw_pose(&frame, 100, 40).unwrap();
        let at = |x: usize, y: usize| &image.pixels()[(y * 100 + x) * 3..][..3];
        assert_eq!(at(50, 20), &[153, 0, 0]); // limb 0, colour 0 x 0.6
        assert_eq!(at(50, 23), &[153, 0, 0]); // within the half-thickness of 4
        assert_eq!(at(50, 26), &[0, 0, 0]);
        assert_eq!(at(30, 20), &[255, 85, 0]); // neck point over the limb
        assert_eq!(at(70, 20), &[255, 170, 0]);
        assert_eq!(at(5, 5), &[0, 0, 0]);
    }
}
