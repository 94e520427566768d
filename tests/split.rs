//! One clip over several devices (`--split windows|cfg`, `celframe::pipeline::devices`) on the CPU
//! twins with the tiny random models: 2 and 3 CPU "devices" (threads, each with its own models and
//! input cache) give the latents, frames and files of one device, byte for byte, with context
//! windows (two LoRA groups and a ControlNet), with segment chaining and with the CFG halves split;
//! a stop mid-step leaves what one device leaves, and the resumed runs finish alike; bad flag
//! combinations exit 2 naming the flags.

#[path = "common/trees.rs"]
mod trees;
#[path = "common/unet_fixtures.rs"]
mod unet_fixtures;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use celframe::pipeline::config::RenderConfig;
use celframe::pipeline::devices::{DeviceSplit, SplitMode};
use celframe::pipeline::windows::ContextOptions;
use celframe::pipeline::{RenderOptions, RenderReport, render};
use trees::{assert_same_tree, celframe_command, read_report, tree_files};
use unet_fixtures::{TempDir, fixtures};

/// How long a wait for a log line or an exit may take on a loaded CI machine.
const PATIENCE: Duration = Duration::from_secs(300);

fn manifest_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny-manifest.toml")
}

/// The tiny manifest's first two clips (8 frames; 6 frames with a text-encoder LoRA: two LoRA
/// groups) in windows of 3 frames overlapping by 1, with its OpenPose ControlNet and CFG 1.5.
fn windows_config() -> RenderConfig {
    let mut config = RenderConfig::load(&manifest_path()).unwrap();
    config.clips.truncate(2);
    config.video.context_length = 3;
    config.video.context_overlap = 1;
    config
}

fn split(mode: SplitMode, devices: usize) -> Option<DeviceSplit> {
    Some(DeviceSplit { mode, devices: (0..devices).collect() })
}

/// `config` rendered into `out` with `split`, keeping latents and frames.
fn render_into(config: &RenderConfig, out: &Path, split: Option<DeviceSplit>) -> RenderReport {
    let mut config = config.clone();
    config.output.root = out.to_path_buf();
    let options = RenderOptions { keep_tensors: true, split, ..RenderOptions::default() };
    render(&config, &options).unwrap()
}

