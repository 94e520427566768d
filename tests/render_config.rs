//! The render config (`celframe::pipeline::config`) and `celframe render`'s arguments: both file
//! formats, unknown keys, every validation rule, the overrides, --dry-run, and the examples.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use celframe::Error;
use celframe::cli::render::{RenderArgs, config_from_args};
use celframe::output::Mp4Choice;
use celframe::pipeline::RenderOptions;
use celframe::pipeline::config::{Component, RenderConfig};
use celframe::sampling::{BetaSchedule, Prediction, SamplerConfig, SamplerKind, Spacing};

/// A fresh folder for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("celframe-render-config-{test}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn touch(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, b"placeholder: validation only checks that the file is there").unwrap();
}

/// The files the configs below name, laid out under `dir`: a diffusers base folder, a motion
/// adapter, three LoRAs, a ControlNet and five pose PNGs (and a text file among them).
fn lay_out_models(dir: &Path) {
    for sub in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        touch(&dir.join("models/base").join(sub).join("config.json"));
    }
    touch(&dir.join("models/motion/config.json"));
    for lora in ["style", "flat", "lcm"] {
        touch(&dir.join(format!("models/{lora}.safetensors")));
    }
    touch(&dir.join("models/openpose/config.json"));
    for i in 0..5 {
        touch(&dir.join(format!("control/pose/{i:03}.png")));
    }
    touch(&dir.join("control/pose/notes.txt"));
}

/// One config with a value other than its default in nearly every field, as TOML and as JSON.
const FULL_TOML: &str = r#"
seed = 42
dtype = "bf16"
device = "cpu"

[models]
base = "models/base"
motion_adapter = "models/motion"

[[loras]]
path = "models/style.safetensors"
weight = 0.8
role = "style"

[[loras]]
path = "models/flat.safetensors"
weight = 0.25
text_encoder_weight = 0.2
role = "Style"

[[loras]]
path = "models/lcm.safetensors"
role = "lcm"

[[controlnets]]
path = "models/openpose"
kind = "openpose"
scale = 0.9
start = 0.1
end = 0.9
guess_mode = true
images = "control/pose"
interpolation = "linear"

[sampler]
name = "lcm"
steps = 6
cfg = 1.8
cfg_rescale = 0.5
beta_schedule = "animatediff"

[video]
width = 512
height = 384
fps = 12
seconds = 2.0
context_length = 12
context_overlap = 3
context_schedule = "static_standard"
fuse = "flat"
long_video = "chain"
chain_strength = 0.5
freenoise = true
vae_chunk_frames = 4
group_norm_across_frames = true

[output]
root = "out"
mp4 = "builtin"
png_frames = false
replace = true

[[clips]]
prompt = "1 girl, blue hair"
negative = "blurry"
prompt_schedule = [{ frame = 12, prompt = "1 girl, red hair" }]

[[clips]]
prompt = "a city at night"
seed = 7
frames = 8
"#;

const FULL_JSON: &str = r#"{
  "seed": 42, "dtype": "bf16", "device": "cpu",
  "models": {"base": "models/base", "motion_adapter": "models/motion"},
  "loras": [
    {"path": "models/style.safetensors", "weight": 0.8, "role": "style"},
    {"path": "models/flat.safetensors", "weight": 0.25, "text_encoder_weight": 0.2, "role": "Style"},
    {"path": "models/lcm.safetensors", "role": "lcm"}
  ],
  "controlnets": [{"path": "models/openpose", "kind": "openpose", "scale": 0.9, "start": 0.1, "end": 0.9,
                   "guess_mode": true, "images": "control/pose", "interpolation": "linear"}],
  "sampler": {"name": "lcm", "steps": 6, "cfg": 1.8, "cfg_rescale": 0.5, "beta_schedule": "animatediff"},
  "video": {"width": 512, "height": 384, "fps": 12, "seconds": 2.0, "context_length": 12, "context_overlap": 3,
            "context_schedule": "static_standard", "fuse": "flat", "long_video": "chain", "chain_strength": 0.5,
            "freenoise": true, "vae_chunk_frames": 4, "group_norm_across_frames": true},
  "output": {"root": "out", "mp4": "builtin", "png_frames": false, "replace": true},
  "clips": [
    {"prompt": "1 girl, blue hair", "negative": "blurry", "prompt_schedule": [{"frame": 12, "prompt": "1 girl, red hair"}]},
    {"prompt": "a city at night", "seed": 7, "frames": 8}
  ]
}"#;

