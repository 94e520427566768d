//! Control inputs against independent references (tests/fixtures/control_*, made by
//! tools/make_control_fixtures.py): OpenPose skeletons against OpenCV drawing controlnet_aux's
//! convention, Canny against cv2.Canny, control-image preparation against diffusers'
//! VaeImageProcessor; depth PNGs and the keyframe flow of a clip.

use std::path::{Path, PathBuf};

use celframe::Error;
use celframe::control::builtin::waving_figure;
use celframe::control::canny::{CANNY_HIGH, CANNY_LOW, canny};
use celframe::control::depth::{DepthRange, depth_hint, load_depth_npy, load_depth_png};
use celframe::control::image::load_image_png;
use celframe::control::prepare::prepare_control_images;
use celframe::control::{Interpolation, KeyframeSchedule, default_keyframes, draw_pose, load_openpose};
use celframe::output::{RgbImage, decode_png};

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn fixture_png(name: &str) -> RgbImage {
    let path = fixture_path(name);
    decode_png(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// Share of pixels equal in all channels, and intersection over union of the non-black pixels.
fn agreement(ours: &RgbImage, reference: &RgbImage) -> (f64, f64) {
    assert_eq!((ours.width(), ours.height()), (reference.width(), reference.height()));
    let (mut equal, mut both, mut either) = (0usize, 0usize, 0usize);
    let pixels = ours.pixels().chunks(3).zip(reference.pixels().chunks(3));
    for (a, b) in pixels {
        equal += (a == b) as usize;
        let (lit_a, lit_b) = (a != [0, 0, 0], b != [0, 0, 0]);
        both += (lit_a && lit_b) as usize;
        either += (lit_a || lit_b) as usize;
    }
    let total = (ours.width() * ours.height()) as f64;
    (equal as f64 / total, both as f64 / either.max(1) as f64)
}

#[test]
fn pose_skeletons_match_opencv_drawing_controlnet_aux_convention() {
    // Every pixel agrees on these fixtures (integer rasterisation as OpenCV's); the margin leaves
    // room for another platform's atan2/sin moving a truncated angle or centre by one.
    let cases = [
        ("control_pose_coco.json", (1, 1), "control_pose_coco_96x128.png", (96, 128)),
        ("control_pose_coco.json", (1, 1), "control_pose_coco_160x120.png", (160, 120)),
        ("control_pose_body25.json", (128, 96), "control_pose_body25_128x96.png", (128, 96)),
        ("control_pose_random.json", (1, 1), "control_pose_random_200x150.png", (200, 150)),
        ("control_pose_random.json", (1, 1), "control_pose_random_150x200.png", (150, 200)),
    ];
    for (json, source, reference, (w, h)) in cases {
        let pose = load_openpose(&fixture_path(json), source).unwrap();
        let ours = draw_pose(&pose, w, h).unwrap();
        let reference = fixture_png(reference);
        let (equal, iou) = agreement(&ours, &reference);
        println!("{json} at {w}x{h}: {:.3}% of pixels equal, IoU of drawn pixels {iou:.4}", 100.0 * equal);
        assert!(equal >= 0.999 && iou >= 0.995, "{json} at {w}x{h}: equal {equal}, IoU {iou}");
    }
}

#[test]
fn hands_and_faces_match_opencv_drawing_controlnet_aux_convention() {
    // controlnet_aux's draw_handpose / draw_facepose (2 px hue-coloured hand edges, blue hand
    // points, white face points) re-stated in the fixture script, which agrees with the real
    // functions of controlnet_aux 0.0.10 on random hands; every pixel must agree (the edges are
    // OpenCV's fixed-point thick lines, integer arithmetic but for one rounded offset per edge).
    let cases = [
        ("control_pose_hands.json", (1, 1), "control_pose_hands_320x240.png", (320, 240)),
        ("control_pose_hands.json", (1, 1), "control_pose_hands_240x320.png", (240, 320)),
        ("control_pose_hands_random.json", (200, 150), "control_pose_hands_random_200x150.png", (200, 150)),
    ];
    for (json, source, reference, (w, h)) in cases {
        let pose = load_openpose(&fixture_path(json), source).unwrap();
        assert!(pose.people.iter().any(|p| p.hands[1].is_some() && p.face.is_some()), "{json}: no hands or face read");
        let ours = draw_pose(&pose, w, h).unwrap();
        let (equal, iou) = agreement(&ours, &fixture_png(reference));
        println!("{json} at {w}x{h}: {:.3}% of pixels equal, IoU of drawn pixels {iou:.4}", 100.0 * equal);
        assert_eq!(equal, 1.0, "{json} at {w}x{h}: IoU {iou}");
        // Without hands and face only the bodies remain, which differ from the full drawing.
        let body_only = draw_pose(&pose.clone().with_parts(false, false), w, h).unwrap();
        assert_ne!(body_only.pixels(), ours.pixels());
    }
}

#[test]
fn canny_matches_cv2_canny() {
    for name in ["shapes", "gray", "noise"] {
        let input = load_image_png(&fixture_path(&format!("control_canny_in_{name}.png"))).unwrap();
        let reference = fixture_png(&format!("control_canny_ref_{name}.png"));
        let ours = canny(&input, CANNY_LOW, CANNY_HIGH).unwrap();
        let (equal, iou) = agreement(&ours, &reference);
        println!("canny {name}: {:.3}% of pixels equal, IoU of edges {iou:.4}", 100.0 * equal);
        // Integer arithmetic throughout, as OpenCV's: every pixel must agree.
        assert_eq!(equal, 1.0, "canny {name}: IoU {iou}");
    }
}

#[test]
fn prepared_control_images_equal_diffusers() {
    let input = fixture_png("control_prepare_in.png");
    for (w, h) in [(64, 48), (24, 16), (48, 16), (16, 40)] {
        let reference = fixture_png(&format!("control_prepare_{w}x{h}.png"));
        let ours = prepare_control_images(std::slice::from_ref(&input), w, h).unwrap();
        let expected: Vec<f32> = reference.pixels().iter().map(|&v| v as f32 / 255.0).collect();
        let mismatches = ours.iter().zip(&expected).filter(|(a, b)| a != b).count();
        assert_eq!(mismatches, 0, "{w}x{h}: {mismatches} of {} values differ from diffusers", expected.len());
    }
}

#[test]
fn a_numpy_depth_map_becomes_the_same_hint_as_numpy_makes() {
    let map = load_depth_npy(&fixture_path("control_depth.npy")).unwrap();
    assert_eq!((map.width(), map.height()), (32, 24));
    for (invert, reference) in [(false, "control_depth_hint.png"), (true, "control_depth_hint_inverted.png")] {
        let ours = depth_hint(&map, DepthRange::PerImage, invert).unwrap();
        let reference = fixture_png(reference);
        // Inverting before or after rounding may move a value sitting at a half by one level.
        let worst = ours.pixels().iter().zip(reference.pixels()).map(|(a, b)| a.abs_diff(*b)).max();
        assert!(worst <= Some(if invert { 1 } else { 0 }), "invert {invert}: off by {worst:?}");
    }
}

#[test]
fn a_sixteen_bit_depth_png_from_disk_becomes_a_bright_near_hint() {
    let dir = std::env::temp_dir().join(format!("celframe_control_depth_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("depth16.png");
    // A disparity ramp (near = large = right) with a dip.
    let (w, h) = (40u32, 8u32);
    let values: Vec<u16> = (0..w * h).map(|i| if i % w == 5 { 100 } else { 1000 + (i % w) as u16 * 1500 }).collect();
    {
        let file = std::fs::File::create(&path).unwrap();
        let mut encoder = png::Encoder::new(file, w, h);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Sixteen);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
        encoder.write_header().unwrap().write_image_data(&bytes).unwrap();
    }
    let map = load_depth_png(&path).unwrap();
    let hint = depth_hint(&map, DepthRange::PerImage, false).unwrap();
    let (lo, hi) = (100.0f64, 1000.0 + 39.0 * 1500.0);
    for (i, &v) in values.iter().enumerate() {
        let expected = ((v as f64 - lo) / (hi - lo) * 255.0).round() as u8;
        assert_eq!(hint.pixels()[3 * i..3 * i + 3], [expected; 3], "pixel {i}");
    }
    std::fs::remove_dir_all(&dir).unwrap();

    let missing = load_depth_png(&dir.join("gone.png")).unwrap_err();
    assert!(matches!(missing, Error::Input(_)) && missing.to_string().contains("gone.png"), "{missing}");
    let missing = load_openpose(&dir.join("gone.json"), (64, 64)).unwrap_err();
    assert!(matches!(missing, Error::Input(_)) && missing.to_string().contains("gone.json"), "{missing}");
}

#[test]
fn demo_flow_poses_at_keyframes_only() {
    // The demo's path: built-in poses, hints at the default keyframes only.
    let (frames, w, h) = (16, 96, 64);
    let poses = waving_figure(frames, w, h).unwrap();
    let keyframes = default_keyframes(frames);
    let schedule =
        KeyframeSchedule::new(frames, keyframes.clone(), vec![1.0; keyframes.len()], Interpolation::default()).unwrap();
    let hints: Vec<RgbImage> = keyframes.iter().map(|&f| draw_pose(&poses[f], w, h).unwrap()).collect();
    for (hint, &frame) in hints.iter().zip(&keyframes) {
        let lit = hint.pixels().chunks(3).filter(|p| p != &[0, 0, 0]).count();
        assert!(lit > 200, "frame {frame}: {lit} pixels drawn");
    }
    assert_ne!(hints[0].pixels(), hints[1].pixels(), "the arm moves between keyframes");
    assert_eq!(schedule.active_frames(), keyframes, "only the keyframes run the net");
    let strengths = schedule.strengths();
    assert!(keyframes.iter().all(|&f| strengths[f] == 1.0));
}
