//! Resuming an interrupted render, and stopping one cleanly.
//!
//! **Saved latents.** While clip NNN renders, `video/.clip_NNN.resume/` holds its finished
//! denoising work, each file written atomically (`weights::save`: temporary name, sync, rename):
//! - segment chaining (`video.long_video = "chain"`): `segment_MMM.safetensors`, segment MMM's
//!   latents (from 1), after it is denoised;
//! - context windows (every window advances each step, so nothing finishes before the whole clip):
//!   `pass_KKK.safetensors`, the clip's latents after sampling pass KKK, the FreeInit pass (one pass
//!   without FreeInit): the last pass is the latents the VAE decodes, so a kill during decode and
//!   write does not redo the denoise. Only the newest pass is kept.
//!
//! Each file carries the clip's identity, a SHA-256 of what decides its latents: the clip's
//! resolved settings, seed, index, frames, dtype, device, injected noise file and the size and
//! modification time of every model, LoRA and control file. A rerun takes the saved files of the
//! same identity and continues after the last one, which gives the bytes an uninterrupted run gives
//! (noise is drawn per frame and pass from counters, not from a running generator); files of
//! another identity are ignored, said so, and removed. The folder goes once the clip is complete
//! (`ClipWriter::finish`, and `OutputTree::open` for a complete clip's leftover).
//!
//! **Stopping.** The first SIGINT or SIGTERM (`cli::render` installs the handlers) sets the stop
//! flag; the render looks at it before each sampler step, after each saved segment or pass, while
//! decoding (between VAE chunks; the clip's partial folder is then removed) and before each clip,
//! and returns [`Error::Interrupted`]: the clip is recorded as interrupted in the run report and
//! the process exits with 128 + the signal (130, 143). No file is ever cut short: saves and clip
//! renames run to completion before the flag is looked at again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::UNIX_EPOCH;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::pipeline::config::RenderConfig;
use crate::tensor::{DType, Tensor};
use crate::weights;

static STOP: LazyLock<Arc<AtomicUsize>> = LazyLock::new(|| Arc::new(AtomicUsize::new(0)));

/// The process's stop flag: 0, or the number of the signal that asked to stop. Signal handlers
/// store into it (`signal_hook::flag::register_usize`); renders poll it.
pub fn stop_flag() -> Arc<AtomicUsize> {
    Arc::clone(&STOP)
}

/// `Error::Interrupted` if a stop was asked for; `at` says where the render stands.
pub(crate) fn check_stop(at: impl FnOnce() -> String) -> Result<()> {
    match STOP.load(Ordering::SeqCst) {
        0 => Ok(()),
        signal => Err(Error::Interrupted { signal: signal as i32, at: at() }),
    }
}

/// The signal that asked to stop, if one did.
pub(crate) fn stop_signal() -> Option<i32> {
    match STOP.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal as i32),
    }
}

/// Most files stamped for one clip (a diffusers model folder holds a few dozen; a folder of
/// control frames hundreds), so a path naming a huge tree costs bounded time.
const MAX_STAMPED: usize = 10_000;
/// Folder depth walked under a path (a Hugging Face cache: models--X/snapshots/HASH/unet/file).
const MAX_DEPTH: usize = 5;

/// The identity of clip `index` of `config` rendered on `device` (module documentation).
pub(crate) fn clip_identity(config: &RenderConfig, index: usize, device: &str, noise: Option<&Path>) -> String {
    let clip = config.for_clip(index);
    let mut settings = clip.resolved_json();
    if let Some(map) = settings.as_object_mut() {
        // Where the frames go and the other clips do not change this clip's latents.
        map.remove("output");
        map.remove("seed");
        let this = map.get("clips").and_then(|c| c.get(index)).cloned().unwrap_or(Value::Null);
        map.insert("clips".into(), this);
    }
    let m = &clip.models;
    let mut paths: Vec<PathBuf> =
        [&m.base, &m.unet, &m.vae, &m.text_encoder, &m.text_encoder_2, &m.motion_adapter, &m.tokenizer]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
    paths.extend(clip.loras.iter().map(|l| l.path.clone()));
    for net in &clip.controlnets {
        paths.push(net.path.clone());
        paths.extend(net.hint_entries().iter().map(|h| h.images.clone()));
    }
    paths.extend(noise.map(Path::to_path_buf));
    let mut files = BTreeMap::new();
    for path in &paths {
        stamp(path, 0, &mut files);
    }
    let identity = json!({
        "celframe": env!("CARGO_PKG_VERSION"),
        "settings": settings,
        "clip": index,
        "seed": config.clip_seed(index),
        "frames": config.clip_frames(index),
        "dtype": config.dtype.trim(),
        "device": device,
        "noise": noise.map(|p| p.display().to_string()),
        "files": files,
    });
    // serde_json's maps are sorted by key, so the text is canonical.
    let digest = Sha256::digest(identity.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Records (size, modification time in ns) of the regular files at or under `path`; what cannot
/// be read is left out (the render itself reports it).
fn stamp(path: &Path, depth: usize, files: &mut BTreeMap<String, (u64, u128)>) {
    let Ok(meta) = std::fs::metadata(path) else { return };
    if meta.is_file() {
        let modified = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        files.insert(path.display().to_string(), (meta.len(), modified));
    } else if meta.is_dir() && depth < MAX_DEPTH {
        let Ok(entries) = std::fs::read_dir(path) else { return };
        let mut children: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        children.sort();
        for child in children {
            if files.len() >= MAX_STAMPED {
                return;
            }
            stamp(&child, depth + 1, files);
        }
    }
}

/// What a saved file holds: a chained segment's latents or the clip's after a sampling pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    Segment,
    Pass,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Segment => "segment",
            Stage::Pass => "pass",
        }
    }
}

