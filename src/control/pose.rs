//! OpenPose keypoints: reading OpenPose JSON and drawing the skeleton the way ControlNet openpose
//! models were trained on it (huggingface/controlnet_aux 0.0.10, `open_pose/util.py`
//! `draw_bodypose`, `draw_handpose` and `draw_facepose`, in the order of `open_pose/__init__.py`
//! `draw_poses`: per person the body, the left hand, the right hand, the face).
//!
//! JSON: `people[i].pose_keypoints_2d` holds `x, y, confidence` per point, either the 18 COCO
//! points (what sd-webui-controlnet and comfyui_controlnet_aux write) or OpenPose's default 25-point
//! BODY_25 model, mapped to the 18 by dropping MidHip and the six foot points (order as in
//! CMU-Perceptual-Computing-Lab/openpose `doc/02_output.md`). `hand_left_keypoints_2d` and
//! `hand_right_keypoints_2d` hold 21 points each (wrist, then thumb, index, middle, ring and little
//! finger from base to tip), `face_keypoints_2d` 70 (OpenPose) or 68 (DWPose, as
//! comfyui_controlnet_aux writes it); absent keys and empty arrays mean none.
//!
//! Coordinates: when every drawn point of the file lies within [0, 1] they are taken as normalised
//! (the ControlNet ecosystem's JSON, which also carries `canvas_width`/`canvas_height`); otherwise
//! they are pixels of the canvas `canvas_width` x `canvas_height` when the file gives it, else of
//! the source size the caller passes (native OpenPose JSON has no canvas size). A point is drawn
//! when its confidence exceeds OpenPose's default render threshold for its part
//! (`include/openpose/flags.hpp`: body 0.05, hands 0.2, face 0.4); the ecosystem's files write 1
//! for present points and 0 for missing ones, so the rule serves both.
//!
//! Between two keyframes' poses [`interpolate_pose`] moves every point linearly. A point has to be
//! known at both ends to be drawn in between: holding the known end still while its neighbours
//! move would stretch its limbs, and a point that appears or vanishes is better left to the net
//! and the motion module than pinned. The same holds for people (matched by their index in
//! `people`), hands and faces.

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
/// Points of a hand.
pub const HAND_POINTS: usize = 21;

/// Index in the file of each COCO-18 point, for COCO-18 and BODY_25 files.
const COCO_TO_COCO: [usize; BODY_POINTS] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17];
const BODY25_TO_COCO: [usize; BODY_POINTS] = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18];

/// OpenPose's default `--render_threshold` for body points, and its hand and face counterparts.
pub const RENDER_THRESHOLD: f64 = 0.05;
pub const HAND_RENDER_THRESHOLD: f64 = 0.2;
pub const FACE_RENDER_THRESHOLD: f64 = 0.4;

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

/// A hand's edges as pairs of its points, in drawing order; edge e takes hue e / 20.
const HAND_EDGES: [(usize, usize); 20] = [
    (0, 1),
    (1, 2),
    (2, 3),
    (3, 4),
    (0, 5),
    (5, 6),
    (6, 7),
    (7, 8),
    (0, 9),
    (9, 10),
    (10, 11),
    (11, 12),
    (0, 13),
    (13, 14),
    (14, 15),
    (15, 16),
    (0, 17),
    (17, 18),
    (18, 19),
    (19, 20),
];
/// Width of a hand's edges, radius and colour (blue) of its points; radius of a face point (white).
const HAND_LINE_THICKNESS: i64 = 2;
const HAND_POINT_RADIUS: i64 = 4;
const HAND_POINT_COLOR: [u8; 3] = [0, 0, 255];
const FACE_POINT_RADIUS: i64 = 3;

/// Normalised coordinates further than this outside [0, 1] are refused as nonsense (and would make
/// the drawing walk far off the canvas).
const COORDINATE_BOUND: f64 = 4.0;

/// A keypoint as normalised (x, y) (x / width, y / height; 0,0 is the top-left corner), or `None`
/// when it was not detected.
pub type Point = Option<[f64; 2]>;

/// One person: the COCO-18 body, and the hands and face where the file has them.
#[derive(Clone, Debug, PartialEq)]
pub struct Person {
    pub body: [Point; BODY_POINTS],
    /// Left then right hand, `HAND_POINTS` points each.
    pub hands: [Option<Vec<Point>>; 2],
    /// 70 or 68 points.
    pub face: Option<Vec<Point>>,
}

impl Person {
    /// A body without hands or face.
    pub fn body_only(body: [Point; BODY_POINTS]) -> Person {
        Person { body, hands: [None, None], face: None }
    }
}

/// The people of one frame.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct PoseFrame {
    pub people: Vec<Person>,
}

