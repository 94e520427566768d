//! Batch rendering on the tiny models (examples/tiny-manifest.toml): per-clip overrides, the
//! stable shard assignment, the scheduler's shard variables, the up-front check listing every
//! problem, a clip that fails late recorded while the batch goes on, a LoRA file that breaks after
//! the check failing only its group, and N shards (run at once
//! into one outputs tree, then `merge-report`) giving the same bytes as one process.

#[path = "common/trees.rs"]
mod trees;
#[path = "common/unet_fixtures.rs"]
mod unet_fixtures;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use celframe::pipeline::batch::{RunReport, Shard, lora_groups, preflight, shard_clips};
use celframe::pipeline::config::RenderConfig;
use celframe::pipeline::{RenderOptions, render};
use trees::{assert_same_tree, celframe_command, read_report, tree_files};
use unet_fixtures::{TempDir, fixtures};

fn manifest_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny-manifest.toml")
}

fn manifest() -> RenderConfig {
    RenderConfig::load(&manifest_path()).unwrap()
}

#[test]
fn clips_override_the_shared_settings() {
    let config = manifest();
    config.validate().unwrap();
    let frames: Vec<usize> = (0..4).map(|i| config.clip_frames(i)).collect();
    // seconds = 0.5 at 8 fps is 4 frames; the others keep the shared 8 or set their own.
    assert_eq!(frames, [8, 6, 4, 8]);
    assert_eq!((config.clip_seed(0), config.clip_seed(1), config.clip_seed(3)), (7, 100, 10));
    assert!(config.clip_loras(0).is_empty());
    assert!(config.for_clip(1).loras[0].path.ends_with("lora_te_only.safetensors"));
    assert!(config.for_clip(2).controlnets[0].images.ends_with("control_pose_coco.json"));
    assert_eq!(config.for_clip(0).controlnets[0].images, PathBuf::from("builtin:pose"));
    // Two LoRA sets: each merged once, clips in manifest order within their set.
    let groups: Vec<Vec<usize>> = lora_groups(&config, &[0, 1, 2, 3]).into_iter().map(|(_, m)| m).collect();
    assert_eq!(groups, [vec![0, 2], vec![1, 3]]);
    let resolved = config.resolved();
    assert_eq!(resolved.clips[2].frames, Some(4));
    assert_eq!(resolved.clips[2].seconds, None);
}

#[test]
fn shards_partition_the_clips_by_id_order() {
    let config = manifest();
    // Ids sorted: pose-json (2), run-lora (3), walk (0), wave-lora (1); shard I takes positions
    // I, I + N, ...
    assert_eq!(shard_clips(&config, Some(Shard { index: 0, count: 2 })), [0, 2]);
    assert_eq!(shard_clips(&config, Some(Shard { index: 1, count: 2 })), [1, 3]);
    assert_eq!(shard_clips(&config, Some(Shard { index: 0, count: 3 })), [1, 2]);
    assert_eq!(shard_clips(&config, Some(Shard { index: 2, count: 3 })), [0]);
    for count in 1..=5 {
        let mut all: Vec<usize> =
            (0..count).flat_map(|index| shard_clips(&config, Some(Shard { index, count }))).collect();
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2, 3], "{count} shards");
    }
    assert_eq!(shard_clips(&config, None), [0, 1, 2, 3]);
}

#[test]
fn the_scheduler_picks_the_shard() {
    let from = |vars: &[(&str, &str)], count: Option<usize>| {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Shard::from_scheduler(|name| vars.get(name).cloned(), count)
    };
    let slurm = [("SLURM_ARRAY_TASK_ID", "5"), ("SLURM_ARRAY_TASK_MIN", "4"), ("SLURM_ARRAY_TASK_COUNT", "3")];
    assert_eq!(from(&slurm, None).unwrap(), Some(Shard { index: 1, count: 3 }));
    assert_eq!(from(&[("SLURM_ARRAY_TASK_ID", "2")], Some(4)).unwrap(), Some(Shard { index: 2, count: 4 }));
    assert_eq!(from(&[("JOB_COMPLETION_INDEX", "2"), ("CELFRAME_SHARD_COUNT", "3")], None).unwrap().unwrap().index, 2);
    assert_eq!(from(&[], None).unwrap(), None);
    for (vars, count, says) in [
        (&[("JOB_COMPLETION_INDEX", "0")][..], None, "--shard-count"),
        (&[("JOB_COMPLETION_INDEX", "3")][..], Some(3), "shard 3 of 3"),
        (&[("SLURM_ARRAY_TASK_ID", "x")][..], None, "SLURM_ARRAY_TASK_ID"),
        (&[][..], Some(2), "without a shard index"),
    ] {
        let e = from(vars, count).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains(says), "{vars:?}: {e}");
    }
    assert_eq!(Shard::parse("1/3").unwrap(), Shard { index: 1, count: 3 });
    for bad in ["3/3", "a/b", "0/0", "2"] {
        assert_eq!(Shard::parse(bad).unwrap_err().exit_code(), 2, "{bad}");
    }
}