/// `dir` with the models laid out and the full config written as `config.toml` and `config.json`.
fn full_setup(test: &str) -> PathBuf {
    let dir = scratch(test);
    lay_out_models(&dir);
    fs::write(dir.join("config.toml"), FULL_TOML).unwrap();
    fs::write(dir.join("config.json"), FULL_JSON).unwrap();
    dir
}

fn valid_config(test: &str) -> (PathBuf, RenderConfig) {
    let dir = full_setup(test);
    let config = RenderConfig::load(&dir.join("config.toml")).unwrap();
    config.validate().unwrap();
    (dir, config)
}

fn input_message<T: std::fmt::Debug>(result: celframe::Result<T>) -> String {
    match result {
        Err(Error::Input(m)) => m,
        other => panic!("expected an input error, got {other:?}"),
    }
}

#[test]
fn toml_and_json_give_the_same_config_with_paths_relative_to_the_file() {
    let dir = full_setup("formats");
    let from_toml = RenderConfig::load(&dir.join("config.toml")).unwrap();
    let from_json = RenderConfig::load(&dir.join("config.json")).unwrap();
    assert_eq!(from_toml, from_json);
    let c = from_toml;
    assert_eq!(c.models.base.as_deref(), Some(dir.join("models/base").as_path()));
    assert_eq!(c.controlnets[0].images, dir.join("control/pose"));
    assert_eq!(c.output.root, dir.join("out"));
    assert_eq!((c.loras[2].weight, c.loras[1].text_encoder_weight), (1.0, Some(0.2)));
    assert_eq!((c.video.width, c.video.height, c.video.fps, c.video.seconds), (512, 384, 12, Some(2.0)));
    assert_eq!((c.sampler.steps, c.sampler.cfg, c.seed), (6, 1.8, 42));
    assert!(c.controlnets[0].guess_mode && c.video.freenoise && c.output.replace && !c.output.png_frames);
    assert_eq!(c.clips[1].seed, Some(7));
    c.validate().unwrap();
    assert_eq!(c.dtype().unwrap(), celframe::DType::BF16);
    assert_eq!(c.output.mp4_choice().unwrap(), Mp4Choice::BuiltIn);
}

#[test]
fn an_absent_section_takes_the_documented_defaults() {
    let dir = scratch("defaults");
    let path = dir.join("c.toml");
    fs::write(&path, "[[clips]]\nprompt = \"x\"\n").unwrap();
    let c = RenderConfig::load(&path).unwrap();
    assert_eq!((c.seed, c.dtype.as_str(), c.device.as_str(), c.fp8.as_str()), (0, "f16", "auto", "off"));
    let s = &c.sampler;
    assert_eq!((s.name.as_str(), s.steps, s.cfg, s.cfg_rescale), ("lcm", 4, 1.5, 0.0));
    assert_eq!(
        (s.beta_schedule.as_str(), s.prediction.as_str(), s.eta, s.spacing.as_deref()),
        ("sdxl", "epsilon", None, None)
    );
    let v = &c.video;
    assert_eq!((v.width, v.height, v.fps, v.frames(), v.context_length, v.context_overlap), (1024, 576, 10, 16, 16, 4));
    assert_eq!(
        (v.context_schedule.as_str(), v.fuse.as_str(), v.long_video.as_str()),
        ("uniform_standard", "pyramid", "windows")
    );
    assert_eq!((v.chain_strength, v.vae_chunk_frames, v.freenoise, v.group_norm_across_frames), (0.7, 8, false, false));
    let o = &c.output;
    assert_eq!((o.root.clone(), o.mp4.as_str(), o.png_frames, o.replace), (dir.join("outputs"), "auto", true, false));
    assert_eq!(c.clips[0].negative, "");
}

