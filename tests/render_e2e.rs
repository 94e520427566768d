//! `celframe render` end to end on the CPU twins against diffusers: the tiny SDXL-family models
//! of tests/fixtures/pipeline_tiny with diffusers' own initial latents and per-step noise injected
//! (tools/make_pipeline_fixtures.py: AnimateDiffSDXLPipeline for the videos, StableDiffusionXL-
//! Pipeline for the image, the AnimateDiff steps with ControlNet residuals for the ControlNet
//! case, AnimateDiffSDXLPipeline with enable_free_init for FreeInit, whose fresh noise the script
//! injects by replacing `free_init_utils.randn_tensor`). The final latents and the frames must
//! match; the outputs tree must be complete.

#[path = "common/trees.rs"]
mod trees;
#[path = "common/unet_fixtures.rs"]
mod unet_fixtures;

use std::path::Path;

use celframe::pipeline::config::RenderConfig;
use celframe::pipeline::{RenderOptions, render};
use celframe::{Tensor, weights};
use trees::{assert_same_tree, celframe_command};
use unet_fixtures::{TempDir, fixtures};

/// Relative L2 error of `actual` against `expected`.
fn rel_l2(actual: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(actual.len(), expected.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (a, e) in actual.iter().zip(expected) {
        num += ((a - e) as f64).powi(2);
        den += (*e as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// diffusers' [1, C, F, h, w] (or [1, C, h, w]) -> frame-major NHWC values.
fn frames_major(t: &Tensor) -> Vec<f32> {
    let s = t.shape().to_vec();
    let (c, f, h, w) = if s.len() == 5 { (s[1], s[2], s[3], s[4]) } else { (s[1], 1, s[2], s[3]) };
    let v = t.to_f32_vec().unwrap();
    let mut out = vec![0f32; v.len()];
    for frame in 0..f {
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    out[((frame * h + y) * w + x) * c + ch] = v[((ch * f + frame) * h + y) * w + x];
                }
            }
        }
    }
    out
}

fn case_json(case: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join(format!("pipeline_tiny/{case}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The render config that reproduces `case`, writing into `out`.
fn config_for(case: &str, out: &Path, control_dir: Option<&Path>) -> RenderConfig {
    let j = case_json(case);
    let tiny = fixtures().join("pipeline_tiny");
    let path = |p: &str| tiny.join(p).display().to_string();
    let mut models = serde_json::json!({
        "unet": path("unet"), "vae": path("../vae_tiny"), "text_encoder": path("../text_encoder_tiny"),
        "text_encoder_2": path("../text_encoder_2_tiny"), "tokenizer": path("tokenizer"),
    });
    if j["models"]["motion_adapter"].is_string() {
        models["motion_adapter"] = path("motion_adapter").into();
    }
    let mut config = serde_json::json!({
        "dtype": "f32", "device": "cpu", "models": models,
        "sampler": { "name": j["sampler"], "steps": j["steps"], "cfg": j["guidance"] },
        "video": { "width": j["width"], "height": j["height"], "frames": j["frames"], "fps": 8 },
        "output": { "root": out.display().to_string(), "mp4": "builtin" },
        "clips": [{ "prompt": j["prompt"], "negative": j["negative"] }],
    });
    if !j["free_init"].is_null() {
        config["video"]["free_init"] = j["free_init"].clone();
    }
    if let Some(dir) = control_dir {
        config["controlnets"] = serde_json::json!([{
            "path": path("controlnet"), "kind": "openpose", "images": dir.display().to_string(),
            "scale": j["controlnet_scale"], "interpolation": "hold",
        }]);
    }
    let file = out.with_extension("json");
    std::fs::write(&file, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    RenderConfig::load(&file).unwrap()
}

/// The control images of a case as PNGs (whole 8-bit levels, so the round trip is exact).
fn write_control_pngs(case: &str, dir: &Path) {
    let noise = weights::open(&fixtures().join(format!("pipeline_tiny/{case}.noise.safetensors")), "noise").unwrap();
    let control = noise.float("control").unwrap();
    let &[f, h, w, _] = control.shape() else { panic!("control shape") };
    let v = control.to_f32_vec().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for frame in 0..f {
        let bytes: Vec<u8> =
            v[frame * h * w * 3..(frame + 1) * h * w * 3].iter().map(|x| (x * 255.0).round() as u8).collect();
        let image = celframe::output::RgbImage::new(w as u32, h as u32, bytes).unwrap();
        celframe::output::write_png(&dir.join(format!("{frame:03}.png")), &image).unwrap();
    }
}

/// Renders `case` and checks it against diffusers: latents and frames within `tolerance` (rel L2).
fn check(case: &str, tolerance: f64) {
    let dir = TempDir::new(&format!("render-{case}"));
    let control = case.starts_with("controlnet").then(|| dir.path("control"));
    if let Some(c) = &control {
        write_control_pngs(case, c);
    }
    let out = dir.path("outputs");
    let config = config_for(case, &out, control.as_deref());
    let noise = fixtures().join(format!("pipeline_tiny/{case}.noise.safetensors"));
    let options = RenderOptions { noise: Some(noise), timings: false, keep_tensors: true, split: None };
    let report = render(&config, &options).unwrap();
    let clip = &report.clips[0];
    let reference =
        weights::open(&fixtures().join(format!("pipeline_tiny/{case}.reference.safetensors")), "reference").unwrap();
    let latents = clip.latents.as_ref().unwrap().to_f32_vec().unwrap();
    let want = frames_major(&reference.float("latents").unwrap());
    let e_latents = rel_l2(&latents, &want);
    eprintln!("{case}: latents rel L2 {e_latents:.2e}");
    assert!(e_latents <= tolerance, "{case}: latents rel L2 {e_latents:.3e} > {tolerance:e}");
    // free_init_video keeps only the latents (its decoding is the other cases').
    if reference.contains("frames") {
        let frames = clip.images.as_ref().unwrap().to_f32_vec().unwrap();
        let e_frames = rel_l2(&frames, &reference.float("frames").unwrap().to_f32_vec().unwrap());
        eprintln!("{case}: frames rel L2 {e_frames:.2e}");
        assert!(e_frames <= tolerance, "{case}: frames rel L2 {e_frames:.3e} > {tolerance:e}");
    }
    // The outputs tree: every frame as a PNG, the mp4, the configs.
    let clip_dir = out.join("video/clip_001");
    let pngs = std::fs::read_dir(clip_dir.join("frames")).unwrap().count();
    assert_eq!(pngs, clip.frames, "{case}: PNG frames");
    assert!(clip_dir.join("clip_001.mp4").is_file(), "{case}: mp4");
    for name in ["pipeline_config.json", "lora_versions.json", "controlnet_config.json"] {
        assert!(out.join("configs").join(name).is_file(), "{case}: configs/{name}");
    }
    assert!(std::fs::read_dir(out.join("images")).unwrap().count() == 1, "{case}: prompt grid");
    // A rerun skips the complete clip.
    let again = render(&config, &RenderOptions::default()).unwrap();
    assert!(again.clips[0].skipped, "{case}: a complete clip is rendered again");
}

/// float32 CPU twins against diffusers float32: what is left is summation order.
const TOL: f64 = 1e-4;

#[test]
fn lcm_video_matches_animatediff_sdxl() {
    check("lcm_video", TOL);
}

#[test]
fn euler_video_with_negative_prompt_matches() {
    check("euler_video", TOL);
}

#[test]
fn lcm_image_matches_stable_diffusion_xl() {
    check("lcm_image", TOL);
}

#[test]
fn controlnet_video_matches() {
    check("controlnet_video", TOL);
}

#[test]
fn free_init_video_matches_animatediff_sdxl() {
    // Three FreeInit passes of 1, 2 and 4 LCM steps (coarse-to-fine), butterworth filter.
    check("free_init_video", TOL);
}

#[test]
fn a_noise_file_without_a_free_init_pass_names_the_missing_tensor() {
    let dir = TempDir::new("render-free-init-missing");
    let out = dir.path("outputs");
    let mut json = serde_json::to_value(config_for("free_init_video", &out, None)).unwrap();
    json["video"]["free_init"]["iterations"] = 4.into();
    let file = dir.path("four.json");
    std::fs::write(&file, serde_json::to_string(&json).unwrap()).unwrap();
    let noise = fixtures().join("pipeline_tiny/free_init_video.noise.safetensors");
    let options = RenderOptions { noise: Some(noise), ..RenderOptions::default() };
    let err = render(&RenderConfig::load(&file).unwrap(), &options).err().expect("a pass without noise ran");
    assert!(err.to_string().contains("no tensor 'free_init.3'"), "{err}");
}

/// The lcm_video case's models and prompt with our own generator and `video` settings merged in.
fn generated(dir: &TempDir, name: &str, video: serde_json::Value) -> RenderConfig {
    let out = dir.path(name);
    let base = config_for("lcm_video", &out, None);
    let mut json = serde_json::to_value(&base).unwrap();
    for (k, v) in video.as_object().unwrap() {
        json["video"][k] = v.clone();
    }
    let file = dir.path(&format!("{name}.json"));
    std::fs::write(&file, serde_json::to_string(&json).unwrap()).unwrap();
    RenderConfig::load(&file).unwrap()
}

fn latents_of(config: &RenderConfig) -> Vec<f32> {
    let options = RenderOptions { keep_tensors: true, ..RenderOptions::default() };
    let report = render(config, &options).unwrap();
    report.clips[0].latents.as_ref().unwrap().to_f32_vec().unwrap()
}

#[test]
fn long_clips_by_windows_and_by_chained_segments() {
    let dir = TempDir::new("render-long");
    let four = latents_of(&generated(&dir, "four", serde_json::json!({ "frames": 4 })));
    assert!(four.iter().all(|v| v.is_finite()) && four.iter().any(|&v| v != 0.0));
    // Chaining 6 frames in segments of 4: the first segment is the 4-frame clip itself (the
    // generator draws per clip frame), the second starts from its last frame.
    let chain = serde_json::json!({ "frames": 6, "context_length": 4, "context_overlap": 2, "long_video": "chain" });
    let chained = latents_of(&generated(&dir, "chain", chain));
    assert_eq!(chained.len(), four.len() / 4 * 6);
    assert_eq!(&chained[..four.len()], &four[..], "the first segment differs from the same frames alone");
    // Context windows of 4 over 6 frames: every frame fused from overlapping windows.
    let windows = serde_json::json!({ "frames": 6, "context_length": 4, "context_overlap": 2 });
    let fused = latents_of(&generated(&dir, "windows", windows));
    assert!(fused.iter().all(|v| v.is_finite()));
    assert_ne!(&fused[..four.len()], &four[..], "windows over 6 frames changed nothing in the first 4");
}

#[test]
fn free_init_over_context_windows() {
    // FreeInit filters the whole clip's latents, whatever the windows: 6 frames in windows of 4.
    let dir = TempDir::new("render-free-init-windows");
    let windows = serde_json::json!({ "frames": 6, "context_length": 4, "context_overlap": 2 });
    let plain = latents_of(&generated(&dir, "plain", windows.clone()));
    let mut with = windows.clone();
    with["free_init"] = serde_json::json!({ "iterations": 2, "method": "gaussian" });
    let refined = latents_of(&generated(&dir, "free_init", with.clone()));
    assert!(refined.iter().all(|v| v.is_finite()));
    let moved = rel_l2(&refined, &plain);
    assert!(moved > 1e-2, "a second pass changed the clip by only {moved:e}");
    // Our generator's streams: the same seed gives the same clip.
    assert_eq!(latents_of(&generated(&dir, "again", with)), refined, "FreeInit is not reproducible");
    // One pass is the plain render: pass 0 draws what a run without FreeInit draws.
    let mut one = windows;
    one["free_init"] = serde_json::json!({ "iterations": 1 });
    assert_eq!(latents_of(&generated(&dir, "one", one)), plain);
}

#[test]
fn a_controlnet_on_keyframes_only_runs_on_those_frames() {
    // Two hint images on frames 0 and 4 of 5 with interpolation "keyframes": the net runs on those
    // frames only (the others' residual rows are zero), and still steers the clip.
    let dir = TempDir::new("render-keyframes");
    let control = dir.path("control");
    write_control_pngs("controlnet_video", &control);
    for f in 1..4 {
        std::fs::remove_file(control.join(format!("{f:03}.png"))).unwrap();
    }
    let out = dir.path("with");
    let mut json = serde_json::to_value(config_for("controlnet_video", &out, Some(&control))).unwrap();
    json["controlnets"][0]["interpolation"] = "keyframes".into();
    let file = dir.path("with.json");
    std::fs::write(&file, serde_json::to_string(&json).unwrap()).unwrap();
    let with = latents_of(&RenderConfig::load(&file).unwrap());
    json["controlnets"] = serde_json::json!([]);
    json["output"]["root"] = dir.path("without").display().to_string().into();
    std::fs::write(&file, serde_json::to_string(&json).unwrap()).unwrap();
    let without = latents_of(&RenderConfig::load(&file).unwrap());
    assert!(with.iter().all(|v| v.is_finite()));
    let moved = rel_l2(&with, &without);
    assert!(moved > 1e-3, "keyframe control changed the clip by only {moved:e}");
}

/// `celframe control CONFIG --out HINTS`, which must succeed.
fn celframe_control(config: &Path, hints: &Path) {
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_celframe"))
        .args(["control", &config.display().to_string(), "--out", &hints.display().to_string()])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
}

#[test]
fn celframe_control_writes_the_hints_a_config_gives() {
    use celframe::control::canny::canny;
    use celframe::output::{RgbImage, decode_png, write_png};
    let dir = TempDir::new("control-command");
    // A picture for the canny net (edges computed in-process) and a grey depth map.
    let square: Vec<u8> = (0..64 * 64)
        .flat_map(|i| if (16..48).contains(&(i % 64)) && (16..48).contains(&(i / 64)) { [230; 3] } else { [10; 3] })
        .collect();
    let picture = RgbImage::new(64, 64, square).unwrap();
    write_png(&dir.path("picture.png"), &picture).unwrap();
    let ramp: Vec<u8> = (0..64 * 64).flat_map(|i| [(40 + (i % 64) * 2) as u8; 3]).collect();
    write_png(&dir.path("depth.png"), &RgbImage::new(64, 64, ramp).unwrap()).unwrap();
    let out = dir.path("outputs");
    let mut json = serde_json::to_value(config_for("controlnet_video", &out, None)).unwrap();
    let net = fixtures().join("pipeline_tiny/controlnet").display().to_string();
    json["controlnets"] = serde_json::json!([
        { "path": net, "kind": "canny", "images": dir.path("picture.png").display().to_string() },
        { "path": net, "kind": "depth", "images": dir.path("depth.png").display().to_string() },
    ]);
    let file = dir.path("control.json");
    std::fs::write(&file, serde_json::to_string(&json).unwrap()).unwrap();
    let hints = dir.path("hints");
    celframe_control(&file, &hints);
    let read = |p: &str| decode_png(&std::fs::read(hints.join(p)).unwrap()).unwrap();
    let edges = read("clip_001/controlnet_1_canny/frame_000000.png");
    assert_eq!(edges.pixels(), canny(&picture, 100.0, 200.0).unwrap().pixels(), "the canny hint");
    assert!(edges.pixels().contains(&255) && edges.pixels().contains(&0));
    let depth = read("clip_001/controlnet_2_depth/frame_000000.png");
    let (lo, hi) = depth.pixels().iter().fold((255u8, 0u8), |(l, h), &v| (l.min(v), h.max(v)));
    assert_eq!((lo, hi), (0, 255), "the depth map is scaled to the full range");
}

#[test]
fn openpose_json_keyframes_are_drawn_as_the_nets_were_trained() {
    // A folder with a BODY_25 OpenPose file: `celframe control` draws it at the render size, the
    // same skeleton as the cv2 reference drawing of tools/make_control_fixtures.py.
    let dir = TempDir::new("control-openpose");
    let poses = dir.path("poses");
    std::fs::create_dir_all(&poses).unwrap();
    std::fs::copy(fixtures().join("control_pose_body25.json"), poses.join("000.json")).unwrap();
    let out = dir.path("outputs");
    let mut json = serde_json::to_value(config_for("controlnet_video", &out, None)).unwrap();
    json["video"]["width"] = 128.into();
    json["video"]["height"] = 96.into();
    let net = fixtures().join("pipeline_tiny/controlnet").display().to_string();
    json["controlnets"] =
        serde_json::json!([{ "path": net, "kind": "openpose", "images": poses.display().to_string() }]);
    let file = dir.path("pose.json");
    std::fs::write(&file, serde_json::to_string(&json).unwrap()).unwrap();
    let hints = dir.path("hints");
    celframe_control(&file, &hints);
    let read = |p: &Path| celframe::output::decode_png(&std::fs::read(p).unwrap()).unwrap();
    let drawn = read(&hints.join("clip_001/controlnet_1_openpose/frame_000000.png"));
    let reference = read(&fixtures().join("control_pose_body25_128x96.png"));
    assert_eq!(drawn.pixels(), reference.pixels(), "the skeleton differs from the reference drawing");
}

/// `celframe render` of `config` into `out` with `CELFRAME_TEXT_KV_CACHE` set to `cache` (None:
/// unset); its stderr.
fn render_cli(config: &Path, out: &Path, cache: Option<&str>) -> String {
    let mut command = celframe_command(&["render", &config.display().to_string(), "--out", &out.display().to_string()]);
    match cache {
        Some(v) => command.env("CELFRAME_TEXT_KV_CACHE", v),
        None => command.env_remove("CELFRAME_TEXT_KV_CACHE"),
    };
    let done = command.stdin(std::process::Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr).into_owned();
    assert!(done.status.success(), "celframe render: {:?}\n{err}", done.status);
    err
}

/// The text k/v computed once per shared context and model (the default) give the clip that
/// k/v computed in every forward (`CELFRAME_TEXT_KV_CACHE=0`) give, byte for byte on the CPU twins
/// (each output element sums the same products in the same order): context windows over 5 frames,
/// a prompt travelling from frame 0 to frame 1 (windows over frame 0 take a context row per frame,
/// the others one per half, cached), and a ControlNet on keyframes 0 and 4 (calls on sub-windows).
#[test]
fn text_kv_computed_once_give_the_clip_computed_in_every_forward() {
    let dir = TempDir::new("render-text-kv");
    let control = dir.path("control");
    write_control_pngs("controlnet_video", &control);
    for f in 1..4 {
        std::fs::remove_file(control.join(format!("{f:03}.png"))).unwrap();
    }
    let mut json = serde_json::to_value(config_for("controlnet_video", &dir.path("unused"), Some(&control))).unwrap();
    json["controlnets"][0]["interpolation"] = "keyframes".into();
    json["video"]["context_length"] = 4.into();
    json["video"]["context_overlap"] = 2.into();
    json["clips"][0]["prompt_schedule"] = serde_json::json!([{ "frame": 1, "prompt": "a dancer, red dress" }]);
    let config = dir.path("travel.json");
    std::fs::write(&config, serde_json::to_string(&json).unwrap()).unwrap();
    let per_forward = dir.path("per_forward");
    let err = render_cli(&config, &per_forward, Some("0"));
    assert!(!err.contains("k/v of the text computed"), "CELFRAME_TEXT_KV_CACHE=0 still cached:\n{err}");
    let cached = dir.path("cached/per_forward");
    let err = render_cli(&config, &cached, None);
    let line = err.lines().find(|l| l.contains("k/v of the text computed"));
    let line = line.unwrap_or_else(|| panic!("no text k/v line:\n{err}"));
    assert!(!line.contains("reused 0 times"), "{line}");
    assert_same_tree(&per_forward, &cached, "text k/v computed once");
}

/// FP8 linears (the config's `fp8` "all"; here the CPU twin of the e4m3 GEMMs) in the UNet, the motion
/// modules and the ControlNet of the tiny pipeline: the clip's frames move away from the f16 clip's
/// by the quantization's cost, which is printed, over two seeds; with f32 weights it is refused.
#[test]
fn fp8_linears_render_a_clip_near_the_f16_one() {
    let dir = TempDir::new("render-fp8");
    let control = dir.path("control");
    write_control_pngs("controlnet_video", &control);
    let frames = |fp8: bool, seed: u64| {
        let mut config = config_for("controlnet_video", &dir.path(&format!("out-{fp8}-{seed}")), Some(&control));
        let mode = if fp8 { "all" } else { "off" }; // every block linear ("on" leaves to_out, proj_in/out)
        (config.dtype, config.fp8, config.seed) = ("f16".into(), mode.into(), seed);
        let options = RenderOptions { keep_tensors: true, ..RenderOptions::default() };
        let report = render(&config, &options).unwrap();
        report.clips[0].images.as_ref().unwrap().to_f32_vec().unwrap()
    };
    for seed in [1, 2] {
        let (plain, fp8) = (frames(false, seed), frames(true, seed));
        let rel = rel_l2(&fp8, &plain);
        eprintln!("seed {seed}: FP8 frames rel L2 {rel:.3e} from the f16 frames");
        assert!(rel > 0.0 && rel < 0.1, "seed {seed}: FP8 frames {rel:.3e} from the f16 ones");
    }
    let mut config = config_for("controlnet_video", &dir.path("f32"), Some(&control));
    config.fp8 = "on".into();
    let Err(err) = render(&config, &RenderOptions::default()) else { panic!("fp8 with f32 weights was rendered") };
    assert!(err.to_string().contains("fp8"), "{err}");
}
