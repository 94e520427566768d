//! Batches: a render config with many clips (the manifest), checked in full before any weight is
//! converted (`preflight`), its clips split into shards for job arrays (`Shard`), ordered so a
//! LoRA set is merged once (`lora_groups`), and the run report (`RunReport`).
//!
//! Sharding is stable: clips are sorted by id, and shard I of N takes the clips at positions p
//! with p mod N = I. Every shard reads the same manifest, so the shards partition its clips; each
//! writes only its clips' folders and its own report, `configs/run_report.shard-I-of-N.json`, and
//! `celframe merge-report` combines them into `configs/run_report.json` and the prompt grid.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::clip::{TextEncoderKind, open_text_encoder};
use crate::models::controlnet::open_controlnet_with_base;
use crate::models::lora::{self, Targets};
use crate::models::vae::open_vae;
use crate::models::{open_motion, open_unet};
use crate::output::{GridCell, OutputTree, decode_png};
use crate::pipeline::config::{Component, LoraEntry, RenderConfig, problems_error};
use crate::pipeline::render::control_hints;
use crate::text::prompt::parse_prompt;

/// The combined report's file name under `configs/`.
pub const REPORT: &str = "run_report.json";

/// Shard `index` of `count` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// Most shards of one manifest.
const MAX_SHARDS: usize = 100_000;

impl Shard {
    /// A shard, checked: 0 <= index < count.
    pub fn new(index: usize, count: usize, what: &str) -> Result<Shard> {
        if count == 0 || count > MAX_SHARDS {
            return Err(Error::Input(format!("{what}: {count} shards; give 1..={MAX_SHARDS}")));
        }
        if index >= count {
            return Err(Error::Input(format!("{what}: shard {index} of {count}; shards are numbered 0..{count}")));
        }
        Ok(Shard { index, count })
    }

    /// `I/N`, as `--shard` takes it.
    pub fn parse(text: &str) -> Result<Shard> {
        let parsed = text.split_once('/').and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        let Some((index, count)) = parsed else {
            return Err(Error::Input(format!("--shard {text:?}: give I/N, shard I (from 0) of N, such as 0/4")));
        };
        Shard::new(index, count, &format!("--shard {text}"))
    }

    /// The shard the job scheduler gives this process, read through `var`: Slurm job arrays
    /// (SLURM_ARRAY_TASK_ID counted from SLURM_ARRAY_TASK_MIN, of SLURM_ARRAY_TASK_COUNT unless
    /// `count` is given) or Kubernetes Indexed Jobs (JOB_COMPLETION_INDEX, of `count`, which
    /// Kubernetes does not export: `--shard-count` or CELFRAME_SHARD_COUNT). None outside both.
    pub fn from_scheduler(var: impl Fn(&str) -> Option<String>, count: Option<usize>) -> Result<Option<Shard>> {
        let number = |name: &str| -> Result<Option<usize>> {
            match var(name) {
                None => Ok(None),
                Some(v) => {
                    v.trim().parse().map(Some).map_err(|_| Error::Input(format!("{name}={v:?}: not a whole number")))
                }
            }
        };
        let count = match count {
            Some(n) => Some(n),
            None => number("CELFRAME_SHARD_COUNT")?,
        };
        if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
            let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let Some(count) = count.or(number("SLURM_ARRAY_TASK_COUNT")?) else {
                return Err(Error::Input(
                    "SLURM_ARRAY_TASK_ID is set but not SLURM_ARRAY_TASK_COUNT; give --shard-count".into(),
                ));
            };
            let index = id
                .checked_sub(min)
                .ok_or_else(|| Error::Input(format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}")))?;
            // Slurm allows stepped arrays (--array=0-9:2), whose ids are not consecutive.
            return Shard::new(
                index,
                count,
                "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN (use --array=0-N with step 1)",
            )
            .map(Some);
        }
        if let Some(index) = number("JOB_COMPLETION_INDEX")? {
            let Some(count) = count else {
                return Err(Error::Input(
                    "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but not the shard count: give \
                     --shard-count or CELFRAME_SHARD_COUNT (the Job's completions)"
                        .into(),
                ));
            };
            return Shard::new(index, count, "JOB_COMPLETION_INDEX").map(Some);
        }
        match count {
            Some(n) => Err(Error::Input(format!(
                "a shard count ({n}) without a shard index: give --shard I/{n}, or run in a Slurm job array or a \
                 Kubernetes Indexed Job"
            ))),
            None => Ok(None),
        }
    }

