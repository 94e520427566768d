//! Control inputs against independent references (tests/fixtures/control_*, made by
//! tools/make_control_fixtures.py): OpenPose skeletons, hands and faces against OpenCV drawing
//! controlnet_aux's convention, interpolated poses, Canny against cv2.Canny, control-image
//! preparation against diffusers' VaeImageProcessor; depth PNGs, the keyframe flow of a clip,
//! video files (made by ffmpeg in the tests) and `celframe control`.
//!
//! The video checks need ffmpeg and ffprobe. Without them they print a note and skip, unless
//! CELFRAME_REQUIRE_FFMPEG=1 (CI sets it), which makes a missing ffmpeg a failure.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use celframe::Error;
use celframe::control::builtin::waving_figure;
use celframe::control::canny::{CANNY_HIGH, CANNY_LOW, canny};
use celframe::control::depth::{DepthRange, depth_hint, load_depth_npy, load_depth_png};
use celframe::control::image::load_image_png;
use celframe::control::prepare::prepare_control_images;
use celframe::control::video::{VideoRequest, VideoTiming, VideoTools, read_video_depth, read_video_rgb};
use celframe::control::{Interpolation, KeyframeSchedule, default_keyframes, draw_pose, load_openpose};
use celframe::output::{RgbImage, decode_png};
use celframe::pipeline::config::ControlNetEntry;
use celframe::pipeline::render::control_hints;

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

/// An entry as a config would give it, for `control_hints`.
fn entry(kind: &str, images: &Path) -> ControlNetEntry {
    ControlNetEntry {
        path: PathBuf::from("controlnet"),
        kind: kind.into(),
        scale: 1.0,
        start: 0.0,
        end: 1.0,
        guess_mode: false,
        images: images.to_path_buf(),
        keyframes: None,
        interpolation: "keyframes".into(),
        pose_interpolation: "none".into(),
        hands: true,
        face: true,
        video_timing: "time".into(),
        conditions: Vec::new(),
    }
}

#[test]
fn interpolated_poses_match_the_reference_between_keyframes() {
    // Two OpenPose JSON keyframes on frames 0 and 3 of 4: frames 1 and 2 get poses a third and two
    // thirds of the way, drawn by the fixture script with OpenCV from the same rule (points, hands
    // and people known at both ends move; the others are not drawn).
    let folder = fixture_path("control_pose_interp");
    let (w, h) = (256, 192);
    let mut pose_entry = entry("openpose", &folder);
    let (keyframes, hints) = control_hints(&pose_entry, 4, 8, w, h).unwrap();
    assert_eq!(keyframes, vec![0, 3], "without the option only the keyframes have hints");
    pose_entry.pose_interpolation = "linear".into();
    let (frames, interpolated) = control_hints(&pose_entry, 4, 8, w, h).unwrap();
    assert_eq!(frames, vec![0, 1, 2, 3]);
    assert_eq!(interpolated[0].pixels(), hints[0].pixels(), "keyframes keep their own pose");
    assert_eq!(interpolated[3].pixels(), hints[1].pixels());
    for (frame, reference) in [(1, "control_pose_interp_1of3_256x192.png"), (2, "control_pose_interp_2of3_256x192.png")]
    {
        let (equal, iou) = agreement(&interpolated[frame], &fixture_png(reference));
        println!("interpolated frame {frame}: {:.3}% of pixels equal, IoU {iou:.4}", 100.0 * equal);
        assert_eq!(equal, 1.0, "frame {frame}: IoU {iou}");
    }
    // Five frames over keyframes 0 and 4 under the keyframes rule: every frame between gets its
    // own hint and so full strength.
    let (frames, _) = control_hints(&pose_entry, 5, 8, w, h).unwrap();
    let schedule =
        KeyframeSchedule::new(5, frames.clone(), vec![1.0; frames.len()], Interpolation::OnlyKeyframes).unwrap();
    assert_eq!(schedule.strengths(), vec![1.0; 5]);
    // hands = false and face = false drop them from every frame.
    pose_entry.hands = false;
    pose_entry.face = false;
    let (_, bodies) = control_hints(&pose_entry, 4, 8, w, h).unwrap();
    let first = load_openpose(&folder.join("a.json"), (w, h)).unwrap().with_parts(false, false);
    assert_eq!(bodies[0].pixels(), draw_pose(&first, w, h).unwrap().pixels());
    assert_ne!(bodies[1].pixels(), interpolated[1].pixels());
}

