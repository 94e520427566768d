//! `celframe render --gpus all` on CUDA: a three-clip manifest on SDXL-shaped models with random
//! weights (the set `celframe demo` draws, cached in $CELFRAME_DEMO_CACHE or target/celframe-demo)
//! rendered by one worker per GPU of the machine gives the bytes one process gives. The tiny test
//! models cannot run on CUDA (their 8- and 16-wide motion heads are below the temporal-attention
//! kernel's 33), hence the full-size set at a small frame size.
//!
//! This needs an NVIDIA GPU, so CI (no GPU) lists it as ignored; tools/gpu_run.sh runs it on the
//! GPU machine with `--include-ignored`, from the repository root (it starts dist/gpu/celframe, or
//! $CELFRAME_BIN). Run without a GPU it fails, never passes silently. One GPU is enough (one
//! worker, shard 0/1); a machine with several runs one worker on each.

#[path = "common/trees.rs"]
mod trees;
#[path = "common/unet_fixtures.rs"]
mod unet_fixtures;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use celframe::gpu::Gpu;
use celframe::pipeline::random_models::{ModelSize, cached_random_pipeline};
use trees::{assert_same_tree, celframe_command, read_report};
use unet_fixtures::TempDir;

/// Three clips of two lengths at 512x288 (64x36 latents: the UNet's three levels and the VAE
/// divide it evenly), LCM 2 steps, an OpenPose ControlNet on the built-in pose, f16.
fn manifest(models: &Path, path: &Path) {
    let dir = |name: &str| models.join(name).display().to_string();
    let config = serde_json::json!({
        "seed": 3, "dtype": "f16", "device": "cuda",
        "models": { "base": models.display().to_string(), "motion_adapter": dir("motion_adapter") },
        "controlnets": [{ "path": dir("controlnet"), "kind": "openpose", "images": "builtin:pose" }],
        "sampler": { "name": "lcm", "steps": 2, "cfg": 1.5 },
        "video": { "width": 512, "height": 288, "fps": 8, "frames": 16 },
        "output": { "root": "outputs/gpus-gpu", "mp4": "builtin" },
        "clips": [
            { "id": "wave", "prompt": "1girl, silver hair, waving, cel shading" },
            { "id": "run", "prompt": "1boy, running, city street at night", "frames": 8 },
            { "id": "sky", "prompt": "clouds over a lake, anime background", "seed": 11 },
        ],
    });
    std::fs::write(path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

fn run(args: &[&str]) -> String {
    let out = celframe_command(args).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "celframe {args:?}: {:?}\n{err}", out.status);
    err
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn gpus_all_on_cuda_writes_what_one_process_writes() {
    assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
    let devices = cudarc::driver::result::device::get_count().unwrap() as usize;
    let cache = std::env::var_os("CELFRAME_DEMO_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/celframe-demo"));
    std::fs::create_dir_all(&cache).unwrap();
    // Absolute: the configs live in a temporary folder, and relative paths in a config are its folder's.
    let models = std::fs::canonicalize(cached_random_pipeline(&cache, ModelSize::Full, 0).unwrap()).unwrap();
    let dir = TempDir::new("gpus-gpu");
    let config = dir.path("manifest.json");
    manifest(&models, &config);
    let config = config.to_str().unwrap();

    let single = dir.path("single");
    let started = std::time::Instant::now();
    run(&["render", config, "--out", single.to_str().unwrap()]);
    let one = started.elapsed().as_secs_f64();
    let out = dir.path("gpus/single");
    let started = std::time::Instant::now();
    let err = run(&["render", config, "--out", out.to_str().unwrap(), "--gpus", "all"]);
    let all = started.elapsed().as_secs_f64();
    println!("{err}");
    for k in 0..devices {
        assert!(err.contains(&format!("[gpu {k}] shard {k} of {devices}: ")), "worker {k}: {err}");
        assert!(err.contains(&format!("render --gpus: gpu {k} (shard {k}/{devices}): exit 0")), "{err}");
    }
    assert_same_tree(&single, &out, "--gpus all");
    let merged = read_report(&out.join("configs/run_report.json"));
    assert_eq!((merged.merged_shards, merged.done), (Some(devices), 3));
    println!("GPUS {devices} GPU(s): one process {one:.1} s, --gpus all {all:.1} s (each loads the models)");
}