#[test]
fn unknown_keys_are_errors_naming_the_key_and_the_file() {
    let dir = scratch("unknown");
    let cases = [
        ("top.toml", "sed = 1\n[[clips]]\nprompt = \"x\"\n", "sed"),
        ("video.toml", "[video]\nwidht = 64\n", "widht"),
        ("lora.toml", "[[loras]]\npath = \"a\"\nstrength = 0.5\n", "strength"),
        ("clip.json", r#"{"clips": [{"prompt": "x", "negativ": ""}]}"#, "negativ"),
        ("key.json", r#"{"clips": [{"prompt": "x", "prompt_schedule": [{"frame": 1, "text": "y"}]}]}"#, "text"),
    ];
    for (name, text, key) in cases {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        let m = input_message(RenderConfig::load(&path));
        assert!(m.contains(&path.display().to_string()) && m.contains(&format!("`{key}`")), "{name}: {m}");
    }
    let path = dir.join("config.yaml");
    fs::write(&path, "seed: 1").unwrap();
    assert!(input_message(RenderConfig::load(&path)).contains(".toml or .json"));
}

#[test]
fn every_validation_rule_names_its_field() {
    type Edit = fn(&mut RenderConfig);
    let cases: Vec<(Edit, &str)> = vec![
        (|c| c.models.motion_adapter = Some("nowhere/motion".into()), "models.motion_adapter: nowhere/motion: no such"),
        (|c| c.models.unet = Some("nowhere/unet".into()), "models.unet: nowhere/unet: no such"),
        (|c| c.models.base = None, "models: no base and no unet, vae, text_encoder, text_encoder_2"),
        (|c| c.loras[0].path = "nowhere.safetensors".into(), "loras[0].path: nowhere.safetensors: no such file"),
        (|c| c.loras[1].weight = f64::NAN, "loras[1].weight: NaN is not a finite number"),
        (|c| c.loras[1].text_encoder_weight = Some(f64::INFINITY), "loras[1].text_encoder_weight: inf"),
        (|c| c.loras[0].role = Some("hero".into()), "loras[0].role: unknown LoRA role 'hero'"),
        (|c| c.loras[0].role = Some("lcm".into()), "loras: LoRA roles: at most one LCM-LoRA"),
        (
            |c| {
                let extra = c.loras[0].clone();
                c.loras.extend([extra.clone(), extra]);
            },
            "at most 3 LoRAs besides the LCM-LoRA",
        ),
        (|c| c.loras[2].role = Some("motion".into()), ""), // valid: the motion adapter is there
        (|c| c.controlnets[0].path = "nowhere/cn".into(), "controlnets[0].path: nowhere/cn: no such"),
        (|c| c.controlnets[0].kind = "pose".into(), "controlnets[0].kind: 'pose' is not one of openpose, depth"),
        (|c| c.controlnets[0].scale = f32::NAN, "controlnets[0].scale: NaN"),
        (|c| c.controlnets[0].start = 0.9, "controlnets[0]: start 0.9 and end 0.9 must satisfy 0 <= start < end <= 1"),
        (|c| c.controlnets[0].end = 1.5, "end 1.5 must satisfy"),
        (|c| c.controlnets[0].start = -0.1, "start -0.1"),
        (|c| c.controlnets[0].interpolation = "cubic".into(), "controlnets[0].interpolation: 'cubic'"),
        (
            |c| c.controlnets[0].images = "nowhere/pose".into(),
            "controlnets[0].images: nowhere/pose: no such file or folder",
        ),
        (|c| c.controlnets[0].keyframes = Some(vec![0.0, 1.0]), "controlnets[0].keyframes: 2 positions for 5 image(s)"),
        (
            |c| c.controlnets[0].keyframes = Some(vec![0.0, 0.5, 0.4, 0.8, 1.0]),
            "controlnets[0].keyframes: [0.0, 0.5, 0.4, 0.8, 1.0]: positions must be given and strictly increase",
        ),
        (|c| c.controlnets[0].keyframes = Some(vec![0.0, 0.2, 0.4, 0.8, 1.5]), "every position is a fraction"),
        (
            |c| {
                c.controlnets[0].kind = "depth".into();
                c.controlnets[0].images = "builtin:pose".into();
            },
            "controlnets[0].images: builtin:pose draws poses, for kind openpose (not depth)",
        ),
        (|c| c.sampler.name = "heun".into(), "sampler.name: unknown scheduler \"heun\""),
        (|c| c.sampler.steps = 51, "sampler: lcm: 51 steps; at most 50"),
        (|c| c.sampler.steps = 0, "sampler: lcm: 0 steps; steps must be 1 to 1000"),
        (|c| c.sampler.cfg = 3.5, "sampler.cfg: 3.5 for lcm; it must be in 1..=3"),
        (|c| c.sampler.cfg = 0.5, "sampler.cfg: 0.5 for lcm"),
        (
            |c| {
                c.sampler.name = "dpmpp_2m".into();
                c.sampler.cfg = 25.0;
            },
            "sampler.cfg: 25 for dpmpp_2m; it must be in 1..=20",
        ),
        (
            |c| {
                c.sampler.name = "euler".into();
                c.sampler.steps = 1001;
            },
            "sampler: euler: 1001 steps",
        ),
        (|c| c.sampler.cfg_rescale = 1.5, "sampler.cfg_rescale: 1.5"),
        (|c| c.sampler.spacing = Some("leading".into()), "sampler: lcm takes no timestep spacing"),
        (
            |c| c.sampler.spacing = Some("sideways".into()),
            "sampler.spacing: 'sideways' is not one of leading, trailing",
        ),
        (|c| c.sampler.prediction = "x0".into(), "sampler.prediction: 'x0' is not one of epsilon, v_prediction"),
        (|c| c.sampler.beta_schedule = "cosine".into(), "sampler.beta_schedule: 'cosine'"),
        (|c| c.sampler.eta = Some(0.5), "lcm takes no eta"),
        (|c| c.video.width = 500, "video.width: 500; it must be a multiple of 8"),
        (|c| c.video.height = 4104, "video.height: 4104"),
        (|c| c.video.width = 56, "video.width: 56"),
        (|c| c.video.fps = 0, "video.fps: 0; it must be in 1..=60"),
        (|c| c.video.fps = 61, "video.fps: 61"),
        (|c| c.video.frames = Some(24), "video: give frames or seconds, not both"),
        (|c| c.video.seconds = Some(-1.0), "video.seconds: -1; it must be a positive number"),
        (|c| c.video.seconds = Some(100.0), "video.seconds: 1200 frames; a clip has 1..=1024"),
        (
            |c| {
                c.video.seconds = None;
                c.video.frames = Some(0);
                c.clips[0].prompt_schedule.clear();
            },
            "video.frames: 0 frames",
        ),
        (
            |c| {
                c.models.motion_adapter = None;
                c.clips[1].frames = Some(1);
            },
            "video.seconds: 24 frames need models.motion_adapter",
        ),
        (|c| c.video.context_length = 33, "video.context_length: 33; it must be in 1..=32"),
        (|c| c.video.context_overlap = 12, "video.context_overlap: 12; it must be less than context_length 12"),
        (|c| c.video.context_schedule = "uniform".into(), "video.context_schedule: 'uniform'"),
        (|c| c.video.fuse = "gauss".into(), "video.fuse: 'gauss'"),
        (|c| c.video.fuse = "Pyramid".into(), "video.fuse: 'Pyramid' is not one of flat, pyramid, overlap_linear"),
        (|c| c.video.long_video = "loop".into(), "video.long_video: 'loop'"),
        (|c| c.video.chain_strength = 1.2, "video.chain_strength: 1.2"),
        (|c| c.video.vae_chunk_frames = 0, "video.vae_chunk_frames: 0"),
        (|c| c.clips.clear(), "clips: none"),
        (|c| c.clips[1].prompt = "  ".into(), "clips[1].prompt: empty"),
        (|c| c.clips[1].frames = Some(2000), "clips[1].frames: 2000 frames"),
        (
            |c| c.clips[0].prompt_schedule[0].frame = 24,
            "clips[0].prompt_schedule[0].frame: 24; the clip's frames are 0..24",
        ),
        (|c| c.clips[0].prompt_schedule[0].prompt = String::new(), "clips[0].prompt_schedule[0].prompt: empty"),
        (
            |c| {
                c.clips[0].prompt_schedule.push(celframe::pipeline::config::PromptKey { frame: 12, prompt: "y".into() })
            },
            "clips[0].prompt_schedule[1].frame: 12; frames must increase",
        ),
        (|c| c.dtype = "f8".into(), "dtype: unknown dtype 'f8'"),
        (|c| c.device = "tpu".into(), "device: 'tpu' is not one of auto, cuda, cpu"),
        (|c| c.fp8 = "yes".into(), "fp8: 'yes' is not an FP8 choice (expected off, on or all)"),
        (
            |c| (c.fp8, c.dtype) = ("on".into(), "f32".into()),
            "fp8: FP8 linears quantize f16 or bf16 weights; dtype is f32",
        ),
        (|c| c.fp8 = "all".into(), ""),
        (|c| c.output.mp4 = "webm".into(), "output.mp4: 'webm' is not one of auto, ffmpeg, builtin, off"),
    ];
    let (_dir, valid) = valid_config("rules");
    for (edit, expected) in &cases {
        let mut config = valid.clone();
        edit(&mut config);
        if expected.is_empty() {
            config.validate().unwrap();
            continue;
        }
        let m = input_message(config.validate());
        assert!(m.contains(expected), "'{expected}' in:\n{m}");
        assert!(m.starts_with("1 problem in the render config"), "one problem expected:\n{m}");
    }
    // All at once: one error listing each of them.
    let mut config = valid.clone();
    config.video.width = 500;
    config.sampler.cfg = 9.0;
    config.loras[0].path = "nowhere.safetensors".into();
    config.clips[1].prompt.clear();
    let m = input_message(config.validate());
    assert!(m.starts_with("4 problems in the render config"), "{m}");
    for part in ["video.width", "sampler.cfg", "loras[0].path", "clips[1].prompt"] {
        assert!(m.contains(part), "'{part}' in:\n{m}");
    }
}

#[test]
fn base_models_resolve_from_folders_cache_folders_and_single_files() {
    let (dir, mut config) = valid_config("base");
    // A diffusers folder missing subfolders that no component path overrides.
    fs::remove_dir_all(dir.join("models/base/vae")).unwrap();
    fs::remove_dir_all(dir.join("models/base/text_encoder_2")).unwrap();
    let m = input_message(config.validate());
    assert!(m.contains("models/base has no vae/, text_encoder_2/ subfolders"), "{m}");
    config.models.vae = Some(dir.join("models/base/unet"));
    let m = input_message(config.validate());
    assert!(m.contains("has no text_encoder_2/ subfolder ") && !m.contains("no vae/"), "{m}");
    config.models.text_encoder_2 = Some(dir.join("models/base/unet"));
    config.validate().unwrap();
    assert_eq!(config.models.component(Component::Vae).unwrap(), dir.join("models/base/unet"));
    assert_eq!(config.models.component(Component::Unet).unwrap(), dir.join("models/base"));

    // A Hugging Face cache folder: refs/main names the snapshot.
    let repo = dir.join("hub/models--stabilityai--sdxl");
    let hash = "0123abcd";
    for sub in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        touch(&repo.join("snapshots").join(hash).join(sub).join("config.json"));
    }
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), format!("{hash}\n")).unwrap();
    let mut config = config.clone();
    config.models = celframe::pipeline::config::ModelPaths {
        base: Some(repo.clone()),
        motion_adapter: config.models.motion_adapter.clone(),
        ..Default::default()
    };
    config.validate().unwrap();
    let snapshot = repo.join("snapshots").join(hash);
    assert_eq!(config.models.resolved_base().unwrap(), Some(snapshot.clone()));
    assert_eq!(config.models.component(Component::TextEncoder2).unwrap(), snapshot);
    fs::write(repo.join("refs/main"), "ffff0000").unwrap();
    assert!(input_message(config.validate()).contains("names snapshot ffff0000"));
    fs::remove_file(repo.join("refs/main")).unwrap();
    assert!(input_message(config.validate()).contains("refs/main"));

    // A single-file checkpoint.
    let file = dir.join("models/sdxl.safetensors");
    touch(&file);
    config.models.base = Some(file.clone());
    config.validate().unwrap();
    assert_eq!(config.models.component(Component::Unet).unwrap(), file);
}