fn ffmpeg_tools() -> bool {
    let runs = |p: &str| Command::new(p).arg("-version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    let found = runs("ffmpeg") && runs("ffprobe");
    if !found {
        assert!(
            std::env::var("CELFRAME_REQUIRE_FFMPEG").as_deref() != Ok("1"),
            "CELFRAME_REQUIRE_FFMPEG=1 but ffmpeg/ffprobe are not on PATH"
        );
        eprintln!("note: ffmpeg/ffprobe not on PATH: video control input checks skipped");
    }
    found
}

/// A scratch folder removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("celframe-control-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Encodes raw frames (`pix_fmt` rgb24 or gray16le, `bytes` per frame) with ffmpeg's lossless
/// FFV1 codec into `path` at `fps`, in `codec_pix_fmt`.
fn encode(path: &Path, frames: &[Vec<u8>], size: (u32, u32), fps: u32, pix_fmt: &str, codec_pix_fmt: &str) {
    let mut child = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", pix_fmt, "-s", &format!("{}x{}", size.0, size.1)])
        .args(["-framerate", &fps.to_string(), "-i", "pipe:0", "-c:v", "ffv1", "-pix_fmt", codec_pix_fmt])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for frame in frames {
        stdin.write_all(frame).unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success(), "ffmpeg could not write {}", path.display());
}

/// Twelve distinct 32x24 RGB frames: frame k carries k * 20 in its blue channel.
fn test_frames() -> Vec<RgbImage> {
    let (w, h) = (32u32, 24u32);
    (0..12u32)
        .map(|k| {
            let pixels = (0..w * h)
                .flat_map(|i| {
                    let (x, y) = (i % w, i / w);
                    [((x * 7 + k * 20) % 256) as u8, ((y * 9 + k * 5) % 256) as u8, (k * 20) as u8]
                })
                .collect();
            RgbImage::new(w, h, pixels).unwrap()
        })
        .collect()
}

#[test]
fn a_video_gives_every_clip_frame_its_hint() {
    if !ffmpeg_tools() {
        return;
    }
    let dir = Scratch::new("video");
    let source = test_frames();
    let video = dir.0.join("moves.mkv");
    let bytes: Vec<Vec<u8>> = source.iter().map(|f| f.pixels().to_vec()).collect();
    encode(&video, &bytes, (32, 24), 20, "rgb24", "gbrp");
    let tools = VideoTools::default();
    let frame_of = |image: &RgbImage| image.pixels()[2] / 20;

    // By time: a 10 fps clip takes every other frame of the 20 fps video, exactly (lossless).
    let request = VideoRequest { frames: 6, fps: 10, timing: VideoTiming::Time };
    let frames = read_video_rgb(&video, request, &tools).unwrap();
    assert_eq!(frames.iter().map(frame_of).collect::<Vec<_>>(), vec![0, 2, 4, 6, 8, 10]);
    for (k, frame) in frames.iter().enumerate() {
        assert_eq!(frame.pixels(), source[2 * k].pixels(), "clip frame {k}");
    }
    // In order: one video frame per clip frame.
    let request = VideoRequest { frames: 5, fps: 10, timing: VideoTiming::Frames };
    let frames = read_video_rgb(&video, request, &tools).unwrap();
    assert_eq!(frames.iter().map(frame_of).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);

    // Through control_hints: every frame is a keyframe; canny edges of each frame.
    let mut canny_entry = entry("canny", &video);
    let (keyframes, hints) = control_hints(&canny_entry, 4, 10, 64, 48).unwrap();
    assert_eq!(keyframes, vec![0, 1, 2, 3]);
    for (k, hint) in hints.iter().enumerate() {
        assert_eq!(hint.pixels(), canny(&source[2 * k], CANNY_LOW, CANNY_HIGH).unwrap().pixels(), "frame {k}");
    }
    canny_entry.video_timing = "frames".into();
    let (_, hints) = control_hints(&canny_entry, 4, 10, 64, 48).unwrap();
    assert_eq!(hints[3].pixels(), canny(&source[3], CANNY_LOW, CANNY_HIGH).unwrap().pixels());

    // Too short: 0.6 s of video for a 0.7 s clip; 12 frames for 13.
    for (frames, timing, needle) in
        [(7, VideoTiming::Time, "gives 6 frames at 10 fps"), (13, VideoTiming::Frames, "has 12 frames")]
    {
        let err = read_video_rgb(&video, VideoRequest { frames, fps: 10, timing }, &tools).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, Error::Input(_)) && message.contains("moves.mkv") && message.contains(needle),
            "{message}"
        );
    }
    // Not a video, and an absurd size.
    let fake = dir.0.join("fake.mp4");
    std::fs::write(&fake, b"just text").unwrap();
    let err =
        read_video_rgb(&fake, VideoRequest { frames: 1, fps: 10, timing: VideoTiming::Time }, &tools).unwrap_err();
    assert!(matches!(err, Error::Input(_)) && err.to_string().contains("fake.mp4: not a video"), "{err}");
    let wide = dir.0.join("wide.mkv");
    encode(&wide, &[vec![0u8; 8200 * 2 * 3]], (8200, 2), 10, "rgb24", "gbrp");
    let err =
        read_video_rgb(&wide, VideoRequest { frames: 1, fps: 10, timing: VideoTiming::Time }, &tools).unwrap_err();
    assert!(matches!(err, Error::Input(_)) && err.to_string().contains("8200x2"), "{err}");
    // The decoded bytes are bounded before anything is decoded.
    let err = read_video_rgb(&video, VideoRequest { frames: 1 << 30, fps: 10, timing: VideoTiming::Time }, &tools)
        .unwrap_err();
    assert!(matches!(err, Error::Input(_)) && err.to_string().contains("byte"), "{err}");
}

