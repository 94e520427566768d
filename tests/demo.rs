//! `celframe demo` through the binary: the small random pipeline on the CPU twins renders a clip
//! into the outputs tree (PNG frames, an mp4 with every frame) and says the weights are random.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use celframe::output::decode_png;
use common::TempDir;

fn demo(args: &[&str]) -> Output {
    // Kept between test runs, like the demo's own cache beside the build.
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-cache");
    Command::new(env!("CARGO_BIN_EXE_celframe"))
        .arg("demo")
        .args(args)
        .env("CELFRAME_DEMO_CACHE", cache)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn cpu_demo_writes_frames_and_an_mp4() {
    let dir = TempDir::new("demo");
    let root = dir.path("out");
    let started = std::time::Instant::now();
    let out = demo(&["--device", "cpu", "--size", "small", "--frames", "8", "--out", root.to_str().unwrap()]);
    let output = text(&out);
    assert!(out.status.success(), "exit {:?}:\n{output}", out.status.code());
    eprintln!("demo, 8 frames on the CPU: {:.1} s", started.elapsed().as_secs_f64());
    assert!(output.contains("The weights are random"), "{output}");
    assert!(output.contains("celframe render examples/seed.toml"), "{output}");
    assert!(output.contains("frames/s"), "{output}");

    let clip = root.join("video").join("clip_001");
    let mut frames: Vec<_> = std::fs::read_dir(clip.join("frames"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    frames.sort();
    assert_eq!(frames.len(), 8);
    // Every part of the random model moves the pixels: frames vary within and between them.
    let first = decode_png(&std::fs::read(&frames[0]).unwrap()).unwrap();
    let last = decode_png(&std::fs::read(&frames[7]).unwrap()).unwrap();
    assert_eq!((first.width(), first.height()), (256, 144));
    let (a, b) = (first.pixels(), last.pixels());
    assert!(a.iter().any(|&p| p != a[0]), "the first frame is one colour");
    assert_ne!(a, b, "the first and last frames are the same");

    let mp4 = clip.join("clip_001.mp4");
    assert!(std::fs::metadata(&mp4).unwrap().len() > 0);
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args(["-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"])
        .arg(&mp4)
        .output();
    match probe {
        Ok(p) if p.status.success() => assert_eq!(String::from_utf8_lossy(&p.stdout).trim(), "8"),
        _ => eprintln!("no ffprobe: the mp4's frame count is not checked"),
    }
}

/// Fewer frames than the built-in pose's five keyframes still render (fewer poses).
#[test]
fn short_clip_renders() {
    let dir = TempDir::new("demo-short");
    let root = dir.path("out");
    let out = demo(&["--device", "cpu", "--frames", "3", "--out", root.to_str().unwrap()]);
    assert!(out.status.success(), "exit {:?}:\n{}", out.status.code(), text(&out));
    assert_eq!(std::fs::read_dir(root.join("video/clip_001/frames")).unwrap().count(), 3);
}

#[test]
fn bad_arguments_exit_2_naming_them() {
    let out = demo(&["--device", "cpu", "--size", "huge"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("--size"), "{}", text(&out));
    let dir = TempDir::new("demo-frames");
    let root = dir.path("out");
    let out = demo(&["--device", "cpu", "--frames", "0", "--out", root.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("frames"), "{}", text(&out));
}