#[test]
fn frames_seeds_keyframes_and_the_sampler_config() {
    let (dir, config) = valid_config("derived");
    // seconds x fps, rounded: 2 s at 12 fps.
    assert_eq!(config.video.frames(), 24);
    let mut video = config.video.clone();
    (video.seconds, video.fps) = (Some(0.7), 10);
    assert_eq!(video.frames(), 7);
    (video.seconds, video.fps) = (Some(1.26), 10);
    assert_eq!(video.frames(), 13);
    assert_eq!((config.clip_frames(0), config.clip_frames(1)), (24, 8));
    // Clip i: seed + i unless it has its own.
    assert_eq!((config.clip_seed(0), config.clip_seed(1)), (42, 7));
    let mut wrapping = config.clone();
    wrapping.seed = u64::MAX;
    wrapping.clips[1].seed = None;
    assert_eq!(wrapping.clip_seed(1), 0);
    // Five images spread over the clip.
    let controlnet = &config.controlnets[0];
    let files = controlnet.image_files().unwrap();
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["000.png", "001.png", "002.png", "003.png", "004.png"]);
    assert_eq!(controlnet.keyframe_positions(files.len()), [0.0, 0.25, 0.5, 0.75, 1.0]);
    assert_eq!(controlnet.keyframe_positions(1), [0.0]);
    assert_eq!(config.clips[0].prompt_keys().iter().map(|k| k.frame).collect::<Vec<_>>(), [0, 12]);
    assert_eq!(config.clips[0].prompt_keys()[0].prompt, "1 girl, blue hair");

    let mut expected = SamplerConfig::new(SamplerKind::Lcm, 6);
    expected.beta_schedule = BetaSchedule::AnimateDiff;
    assert_eq!(config.sampler.sampler_config().unwrap(), expected);
    let mut sampler = config.sampler.clone();
    (sampler.name, sampler.spacing, sampler.prediction, sampler.zero_snr, sampler.karras) =
        ("DPMPP-2M-SDE".into(), Some("leading".into()), "v".into(), true, true);
    let mut expected = SamplerConfig::new(SamplerKind::DpmPp2mSde, 6);
    (expected.spacing, expected.prediction, expected.zero_snr, expected.karras, expected.beta_schedule) =
        (Some(Spacing::Leading), Prediction::VPrediction, true, true, BetaSchedule::AnimateDiff);
    assert_eq!(sampler.sampler_config().unwrap(), expected);
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn the_resolved_json_writes_out_every_default() {
    let (_dir, config) = valid_config("resolved");
    let json = config.resolved_json();
    assert_eq!(json["video"]["frames"], 24);
    assert!(json["video"]["seconds"].is_null());
    assert_eq!(json["clips"][0]["seed"], 42);
    assert_eq!(json["clips"][0]["frames"], 24);
    assert_eq!(json["clips"][1]["seed"], 7);
    assert_eq!(json["clips"][0]["prompt_schedule"][0]["frame"], 0);
    assert_eq!(json["clips"][0]["prompt_schedule"][0]["prompt"], "1 girl, blue hair");
    assert_eq!(json["loras"][0]["text_encoder_weight"], 0.8);
    assert_eq!(json["loras"][2]["weight"], 1.0);
    assert_eq!(json["controlnets"][0]["keyframes"], serde_json::json!([0.0, 0.25, 0.5, 0.75, 1.0]));
    assert_eq!(json["sampler"]["steps"], 6);
    assert_eq!(json["video"]["context_schedule"], "static_standard");
    // Loaded back, the resolved config is the same render.
    let back: RenderConfig = serde_json::from_value(json.clone()).unwrap();
    back.validate().unwrap();
    assert_eq!(back.resolved_json(), json);
    // A non-distilled sampler gets its spacing written out.
    let mut euler = config.clone();
    (euler.sampler.name, euler.sampler.cfg) = ("euler".into(), 6.0);
    assert_eq!(euler.resolved_json()["sampler"]["spacing"], "trailing");
}

