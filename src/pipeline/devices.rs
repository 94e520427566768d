//! One clip over several devices of this host (`celframe render CONFIG --gpus LIST --split
//! windows|cfg`).
//!
//! **Windows** (`SplitMode::Windows`): every model is loaded once per device (the checkpoints are
//! opened and memory-mapped once; each device converts and uploads its own copy, with the LoRA
//! group's set switched or merged as on one device), and each sampler evaluation's context windows
//! are dealt round-robin: window k runs on device k mod N. The lead device (the first listed) runs
//! on the render's own thread, which also encodes the prompts, decodes, fuses and steps the
//! sampler; every other device has a thread of its own with its own `Gpu` (context, stream,
//! cuBLASLt and cuDNN handles), models, scratch arena and control-input cache. Each window's model
//! call is exactly the one-device call (the same `[uncond..., cond...]` batch, the same inputs), its
//! prediction comes back to the host as on one device, and the lead fuses the predictions in window
//! order, so the frames are the one-device frames byte for byte. Windows have equal lengths, so an
//! evaluation takes ceil(windows / N) window calls on the busiest device: a 10 s clip at 8 fps (80
//! frames) with the default context options (16 frames, overlap 4, uniform standard) has 7 or 8
//! windows a step (7, 7, 7, 8 over 4 LCM steps: 29 window calls), so with 2 devices 16 calls (a
//! speed-up of at most 1.81x), with 4 devices 8 calls (3.62x), with 8 devices 4 calls (7.25x).
//!
//! **CFG halves** (`SplitMode::Cfg`, for clips of one window): exactly two devices; the lead runs
//! each window's unconditional half, the other device its conditional half, and the lead combines
//! them with the guidance scale as one device does. Each half is a batch of its own, so a GPU's
//! BLAS may pick other kernels than for the whole batch: the result is close to the one-device
//! render, not equal to it on CUDA (the CPU twins compute every row alone, so there it is equal).
//!
//! **Why threads in one process** rather than a process per GPU with NCCL: the fuse and the sampler
//! step already run on the host over host latents (a window's prediction is downloaded by the
//! one-device path too), so a window's result has nowhere better to go than the lead's memory; a
//! thread hands it over through a channel with no copy, and one process keeps one stop flag, one
//! resume folder and one outputs tree. The per-window traffic (the window's latents up, its
//! prediction down: a few MB at 1024x576) is small beside a window's UNet time.
//!
//! **Stopping**: a device thread looks at the stop flag before each window it runs; the lead gathers
//! every window's answer before it returns, so after a stop (or any error) no device is still
//! working on the step, and the saved state is the one-device state (nothing is saved mid-step).

use std::cell::Cell;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::Scope;
use std::time::Instant;

use indicatif::ProgressBar;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::models::lora::device::Restore;
use crate::ops::Exec;
use crate::pipeline::config::RenderConfig;
use crate::pipeline::render::{
    Checkpoints, ClipInputs, Geometry, GpuModels, Half, HostGroup, InputCache, Models, Part, Step, Target, WindowRun,
    denoise_window, prepare_group,
};
use crate::pipeline::resume::check_stop;
use crate::tensor::DType;

/// How one clip's work is divided among the devices of a split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitMode {
    /// Each evaluation's context windows, round-robin.
    Windows,
    /// The unconditional and conditional halves of each CFG batch, on exactly two devices.
    Cfg,
}

/// `--split windows|cfg` over `devices` (CUDA ordinals as this process sees them; on the CPU, one
/// CPU "device" per entry, a thread each). An ordinal listed twice gets two threads on one GPU,
/// each with its own models and half the scratch memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSplit {
    pub mode: SplitMode,
    pub devices: Vec<usize>,
}

