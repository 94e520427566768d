//! `celframe render --gpus LIST` on the CPU: an explicit list needs no CUDA driver and the tiny
//! manifest's device is the CPU, so the workers render on the CPU twins. That tests the
//! orchestration without GPUs: the workers' tree is the single process's byte for byte, their
//! lines are prefixed per GPU, a failing worker's exit code is passed on, a SIGTERM to the parent
//! reaches the workers, and the conflicts and bad lists are named (exit 2). tests/gpus_gpu.rs runs
//! `--gpus all` on CUDA.

#[path = "common/trees.rs"]
mod trees;
#[path = "common/unet_fixtures.rs"]
mod unet_fixtures;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use celframe::gpu::Gpu;
use trees::{assert_same_tree, celframe_command, read_report};
use unet_fixtures::TempDir;

fn manifest() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny-manifest.toml").display().to_string()
}

/// One sampling step: these tests are about processes, not pictures.
const FAST: [&str; 2] = ["--steps", "1"];

/// Exit code and stderr of `command`.
fn finish(mut command: Command) -> (i32, String) {
    let out = command.stdin(Stdio::null()).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn render(args: &[&str]) -> (i32, String) {
    let mut all = vec!["render"];
    all.extend_from_slice(args);
    finish(celframe_command(&all))
}

fn path_arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn workers_write_what_one_process_writes_and_a_failing_one_sets_the_exit_code() {
    let dir = TempDir::new("gpus-tree");
    let manifest = manifest();
    let single = dir.path("single");
    let (code, err) = render(&[&manifest, "--out", path_arg(&single), FAST[0], FAST[1]]);
    assert_eq!(code, 0, "single run: {err}");
    // Named like the single run's folder: the prompt grid's file name is the folder's.
    let out = dir.path("gpus/single");
    let gpus = [&manifest, "--out", path_arg(&out), "--gpus", "0,1", FAST[0], FAST[1]];
    let (code, err) = render(&gpus);
    assert_eq!(code, 0, "--gpus 0,1: {err}");
    assert_same_tree(&single, &out, "--gpus 0,1");
    assert_eq!(read_report(&out.join("configs/run_report.json")).merged_shards, Some(2));
    // Shard I is GPU I's; every line a worker writes is prefixed with its GPU.
    assert!(err.contains("[gpu 0] shard 0 of 2: 2 of the 4 clips"), "{err}");
    assert!(err.contains("[gpu 1] shard 1 of 2: 2 of the 4 clips"), "{err}");
    assert!(err.contains("[gpu 1] clip 002: frames 0..6: step 1/1"), "{err}");
    let own = ["[gpu 0] ", "[gpu 1] ", "render --gpus: ", "merged 2 shard report(s)", "prompt grid: ", "report: "];
    for line in err.lines() {
        assert!(own.iter().any(|p| line.starts_with(p)), "an unprefixed line: {line:?} in\n{err}");
    }

    // Clip 2 (wave-lora, GPU 1's) blocked by a file where its folder goes: found when it is
    // written. GPU 0's clips are complete and skipped.
    std::fs::remove_dir_all(out.join("video/clip_002")).unwrap();
    std::fs::write(out.join("video/clip_002"), b"in the way").unwrap();
    let (code, err) = render(&gpus);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("render --gpus: gpu 0 (shard 0/2): exit 0"), "{err}");
    assert!(err.contains("render --gpus: gpu 1 (shard 1/2): exit 2"), "{err}");
    assert!(err.lines().any(|l| l.starts_with("[gpu 1] ") && l.contains("clip_002")), "{err}");
    assert!(
        err.contains("error: merge-report: ") && err.contains("1 clip(s) not rendered: wave-lora (failed)"),
        "{err}"
    );
    let merged = read_report(&out.join("configs/run_report.json"));
    let status: Vec<&str> = merged.clips.iter().map(|c| c.status.as_str()).collect();
    assert_eq!(status, ["skipped", "failed", "skipped", "skipped"]);
}