fn args(config: &Path) -> RenderArgs {
    RenderArgs { config: config.to_path_buf(), ..Default::default() }
}

#[test]
fn overrides_apply_to_every_clip() {
    let dir = full_setup("overrides");
    let mut a = args(&dir.join("config.toml"));
    a.prompt = Some("a cat".into());
    a.negative = Some("dogs".into());
    a.seed = Some(100);
    a.frames = Some(32);
    a.fps = Some(8);
    a.steps = Some(5);
    a.cfg = Some(2.0);
    a.sampler = Some("tcd".into());
    a.width = Some(640);
    a.height = Some(480);
    a.out = Some("elsewhere".into());
    a.device = Some("cuda".into());
    a.dtype = Some("f32".into());
    a.mp4 = Some("off".into());
    a.timings = true;
    let (c, options) = config_from_args(&a).unwrap();
    assert_eq!(options, RenderOptions { noise: None, timings: true, keep_tensors: false, split: None });
    for (i, clip) in c.clips.iter().enumerate() {
        assert_eq!((clip.prompt.as_str(), clip.negative.as_str()), ("a cat", "dogs"));
        assert!(clip.prompt_schedule.is_empty() && clip.seed.is_none() && clip.frames.is_none());
        assert_eq!((c.clip_seed(i), c.clip_frames(i)), (100 + i as u64, 32));
    }
    assert_eq!((c.video.fps, c.video.width, c.video.height, c.video.seconds), (8, 640, 480, None));
    assert_eq!((c.sampler.name.as_str(), c.sampler.steps, c.sampler.cfg), ("tcd", 5, 2.0));
    assert_eq!((c.device.as_str(), c.dtype.as_str(), c.output.mp4.as_str()), ("cuda", "f32", "off"));
    assert_eq!(c.output.root, PathBuf::from("elsewhere"));

    // --seconds replaces the config's frames; --fps counts.
    let mut a = args(&dir.join("config.json"));
    (a.seconds, a.fps) = (Some(3.0), Some(8));
    assert_eq!(config_from_args(&a).unwrap().0.clip_frames(1), 24);
    // --prompt gives a config without clips its one clip.
    let bare = dir.join("bare.toml");
    fs::write(&bare, "[models]\nbase = \"models/base\"\n[video]\nframes = 1\n").unwrap();
    assert!(input_message(config_from_args(&args(&bare))).contains("clips: none"));
    let mut a = args(&bare);
    a.prompt = Some("a cat".into());
    let (c, _) = config_from_args(&a).unwrap();
    assert_eq!((c.clips.len(), c.clips[0].prompt.as_str()), (1, "a cat"));
    // Overridden values are validated, and the error names the config file.
    let mut a = args(&dir.join("config.toml"));
    a.width = Some(100);
    let m = input_message(config_from_args(&a));
    assert!(m.contains("config.toml") && m.contains("video.width: 100"), "{m}");
    // --noise is carried when the file exists.
    let mut a = args(&dir.join("config.toml"));
    a.noise = Some(dir.join("noise.safetensors"));
    assert!(input_message(config_from_args(&a)).contains("--noise"));
    touch(&dir.join("noise.safetensors"));
    assert_eq!(config_from_args(&a).unwrap().1.noise, Some(dir.join("noise.safetensors")));
}

