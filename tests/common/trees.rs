//! Batch runs through the `celframe` binary and the outputs trees they write: the command (no job
//! scheduler's shard variables inherited), every file of a tree, and the check that a tree holds
//! the bytes a single-process run wrote.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use celframe::pipeline::batch::RunReport;

/// The CLI: `CELFRAME_BIN`, else the one cargo built with this test, else `dist/gpu/celframe`
/// (the GPU machine runs test binaries built elsewhere, from the repository root, with
/// tools/build_gpu_bundle.sh's binaries).
pub fn celframe_exe() -> PathBuf {
    if let Some(path) = std::env::var_os("CELFRAME_BIN") {
        return PathBuf::from(path);
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_celframe"));
    let bundled = PathBuf::from("dist/gpu/celframe");
    match (built.is_file(), bundled.is_file()) {
        (true, _) => built,
        (false, true) => bundled,
        _ => panic!("no celframe binary: neither {} nor {} (set CELFRAME_BIN)", built.display(), bundled.display()),
    }
}

/// `celframe ARGS`, outside any job array or Indexed Job.
pub fn celframe_command(args: &[&str]) -> Command {
    let mut command = Command::new(celframe_exe());
    command
        .args(args)
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("CELFRAME_SHARD_COUNT");
    command
}

pub fn read_report(path: &Path) -> RunReport {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Every file under `root` except the run reports and lock files, by relative path.
pub fn tree_files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                stack.push(path);
            } else if !name.starts_with("run_report") && !name.starts_with(".lock-") {
                files.insert(path.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// `got` holds the files of `expected` (a single-process run of the same manifest and arguments),
/// no more, byte for byte: the same frames, mp4s, configs and prompt grid. Both trees' folders
/// must have one name, the prompt grid's file name being the folder's.
pub fn assert_same_tree(expected: &Path, got: &Path, what: &str) {
    let want = tree_files(expected);
    let have = tree_files(got);
    assert_eq!(have.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}: the file lists differ");
    for (path, bytes) in &want {
        let mut have = have[path].clone();
        if path.ends_with("pipeline_config.json") {
            // The resolved config names its output folder.
            let text = String::from_utf8(have).unwrap();
            have = text.replace(got.to_str().unwrap(), expected.to_str().unwrap()).into_bytes();
        }
        assert!(have == *bytes, "{what}: {} differs", path.display());
    }
}
