//! Interrupted renders resume (CPU, the tiny random models): `celframe render` killed with SIGKILL
//! at random points, stopped by SIGTERM / SIGINT, or killed right after a saved segment or pass,
//! then run again, writes the bytes of an uninterrupted run; at every stop, each file under a
//! final name is complete (equal to the uninterrupted run's). Two configs: segment chaining (two
//! clips of 3 and 2 segments) and context windows with FreeInit (one clip, two passes).
//!
//! The random kill points come from a seeded generator; the seed is printed, and
//! CELFRAME_RESUME_SEED=N repeats a run's choices (kill times still meet the machine's speed).

#[path = "common/unet_fixtures.rs"]
mod unet_fixtures;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use celframe::pipeline::batch::RunReport;
use unet_fixtures::{TempDir, fixtures};

/// How long a wait for a log line or an exit may take before the test fails (a loaded CI machine
/// renders a step in seconds).
const PATIENCE: Duration = Duration::from_secs(300);
/// How soon after SIGINT / SIGTERM the render must have exited: the stop is looked at before
/// every step and VAE chunk, each a few seconds at most here.
const STOP_BOUND: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    Chain,
    Windows,
}

/// The render config of `case`, writing to `out` beside it.
fn config_text(case: Case) -> String {
    let f = fixtures();
    let f = f.display();
    let video = match case {
        // 6 and 4 frames in segments of 2: clips of 3 and 2 segments.
        Case::Chain => "frames = 6\ncontext_length = 2\ncontext_overlap = 1\nlong_video = \"chain\"\n",
        Case::Windows => "frames = 4\ncontext_length = 2\ncontext_overlap = 1\n[video.free_init]\niterations = 2\n",
    };
    let clips = match case {
        Case::Chain => {
            "[[clips]]\nprompt = \"1 girl, walking\"\n[[clips]]\nprompt = \"1 boy, waving\"\nseed = 100\nframes = 4\n"
        }
        Case::Windows => "[[clips]]\nprompt = \"1 girl, walking\"\n",
    };
    format!(
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
cfg = 1.0
[output]
root = "out"
mp4 = "builtin"
{clips}[video]
width = 64
height = 64
fps = 8
{video}"#
    )
}

/// A folder holding `case`'s config as `render.toml`; renders go to `out/` in it.
fn setup(dir: &Path, case: Case) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("render.toml");
    std::fs::write(&config, config_text(case)).unwrap();
    config
}

/// An uninterrupted run of a case: its files and how long it took.
struct Reference {
    root: PathBuf,
    files: BTreeMap<PathBuf, Vec<u8>>,
    seconds: f64,
}

fn reference(case: Case) -> &'static Reference {
    static CHAIN: OnceLock<Reference> = OnceLock::new();
    static WINDOWS: OnceLock<Reference> = OnceLock::new();
    let cell = if case == Case::Chain { &CHAIN } else { &WINDOWS };
    cell.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("resume-reference-{case:?}"));
        let _ = std::fs::remove_dir_all(&dir);
        let config = setup(&dir, case);
        let started = Instant::now();
        let (status, log) = Render::start(&config, &[]).finish();
        assert!(status.success(), "{case:?} reference run: {log}");
        let root = dir.join("out");
        let files = final_files(&root).into_iter().filter(|(p, _)| !is_report(p)).collect();
        Reference { root, files, seconds: started.elapsed().as_secs_f64() }
    })
}

fn is_report(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("run_report"))
}