impl DeviceSplit {
    /// Refuses a split that cannot work with `config`, naming the flags.
    pub fn check(&self, config: &RenderConfig) -> Result<()> {
        match self.mode {
            SplitMode::Windows if self.devices.is_empty() => {
                Err(Error::Input("--split windows: --gpus lists no device".into()))
            }
            SplitMode::Cfg if self.devices.len() != 2 => Err(Error::Input(format!(
                "--split cfg runs the two halves of the CFG batch on two devices; --gpus lists {} (give two, such \
                 as --gpus 0,1, or use --split windows)",
                self.devices.len()
            ))),
            SplitMode::Cfg if config.sampler.cfg <= 1.0 => Err(Error::Input(format!(
                "--split cfg: sampler.cfg is {}, so there is no unconditional half to split off (use a cfg above 1, \
                 or --split windows)",
                config.sampler.cfg
            ))),
            _ => Ok(()),
        }
    }
}

/// One window of an evaluation, for whichever device runs it.
pub(super) struct WindowJob {
    /// Clip frame indices.
    pub(super) frames: Vec<usize>,
    /// The window's frame-major model inputs.
    pub(super) latents: Vec<f32>,
    pub(super) step: Step,
}

/// An evaluation's model outputs, one per window in window order (`denoise_window`'s, the halves
/// joined), and with a split a line saying which device ran what.
pub(super) struct StepDone {
    pub(super) outputs: Vec<Vec<f32>>,
    pub(super) devices: Option<String>,
}

/// Where a device thread keeps its models.
#[derive(Clone, Copy)]
pub(super) enum HelperKind {
    Cpu,
    /// `reserve`: device bytes the scratch arena leaves for LoRA switching (`lora_reserve`).
    Cuda {
        restore: Restore,
        reserve: usize,
    },
}

enum Job {
    /// Prepare the models for this LoRA group (the group's config).
    Group { config: Box<RenderConfig>, reply: Sender<Result<Vec<String>>> },
    /// Run `part` of these windows (index in the evaluation, window) of clip `clip`; `run` is new
    /// for every sampling run, whose cached inputs it shares.
    Windows {
        run: u64,
        clip: Arc<ClipInputs>,
        g: Geometry,
        part: Part,
        windows: Vec<(usize, WindowJob)>,
        reply: Sender<Done>,
    },
}

/// A window a device thread ran.
struct Done {
    /// Position in the device list.
    device: usize,
    /// The window's index in the evaluation.
    index: usize,
    result: Result<Vec<f32>>,
    seconds: f64,
}

struct Helper {
    jobs: Sender<Job>,
}

/// The devices of a render: the lead (the render's own thread) and, with a split, a thread per
/// further device.
pub(super) struct Devices {
    mode: Option<SplitMode>,
    /// "gpu K" or "cpu K", lead first.
    labels: Vec<String>,
    helpers: Vec<Helper>,
    runs: Cell<u64>,
}

impl Devices {
    /// The lead alone: every window on the render's thread, as without a split.
    pub(super) fn lead_only() -> Devices {
        Devices { mode: None, labels: Vec::new(), helpers: Vec::new(), runs: Cell::new(0) }
    }