#[test]
fn every_problem_is_listed_before_any_weight_is_converted() {
    let dir = TempDir::new("batch-preflight");
    let mut config = manifest();
    // Deep problems: a LoRA whose UNet keys do not fit the tiny UNet, a control PNG that does
    // not decode.
    config.clips[1].loras.as_mut().unwrap()[0].path = fixtures().join("lora_te_kohya.safetensors");
    let garbage = dir.path("broken.png");
    std::fs::write(&garbage, b"not a png").unwrap();
    config.clips[2].control_images = Some(vec![garbage]);
    let e = preflight(&config).unwrap_err();
    assert_eq!(e.exit_code(), 2);
    let text = e.to_string();
    assert!(text.contains("2 problems"), "{text}");
    assert!(text.contains("clips[1].loras: ") && text.contains("is [32, 32]"), "{text}");
    assert!(text.contains("clips[2] (pose-json) controlnets[0].images: ") && text.contains("broken.png"), "{text}");
    // Rule problems alongside: a missing LoRA, both frames and seconds, a duplicate id.
    config.clips[3].loras.as_mut().unwrap()[0].path = dir.path("missing.safetensors");
    (config.clips[0].frames, config.clips[0].seconds) = (Some(8), Some(1.0));
    config.clips[3].id = Some("walk".into());
    let text = preflight(&config).unwrap_err().to_string();
    for says in [
        "clips[1].loras: ",
        "clips[3].loras[0].path: ",
        "missing.safetensors: no such file",
        "clips[0]: give frames or seconds, not both",
        "clips[3].id: \"walk\" is clips[0]'s id too",
    ] {
        assert!(text.contains(says), "{says}: {text}");
    }
}

#[test]
fn a_union_entrys_condition_images_are_checked_by_condition() {
    // A Union entry has no images of its own: the check decodes each condition's and names it.
    let dir = TempDir::new("batch-union");
    let mut config = manifest();
    let condition = |kind: &str, images: &Path| {
        serde_json::from_value(serde_json::json!({ "kind": kind, "images": images })).unwrap()
    };
    let garbage = dir.path("broken.png");
    std::fs::write(&garbage, b"not a png").unwrap();
    config.controlnets[0].conditions =
        vec![condition("openpose", Path::new("builtin:pose")), condition("depth", &garbage)];
    config.controlnets[0].kind.clear();
    config.controlnets[0].images = PathBuf::new();
    config.clips.truncate(1);
    let text = preflight(&config).unwrap_err().to_string();
    assert!(text.contains("1 problem"), "{text}");
    assert!(text.contains("controlnets[0].conditions[1].images: ") && text.contains("broken.png"), "{text}");
    let pose = fixtures().join("control_pose_coco.json");
    config.controlnets[0].conditions[1] = condition("openpose", &pose);
    preflight(&config).unwrap();
}

/// The manifest's first `clips` clips, written into `out`.
fn small_batch(out: &Path, clips: usize) -> RenderConfig {
    let mut config = manifest();
    config.clips.truncate(clips);
    config.output.root = out.to_path_buf();
    config
}