fn bits(t: &Option<celframe::tensor::Tensor>) -> Vec<u32> {
    t.as_ref().unwrap().to_f32_vec().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// The same clips with the same latents and frames, bit for bit.
fn assert_same_clips(want: &RenderReport, got: &RenderReport, what: &str) {
    assert_eq!(want.clips.len(), got.clips.len(), "{what}");
    for (a, b) in want.clips.iter().zip(&got.clips) {
        assert!(!a.skipped && !b.skipped, "{what}: clip {} was skipped", a.index + 1);
        assert!(bits(&a.latents) == bits(&b.latents), "{what}: clip {}'s latents differ", a.index + 1);
        assert!(bits(&a.images) == bits(&b.images), "{what}: clip {}'s frames differ", a.index + 1);
    }
}

#[test]
fn context_windows_over_2_and_3_devices_are_one_devices_bytes() {
    let config = windows_config();
    // Several windows per step, so every device gets some (the lead at least one, others too).
    let windows = ContextOptions { length: 3, overlap: 1, ..ContextOptions::default() };
    for (frames, step) in [(8, 0), (8, 1), (6, 0), (6, 1)] {
        let count = windows.windows(frames, step).unwrap().len();
        assert!(count >= 3, "{frames} frames, step {step}: {count} windows");
    }
    let dir = TempDir::new("split-windows");
    let one = render_into(&config, &dir.path("1/out"), None);
    for devices in [2, 3] {
        let out = dir.path(&format!("{devices}/out"));
        let got = render_into(&config, &out, split(SplitMode::Windows, devices));
        assert_same_clips(&one, &got, &format!("{devices} devices"));
        assert_same_tree(&dir.path("1/out"), &out, &format!("{devices} devices"));
        let described = got.summary.iter().find(|l| l.starts_with("split: ")).expect("the split's summary line");
        assert!(described.contains(&format!("cpu {}", devices - 1)), "{described}");
        // Every device loaded the models of both LoRA groups.
        for device in 1..devices {
            let loads = got.summary.iter().filter(|l| l.starts_with(&format!("cpu {device}: loaded"))).count();
            assert_eq!(loads, 2, "cpu {device}: {:?}", got.summary);
        }
    }
}

#[test]
fn chained_segments_over_2_devices_are_one_devices_bytes() {
    // Segments stay in order; each one's windows (here one per step) go to the devices.
    let mut config = windows_config();
    config.clips.truncate(1);
    config.video.long_video = "chain".into();
    let dir = TempDir::new("split-chain");
    let one = render_into(&config, &dir.path("1/out"), None);
    let two = render_into(&config, &dir.path("2/out"), split(SplitMode::Windows, 2));
    assert_same_clips(&one, &two, "chained, 2 devices");
    assert_same_tree(&dir.path("1/out"), &dir.path("2/out"), "chained, 2 devices");
}

#[test]
fn cfg_halves_on_2_devices_are_one_devices_bytes_on_the_cpu() {
    // The CPU twins compute each row of a batch on its own, so the halves run apart give the
    // whole batch's values (on CUDA the BLAS may choose other kernels for half a batch).
    let mut config = windows_config();
    config.clips.truncate(1);
    // One window of all 8 frames: the case the CFG split is for.
    config.video.context_length = 8;
    let dir = TempDir::new("split-cfg");
    let one = render_into(&config, &dir.path("1/out"), None);
    let two = render_into(&config, &dir.path("2/out"), split(SplitMode::Cfg, 2));
    assert_same_clips(&one, &two, "CFG halves");
    assert_same_tree(&dir.path("1/out"), &dir.path("2/out"), "CFG halves");
}

#[test]
fn splits_that_cannot_work_are_refused_before_rendering() {
    let config = windows_config();
    let dir = TempDir::new("split-refused");
    for (mode, devices, cfg, says) in [
        (SplitMode::Cfg, 3, 1.5, "--split cfg runs the two halves of the CFG batch on two devices; --gpus lists 3"),
        (SplitMode::Cfg, 1, 1.5, "--gpus lists 1"),
        (SplitMode::Cfg, 2, 1.0, "--split cfg: sampler.cfg is 1"),
        (SplitMode::Windows, 0, 1.5, "--split windows: --gpus lists no device"),
    ] {
        let mut config = config.clone();
        config.sampler.cfg = cfg;
        config.output.root = dir.path("out");
        let options = RenderOptions { split: split(mode, devices), ..RenderOptions::default() };
        let Err(e) = render(&config, &options) else { panic!("{mode:?} over {devices} rendered") };
        assert_eq!(e.exit_code(), 2, "{e}");
        assert!(e.to_string().contains(says), "{e}");
        assert!(!dir.path("out").exists(), "{mode:?} over {devices}: wrote an outputs tree");
    }
}

#[test]
fn bad_flag_combinations_exit_2_naming_the_flags() {
    let manifest = manifest_path();
    let manifest = manifest.to_str().unwrap();
    let dir = TempDir::new("split-flags");
    let out = dir.path("out");
    let out = out.to_str().unwrap();
    for (args, says) in [
        (&["--split", "windows"][..], "--split windows: name the devices with --gpus"),
        (&["--split", "cfg"][..], "--split cfg: name the devices with --gpus"),
        (&["--split", "rows", "--gpus", "0,1"][..], "--split \"rows\": give clips, windows or cfg"),
        (&["--split", "cfg", "--gpus", "0,1,2"][..], "--gpus lists 3"),
        (&["--split", "cfg", "--gpus", "0,1", "--cfg", "1"][..], "sampler.cfg is 1"),
        (&["--split", "clips", "--gpus", "0,0"][..], "GPU 0 is listed twice"),
        (&["--split", "windows", "--gpus", "0,1", "--shard", "0/2"][..], "--shard"),
    ] {
        let mut all = vec!["render", manifest, "--out", out];
        all.extend_from_slice(args);
        let done = celframe_command(&all).stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&done.stderr);
        assert_eq!(done.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert!(!dir.path("out").join("video").exists(), "a refused run rendered");
}

/// A render config for the stop test: one 6-frame clip in windows of 2 (5 windows a step), two
/// FreeInit passes of 2 LCM steps.
fn stop_config(dir: &Path) -> PathBuf {
    let f = fixtures();
    let f = f.display();
    let text = format!(
        r#"seed = 7
dtype = "f32"
device = "cpu"
[models]
unet = "{f}/pipeline_tiny/unet"
motion_adapter = "{f}/pipeline_tiny/motion_adapter"
vae = "{f}/vae_tiny"
text_encoder = "{f}/text_encoder_tiny"
text_encoder_2 = "{f}/text_encoder_2_tiny"
tokenizer = "{f}/pipeline_tiny/tokenizer"
[sampler]
name = "lcm"
steps = 2
cfg = 1.5
[output]
root = "out"
mp4 = "builtin"
[[clips]]
prompt = "1 girl, walking"
[video]
width = 64
height = 64
fps = 8
frames = 6
context_length = 2
context_overlap = 1
[video.free_init]
iterations = 2
"#
    );
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("render.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `celframe render CONFIG ARGS` with its stderr lines on a channel.
fn start(config: &Path, args: &[&str]) -> (Child, Receiver<String>) {
    let mut all = vec!["render", config.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut child = celframe_command(&all).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines, receiver) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    (child, receiver)
}

/// Every line until the process's stderr closes; panics when `until` is given and no line holds it
/// in time (then returns right after that line).
fn read_lines(lines: &Receiver<String>, until: Option<&str>) -> Vec<String> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let found = until.is_some_and(|u| line.contains(u));
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(RecvTimeoutError::Disconnected) if until.is_none() => return seen,
            Err(e) => panic!("{e:?} waiting for {until:?}: {}", seen.join("\n")),
        }
    }
}

/// A saved resume file: its metadata and its latents' bytes.
type Saved = (std::collections::BTreeMap<String, String>, Vec<u8>);

/// The files of a clip's resume folder, by name, read as safetensors (the metadata's key order in
/// the header is a hash map's, so the files' bytes are compared through what they hold).
fn resume_files(root: &Path) -> Vec<(PathBuf, Saved)> {
    tree_files(&root.join("video/.clip_001.resume"))
        .into_iter()
        .map(|(path, bytes)| {
            let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            let metadata = header.metadata().clone().unwrap_or_default().into_iter().collect();
            let latents =
                safetensors::SafeTensors::deserialize(&bytes).unwrap().tensor("latents").unwrap().data().to_vec();
            (path, (metadata, latents))
        })
        .collect()
}

#[test]
fn a_stop_mid_step_leaves_what_one_device_leaves_and_both_resume_alike() {
    let dir = TempDir::new("split-stop");
    let mut stopped = Vec::new();
    for (name, args) in [("one", &[][..]), ("two", &["--gpus", "0,1", "--split", "windows"][..])] {
        let config = stop_config(&dir.path(name));
        let (mut child, lines) = start(&config, args);
        // Pass 1 is saved when pass 2 starts; SIGTERM then lands in pass 2's first step (or
        // before it), well before pass 2 can finish.
        let mut log = read_lines(&lines, Some("FreeInit pass 2/2"));
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        log.extend(read_lines(&lines, None));
        let status = child.wait().unwrap();
        let log = log.join("\n");
        assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{name}: {log}");
        if name == "two" {
            assert!(log.contains("cpu 0: windows 1,3,5 in") && log.contains("cpu 1: windows 2,4 in"), "{log}");
        }
        let root = dir.path(name).join("out");
        let report = read_report(&root.join("configs/run_report.json"));
        assert_eq!(report.clips[0].status, "interrupted", "{name}: {log}");
        assert!(!root.join("video/clip_001").exists(), "{name}: a clip folder after the stop");
        let saved = resume_files(&root);
        let names: Vec<_> = saved.iter().map(|(p, _)| p.display().to_string()).collect();
        assert_eq!(names, ["pass_001.safetensors"], "{name}: {log}");
        stopped.push(saved);
    }
    assert!(stopped[0] == stopped[1], "the saved pass differs between one device and two");
    for (name, args) in [("one", &[][..]), ("two", &["--gpus", "0,1", "--split", "windows"][..])] {
        let (mut child, lines) = start(&dir.path(name).join("render.toml"), args);
        let log = read_lines(&lines, None).join("\n");
        assert!(child.wait().unwrap().success(), "{name} resumed: {log}");
        assert!(log.contains("resumed from pass 1 of 2"), "{name}: {log}");
    }
    // Both folders are named out, so the prompt grids share their file name.
    assert_same_tree(&dir.path("one/out"), &dir.path("two/out"), "resumed, one device vs two");
}

#[test]
fn the_quoted_speed_up_bound_of_a_10_second_clip_holds() {
    // README.md and devices.rs quote the bound for 10 s at 8 fps with the default context options
    // and 4 LCM steps: windows are dealt round-robin, so a step costs ceil(windows / N) window
    // calls on the busiest device.
    let windows = ContextOptions::default();
    let counts: Vec<usize> = (0..4).map(|step| windows.windows(80, step).unwrap().len()).collect();
    let total: usize = counts.iter().sum();
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let module =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/pipeline/devices.rs")).unwrap();
    let flat = |t: &str| t.split_whitespace().filter(|w| *w != "//!").collect::<Vec<_>>().join(" ");
    let (readme, module) = (flat(&readme), flat(&module));
    assert!(readme.contains(&format!("({total} over 4 LCM steps)")), "{counts:?}");
    assert!(module.contains(&format!("({} over 4 LCM steps: {total} window calls)", list(&counts))), "{counts:?}");
    for devices in [2, 4, 8] {
        let calls: usize = counts.iter().map(|c| c.div_ceil(devices)).sum();
        let bound = format!("{:.2}x", total as f64 / calls as f64);
        assert!(readme.contains(&format!("{bound} on {devices}")), "README: {devices} devices: {bound}");
        let quoted = module.contains(&format!("{devices} devices {calls} calls")) && module.contains(&bound);
        assert!(quoted, "devices.rs: {devices} devices: {calls} calls, {bound}");
    }
}

fn list(counts: &[usize]) -> String {
    counts.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
}
