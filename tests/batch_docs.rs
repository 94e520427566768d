//! The job-array examples in docs/batch: the sbatch script passes `bash -n` and runs celframe
//! render; the Kubernetes Indexed Job is well-formed YAML as far as a line check goes (two-space
//! indentation, no tabs, `key: value` or `- item` lines) and keeps its shard count equal to its
//! completions.

use std::path::Path;
use std::process::Command;

fn doc(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/batch").join(name)).unwrap()
}

#[test]
fn the_sbatch_script_parses_and_runs_a_job_array() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/batch/render-array.sbatch");
    let out = Command::new("bash").arg("-n").arg(&path).output().expect("bash runs");
    assert!(out.status.success(), "bash -n: {}", String::from_utf8_lossy(&out.stderr));
    let text = doc("render-array.sbatch");
    assert!(text.lines().any(|l| l.starts_with("#SBATCH --array=")));
    assert!(text.lines().any(|l| l.starts_with("#SBATCH --gpus-per-task=1")));
    assert!(text.contains("celframe render \"$manifest\""));
}

/// The value of the first `key:` line (leading `- ` and spaces ignored).
fn value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.trim_start().trim_start_matches("- ").strip_prefix(&format!("{key}:")).map(str::trim))
}

#[test]
fn the_indexed_job_is_well_formed_and_its_shard_count_is_its_completions() {
    let text = doc("render-indexed-job.yaml");
    let mut depth_of_last = 0;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        assert!(!line.contains('\t'), "line {n}: a tab");
        let indent = line.len() - line.trim_start().len();
        assert_eq!(indent % 2, 0, "line {n}: odd indentation");
        assert!(indent <= depth_of_last + 4, "line {n}: indented too far");
        depth_of_last = indent;
        let item = line.trim_start().trim_start_matches("- ");
        let key = item.split(':').next().unwrap();
        assert!(item.contains(':') || line.trim_start().starts_with("- "), "line {n}: neither key: value nor - item");
        assert!(key.chars().all(|c| c.is_ascii_alphanumeric() || "./-_\"".contains(c)), "line {n}: key {key:?}");
    }
    assert_eq!(value(&text, "kind"), Some("Job"));
    assert_eq!(value(&text, "completionMode"), Some("Indexed"));
    let completions = value(&text, "completions").unwrap();
    assert_eq!(value(&text, "parallelism"), Some(completions));
    let count =
        text.lines().skip_while(|l| !l.contains("- name: CELFRAME_SHARD_COUNT")).nth(1).and_then(|l| value(l, "value"));
    assert_eq!(count, Some(format!("\"{completions}\"").as_str()));
    assert_eq!(value(&text, "nvidia.com/gpu"), Some("1"));
    assert!(value(&text, "command").unwrap().contains("\"render\""));
}