impl PoseFrame {
    /// The same people without their hands (`hands` false) or faces (`face` false).
    pub fn with_parts(mut self, hands: bool, face: bool) -> PoseFrame {
        for person in &mut self.people {
            if !hands {
                person.hands = [None, None];
            }
            if !face {
                person.face = None;
            }
        }
        self
    }
}

/// Reads an OpenPose JSON file; `source_size` (width, height) is the frame the pixel coordinates
/// refer to when the file is in pixels and names no canvas.
pub fn load_openpose(path: &Path, source_size: (u32, u32)) -> Result<PoseFrame> {
    let text = crate::io::read_text(path, crate::io::JSON_LIMIT, "OpenPose JSON")?;
    parse_openpose(&text, &path.display().to_string(), source_size)
}

/// One part of a person in the file: its key, the point counts it may have, and its threshold.
struct Part {
    key: &'static str,
    counts: &'static [usize],
    expected: &'static str,
    threshold: f64,
}

const BODY: Part = Part {
    key: "pose_keypoints_2d",
    counts: &[BODY_POINTS, 25],
    expected: "54 (COCO-18) or 75 (BODY_25)",
    threshold: RENDER_THRESHOLD,
};
const HANDS: [Part; 2] = [
    Part { key: "hand_left_keypoints_2d", counts: &[HAND_POINTS], expected: "63", threshold: HAND_RENDER_THRESHOLD },
    Part { key: "hand_right_keypoints_2d", counts: &[HAND_POINTS], expected: "63", threshold: HAND_RENDER_THRESHOLD },
];
const FACE: Part = Part {
    key: "face_keypoints_2d",
    counts: &[70, 68],
    expected: "210 (OpenPose's 70 points) or 204 (DWPose's 68)",
    threshold: FACE_RENDER_THRESHOLD,
};

/// The points of one part of `person` as the file has them (not yet normalised), or `None` when
/// the key is absent or its array empty.
fn read_part(person: &Value, part: &Part, name: &str, index: usize) -> Result<Option<Vec<Point>>> {
    let field = format!("people[{index}].{}", part.key);
    let Some(values) = person.get(part.key) else { return Ok(None) };
    let values = values.as_array().ok_or_else(|| Error::Input(format!("{name}: {field} is not an array")))?;
    if values.is_empty() {
        return Ok(None);
    }
    if !part.counts.iter().any(|&n| n * 3 == values.len()) {
        return crate::input_err!(
            "{name}: {field} has {} numbers; expected {}, x, y, confidence per point",
            values.len(),
            part.expected
        );
    }
    let number = |k: usize| -> Result<f64> {
        values[k]
            .as_f64()
            .filter(|v| v.is_finite())
            .ok_or_else(|| Error::Input(format!("{name}: {field}[{k}] is {}, not a finite number", values[k])))
    };
    let mut points = Vec::with_capacity(values.len() / 3);
    for p in 0..values.len() / 3 {
        let (x, y, confidence) = (number(3 * p)?, number(3 * p + 1)?, number(3 * p + 2)?);
        points.push((confidence > part.threshold).then_some([x, y]));
    }
    Ok(Some(points))
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
        let Some(points) = read_part(person, &BODY, name, i)? else { continue };
        let mapping = if points.len() == BODY_POINTS { &COCO_TO_COCO } else { &BODY25_TO_COCO };
        let body = mapping.map(|source| points[source]);
        let hands = [read_part(person, &HANDS[0], name, i)?, read_part(person, &HANDS[1], name, i)?];
        let face = read_part(person, &FACE, name, i)?;
        raw_people.push((i, Person { body, hands, face }));
    }

    let normalised = raw_people
        .iter()
        .flat_map(|(_, person)| parts(person))
        .flat_map(|(_, points)| points.iter().flatten())
        .all(|p| (0.0..=1.0).contains(&p[0]) && (0.0..=1.0).contains(&p[1]));
    let (width, height) = canvas.unwrap_or((source_size.0 as f64, source_size.1 as f64));
    if !normalised && (width <= 0.0 || height <= 0.0) {
        return crate::input_err!("{name}: pixel coordinates need a source size, got {width}x{height}");
    }
    let mut frame = PoseFrame::default();
    for (i, mut person) in raw_people {
        if !normalised {
            let scale = |p: &mut Point| *p = p.map(|p| [p[0] / width, p[1] / height]);
            person.body.iter_mut().for_each(scale);
            person.hands.iter_mut().flatten().chain(&mut person.face).flatten().for_each(scale);
        }
        for (key, points) in parts(&person) {
            let far = points.iter().enumerate().find_map(|(k, p)| {
                p.filter(|p| p[0].abs() > COORDINATE_BOUND || p[1].abs() > COORDINATE_BOUND).map(|p| (k, p))
            });
            if let Some((k, p)) = far {
                return crate::input_err!(
                    "{name}: people[{i}].{key} point {k} at ({}, {}) of a {width}x{height} frame lies far outside it",
                    p[0] * width,
                    p[1] * height
                );
            }
        }
        frame.people.push(person);
    }
    Ok(frame)
}