/// Every file under `root` whose relative path has no dot-named part (the final names), read.
fn final_files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.file_name().unwrap().to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// Checks the outputs tree `root` of `case` after a stop: every file under a final name equals
/// the reference run's (configs name their output folder: compared with it put back), the run
/// report reads whole. `complete`: every file is there, every clip done or skipped, and no
/// dot-named leftover (partial clip, saved latents) remains.
fn check_tree(case: Case, root: &Path, complete: bool, when: &str) {
    let reference = reference(case);
    let got = final_files(root);
    let (ours, theirs) = (root.display().to_string(), reference.root.display().to_string());
    for (path, bytes) in &got {
        if is_report(path) {
            let report: RunReport = serde_json::from_slice(bytes)
                .unwrap_or_else(|e| panic!("{when}: {} is not a whole report: {e}", path.display()));
            if complete {
                assert_eq!(report.done + report.skipped, report.clips.len(), "{when}: {report:?}");
            }
            continue;
        }
        let Some(expected) = reference.files.get(path) else {
            panic!("{when}: {} is not in the uninterrupted run's outputs", path.display())
        };
        let bytes = if path.extension().is_some_and(|e| e == "json") {
            String::from_utf8(bytes.clone()).unwrap().replace(&ours, &theirs).into_bytes()
        } else {
            bytes.clone()
        };
        assert!(bytes == *expected, "{when}: {} differs from the uninterrupted run's", path.display());
    }
    if complete {
        let names: Vec<_> = got.keys().filter(|p| !is_report(p)).collect();
        assert_eq!(names, reference.files.keys().collect::<Vec<_>>(), "{when}");
        let leftovers: Vec<_> = std::fs::read_dir(root.join("video"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{when}: left in video/: {leftovers:?}");
    }
}

fn read_report(root: &Path) -> RunReport {
    serde_json::from_slice(&std::fs::read(root.join("configs/run_report.json")).unwrap()).unwrap()
}

/// A running `celframe render`, its stderr read line by line on a thread.
struct Render {
    child: Child,
    lines: Receiver<String>,
    log: Arc<Mutex<String>>,
}

impl Render {
    fn start(config: &Path, args: &[&str]) -> Render {
        let mut child = Command::new(env!("CARGO_BIN_EXE_celframe"))
            .arg("render")
            .arg(config)
            .args(args)
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("JOB_COMPLETION_INDEX")
            .env_remove("CELFRAME_SHARD_COUNT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (sender, lines) = channel();
        let log = Arc::new(Mutex::new(String::new()));
        let kept = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                kept.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = sender.send(line);
            }
        });
        Render { child, lines, log }
    }

    /// Waits for a log line containing `text`.
    fn wait_for(&self, text: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!("no line with {text:?} in time: {}", self.log()),
                Err(RecvTimeoutError::Disconnected) => panic!("the render ended before {text:?}: {}", self.log()),
            }
        }
    }

    fn signal(&self, name: &str) {
        let sent = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(sent.success(), "kill -{name}");
    }

    /// SIGKILL (nothing of the render runs after it).
    fn kill(mut self) -> String {
        let _ = self.child.kill();
        self.finish().1
    }

    /// Waits for the exit: the status and the whole log.
    fn finish(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the render did not end in time: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader ends at the pipe's end of file; let it take the last lines.
        while self.lines.recv_timeout(Duration::from_secs(5)).is_ok() {}
        (status, self.log())
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

/// Runs `config` to the end and checks the outputs against the reference.
fn complete(case: Case, config: &Path, when: &str) -> String {
    let (status, log) = Render::start(config, &[]).finish();
    assert!(status.success(), "{when}: {log}");
    check_tree(case, &config.parent().unwrap().join("out"), true, when);
    log
}

/// xorshift64*: a few reproducible random numbers without a dependency.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("CELFRAME_RESUME_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
        eprintln!("kill points from seed {seed} (CELFRAME_RESUME_SEED={seed} repeats them)");
        Rng(seed | 1)
    }

    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[test]
fn killed_at_random_points_the_reruns_write_the_uninterrupted_bytes() {
    let dir = TempDir::new("resume-random");
    let mut rng = Rng::from_env();
    for (case, kills) in [(Case::Chain, 3), (Case::Windows, 2)] {
        let config = setup(&dir.path(&format!("{case:?}")), case);
        let root = config.parent().unwrap().join("out");
        let seconds = reference(case).seconds;
        for k in 0..kills {
            let delay = Duration::from_secs_f64(0.2 + rng.next() * seconds);
            let when = format!("{case:?}, kill {} of {kills} after {:.2} s", k + 1, delay.as_secs_f64());
            eprintln!("{when}");
            let render = Render::start(&config, &[]);
            std::thread::sleep(delay);
            if case == Case::Chain && k == 1 {
                // Two SIGINTs at once: the second exits at once (exit code 130 either way).
                render.signal("INT");
                render.signal("INT");
                let (status, log) = render.finish();
                // 130, or done before the signals came, or not yet handling them (at its start).
                let ok = status.code() == Some(130) || status.success() || status.signal() == Some(2);
                assert!(ok, "{when}: {status:?} {log}");
            } else {
                render.kill();
            }
            check_tree(case, &root, false, &when);
        }
        complete(case, &config, &format!("{case:?}, the run after the kills"));
    }
}