    /// Starts a thread per device of `split` after the first (the lead's); on CUDA each opens its
    /// GPU before this returns (an error ends them all).
    pub(super) fn spawn<'scope, 'env>(
        scope: &'scope Scope<'scope, 'env>,
        split: &DeviceSplit,
        checkpoints: &'env Checkpoints,
        kind: HelperKind,
        dtype: DType,
    ) -> Result<Devices> {
        let labels: Vec<String> = match kind {
            HelperKind::Cpu => (0..split.devices.len()).map(|k| format!("cpu {k}")).collect(),
            HelperKind::Cuda { .. } => split.devices.iter().map(|o| format!("gpu {o}")).collect(),
        };
        let (ready_tx, ready_rx) = channel();
        let mut helpers = Vec::new();
        for (position, &ordinal) in split.devices.iter().enumerate().skip(1) {
            let (jobs, queue) = channel();
            let ready = ready_tx.clone();
            let sharing = sharing(&split.devices, ordinal);
            let label = labels[position].clone();
            scope.spawn(move || serve(position, label, ordinal, sharing, kind, checkpoints, dtype, queue, ready));
            helpers.push(Helper { jobs });
        }
        drop(ready_tx);
        for _ in 0..helpers.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::Internal("a device thread ended while starting".into())),
            }
        }
        Ok(Devices { mode: Some(split.mode), labels, helpers, runs: Cell::new(0) })
    }

    /// True when the CFG halves run on two devices.
    pub(super) fn splits_cfg(&self) -> bool {
        self.mode == Some(SplitMode::Cfg)
    }

    /// A line for the summary saying how the work is split (None without a split).
    pub(super) fn describe(&self) -> Option<String> {
        let list = self.labels.join(", ");
        match self.mode? {
            SplitMode::Windows => Some(format!(
                "split: each step's context windows over {list} (window k on device k mod {})",
                self.labels.len()
            )),
            SplitMode::Cfg => Some(format!(
                "split: the CFG halves over {list} (unconditional on {}, conditional on {})",
                self.labels[0], self.labels[1]
            )),
        }
    }

    /// Asks every device thread to prepare `group`'s models; `finish_group` collects the answers.
    pub(super) fn begin_group(&self, group: &RenderConfig) -> Vec<Result<Receiver<Result<Vec<String>>>>> {
        self.helpers
            .iter()
            .map(|h| {
                let (reply, answer) = channel();
                h.jobs.send(Job::Group { config: Box::new(group.clone()), reply }).map_err(|_| ended())?;
                Ok(answer)
            })
            .collect()
    }

    /// The device threads' summary lines for the group begun by `begin_group`, each after its
    /// device's label; the first device's error if one failed.
    pub(super) fn finish_group(&self, pending: Vec<Result<Receiver<Result<Vec<String>>>>>) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        let mut failure = None;
        for (k, answer) in pending.into_iter().enumerate() {
            let label = &self.labels[k + 1];
            let result = answer.and_then(|a| a.recv().map_err(|_| ended())?);
            match result {
                Ok(own) => lines.extend(own.into_iter().map(|l| format!("{label}: {l}"))),
                Err(e) => {
                    failure.get_or_insert(e.with_prefix(&format!("{label}: ")));
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(lines),
        }
    }

    /// A new sampling run's number (the device threads clear their cached inputs on a new one).
    pub(super) fn next_run(&self) -> u64 {
        let run = self.runs.get() + 1;
        self.runs.set(run);
        run
    }

    /// Runs an evaluation's windows: without a split all of them here, in order; with one, the
    /// lead's share here while the device threads run theirs, then every answer is gathered before
    /// this returns (the first error in window order wins).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_step(
        &self,
        lead: &WindowRun,
        clip: &Arc<ClipInputs>,
        g: Geometry,
        run: u64,
        jobs: Vec<WindowJob>,
        cache: &mut InputCache,
        bar: &ProgressBar,
    ) -> Result<StepDone> {
        let windows = jobs.len();
        let mut lead_window = |k: usize, job: &WindowJob, part: Part| {
            bar.set_message(format!("window {}/{windows}", k + 1));
            denoise_window(lead, g, &job.frames, &job.latents, job.step, part, cache)
        };
        let Some(mode) = self.mode else {
            let outputs =
                jobs.iter().enumerate().map(|(k, job)| lead_window(k, job, Part::Both)).collect::<Result<_>>()?;
            return Ok(StepDone { outputs, devices: None });
        };
        let devices = self.labels.len();
        let (reply, answers) = channel();
        let mut ran: Vec<Vec<usize>> = vec![Vec::new(); devices];
        let mut seconds = vec![0f64; devices];
        let mut expected = 0;
        let mut lead_results: Vec<(usize, Result<Vec<f32>>)> = Vec::new();
        let send = |helper: &Helper, part: Part, list: Vec<(usize, WindowJob)>| {
            let clip = Arc::clone(clip);
            helper
                .jobs
                .send(Job::Windows { run, clip, g, part, windows: list, reply: reply.clone() })
                .map_err(|_| ended())
        };
        let started = Instant::now();
        match mode {
            SplitMode::Windows => {
                let mut lists: Vec<Vec<(usize, WindowJob)>> = (0..devices).map(|_| Vec::new()).collect();
                for (k, job) in jobs.into_iter().enumerate() {
                    ran[k % devices].push(k);
                    lists[k % devices].push((k, job));
                }
                let mut lists = lists.into_iter();
                let mine = lists.next().unwrap_or_default();
                for (helper, list) in self.helpers.iter().zip(lists) {
                    if !list.is_empty() {
                        expected += list.len();
                        send(helper, Part::Both, list)?;
                    }
                }
                for (k, job) in &mine {
                    let result = lead_window(*k, job, Part::Both);
                    let failed = result.is_err();
                    lead_results.push((*k, result));
                    if failed {
                        break; // the step fails; the rest of the lead's windows would be wasted
                    }
                }
            }
            SplitMode::Cfg => {
                let copies: Vec<(usize, WindowJob)> = jobs
                    .iter()
                    .enumerate()
                    .map(|(k, j)| (k, WindowJob { frames: j.frames.clone(), latents: j.latents.clone(), step: j.step }))
                    .collect();
                expected = copies.len();
                ran[1] = (0..windows).collect();
                send(&self.helpers[0], Part::Half(Half::Cond), copies)?;
                ran[0] = (0..windows).collect();
                for (k, job) in jobs.iter().enumerate() {
                    let result = lead_window(k, job, Part::Half(Half::Uncond));
                    let failed = result.is_err();
                    lead_results.push((k, result));
                    if failed {
                        break;
                    }
                }
            }
        }
        seconds[0] = started.elapsed().as_secs_f64();
        // The device threads hold the only senders now: a thread that ends shows as a closed channel.
        drop(reply);
        let mut theirs: Vec<Option<Result<Vec<f32>>>> = (0..windows).map(|_| None).collect();
        for _ in 0..expected {
            let done = answers.recv().map_err(|_| ended())?;
            seconds[done.device] += done.seconds;
            theirs[done.index] = Some(done.result);
        }
        let mut mine: Vec<Option<Result<Vec<f32>>>> = (0..windows).map(|_| None).collect();
        for (k, result) in lead_results {
            mine[k] = Some(result);
        }
        let mut outputs = Vec::with_capacity(windows);
        for (k, (lead_part, other_part)) in mine.into_iter().zip(theirs).enumerate() {
            let out = match (mode, lead_part, other_part) {
                (SplitMode::Windows, Some(out), None) | (SplitMode::Windows, None, Some(out)) => out?,
                (SplitMode::Cfg, Some(uncond), Some(cond)) => {
                    let mut both = uncond?;
                    both.extend(cond?);
                    both
                }
                _ => return Err(Error::Internal(format!("window {} of the step got no answer or two", k + 1))),
            };
            outputs.push(out);
        }
        let what = |k: usize| match mode {
            SplitMode::Windows => {
                let list: Vec<String> = ran[k].iter().map(|w| (w + 1).to_string()).collect();
                format!("window{} {}", if list.len() == 1 { "" } else { "s" }, list.join(","))
            }
            SplitMode::Cfg if k == 0 => format!("uncond of {windows} window(s)"),
            SplitMode::Cfg => format!("cond of {windows} window(s)"),
        };
        let line: Vec<String> =
            (0..devices).map(|k| format!("{}: {} in {:.2} s", self.labels[k], what(k), seconds[k])).collect();
        Ok(StepDone { outputs, devices: Some(line.join("; ")) })
    }
}