/// A person's parts that are present, with their keys in the file.
fn parts(person: &Person) -> impl Iterator<Item = (&'static str, &[Point])> {
    let hands = person.hands.iter().zip(&HANDS).filter_map(|(h, part)| Some((part.key, h.as_deref()?)));
    std::iter::once((BODY.key, &person.body[..])).chain(hands).chain(person.face.as_deref().map(|f| (FACE.key, f)))
}

fn canvas_side(value: &Value, name: &str, field: &str) -> Result<f64> {
    value
        .as_f64()
        .filter(|v| v.is_finite() && *v >= 1.0)
        .ok_or_else(|| Error::Input(format!("{name}: {field} is {value}; expected a positive number of pixels")))
}

/// The pose a fraction `t` (0..=1) of the way from `a` to `b`: every point known at both ends
/// moves linearly; a point, hand, face or person missing at either end is missing (see the module
/// notes).
pub fn interpolate_pose(a: &PoseFrame, b: &PoseFrame, t: f64) -> PoseFrame {
    let point = |p: &Point, q: &Point| match (p, q) {
        (Some(p), Some(q)) => Some([p[0] + (q[0] - p[0]) * t, p[1] + (q[1] - p[1]) * t]),
        _ => None,
    };
    let part = |p: &Option<Vec<Point>>, q: &Option<Vec<Point>>| match (p, q) {
        (Some(p), Some(q)) if p.len() == q.len() => Some(p.iter().zip(q).map(|(p, q)| point(p, q)).collect()),
        _ => None,
    };
    let people = a
        .people
        .iter()
        .zip(&b.people)
        .map(|(p, q)| Person {
            body: std::array::from_fn(|k| point(&p.body[k], &q.body[k])),
            hands: [part(&p.hands[0], &q.hands[0]), part(&p.hands[1], &q.hands[1])],
            face: part(&p.face, &q.face),
        })
        .collect();
    PoseFrame { people }
}