#[test]
fn a_clip_that_fails_late_is_recorded_and_the_batch_goes_on() {
    let dir = TempDir::new("batch-fail");
    let out = dir.path("out");
    let config = small_batch(&out, 3);
    // A file where clip 2's folder goes: found only when the clip is written, after sampling.
    std::fs::create_dir_all(out.join("video")).unwrap();
    std::fs::write(out.join("video/clip_002"), b"in the way").unwrap();
    let Err(e) = render(&config, &RenderOptions::default()) else { panic!("the blocked clip did not fail") };
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("1 of 3 clip(s) failed"), "{e}");
    let report = read_report(&out.join("configs/run_report.json"));
    let status: Vec<&str> = report.clips.iter().map(|c| c.status.as_str()).collect();
    assert_eq!(status, ["done", "failed", "done"]);
    assert_eq!((report.done, report.failed, report.pending), (2, 1, 0));
    let failed = &report.clips[1];
    assert_eq!((failed.id.as_str(), failed.exit_code), ("wave-lora", Some(2)));
    assert!(failed.error.as_deref().unwrap().contains("clip_002"), "{failed:?}");
    assert!(report.clips[0].seconds.as_ref().unwrap().denoise > 0.0);
    assert!(out.join("video/clip_003/frames/000000.png").is_file());
    // The rerun renders only the failed clip.
    std::fs::remove_file(out.join("video/clip_002")).unwrap();
    let rerun = render(&config, &RenderOptions::default()).unwrap();
    let skipped: Vec<bool> = rerun.clips.iter().map(|c| c.skipped).collect();
    assert_eq!(skipped, [true, false, true]);
    let report = read_report(&out.join("configs/run_report.json"));
    assert_eq!((report.done, report.skipped, report.failed), (1, 2, 0));
}

/// Replaces `lora` with bytes that are no safetensors file as soon as `report` (the run report,
/// first written right after the up-front check) appears, unless `done` is set first. The file is
/// replaced by a rename, so nothing that mapped the old one sees it change.
fn spoil_after_the_check(report: PathBuf, lora: PathBuf, done: Arc<AtomicBool>) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        while !report.is_file() {
            if done.load(Ordering::Acquire) {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let temp = lora.with_extension("spoiled");
        std::fs::write(&temp, b"no safetensors header here").unwrap();
        std::fs::rename(&temp, &lora).unwrap();
        true
    })
}

#[test]
fn a_lora_file_spoiled_after_the_check_fails_only_its_groups_clips() {
    // A LoRA group's set is read when the batch reaches the group (on CUDA, while the group before
    // it renders: tests/gpu_lora.rs has that twin of this test), so a file that breaks after the
    // up-front check fails that group's clips, with the file named, and the batch goes on.
    // Group 1 is clips 1 and 3 (no LoRA), group 2 clips 2 and 4 (this file); the file is spoiled
    // once the run report appears, before any model loads.
    let dir = TempDir::new("batch-bad-lora");
    let out = dir.path("out");
    let mut config = small_batch(&out, 4);
    let lora = dir.path("te_copy.safetensors");
    std::fs::copy(fixtures().join("lora_te_only.safetensors"), &lora).unwrap();
    for clip in &mut config.clips {
        if let Some(loras) = clip.loras.as_mut() {
            loras[0].path = lora.clone();
        }
    }
    let groups: Vec<Vec<usize>> = lora_groups(&config, &[0, 1, 2, 3]).into_iter().map(|(_, m)| m).collect();
    assert_eq!(groups, [vec![0, 2], vec![1, 3]]);
    let done = Arc::new(AtomicBool::new(false));
    let spoiler = spoil_after_the_check(out.join("configs/run_report.json"), lora, done.clone());
    let result = render(&config, &RenderOptions::default());
    done.store(true, Ordering::Release);
    assert!(spoiler.join().unwrap(), "the run report never appeared");
    let Err(e) = result else { panic!("the spoiled LoRA file did not fail its clips") };
    assert!(e.to_string().contains("2 of 4 clip(s) failed"), "{e}");
    let report = read_report(&out.join("configs/run_report.json"));
    let status: Vec<&str> = report.clips.iter().map(|c| c.status.as_str()).collect();
    assert_eq!(status, ["done", "failed", "done", "failed"]);
    for failed in [&report.clips[1], &report.clips[3]] {
        assert!(failed.error.as_deref().unwrap().contains("te_copy.safetensors"), "{failed:?}");
        assert_eq!(failed.exit_code, Some(e.exit_code()));
    }
}