fn celframe(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_celframe")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_dry_run_prints_the_resolved_json_and_bad_configs_exit_2() {
    let dir = full_setup("cli");
    let config = dir.join("config.toml").display().to_string();
    let (code, stdout, stderr) = celframe(&["render", &config, "--dry-run", "--steps", "5", "--seed", "9"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!((json["sampler"]["steps"].as_u64(), json["clips"][1]["seed"].as_u64()), (Some(5), Some(10)));
    assert_eq!(json["models"]["base"], dir.join("models/base").display().to_string());

    let (code, _, stderr) = celframe(&["render", &config, "--dry-run", "--width", "100", "--cfg", "30"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("video.width: 100") && stderr.contains("sampler.cfg: 30"), "{stderr}");
    let bad = dir.join("bad.toml");
    fs::write(&bad, "[video]\nwidht = 64\n").unwrap();
    let (code, _, stderr) = celframe(&["render", &bad.display().to_string(), "--dry-run"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("widht"), "{stderr}");
    // Without --dry-run: refused until the renderer is built.
    let (code, _, stderr) = celframe(&["render", &config]);
    assert_eq!(code, 2, "{stderr}");
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

#[test]
fn the_seed_example_parses_and_lists_the_files_the_user_must_fetch() {
    let c = RenderConfig::load(&examples().join("seed.toml")).unwrap();
    assert_eq!((c.video.width, c.video.height, c.video.fps, c.video.frames()), (1024, 576, 10, 100));
    assert_eq!((c.sampler.name.as_str(), c.sampler.steps, c.sampler.cfg), ("lcm", 5, 1.5));
    let weights: Vec<(f64, Option<&str>)> = c.loras.iter().map(|l| (l.weight, l.role.as_deref())).collect();
    assert_eq!(weights, [(0.8, Some("style")), (0.25, Some("style")), (1.0, Some("lcm"))]);
    let kinds: Vec<&str> = c.controlnets.iter().map(|n| n.kind.as_str()).collect();
    assert_eq!(kinds, ["openpose", "depth"]);
    assert!(
        c.clips[0].prompt.starts_with("(masterpiece, anime") && c.clips[0].prompt.ends_with("dramatic composition")
    );
    assert!(!c.clips[0].prompt.contains('\n') && c.clips[0].negative.ends_with("distorted face"));
    assert_eq!(c.warnings(), Vec::<String>::new());
    let m = input_message(c.validate());
    let missing = [
        "models.base: ",
        "models.vae: ",
        "models.motion_adapter: ",
        "loras[0].path: ",
        "loras[1].path: ",
        "loras[2].path: ",
        "controlnets[0].path: ",
        "controlnets[0].images: ",
        "controlnets[1].path: ",
        "controlnets[1].images: ",
    ];
    assert!(m.starts_with(&format!("{} problems", missing.len())), "{m}");
    for field in missing {
        assert!(m.contains(field), "'{field}' in:\n{m}");
    }
    for path in [
        c.models.base.as_ref().unwrap(),
        c.models.vae.as_ref().unwrap(),
        c.models.motion_adapter.as_ref().unwrap(),
        &c.loras[2].path,
        &c.controlnets[1].images,
    ] {
        assert!(path.starts_with(examples()) && m.contains(&path.display().to_string()), "{}: {m}", path.display());
    }
}

#[test]
fn the_tiny_example_parses() {
    let c = RenderConfig::load(&examples().join("tiny.toml")).unwrap();
    assert_eq!((c.video.width, c.video.height, c.video.frames()), (64, 64, 8));
    assert_eq!((c.sampler.name.as_str(), c.sampler.steps), ("lcm", 4));
    assert_eq!((c.device.as_str(), c.dtype().unwrap()), ("cpu", celframe::DType::F32));
    let fixtures = examples().join("../tests/fixtures");
    assert_eq!(c.models.vae.as_deref(), Some(fixtures.join("vae_tiny").as_path()));
    assert_eq!(c.models.unet.as_deref(), Some(fixtures.join("pipeline_tiny/unet").as_path()));
    assert!(c.controlnets[0].is_builtin_pose());
}

const UNION_TOML: &str = r#"
[[controlnets]]
path = "models/openpose"
end = 0.8

[[controlnets.conditions]]
kind = "openpose"
images = "builtin:pose"

[[controlnets.conditions]]
kind = "depth"
images = "control/pose"
scale = 0.6
interpolation = "keyframes"
"#;

#[test]
fn a_union_entry_takes_conditions_validated_whole() {
    let dir = full_setup("union");
    let path = dir.join("union.toml");
    fs::write(&path, format!("{FULL_TOML}{UNION_TOML}")).unwrap();
    let valid = RenderConfig::load(&path).unwrap();
    valid.validate().unwrap();
    let union = &valid.controlnets[1];
    assert!(union.is_union() && union.kind.is_empty());
    assert_eq!(union.conditions[1].images, dir.join("control/pose"));
    let hints = union.hint_entries();
    assert_eq!(hints.iter().map(|h| h.kind.as_str()).collect::<Vec<_>>(), ["openpose", "depth"]);
    assert!(hints.iter().all(|h| h.path == union.path && h.end == 0.8));
    assert_eq!((hints[1].scale, hints[1].interpolation.as_str()), (0.6, "keyframes"));
    // The resolved config shows the conditions with their keyframes, and no entry-level kind.
    let json = valid.resolved_json();
    let entry = &json["controlnets"][1];
    assert!(entry.get("kind").is_none() && entry.get("images").is_none(), "{entry}");
    assert_eq!(entry["conditions"][1]["keyframes"], serde_json::json!([0.0, 0.25, 0.5, 0.75, 1.0]));
    assert_eq!(entry["conditions"][0]["kind"], "openpose");

    type Edit = fn(&mut RenderConfig);
    let cases: Vec<(Edit, &str)> = vec![
        (
            |c| c.controlnets[1].kind = "depth".into(),
            "controlnets[1].kind: a ControlNet Union entry takes kind on each",
        ),
        (|c| c.controlnets[1].scale = 0.5, "controlnets[1].scale: a ControlNet Union entry takes scale"),
        (|c| c.controlnets[1].keyframes = Some(vec![0.0]), "controlnets[1].keyframes: a ControlNet Union"),
        (|c| c.controlnets[1].conditions[1].kind = "other".into(), "controlnets[1].conditions[1].kind: 'other' is not"),
        (|c| c.controlnets[1].conditions[1].kind = "hed".into(), ""), // a Union type, images as drawn
        (|c| c.controlnets[1].conditions[1].images = "nowhere".into(), "controlnets[1].conditions[1].images: nowhere"),
        (|c| c.controlnets[1].conditions[1].scale = f32::NAN, "controlnets[1].conditions[1].scale: NaN"),
        (
            |c| c.controlnets[1].conditions[1].keyframes = Some(vec![0.0, 1.0]),
            "controlnets[1].conditions[1].keyframes: 2 positions for 5 image(s)",
        ),
        (|c| c.controlnets[1].conditions[1].kind = "canny".into(), ""),
        (
            |c| {
                let one = c.controlnets[1].conditions[0].clone();
                c.controlnets[1].conditions = vec![one; 9];
            },
            "controlnets[1].conditions: 9 conditions; a Union takes at most 8",
        ),
        (|c| c.controlnets[1].end = 1.5, "controlnets[1]: start 0 and end 1.5"),
        (
            |c| {
                c.controlnets[0].conditions.clear();
                c.controlnets[0].kind.clear();
            },
            "controlnets[0].kind: missing (a ControlNet Union entry lists [[controlnets.conditions]] instead)",
        ),
    ];
    for (edit, expected) in &cases {
        let mut config = valid.clone();
        edit(&mut config);
        if expected.is_empty() {
            config.validate().unwrap();
            continue;
        }
        let m = input_message(config.validate());
        assert!(m.contains(expected), "'{expected}' in:\n{m}");
        assert!(m.starts_with("1 problem in the render config"), "one problem expected:\n{m}");
    }
    // Unknown keys inside a condition are errors naming the key.
    fs::write(&path, format!("{FULL_TOML}{UNION_TOML}strength = 2\n")).unwrap();
    assert!(input_message(RenderConfig::load(&path)).contains("strength"));
}