/// matplotlib's `hsv_to_rgb` at full saturation and value, x 255 and rounded as OpenCV converts a
/// colour to 8 bits (half to even): the colour controlnet_aux gives a hand's edge of hue `hue`.
fn hue_color(hue: f64) -> [u8; 3] {
    let sector = (hue * 6.0) as i64;
    let f = hue * 6.0 - sector as f64;
    // matplotlib's p, q and t at s = v = 1, computed as it does them (t is not always f exactly,
    // and ties at .5 go the way its rounding errors send them).
    let (v, p, q, t) = (1.0, 0.0, 1.0 - f, 1.0 - (1.0 - f));
    let rgb = match sector.rem_euclid(6) {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    };
    rgb.map(|c: f64| (c * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
}

/// Draws every person on black at `width` x `height`, as controlnet_aux's `draw_poses` does with
/// OpenCV: the body's limbs as filled ellipses (half-thickness 4 px, colour x 0.6), then its
/// keypoints as filled circles (radius 4 px, full colour); each hand's edges as 2 px lines coloured
/// by hue, then its points as blue circles of radius 4; the face's points as white circles of
/// radius 3. Hand and face points on pixel column or row 0 (or left of or above it) are skipped,
/// as controlnet_aux skips them.
pub fn draw_pose(frame: &PoseFrame, width: u32, height: u32) -> Result<RgbImage> {
    check_size(width, height, "pose image")?;
    let mut canvas = Canvas::new(width, height);
    let (w, h) = (width as f64, height as f64);
    // Truncations as in the reference (Python int()).
    let pixel = |p: [f64; 2]| ((p[0] * w) as i64, (p[1] * h) as i64);
    // controlnet_aux's `x > eps and y > eps` (eps = 0.01) on whole pixels.
    let shown = |p: &Point| p.map(pixel).filter(|&(x, y)| x > 0 && y > 0);
    for person in &frame.people {
        for (limb, &(a, b)) in LIMBS.iter().enumerate() {
            let (Some(pa), Some(pb)) = (person.body[a], person.body[b]) else { continue };
            let (xa, ya, xb, yb) = (pa[0] * w, pa[1] * h, pb[0] * w, pb[1] * h);
            let center = (((xa + xb) / 2.0) as i64, ((ya + yb) / 2.0) as i64);
            let length = ((ya - yb).powi(2) + (xa - xb).powi(2)).sqrt();
            let angle = (ya - yb).atan2(xa - xb).to_degrees() as i32;
            let polygon = ellipse_polygon(center, ((length / 2.0) as i64, STICK_WIDTH), angle);
            canvas.fill_convex_polygon(&polygon, COLORS[limb].map(|c| (c as f64 * 0.6) as u8));
        }
        for (point, color) in person.body.iter().zip(COLORS) {
            if let Some(p) = point {
                canvas.fill_circle(pixel(*p), POINT_RADIUS, color);
            }
        }
        for hand in person.hands.iter().flatten() {
            for (edge, &(a, b)) in HAND_EDGES.iter().enumerate() {
                if let (Some(pa), Some(pb)) = (shown(&hand[a]), shown(&hand[b])) {
                    let color = hue_color(edge as f64 / HAND_EDGES.len() as f64);
                    canvas.thick_line(pa, pb, HAND_LINE_THICKNESS, color);
                }
            }
            for p in hand.iter().filter_map(shown) {
                canvas.fill_circle(p, HAND_POINT_RADIUS, HAND_POINT_COLOR);
            }
        }
        for p in person.face.iter().flatten().filter_map(shown) {
            canvas.fill_circle(p, FACE_POINT_RADIUS, [255, 255, 255]);
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
        let zeros = vec!["0"; 54].join(",");
        for (part, numbers, needle) in [
            ("hand_left_keypoints_2d", "1,2,3", "people[0].hand_left_keypoints_2d has 3 numbers; expected 63"),
            ("face_keypoints_2d", "1,2,3,4,5,6", "people[0].face_keypoints_2d has 6 numbers; expected 210"),
        ] {
            let text = format!(r#"{{"people":[{{"pose_keypoints_2d":[{zeros}],"{part}":[{numbers}]}}]}}"#);
            let message = parse_openpose(&text, "hands.json", (64, 64)).unwrap_err().to_string();
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

    #[test]
    fn hand_edge_colours_are_matplotlibs_hues_rounded_as_opencv_does() {
        // matplotlib.colors.hsv_to_rgb([e / 20, 1, 1]) * 255 as cv2.line stored it (printed with
        // matplotlib 3 and OpenCV 5.1): ties like 76.5 and 229.5 go where float error sends them.
        let expected = [
            [255, 0, 0],
            [255, 77, 0],
            [255, 153, 0],
            [255, 229, 0],
            [204, 255, 0],
            [128, 255, 0],
            [51, 255, 0],
            [0, 255, 25],
            [0, 255, 102],
            [0, 255, 179],
            [0, 255, 255],
            [0, 178, 255],
            [0, 102, 255],
            [0, 25, 255],
            [51, 0, 255],
            [128, 0, 255],
            [204, 0, 255],
            [255, 0, 230],
            [255, 0, 153],
            [255, 0, 77],
        ];
        for (e, color) in expected.iter().enumerate() {
            assert_eq!(hue_color(e as f64 / 20.0), *color, "edge {e}");
        }
    }

    #[test]
    fn interpolation_moves_points_known_at_both_ends_only() {
        let hand = |x: f64| Some((0..HAND_POINTS).map(|k| Some([x, 0.01 * k as f64])).collect::<Vec<_>>());
        let mut a = Person { body: [Some([0.2, 0.4]); BODY_POINTS], hands: [hand(0.1), hand(0.5)], face: None };
        a.body[3] = None;
        let mut b = Person { body: [Some([0.6, 0.0]); BODY_POINTS], hands: [None, hand(0.9)], face: None };
        b.body[5] = None;
        if let Some(h) = b.hands[1].as_mut() {
            h[7] = None;
        }
        let second = Person::body_only([Some([0.5, 0.5]); BODY_POINTS]);
        let from = PoseFrame { people: vec![a, second] };
        let to = PoseFrame { people: vec![b] };
        let mid = interpolate_pose(&from, &to, 0.25);
        assert_eq!(mid.people.len(), 1, "a person in one keyframe only is not drawn between");
        let person = &mid.people[0];
        let near =
            |p: Point, q: [f64; 2]| p.is_some_and(|p| (p[0] - q[0]).abs() < 1e-12 && (p[1] - q[1]).abs() < 1e-12);
        assert!(near(person.body[0], [0.3, 0.3]));
        assert!(person.body[3].is_none() && person.body[5].is_none());
        assert!(person.hands[0].is_none(), "a hand in one keyframe only is not drawn between");
        let right = person.hands[1].as_ref().unwrap();
        assert!(near(right[2], [0.6, 0.02]));
        assert!(right[7].is_none());
        assert!(person.face.is_none());
    }
}