/// How many entries of `devices` name `ordinal` (threads sharing one GPU share its memory).
fn sharing(devices: &[usize], ordinal: usize) -> usize {
    devices.iter().filter(|&&o| o == ordinal).count()
}

/// Threads of the lead's device (`devices[0]`) for the scratch arena's share; 1 without a split.
pub(super) fn lead_sharing(split: Option<&DeviceSplit>) -> usize {
    split.and_then(|s| s.devices.first().map(|&o| sharing(&s.devices, o))).unwrap_or(1)
}

fn ended() -> Error {
    Error::Internal("a device thread of the split has ended".into())
}

/// A device thread's models.
#[allow(clippy::large_enum_variant)] // one per device thread, made once and never moved
enum Held {
    Cpu(Option<Models>),
    Cuda { gpu: Gpu, loaded: Option<GpuModels> },
}

impl Held {
    fn window_run<'a>(&'a self, clip: &'a ClipInputs, dtype: DType) -> Result<WindowRun<'a>> {
        let missing = || Error::Internal("a device thread was given windows before its models".into());
        let (models, target) = match self {
            Held::Cpu(models) => (models.as_ref().ok_or_else(missing)?, Target { ex: Exec::Cpu, dtype }),
            Held::Cuda { gpu, loaded } => {
                let m = loaded.as_ref().ok_or_else(missing)?;
                (&m.models, Target { ex: Exec::Cuda { gpu, scratch: &m.scratch }, dtype })
            }
        };
        Ok(WindowRun { config: &clip.config, models, target, cond: &clip.cond, controls: &clip.controls })
    }
}