    /// `run_report.shard-I-of-N.json`.
    pub fn report_name(&self) -> String {
        format!("run_report.shard-{}-of-{}.json", self.index, self.count)
    }
}

/// The clips (indices, in manifest order) that `shard` renders; all without one.
pub fn shard_clips(config: &RenderConfig, shard: Option<Shard>) -> Vec<usize> {
    let Some(shard) = shard else { return (0..config.clips.len()).collect() };
    let mut by_id: Vec<(String, usize)> = (0..config.clips.len()).map(|i| (config.clip_id(i), i)).collect();
    by_id.sort();
    let mut mine: Vec<usize> =
        by_id.into_iter().enumerate().filter(|(p, _)| p % shard.count == shard.index).map(|(_, (_, i))| i).collect();
    mine.sort_unstable();
    mine
}

/// `clips` grouped by LoRA set, so each set is merged into the weights once: the groups in the
/// order their sets first appear, each group's clips in manifest order.
pub fn lora_groups(config: &RenderConfig, clips: &[usize]) -> Vec<(Vec<LoraEntry>, Vec<usize>)> {
    let mut groups: Vec<(Vec<LoraEntry>, Vec<usize>)> = Vec::new();
    for &i in clips {
        let set = config.clip_loras(i);
        match groups.iter_mut().find(|(s, _)| s.as_slice() == set) {
            Some((_, members)) => members.push(i),
            None => groups.push((set.to_vec(), vec![i])),
        }
    }
    groups
}

/// Checks everything before a weight is converted, listing every problem in one `Error::Input`:
/// the config's rules (`RenderConfig::validate`), then what needs the files read: prompts parse,
/// every checkpoint's header parses, every LoRA set resolves against the models (each key names a
/// module of the right shape), every clip's control inputs decode.
pub fn preflight(config: &RenderConfig) -> Result<()> {
    let rules = config.problems();
    let mut problems = rules.clone();
    let clear =
        |problems: &[String], prefixes: &[&str]| !problems.iter().any(|p| prefixes.iter().any(|x| p.starts_with(x)));
    for (i, clip) in config.clips.iter().enumerate() {
        for (what, text) in
            clip.prompt_keys().iter().map(|k| ("prompt", &k.prompt)).chain([("negative", &clip.negative)])
        {
            if let Err(e) = parse_prompt(text) {
                problems.push(format!("clips[{i}].{what}: {}", message(e)));
            }
        }
    }
    if clear(&problems, &["models"]) {
        match lora_targets(config) {
            Err(e) => problems.push(format!("models: {}", message(e))),
            Ok(targets) => {
                let mut seen: Vec<&[LoraEntry]> = Vec::new();
                for i in 0..config.clips.len().max(1) {
                    let set = config.clip_loras(i);
                    if set.is_empty() || seen.contains(&set) {
                        continue;
                    }
                    seen.push(set);
                    let field = match config.clips.get(i).and_then(|c| c.loras.as_ref()) {
                        Some(_) => format!("clips[{i}].loras"),
                        None => "loras".into(),
                    };
                    if !clear(&problems, &[&field]) {
                        continue;
                    }
                    let specs = config.for_clip(i).lora_specs();
                    if let Err(e) = specs.and_then(|s| lora::resolve(&s, &targets, false)) {
                        problems.push(format!("{field}: {}", message(e)));
                    }
                }
            }
        }
        // A Control-LoRA is built on the UNet, as the render builds it.
        let base = config.models.component(Component::Unet).ok();
        for (k, net) in config.controlnets.iter().enumerate() {
            if let Err(e) = open_controlnet_with_base(&net.path, base.as_deref()) {
                problems.push(format!("controlnets[{k}].path: {}", message(e)));
            }
        }
    }
    if clear(&rules, &["video", "controlnets"]) {
        control_problems(config, &rules, &mut problems);
    }
    problems_error(problems)
}

