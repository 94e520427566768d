//! `celframe render CONFIG --gpus all|LIST`: one `celframe render` worker per GPU of this host
//! (`--split clips`, the default), or with `--split windows|cfg` every clip over the listed
//! devices in this one process (`crate::pipeline::devices`).
//!
//! With clips, worker k renders shard k of N (`--shard k/N`, the stable assignment of
//! `crate::pipeline::batch`) into the one outputs tree, sees only its GPU (CUDA_VISIBLE_DEVICES)
//! and gets every other argument unchanged; its stdout and stderr lines come out prefixed
//! `[gpu K]`. When all have exited, the shards' reports are merged as `celframe merge-report`
//! merges them.
//!
//! Exit code: the highest of the workers' codes and the merge's (a worker ended by signal S counts
//! 128 + S, as a shell reports it), so 2 when a worker or the merge found bad input or a failed
//! clip, 4 when a worker's CUDA call failed, and so on. SIGINT and SIGTERM are passed on to the
//! workers, which run in their own process group (a terminal's Ctrl-C reaches them once, through
//! this process); after one, nothing is merged and the exit code is at least 128 + S.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::pipeline::batch::{Shard, preflight};
use crate::process::dies_with_its_parent;

use super::merge_report::{self, MergeReportArgs};
use super::render::{RenderArgs, config_from_args};
use crate::pipeline::devices::{DeviceSplit, SplitMode};

/// What `--gpus` names: every device the CUDA driver reports, or these ordinals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuSelection {
    All,
    List(Vec<usize>),
}

/// Most ordinals in a list (more GPUs than any one host holds).
const MAX_GPUS: usize = 1024;

impl GpuSelection {
    /// `all`, or comma-separated CUDA ordinals such as `0,2,3` (each once unless `repeats`: a
    /// split of one clip may put two device threads on one GPU).
    pub fn parse(text: &str, repeats: bool) -> Result<GpuSelection> {
        if text.trim() == "all" {
            return Ok(GpuSelection::All);
        }
        let mut ordinals = Vec::new();
        for item in text.split(',') {
            let Ok(ordinal) = item.trim().parse::<usize>() else {
                return Err(Error::Input(format!(
                    "--gpus {text:?}: {:?} is not a GPU ordinal; give all, or ordinals such as 0,2,3",
                    item.trim()
                )));
            };
            if !repeats && ordinals.contains(&ordinal) {
                return Err(Error::Input(format!("--gpus {text}: GPU {ordinal} is listed twice")));
            }
            ordinals.push(ordinal);
        }
        if ordinals.len() > MAX_GPUS {
            return Err(Error::Input(format!("--gpus: {} GPUs; at most {MAX_GPUS}", ordinals.len())));
        }
        Ok(GpuSelection::List(ordinals))
    }
}

/// One worker: the ordinal it is shown by (`[gpu K]`), the CUDA_VISIBLE_DEVICES it gets, its shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Worker {
    pub ordinal: usize,
    pub visible: String,
    pub shard: Shard,
}

/// The workers for `selection`. `visible` is this process's CUDA_VISIBLE_DEVICES: ordinals count
/// within it, as CUDA counts them, and a worker gets the entry its ordinal names. `devices` is the
/// CUDA driver's device count (None without a driver or device). `all` needs the driver; a list is
/// checked against the driver's count, else against `visible`'s length, else not at all (the
/// workers then run on the device the config names: a CPU config tests the orchestration).
pub fn plan(selection: &GpuSelection, visible: Option<&str>, devices: Option<usize>) -> Result<Vec<Worker>> {
    let entries: Option<Vec<&str>> = visible.map(|v| v.split(',').map(str::trim).filter(|e| !e.is_empty()).collect());
    let ordinals = match selection {
        GpuSelection::All => match devices {
            Some(n) if n > 0 => (0..n).collect(),
            _ => {
                return Err(Error::Input(
                    "--gpus all: no CUDA driver or device on this machine to count (an explicit --gpus LIST starts \
                     its workers anyway, on the device the config names)"
                        .into(),
                ));
            }
        },
        GpuSelection::List(list) => list.clone(),
    };
    // The driver counts within CUDA_VISIBLE_DEVICES (up to its first entry that names no device).
    let limits = [
        devices.filter(|&n| n > 0).map(|n| (n, "the CUDA driver reports")),
        entries.as_ref().map(|e| (e.len(), "CUDA_VISIBLE_DEVICES names")),
    ];
    if let Some((count, source)) = limits.into_iter().flatten().min_by_key(|&(n, _)| n)
        && let Some(bad) = ordinals.iter().find(|&&k| k >= count)
    {
        return Err(Error::Input(format!(
            "--gpus: GPU {bad} does not exist ({source} {count}, numbered from 0{})",
            visible.map_or(String::new(), |v| format!("; CUDA_VISIBLE_DEVICES={v}"))
        )));
    }
    let count = ordinals.len();
    ordinals
        .iter()
        .enumerate()
        .map(|(index, &ordinal)| {
            Ok(Worker {
                ordinal,
                visible: entries.as_ref().map_or(ordinal.to_string(), |e| e[ordinal].to_string()),
                shard: Shard::new(index, count, "--gpus")?,
            })
        })
        .collect()
}

