//! A built-in pose sequence for the demo, so it needs no input files: a standing figure waving its
//! right arm (the viewer's left), as OpenPose COCO-18 keypoints at any frame count and size.
//!
//! The figure is laid out in units of its own height (0.8 of the frame's height, centred; less in
//! frames narrower than half their height), so it keeps its proportions at any aspect ratio. The forearm swings +-35 degrees about vertical with a
//! 12-frame period (1.5 s at 8 fps), the head tilts with it and the body sways slightly: motion the
//! speed of which does not depend on the clip's length.

use std::f64::consts::TAU;

use super::check_size;
use super::pose::{BODY_POINTS, Person, PoseFrame};
use crate::error::Result;

/// Frames per wave of the arm.
const WAVE_PERIOD: f64 = 12.0;

/// The resting figure: COCO-18 points in figure units, x to the image's right from the body's
/// centre line, y down from the top of the head's box (0..1 is the figure's height).
const REST: [[f64; 2]; BODY_POINTS] = [
    [0.0, 0.08],    // nose
    [0.0, 0.18],    // neck
    [-0.10, 0.19],  // right shoulder (image left)
    [-0.20, 0.15],  // right elbow, raised
    [0.0, 0.0],     // right wrist: placed by the wave
    [0.10, 0.19],   // left shoulder
    [0.13, 0.33],   // left elbow
    [0.14, 0.46],   // left wrist
    [-0.06, 0.50],  // right hip
    [-0.07, 0.73],  // right knee
    [-0.08, 0.97],  // right ankle
    [0.06, 0.50],   // left hip
    [0.07, 0.73],   // left knee
    [0.08, 0.97],   // left ankle
    [-0.025, 0.06], // right eye
    [0.025, 0.06],  // left eye
    [-0.05, 0.07],  // right ear
    [0.05, 0.07],   // left ear
];

/// Forearm length in figure units.
const FOREARM: f64 = 0.13;

/// `frames` poses of the waving figure for a `width` x `height` render.
pub fn waving_figure(frames: usize, width: u32, height: u32) -> Result<Vec<PoseFrame>> {
    check_size(width, height, "built-in pose")?;
    if frames == 0 || frames > super::keyframes::MAX_FRAMES {
        return crate::input_err!("built-in pose of {frames} frames: needs 1..={}", super::keyframes::MAX_FRAMES);
    }
    let (w, h) = (width as f64, height as f64);
    // The figure is about half as wide as it is tall: narrow frames shrink it to fit.
    let size = (0.8 * h).min(1.6 * w);
    let top = (h - size) / 2.0;
    let to_image = |p: [f64; 2], sway: f64| [(0.5 * w + (p[0] + sway) * size) / w, (top + p[1] * size) / h];
    Ok((0..frames)
        .map(|frame| {
            let phase = TAU * frame as f64 / WAVE_PERIOD;
            let swing = 35f64.to_radians() * phase.sin();
            let sway = 0.01 * phase.sin();
            let mut points = REST;
            let elbow = points[3];
            points[4] = [elbow[0] + FOREARM * swing.sin(), elbow[1] - FOREARM * swing.cos()];
            // The head (nose, eyes, ears) turns slightly about the neck with the wave.
            let neck = points[1];
            let tilt = 0.15 * swing;
            for k in [0, 14, 15, 16, 17] {
                let (dx, dy) = (points[k][0] - neck[0], points[k][1] - neck[1]);
                points[k] = [neck[0] + dx * tilt.cos() - dy * tilt.sin(), neck[1] + dx * tilt.sin() + dy * tilt.cos()];
            }
            let body = points.map(|p| Some(to_image(p, sway)));
            PoseFrame { people: vec![Person::body_only(body)] }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distance(a: [f64; 2], b: [f64; 2], w: f64, h: f64) -> f64 {
        ((a[0] - b[0]) * w).hypot((a[1] - b[1]) * h)
    }

    #[test]
    fn limbs_keep_their_length_while_the_wrist_waves() {
        let (w, h) = (768.0, 512.0);
        let frames = waving_figure(24, 768, 512).unwrap();
        let body = |f: usize| frames[f].people[0].body.map(|p| p.unwrap());
        let forearm = distance(body(0)[3], body(0)[4], w, h);
        assert!((forearm - FOREARM * 0.8 * h).abs() < 1e-9);
        for f in 0..24 {
            let b = body(f);
            assert!((distance(b[3], b[4], w, h) - forearm).abs() < 1e-9);
            assert!((distance(b[1], b[0], w, h) - distance(body(0)[1], body(0)[0], w, h)).abs() < 1e-9);
            assert!(b.iter().all(|p| (0.0..=1.0).contains(&p[0]) && (0.0..=1.0).contains(&p[1])));
            // The wrist stays above the elbow: a wave, not a swing down.
            assert!(b[4][1] < b[3][1]);
        }
        // Three frames in (a quarter period), the wrist is at its furthest out; the wave repeats.
        assert!((body(3)[4][0] - body(0)[4][0]).abs() * w > 10.0);
        assert!((body(12)[4][0] - body(0)[4][0]).abs() < 1e-9);
    }

    #[test]
    fn proportions_hold_at_any_aspect() {
        let wide = &waving_figure(1, 1024, 512).unwrap()[0].people[0].body;
        let tall = &waving_figure(1, 512, 1024).unwrap()[0].people[0].body;
        // Shoulder width over body height is the same in pixels.
        let ratio = |b: &[Option<[f64; 2]>; BODY_POINTS], w: f64, h: f64| {
            let (rs, ls, ra) = (b[2].unwrap(), b[5].unwrap(), b[10].unwrap());
            ((ls[0] - rs[0]) * w) / ((ra[1] - b[0].unwrap()[1]) * h)
        };
        assert!((ratio(wide, 1024.0, 512.0) - ratio(tall, 512.0, 1024.0)).abs() < 1e-12);
        assert!(waving_figure(0, 64, 64).is_err());
        assert!(waving_figure(4, 0, 64).is_err());
    }
}