/// Sends `signal` once the render logs `after`; checks the exit code, the time it took, the
/// message and the report, and that the rerun completes.
fn stop_with(case: Case, dir: &Path, after: &str, signal: &str, code: i32) {
    let config = setup(dir, case);
    let root = config.parent().unwrap().join("out");
    let render = Render::start(&config, &[]);
    render.wait_for(after);
    let sent = Instant::now();
    render.signal(signal);
    let (status, log) = render.finish();
    let took = sent.elapsed();
    eprintln!("{case:?}: SIG{signal} -> exit {:?} after {:.2} s", status.code(), took.as_secs_f64());
    assert_eq!(status.code(), Some(code), "{log}");
    assert!(took < STOP_BOUND, "{:.1} s to stop: {log}", took.as_secs_f64());
    assert!(log.contains(&format!("stopped by SIG{signal}")), "{log}");
    assert!(log.contains("run the same command again to resume"), "{log}");
    let report = read_report(&root);
    assert_eq!(report.clips[0].status, "interrupted", "{report:?}");
    assert_eq!((report.interrupted, report.clips[0].exit_code), (1, Some(code as u8)));
    check_tree(case, &root, false, &format!("{case:?} after SIG{signal}"));
    complete(case, &config, &format!("{case:?}, the run after SIG{signal}"));
}

#[test]
fn sigterm_and_sigint_stop_cleanly_and_the_rerun_completes() {
    let dir = TempDir::new("resume-signals");
    stop_with(Case::Chain, &dir.path("term"), "clip 001: frames 2..4: step 1/2", "TERM", 143);
    stop_with(Case::Windows, &dir.path("int"), "FreeInit pass 2/2", "INT", 130);
}

#[test]
fn a_rerun_resumes_after_the_saved_work_and_ignores_other_settings() {
    let dir = TempDir::new("resume-saved");
    // Chaining: killed after segment 2 is saved, the rerun starts at segment 3.
    let config = setup(&dir.path("chain"), Case::Chain);
    let render = Render::start(&config, &[]);
    render.wait_for("clip 001: saved segment 2 of 3");
    render.kill();
    let log = complete(Case::Chain, &config, "chain, after segment 2");
    assert!(log.contains("clip 001: resumed from segment 2 of 3"), "{log}");
    assert!(!log.contains("clip 001: frames 0..2: step") && !log.contains("clip 001: frames 2..4: step"), "{log}");

    // Saved latents of other settings (here a seed) are said to be ignored, and not used.
    let fresh = setup(&dir.path("stale"), Case::Chain);
    let render = Render::start(&fresh, &[]);
    render.wait_for("clip 001: saved segment 1 of 3");
    render.kill();
    let render = Render::start(&fresh, &["--seed", "8"]);
    let line = render.wait_for("ignoring the saved latents");
    assert!(line.contains("made with other settings"), "{line}");
    render.wait_for("clip 001: frames 0..2: step 1/2");
    let log = render.kill();
    assert!(!log.contains("resumed"), "{log}");

    // Windows with FreeInit: killed after pass 1, the rerun starts at pass 2; killed after pass 2
    // (the final latents, while decoding), the next run only decodes.
    let config = setup(&dir.path("windows"), Case::Windows);
    let render = Render::start(&config, &[]);
    render.wait_for("clip 001: saved pass 1 of 2");
    render.kill();
    let render = Render::start(&config, &[]);
    render.wait_for("clip 001: saved pass 2 of 2");
    let log = render.kill();
    assert!(log.contains("clip 001: resumed from pass 1 of 2"), "{log}");
    assert!(!log.contains("FreeInit pass 1/2"), "{log}");
    check_tree(Case::Windows, &config.parent().unwrap().join("out"), false, "windows, after pass 2");
    let log = complete(Case::Windows, &config, "windows, after pass 2");
    assert!(log.contains("clip 001: resumed from pass 2 of 2") && log.contains("final"), "{log}");
    assert!(!log.contains("step 1/"), "{log}");
}