/// The scheduler variables that pick a shard (`Shard::from_scheduler`): each worker gets its
/// shard from `--gpus`, so a process given one by its scheduler cannot also split its own.
const SCHEDULER_VARS: [&str; 3] = ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX", "CELFRAME_SHARD_COUNT"];

fn scheduler_conflict(var: impl Fn(&str) -> Option<String>) -> Result<()> {
    match SCHEDULER_VARS.iter().find_map(|name| var(name).map(|v| (name, v))) {
        None => Ok(()),
        Some((name, value)) => Err(Error::Input(format!(
            "--gpus and {name}={value}: this process is one shard of a job array or Indexed Job, and --gpus would \
             split it again; give each array task or pod one GPU and no --gpus, or run --gpus outside the job array"
        ))),
    }
}

/// A worker's arguments: this process's (`args`, without the program name; the subcommand first)
/// without `--gpus`, and `--shard I/N` after the subcommand.
pub fn worker_args(args: &[OsString], shard: Shard) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::with_capacity(args.len() + 2);
    let mut rest = args.iter();
    out.extend(rest.next().cloned());
    out.push("--shard".into());
    out.push(format!("{}/{}", shard.index, shard.count).into());
    let mut options_end = false;
    while let Some(arg) = rest.next() {
        let text = arg.to_string_lossy();
        if !options_end && text == "--gpus" {
            rest.next();
            continue;
        }
        if !options_end && text.starts_with("--gpus=") {
            continue;
        }
        options_end |= text == "--";
        out.push(arg.clone());
    }
    out
}

/// The exit code a worker's status stands for: its code, or 128 + S when signal S ended it.
fn status_code(status: ExitStatus) -> i32 {
    status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1)
}

/// The last SIGINT or SIGTERM received and not yet passed on (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    // An atomic store is async-signal-safe; the wait loop does the rest.
    RECEIVED.store(signal, Ordering::SeqCst);
}

fn catch_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic. glibc's signal() keeps the handler
        // installed and restarts interrupted calls (BSD semantics).
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        other => format!("signal {other}"),
    }
}

/// Copies `from` line by line to this process's stdout or stderr, each line after `prefix`.
fn relay(from: impl Read + Send + 'static, prefix: String, to_stderr: bool) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if line.last() != Some(&b'\n') {
                line.push(b'\n');
            }
            // A closed stdout or stderr (a pipe to `head`) must not stop the draining: a worker
            // blocked on a full pipe would never finish.
            let _ = if to_stderr {
                write_line(&mut std::io::stderr().lock(), &prefix, &line)
            } else {
                write_line(&mut std::io::stdout().lock(), &prefix, &line)
            };
        }
    })
}

fn write_line(out: &mut impl Write, prefix: &str, line: &[u8]) -> std::io::Result<()> {
    out.write_all(prefix.as_bytes())?;
    out.write_all(line)?;
    out.flush()
}

struct Running {
    worker: Worker,
    child: Child,
    relays: Vec<JoinHandle<()>>,
    code: Option<i32>,
}