/// Every checkpoint opened (headers and configs parsed; weights only mapped) and the modules a
/// LoRA may adapt.
fn lora_targets(config: &RenderConfig) -> Result<Targets> {
    let models = &config.models;
    let unet = open_unet(&models.component(Component::Unet)?)?;
    open_vae(&models.component(Component::Vae)?)?;
    let mut targets = Targets::new();
    targets.add_unet(&unet)?;
    for (component, kind) in
        [(Component::TextEncoder, TextEncoderKind::ClipL), (Component::TextEncoder2, TextEncoderKind::ClipG)]
    {
        targets.add_text_encoder(&open_text_encoder(&models.component(component)?, kind)?)?;
    }
    if let Some(path) = &models.motion_adapter {
        let motion = open_motion(path)?;
        motion.config.check_unet(&unet.config)?;
        targets.add_motion(&motion)?;
    }
    Ok(targets)
}

/// Decodes every clip's control inputs once per distinct (inputs, length), as the render will;
/// clips that break a rule (`rules`) are left out.
fn control_problems(config: &RenderConfig, rules: &[String], problems: &mut Vec<String>) {
    let video = &config.video;
    let mut checked: HashMap<(PathBuf, usize), ()> = HashMap::new();
    for i in 0..config.clips.len() {
        let field = format!("clips[{i}]");
        if rules.iter().any(|p| p.starts_with(&field)) {
            continue;
        }
        let frames = config.clip_frames(i);
        for (k, net) in config.for_clip(i).controlnets.iter().enumerate() {
            // A Union entry's images are its conditions'.
            for (j, hint) in net.hint_entries().iter().enumerate() {
                if checked.insert((hint.images.clone(), frames), ()).is_some() {
                    continue;
                }
                let hints = control_hints(hint, frames, video.fps, video.width as u32, video.height as u32);
                if let Err(e) = hints {
                    let at = if net.is_union() { format!("conditions[{j}].images") } else { "images".into() };
                    problems.push(format!("clips[{i}] ({}) controlnets[{k}].{at}: {}", config.clip_id(i), message(e)));
                }
            }
        }
    }
}

fn message(e: Error) -> String {
    match e {
        Error::Input(m) => m,
        other => other.to_string(),
    }
}

/// What became of one clip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipRecord {
    pub index: usize,
    pub id: String,
    /// Relative to the outputs root: `video/clip_NNN`.
    pub folder: String,
    pub prompt: String,
    /// pending (not reached yet), done, skipped (complete from an earlier run), failed, or
    /// interrupted (stopped by SIGINT/SIGTERM; a rerun resumes it).
    pub status: String,
    /// The failure, and the exit code it carries (2 bad input, 4 CUDA, 5 internal).
    pub error: Option<String>,
    pub exit_code: Option<u8>,
    pub frames: usize,
    /// Seconds per stage of a rendered clip.
    pub seconds: Option<ClipSeconds>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClipSeconds {
    pub text: f64,
    pub denoise: f64,
    pub decode_and_write: f64,
    /// From the clip's start to its folder in place (or its failure).
    pub total: f64,
}

/// `configs/run_report.json`, or one shard's part of it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// The shard this report covers; None for a whole run or a merged report.
    pub shard: Option<Shard>,
    /// How many shard reports a merged report combines.
    pub merged_shards: Option<usize>,
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
    pub pending: usize,
    #[serde(default)]
    pub interrupted: usize,
    /// In manifest order.
    pub clips: Vec<ClipRecord>,
}

impl RunReport {
    /// A report of `clips` (indices), each pending.
    pub fn pending(config: &RenderConfig, shard: Option<Shard>, clips: &[usize]) -> RunReport {
        let clips = clips
            .iter()
            .map(|&i| ClipRecord {
                index: i,
                id: config.clip_id(i),
                folder: format!("video/clip_{:03}", i + 1),
                prompt: config.clips[i].prompt.clone(),
                status: "pending".into(),
                error: None,
                exit_code: None,
                frames: config.clip_frames(i),
                seconds: None,
            })
            .collect();
        let mut report = RunReport { shard, clips, ..Default::default() };
        report.count();
        report
    }

    /// The record of clip `index`.
    pub fn record(&mut self, index: usize) -> Option<&mut ClipRecord> {
        self.clips.iter_mut().find(|c| c.index == index)
    }

    /// Recounts the totals from the records.
    pub fn count(&mut self) {
        let n = |s: &str| self.clips.iter().filter(|c| c.status == s).count();
        (self.done, self.skipped, self.failed, self.pending, self.interrupted) =
            (n("done"), n("skipped"), n("failed"), n("pending"), n("interrupted"));
    }