#[test]
fn control_inputs_built_ahead_match_those_built_inline() {
    // In a batch the next clip's control inputs (image decode, pose drawing, Canny edges) are
    // built on a thread while a clip renders; the first clip a run renders builds its own inline.
    // Clip 3 follows clip 1 in its LoRA group, so the batch builds its inputs ahead; the second
    // run finds clips 1 and 2 complete and renders clip 3 first. Same clip, same frames.
    let dir = TempDir::new("batch-prefetch");
    let mut config = small_batch(&dir.path("batch"), 3);
    let mut canny = config.controlnets[0].clone();
    canny.kind = "canny".into();
    canny.images = fixtures().join("control_canny_in_shapes.png");
    config.controlnets.push(canny);
    config.clips[2].control_images =
        Some(vec![fixtures().join("control_pose_coco.json"), fixtures().join("control_canny_in_gray.png")]);
    let options = RenderOptions { keep_tensors: true, ..Default::default() };
    let batch = render(&config, &options).unwrap();
    let rendered: Vec<usize> = batch.clips.iter().filter(|c| !c.skipped).map(|c| c.index).collect();
    assert_eq!(rendered, [0, 1, 2]);

    let alone = dir.path("alone");
    for clip in ["clip_001", "clip_002"] {
        std::fs::create_dir_all(alone.join("video").join(clip)).unwrap();
    }
    config.output.root = alone.clone();
    let single = render(&config, &options).unwrap();
    let third = |r: &celframe::pipeline::RenderReport| r.clips.iter().find(|c| c.index == 2 && !c.skipped).cloned();
    let (ahead, inline) = (third(&batch).unwrap(), third(&single).expect("clip 3 rendered alone"));
    let values = |t: &Option<celframe::tensor::Tensor>| t.as_ref().unwrap().to_f32_vec().unwrap();
    assert!(values(&ahead.latents) == values(&inline.latents), "latents differ");
    assert!(values(&ahead.images) == values(&inline.images), "frames differ");
    let frames = |root: &Path| tree_files(&root.join("video/clip_003"));
    assert!(frames(&dir.path("batch")) == frames(&alone), "clip_003's files differ");
}

fn celframe(args: &[&str]) -> std::process::Child {
    celframe_command(args).stderr(std::process::Stdio::piped()).spawn().unwrap()
}

fn wait(child: std::process::Child, what: &str) {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn shards_together_write_what_one_process_writes() {
    let dir = TempDir::new("batch-shards");
    let manifest = manifest_path();
    let manifest = manifest.to_str().unwrap();
    let single = dir.path("single");
    wait(celframe(&["render", manifest, "--out", single.to_str().unwrap()]), "single run");
    let expected = tree_files(&single);
    assert!(expected.keys().any(|p| p.ends_with("video/clip_004/clip_004.mp4")), "{:?}", expected.keys());
    assert!(expected.contains_key(Path::new("images/prompt_grid_single.png")));
    let single_report = read_report(&single.join("configs/run_report.json"));
    assert_eq!(single_report.done, 4);
    for count in [2usize, 3] {
        // Named like the single run's folder: the prompt grid's file name is the folder's.
        let out = dir.path(&format!("{count}/single"));
        let out_arg = out.to_str().unwrap();
        let shards: Vec<_> = (0..count)
            .map(|i| celframe(&["render", manifest, "--out", out_arg, "--shard", &format!("{i}/{count}")]))
            .collect();
        for (i, child) in shards.into_iter().enumerate() {
            wait(child, &format!("shard {i}/{count}"));
        }
        assert!(!out.join("images/prompt_grid_single.png").exists(), "a shard wrote the grid");
        wait(celframe(&["merge-report", out_arg]), "merge-report");
        assert_same_tree(&single, &out, &format!("{count} shards"));
        let merged = read_report(&out.join("configs/run_report.json"));
        assert_eq!(merged.merged_shards, Some(count));
        let strip = |r: &RunReport| -> Vec<(usize, String, String)> {
            r.clips.iter().map(|c| (c.index, c.id.clone(), c.status.clone())).collect()
        };
        assert_eq!(strip(&merged), strip(&single_report));
    }
}