fn spawn(worker: &Worker, exe: &OsStr, args: &[OsString]) -> Result<Running> {
    let mut command = Command::new(exe);
    command
        .args(worker_args(args, worker.shard))
        .env("CUDA_VISIBLE_DEVICES", &worker.visible)
        // The worker sees one device, ordinal 0; an ordinal meant for this process would not fit.
        .env_remove("CELFRAME_DEVICE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a terminal's Ctrl-C goes to this process only, which passes it
        // on, so a worker never gets it twice.
        .process_group(0);
    // SIGTERM when this process dies without passing a signal on (SIGKILL): the worker stops
    // cleanly rather than rendering on unwatched.
    dies_with_its_parent(&mut command, libc::SIGTERM);
    let mut child = command.spawn().map_err(|e| Error::Io {
        context: format!("starting the worker for GPU {} ({})", worker.ordinal, exe.to_string_lossy()),
        source: e,
    })?;
    let prefix = format!("[gpu {}] ", worker.ordinal);
    let mut relays = Vec::new();
    if let Some(out) = child.stdout.take() {
        relays.push(relay(out, prefix.clone(), false));
    }
    if let Some(err) = child.stderr.take() {
        relays.push(relay(err, prefix, true));
    }
    Ok(Running { worker: worker.clone(), child, relays, code: None })
}

/// Passes `signal` to every worker still running.
fn pass_on(running: &[Running], signal: i32) {
    for r in running.iter().filter(|r| r.code.is_none()) {
        // SAFETY: kill(2) with a pid of our own unreaped child (`code` is None until try_wait
        // reaps it, so the pid cannot have been reused).
        unsafe { libc::kill(r.child.id() as libc::pid_t, signal) };
    }
}

/// Waits for every worker, passing SIGINT/SIGTERM on; returns the first signal received, if any.
fn wait_all(running: &mut [Running]) -> Result<Option<i32>> {
    let mut interrupted = None;
    loop {
        let signal = RECEIVED.swap(0, Ordering::SeqCst);
        if signal != 0 {
            eprintln!("render --gpus: {}: passing it on to the workers and waiting for them", signal_name(signal));
            interrupted.get_or_insert(signal);
            pass_on(running, signal);
        }
        for r in running.iter_mut().filter(|r| r.code.is_none()) {
            let status = r.child.try_wait().map_err(|e| Error::Io {
                context: format!("waiting for the worker of GPU {}", r.worker.ordinal),
                source: e,
            })?;
            r.code = status.map(status_code);
        }
        if running.iter().all(|r| r.code.is_some()) {
            return Ok(interrupted);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The workers' run: checks, starts, waits, merges; returns the exit code (module docs).
fn orchestrate(args: &RenderArgs, gpus: &str) -> Result<u8> {
    scheduler_conflict(|name| std::env::var(name).ok())?;
    let workers = plan_here(&GpuSelection::parse(gpus, false)?)?;
    // Every problem once, here, rather than once per worker.
    let (config, _) = config_from_args(args)?;
    preflight(&config).map_err(|e| e.with_prefix(&format!("{}: ", args.config.display())))?;

    let exe = std::env::current_exe()
        .map_err(|e| Error::Io { context: "finding the celframe executable".into(), source: e })?;
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    catch_signals();
    let mut running: Vec<Running> = Vec::with_capacity(workers.len());
    for worker in &workers {
        match spawn(worker, exe.as_os_str(), &argv) {
            Ok(r) => running.push(r),
            Err(e) => {
                pass_on(&running, libc::SIGTERM);
                wait_all(&mut running)?;
                return Err(e);
            }
        }
        eprintln!(
            "render --gpus: gpu {} (CUDA_VISIBLE_DEVICES={}): shard {}/{}, pid {}",
            worker.ordinal,
            worker.visible,
            worker.shard.index,
            worker.shard.count,
            running.last().map_or(0, |r| r.child.id())
        );
    }
    let interrupted = wait_all(&mut running)?;
    let mut worst = 0;
    for r in &mut running {
        for relay in r.relays.drain(..) {
            let _ = relay.join();
        }
        let code = r.code.unwrap_or(1);
        eprintln!(
            "render --gpus: gpu {} (shard {}/{}): exit {code}",
            r.worker.ordinal, r.worker.shard.index, r.worker.shard.count
        );
        worst = worst.max(code);
    }
    if let Some(signal) = interrupted {
        eprintln!(
            "render --gpus: stopped by {}; reports not merged (run the same command again to resume)",
            signal_name(signal)
        );
        worst = worst.max(128 + signal);
    } else if let Err(e) = merge_report::run(&MergeReportArgs { output: config.output.root.clone() }) {
        eprintln!("error: merge-report: {e}");
        worst = worst.max(e.exit_code() as i32);
    }
    Ok(worst.clamp(0, 255) as u8)
}

/// The devices of `--gpus` for a split of one clip (`--split windows|cfg`), checked as the
/// workers' ordinals are (`plan`).
fn split_devices(gpus: &str) -> Result<Vec<usize>> {
    Ok(plan_here(&GpuSelection::parse(gpus, true)?)?.into_iter().map(|w| w.ordinal).collect())
}

/// `plan` with this process's CUDA_VISIBLE_DEVICES and device count. A list needs no driver;
/// where there is one, its count checks the ordinals.
fn plan_here(selection: &GpuSelection) -> Result<Vec<Worker>> {
    let devices = if Gpu::is_available() {
        let count = cudarc::driver::result::device::get_count();
        Some(count.map_err(|e| Error::Cuda(format!("cuDeviceGetCount: {e}")))? as usize)
    } else {
        None
    };
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    plan(selection, visible.as_deref(), devices)
}

/// `--split windows|cfg`: the render in this process over the listed devices.
fn split_run(args: &RenderArgs, gpus: &str, mode: SplitMode) -> Result<u8> {
    let split = DeviceSplit { mode, devices: split_devices(gpus)? };
    super::render::run_split(args, Some(split))?;
    Ok(0)
}

/// `celframe render ... --gpus`: the exit code of `orchestrate` (or of the split render), or of
/// its error (printed).
pub fn main(args: &RenderArgs, gpus: &str) -> ExitCode {
    let result = match super::render::split_mode(args) {
        Ok(None) => orchestrate(args, gpus),
        Ok(Some(mode)) => split_run(args, gpus, mode),
        Err(e) => Err(e),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_bad_ones_are_named() {
        assert_eq!(GpuSelection::parse("all", false).unwrap(), GpuSelection::All);
        assert_eq!(GpuSelection::parse("0, 2,3", false).unwrap(), GpuSelection::List(vec![0, 2, 3]));
        // A split of one clip may put two device threads on one GPU.
        assert_eq!(GpuSelection::parse("0,0", true).unwrap(), GpuSelection::List(vec![0, 0]));
        for (bad, says) in
            [("0,0", "GPU 0 is listed twice"), ("1,x", "\"x\" is not"), ("", "\"\" is not"), ("0,", "\"\"")]
        {
            let e = GpuSelection::parse(bad, false).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn workers_map_into_cuda_visible_devices() {
        let shown = |w: &[Worker]| -> Vec<(usize, String, usize, usize)> {
            w.iter().map(|w| (w.ordinal, w.visible.clone(), w.shard.index, w.shard.count)).collect()
        };
        let all = plan(&GpuSelection::All, None, Some(3)).unwrap();
        assert_eq!(shown(&all), [(0, "0".into(), 0, 3), (1, "1".into(), 1, 3), (2, "2".into(), 2, 3)]);
        // Ordinals count within CUDA_VISIBLE_DEVICES, as CUDA numbers the devices it shows.
        let list = GpuSelection::List(vec![2, 0]);
        let mapped = plan(&list, Some("3,5,GPU-8f2a"), None).unwrap();
        assert_eq!(shown(&mapped), [(2, "GPU-8f2a".into(), 0, 2), (0, "3".into(), 1, 2)]);
        assert_eq!(shown(&plan(&GpuSelection::All, Some("6,7"), Some(2)).unwrap())[1].1, "7");
        // Without a driver and without CUDA_VISIBLE_DEVICES a list is taken as it is.
        assert_eq!(plan(&GpuSelection::List(vec![0, 7]), None, None).unwrap().len(), 2);
        for (selection, visible, devices, says) in [
            (GpuSelection::All, None, None, "--gpus all: no CUDA driver or device"),
            (GpuSelection::All, Some("0"), Some(0), "--gpus all: no CUDA driver or device"),
            (GpuSelection::List(vec![0, 2]), None, Some(2), "GPU 2 does not exist (the CUDA driver reports 2"),
            (GpuSelection::List(vec![2]), Some("4,5"), None, "GPU 2 does not exist (CUDA_VISIBLE_DEVICES names 2"),
        ] {
            let e = plan(&selection, visible, devices).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains(says), "{selection:?}: {e}");
        }
    }

    #[test]
    fn workers_get_every_argument_but_gpus_and_their_shard() {
        let os = |v: &[&str]| -> Vec<OsString> { v.iter().map(OsString::from).collect() };
        let shard = Shard { index: 1, count: 3 };
        let args = os(&["render", "m.toml", "--gpus", "0,1,2", "--steps", "2", "--gpus=all", "--prompt=--gpus"]);
        assert_eq!(
            worker_args(&args, shard),
            os(&["render", "--shard", "1/3", "m.toml", "--steps", "2", "--prompt=--gpus"])
        );
        // After `--` every argument is a value.
        let args = os(&["render", "--gpus", "0", "--", "--gpus"]);
        assert_eq!(worker_args(&args, shard), os(&["render", "--shard", "1/3", "--", "--gpus"]));
    }

    #[test]
    fn the_scheduler_variables_conflict_with_gpus() {
        assert!(scheduler_conflict(|_| None).is_ok());
        let e = scheduler_conflict(|n| (n == "JOB_COMPLETION_INDEX").then(|| "3".to_string())).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--gpus and JOB_COMPLETION_INDEX=3"), "{e}");
    }

    #[test]
    fn a_signal_counts_as_128_plus_its_number() {
        assert_eq!(status_code(ExitStatus::from_raw(2 << 8)), 2);
        assert_eq!(status_code(ExitStatus::from_raw(libc::SIGTERM)), 128 + libc::SIGTERM);
    }
}