    /// Its file name under `configs/`.
    pub fn file_name(&self) -> String {
        self.shard.map_or_else(|| REPORT.to_string(), |s| s.report_name())
    }

    pub fn write(&mut self, tree: &OutputTree) -> Result<PathBuf> {
        self.count();
        let value = serde_json::to_value(&*self).map_err(|e| Error::Internal(format!("{}: {e}", self.file_name())))?;
        tree.write_config(&self.file_name(), &value)
    }
}

/// The prompt grid of an outputs tree: each clip's first frame (where it has PNG frames) captioned
/// with its prompt, in clip order, as `images/prompt_grid_NAME.png` with NAME the root folder's.
pub fn write_prompt_grid(tree: &OutputTree, clips: &[(usize, String)]) -> Result<Option<PathBuf>> {
    let mut grid = Vec::new();
    for (index, prompt) in clips {
        let first = tree.clip_dir(*index as u32 + 1).join("frames").join("000000.png");
        if let Ok(bytes) = std::fs::read(&first) {
            grid.push(GridCell { image: decode_png(&bytes)?, caption: prompt.clone() });
        }
    }
    if grid.is_empty() {
        return Ok(None);
    }
    let name = tree.root().file_name().map_or("render".to_string(), |n| n.to_string_lossy().to_string());
    tree.write_prompt_grid(&name, &grid).map(Some)
}

/// Largest shard report read.
const REPORT_LIMIT: u64 = 64 << 20;

/// `celframe merge-report`: reads every `configs/run_report.shard-I-of-N.json` under `root`
/// (all N of one N, none missing), writes the combined `configs/run_report.json` and the prompt
/// grid, and returns the combined report.
pub fn merge_reports(root: &Path) -> Result<(RunReport, Option<PathBuf>)> {
    let configs = root.join("configs");
    let entries = std::fs::read_dir(&configs)
        .map_err(|e| Error::Input(format!("{}: cannot list ({e}); is it an outputs tree?", configs.display())))?;
    let mut shards: Vec<(Shard, RunReport)> = Vec::new();
    for entry in entries {
        let path =
            entry.map_err(|e| Error::Io { context: format!("listing {}", configs.display()), source: e })?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !(name.starts_with("run_report.shard-") && name.ends_with(".json")) {
            continue;
        }
        let text = crate::io::read_text(&path, REPORT_LIMIT, "shard run report")?;
        let report: RunReport =
            serde_json::from_str(&text).map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
        let Some(shard) = report.shard.filter(|s| s.report_name() == name) else {
            return Err(Error::Input(format!("{}: its shard field does not match its name", path.display())));
        };
        shards.push((shard, report));
    }
    let Some(count) = shards.first().map(|(s, _)| s.count) else {
        return Err(Error::Input(format!(
            "{}: no run_report.shard-I-of-N.json (render with --shard or in a job array first)",
            configs.display()
        )));
    };
    if let Some((other, _)) = shards.iter().find(|(s, _)| s.count != count) {
        return Err(Error::Input(format!(
            "{}: shard reports of {count} and of {} shards; remove the stale ones",
            configs.display(),
            other.count
        )));
    }
    let missing: Vec<String> =
        (0..count).filter(|i| !shards.iter().any(|(s, _)| s.index == *i)).map(|i| i.to_string()).collect();
    if !missing.is_empty() {
        return Err(Error::Input(format!(
            "{}: no report of shard{} {} of {count}; has every shard run?",
            configs.display(),
            if missing.len() > 1 { "s" } else { "" },
            missing.join(", ")
        )));
    }
    let mut clips: Vec<ClipRecord> = shards.into_iter().flat_map(|(_, r)| r.clips).collect();
    clips.sort_by_key(|c| c.index);
    if let Some(pair) = clips.windows(2).find(|w| w[0].index == w[1].index) {
        return Err(Error::Input(format!(
            "{}: clip {} ({}) is in two shard reports; were the shards run on different manifests?",
            configs.display(),
            pair[0].index + 1,
            pair[0].id
        )));
    }
    let tree = OutputTree::open(root)?;
    let mut report = RunReport { merged_shards: Some(count), clips, ..Default::default() };
    report.write(&tree)?;
    let cells: Vec<(usize, String)> = report.clips.iter().map(|c| (c.index, c.prompt.clone())).collect();
    let grid = write_prompt_grid(&tree, &cells)?;
    Ok((report, grid))
}