/// A device thread: opens its device, says so on `ready`, then serves `jobs` until the lead drops
/// their sender.
#[allow(clippy::too_many_arguments)]
fn serve(
    position: usize,
    label: String,
    ordinal: usize,
    sharing: usize,
    kind: HelperKind,
    checkpoints: &Checkpoints,
    dtype: DType,
    jobs: Receiver<Job>,
    ready: Sender<Result<()>>,
) {
    let mut held = match kind {
        HelperKind::Cpu => Held::Cpu(None),
        HelperKind::Cuda { .. } => match Gpu::new(ordinal) {
            Ok(gpu) => Held::Cuda { gpu, loaded: None },
            Err(e) => {
                let _ = ready.send(Err(e.with_prefix(&format!("{label}: "))));
                return;
            }
        },
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    let mut cache = InputCache::default();
    let mut current_run = 0;
    for job in jobs {
        match job {
            Job::Group { config, reply } => {
                let prepared = match (&mut held, kind) {
                    (Held::Cpu(models), _) => {
                        *models = None;
                        let started = Instant::now();
                        checkpoints.resolve_loras(&config).and_then(|loras| {
                            *models = Some(Models::on_host(checkpoints, loras.as_ref(), dtype, config.fp8()?)?);
                            Ok(vec![format!("loaded the models in {:.1} s", started.elapsed().as_secs_f64())])
                        })
                    }
                    (Held::Cuda { gpu, loaded }, HelperKind::Cuda { restore, reserve }) => {
                        HostGroup::new(checkpoints, &config, None).and_then(|host| {
                            prepare_group(gpu, checkpoints, &config, host, restore, reserve, sharing, loaded)
                                .map(|(lines, _)| lines)
                        })
                    }
                    (Held::Cuda { .. }, HelperKind::Cpu) => {
                        Err(Error::Internal("a CUDA device thread of a CPU run".into()))
                    }
                };
                cache = InputCache::default();
                if reply.send(prepared).is_err() {
                    return;
                }
            }
            Job::Windows { run, clip, g, part, windows, reply } => {
                if run != current_run {
                    cache = InputCache::default();
                    current_run = run;
                }
                for (index, job) in windows {
                    let started = Instant::now();
                    let result = check_stop(|| {
                        format!(
                            "{label}, before window {}/{} of step {}/{}",
                            index + 1,
                            job.step.windows,
                            job.step.index + 1,
                            job.step.of
                        )
                    })
                    .and_then(|()| held.window_run(&clip, dtype))
                    .and_then(|w| denoise_window(&w, g, &job.frames, &job.latents, job.step, part, &mut cache));
                    let done = Done { device: position, index, result, seconds: started.elapsed().as_secs_f64() };
                    if reply.send(done).is_err() {
                        return;
                    }
                }
            }
        }
    }
}