#[test]
fn the_highest_exit_code_wins() {
    if Gpu::is_available() {
        eprintln!("SKIPPED the_highest_exit_code_wins: it needs a machine without a GPU (its workers exit 3)");
        return;
    }
    // On CUDA without a GPU each worker exits 3 before writing anything; the merge then finds no
    // report (2), and the workers' 3 wins.
    let dir = TempDir::new("gpus-code");
    let out = dir.path("out");
    let (code, err) = render(&[&manifest(), "--out", path_arg(&out), "--gpus", "0,1", "--device", "cuda"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("render --gpus: gpu 1 (shard 1/2): exit 3"), "{err}");
    assert!(err.contains("[gpu 0] error: no GPU"), "{err}");
    assert!(err.contains("error: merge-report: ") && err.contains("is it an outputs tree?"), "{err}");
}

#[test]
fn gpus_all_without_a_gpu_is_bad_input() {
    if Gpu::is_available() {
        eprintln!(
            "SKIPPED gpus_all_without_a_gpu_is_bad_input: this machine has a GPU (tests/gpus_gpu.rs runs --gpus all)"
        );
        return;
    }
    let (code, err) = render(&[&manifest(), "--gpus", "all"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--gpus all: no CUDA driver or device on this machine"), "{err}");
}

#[test]
fn conflicts_and_bad_lists_are_named() {
    let manifest = manifest();
    for (extra, says) in [
        (&["--gpus", "0,1", "--shard", "0/2"][..], "--shard"),
        (&["--gpus", "0", "--dry-run"][..], "--dry-run"),
        (&["--gpus", "0,0"][..], "GPU 0 is listed twice"),
        (&["--gpus", "0,one"][..], "\"one\" is not a GPU ordinal"),
    ] {
        let mut args = vec![manifest.as_str()];
        args.extend_from_slice(extra);
        let (code, err) = render(&args);
        assert_eq!(code, 2, "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: {err}");
    }
    let with_env = |name: &str, value: &str, gpus: &str| {
        let mut command = celframe_command(&["render", &manifest, "--gpus", gpus]);
        command.env(name, value);
        finish(command)
    };
    let (code, err) = with_env("SLURM_ARRAY_TASK_ID", "1", "0,1");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--gpus and SLURM_ARRAY_TASK_ID=1"), "{err}");
    // Ordinals count within CUDA_VISIBLE_DEVICES.
    let (code, err) = with_env("CUDA_VISIBLE_DEVICES", "4,6", "1,2");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("GPU 2 does not exist"), "{err}");
    // The config is checked once, before any worker starts.
    let (code, err) = render(&["/no/such/manifest.toml", "--gpus", "0,1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/no/such/manifest.toml") && !err.contains("[gpu "), "{err}");
}

#[test]
fn a_sigterm_to_the_parent_reaches_the_workers() {
    let dir = TempDir::new("gpus-signal");
    let out = dir.path("out");
    let mut parent = celframe_command(&["render", &manifest(), "--out", path_arg(&out), "--gpus", "0,1"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(parent.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut pids: Vec<PathBuf> = Vec::new();
    // Both workers started and rendering.
    while seen.iter().filter(|l: &&String| l.contains("] shard ")).count() < 2 || pids.len() < 2 {
        let line = lines.next().expect("the parent ended before both workers started").unwrap();
        if let Some(pid) = line.strip_prefix("render --gpus: gpu ").and_then(|l| l.split(", pid ").nth(1)) {
            pids.push(Path::new("/proc").join(pid.trim()));
        }
        seen.push(line);
    }
    let status = Command::new("kill").args(["-TERM", &parent.id().to_string()]).status().unwrap();
    assert!(status.success());
    seen.extend(lines.map(|l| l.unwrap()));
    let code = parent.wait().unwrap().code();
    let text = seen.join("\n");
    assert_eq!(code, Some(128 + 15), "{text}");
    assert!(text.contains("render --gpus: SIGTERM: passing it on to the workers"), "{text}");
    assert!(text.contains("reports not merged"), "{text}");
    for pid in &pids {
        assert!(!pid.exists(), "worker {} still runs after the parent exited", pid.display());
    }
}