/// One saved file, read back.
struct Saved {
    stage: Stage,
    /// From 1.
    number: usize,
    first_frame: usize,
    /// [frames, h, w, c], frame-major NHWC.
    shape: Vec<usize>,
    latents: Vec<f32>,
}

/// The saved latents of one clip (module documentation).
pub(crate) struct ClipResume {
    dir: PathBuf,
    identity: String,
    /// `clip NNN`, for messages.
    clip: String,
    saved: Vec<Saved>,
}

const IDENTITY_KEY: &str = "celframe.resume";

impl ClipResume {
    /// Reads what `dir` holds for clip `number`. Files of another identity, or that do not read
    /// as ours, are reported and the folder is emptied: the clip then renders from the start.
    pub(crate) fn open(dir: PathBuf, number: usize, identity: String) -> Result<ClipResume> {
        let clip = format!("clip {number:03}");
        let mut resume = ClipResume { dir, identity, clip, saved: Vec::new() };
        let entries = match std::fs::read_dir(&resume.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(resume),
            Err(e) => return Err(Error::Io { context: format!("listing {}", resume.dir.display()), source: e }),
        };
        let mut foreign = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|e| Error::Io { context: format!("listing {}", resume.dir.display()), source: e })?
                .path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if name.starts_with('.') {
                continue; // a temporary of an interrupted save; OutputTree::open sweeps those
            }
            match resume.read(&path) {
                Ok(saved) => resume.saved.push(saved),
                Err(why) => foreign.push(format!("{name} ({why})")),
            }
        }
        if !foreign.is_empty() {
            eprintln!(
                "{}: ignoring the saved latents in {}: {}; rendering the clip from the start",
                resume.clip,
                resume.dir.display(),
                foreign.join(", ")
            );
            std::fs::remove_dir_all(&resume.dir)
                .map_err(|e| Error::Io { context: format!("removing {}", resume.dir.display()), source: e })?;
            resume.saved.clear();
        }
        Ok(resume)
    }

    fn read(&self, path: &Path) -> std::result::Result<Saved, String> {
        let file = weights::open(path, "saved latents").map_err(|e| e.to_string())?;
        let meta = file.metadata();
        if meta.get(IDENTITY_KEY) != Some(&self.identity) {
            return Err("made with other settings: the config, seed, models, dtype or device changed".into());
        }
        let field = |key: &str| meta.get(key).ok_or_else(|| format!("no '{key}' in its metadata"));
        let number = |key: &str| field(key)?.parse::<usize>().map_err(|_| format!("'{key}' is not a number"));
        let stage = match field("stage")?.as_str() {
            "segment" => Stage::Segment,
            "pass" => Stage::Pass,
            other => return Err(format!("stage '{other}'")),
        };
        let latents = file.float("latents").map_err(|e| e.to_string())?;
        if latents.dtype() != DType::F32 || latents.shape().len() != 4 {
            return Err(format!(
                "latents {:?} {:?}; saved ones are f32 [frames, h, w, c]",
                latents.dtype(),
                latents.shape()
            ));
        }
        Ok(Saved {
            stage,
            number: number("number")?,
            first_frame: number("first_frame")?,
            shape: latents.shape().to_vec(),
            latents: latents.to_f32_vec().map_err(|e| e.to_string())?,
        })
    }

    /// The saved latents of `stage` `number` over `shape` ([frames, h, w, c]) from clip frame
    /// `first_frame`, if this clip's earlier run saved them.
    pub(crate) fn get(&self, stage: Stage, number: usize, first_frame: usize, shape: [usize; 4]) -> Option<&[f32]> {
        self.saved
            .iter()
            .find(|s| s.stage == stage && s.number == number && s.first_frame == first_frame && s.shape == shape)
            .map(|s| s.latents.as_slice())
    }

    /// The newest pass saved, with its number.
    pub(crate) fn last_pass(&self, shape: [usize; 4]) -> Option<(usize, &[f32])> {
        self.saved
            .iter()
            .filter(|s| s.stage == Stage::Pass && s.first_frame == 0 && s.shape == shape)
            .max_by_key(|s| s.number)
            .map(|s| (s.number, s.latents.as_slice()))
    }

    /// Saves `latents` ([frames, h, w, c] from clip frame `first_frame`) as `stage` `number` of
    /// `of`. A pass replaces the pass before it.
    pub(crate) fn save(
        &self,
        stage: Stage,
        (number, of): (usize, usize),
        first_frame: usize,
        shape: [usize; 4],
        latents: &[f32],
    ) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::Io { context: format!("creating {}", self.dir.display()), source: e })?;
        let tensor = Tensor::from_f32(&shape, DType::F32, latents)?;
        let metadata = [
            (IDENTITY_KEY, self.identity.clone()),
            ("stage", stage.name().to_string()),
            ("number", number.to_string()),
            ("of", of.to_string()),
            ("first_frame", first_frame.to_string()),
        ];
        let metadata = metadata.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let path = self.path(stage, number);
        weights::save(&path, &[("latents".to_string(), &tensor)], Some(metadata))?;
        if stage == Stage::Pass && number > 1 {
            let older = self.path(stage, number - 1);
            if older.exists() {
                std::fs::remove_file(&older)
                    .map_err(|e| Error::Io { context: format!("removing {}", older.display()), source: e })?;
            }
        }
        let frames = format!("frames {first_frame}..{}", first_frame + shape[0]);
        eprintln!("{}: saved {} {number} of {of} ({frames}) in {}", self.clip, stage.name(), self.dir.display());
        Ok(())
    }

    fn path(&self, stage: Stage, number: usize) -> PathBuf {
        self.dir.join(format!("{}_{number:03}.safetensors", stage.name()))
    }

    /// The folder, for messages.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}