#[test]
fn a_depth_video_keeps_sixteen_bits_and_one_range_over_the_clip() {
    if !ffmpeg_tools() {
        return;
    }
    let dir = Scratch::new("depth-video");
    let (w, h) = (16u32, 8u32);
    // Frame k: a ramp along x shifted by k * 1000 (16-bit levels, lossless FFV1 gray16le).
    let values = |k: u32| (0..w * h).map(move |i| (1000 + (i % w) * 2000 + k * 1000) as u16);
    let frames: Vec<Vec<u8>> = (0..4).map(|k| values(k).flat_map(|v| v.to_le_bytes()).collect()).collect();
    let video = dir.0.join("depth.mkv");
    encode(&video, &frames, (w, h), 8, "gray16le", "gray16le");
    let request = VideoRequest { frames: 4, fps: 8, timing: VideoTiming::Time };
    let maps = read_video_depth(&video, request, &VideoTools::default()).unwrap();
    for (k, map) in maps.iter().enumerate() {
        let expected: Vec<f32> = values(k as u32).map(|v| v as f32).collect();
        assert_eq!(map.values(), &expected[..], "frame {k}");
    }
    // The hints share the clip's range: the brightest value is the last frame's right edge.
    let (keyframes, hints) = control_hints(&entry("depth", &video), 4, 8, 64, 64).unwrap();
    assert_eq!(keyframes, vec![0, 1, 2, 3]);
    let (low, high) = (1000.0f64, (1000 + 15 * 2000 + 3000) as f64);
    for (k, hint) in hints.iter().enumerate() {
        let expected = depth_hint(&maps[k], DepthRange::Fixed { low: low as f32, high: high as f32 }, false).unwrap();
        assert_eq!(hint.pixels(), expected.pixels(), "frame {k}");
    }
    assert_eq!(hints[0].pixels()[0], 0);
    assert_eq!(hints[3].pixels()[(w as usize - 1) * 3], 255);
}

/// Runs the celframe binary; its exit code and stdout + stderr.
fn celframe(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_celframe")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn celframe_control_writes_interpolated_poses_and_video_frames() {
    let dir = Scratch::new("cli");
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let video = dir.0.join("edges.mkv");
    let with_video = ffmpeg_tools();
    if with_video {
        let bytes: Vec<Vec<u8>> = test_frames().iter().map(|f| f.pixels().to_vec()).collect();
        encode(&video, &bytes, (32, 24), 20, "rgb24", "gbrp");
    }
    let config = |extra: &str| {
        let models = |p: &str| tiny.join(p).display().to_string();
        let mut text = format!(
            "seed = 1\n[models]\nunet = {:?}\nmotion_adapter = {:?}\nvae = {:?}\ntext_encoder = {:?}\n\
             text_encoder_2 = {:?}\ntokenizer = {:?}\n\n[[controlnets]]\npath = {:?}\nkind = \"openpose\"\n\
             images = {:?}\npose_interpolation = \"linear\"\ninterpolation = \"keyframes\"\n{extra}\n",
            models("pipeline_tiny/unet"),
            models("pipeline_tiny/motion_adapter"),
            models("vae_tiny"),
            models("text_encoder_tiny"),
            models("text_encoder_2_tiny"),
            models("pipeline_tiny/tokenizer"),
            models("pipeline_tiny/controlnet"),
            fixture_path("control_pose_interp").display().to_string(),
        );
        if with_video {
            text += &format!(
                "[[controlnets]]\npath = {:?}\nkind = \"canny\"\nimages = {:?}\n",
                models("pipeline_tiny/controlnet"),
                video.display().to_string()
            );
        }
        text + "[video]\nwidth = 64\nheight = 64\nfps = 10\nframes = 6\n\n[[clips]]\nprompt = \"a\"\n"
    };
    let path = dir.0.join("control.toml");
    std::fs::write(&path, config("")).unwrap();
    let out = dir.0.join("hints");
    let (code, text) = celframe(&["control", path.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    let listed = |sub: &str| {
        let mut names: Vec<String> = std::fs::read_dir(out.join("clip_001").join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let every_frame: Vec<String> = (0..6).map(|f| format!("frame_{f:06}.png")).collect();
    assert_eq!(listed("controlnet_1_openpose"), every_frame, "{text}");
    assert!(text.contains("every frame from 0 to 5"), "{text}");
    if with_video {
        assert_eq!(listed("controlnet_2_canny"), every_frame, "{text}");
    }
    // Bad values are named, exit code 2.
    std::fs::write(
        &path,
        config("pose_interpolation = \"cubic\"").replacen("pose_interpolation = \"linear\"\n", "", 1),
    )
    .unwrap();
    let (code, text) = celframe(&["control", path.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(code == 2 && text.contains("controlnets[0].pose_interpolation: 'cubic'"), "{code}: {text}");
    if with_video {
        let bad = config("").replace("[video]", "keyframes = [0.0]\n[video]");
        std::fs::write(&path, bad).unwrap();
        let (code, text) = celframe(&["control", path.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(
            code == 2 && text.contains("controlnets[1].keyframes") && text.contains("is a video"),
            "{code}: {text}"
        );
    }
}
