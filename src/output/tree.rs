//! The outputs tree and one clip's writer (see the module documentation in `output/mod.rs`).

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

use super::ffmpeg::{FfmpegInfo, FfmpegWriter, probe_ffmpeg};
use super::fs::{io_error, sweep_temporaries, sync_dir, write_atomic};
use super::grid::{GridCell, prompt_grid};
use super::h264::BuiltInWriter;
use super::pngs::{PngPool, write_png};
use super::{Fps, RgbImage};

/// Which mp4 encoder a clip asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Mp4Choice {
    /// ffmpeg (libx264) where `ffmpeg` runs and has libx264, else the built-in encoder.
    #[default]
    Auto,
    /// ffmpeg only: an error if it cannot be used.
    Ffmpeg,
    /// The built-in OpenH264 encoder, even where ffmpeg is installed.
    BuiltIn,
    /// No mp4 (PNG frames only).
    Off,
}

/// Which encoder wrote a clip's mp4, for the run's report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mp4Encoder {
    /// ffmpeg with libx264; its version line.
    Ffmpeg { version: String },
    /// OpenH264 compiled into celframe; `why` says why ffmpeg was not used (None: asked for).
    BuiltIn { why: Option<String> },
}

impl std::fmt::Display for Mp4Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mp4Encoder::Ffmpeg { version } => write!(f, "ffmpeg + libx264 ({version})"),
            Mp4Encoder::BuiltIn { why: None } => write!(f, "built-in OpenH264 encoder"),
            Mp4Encoder::BuiltIn { why: Some(why) } => write!(f, "built-in OpenH264 encoder ({why})"),
        }
    }
}

/// How to write one clip.
#[derive(Clone, Debug)]
pub struct ClipOptions {
    pub width: u32,
    pub height: u32,
    pub fps: Fps,
    /// Write every frame as `frames/NNNNNN.png` (default true).
    pub png_frames: bool,
    pub mp4: Mp4Choice,
    /// The ffmpeg program (default `ffmpeg`, looked up on PATH).
    pub ffmpeg: PathBuf,
    /// libx264's constant rate factor on the ffmpeg path (default 18, "visually lossless" in
    /// FFmpeg's H.264 guide; +6 roughly halves the size).
    pub crf: u8,
    /// The built-in encoder's largest quantiser (default 26; 0..=51, lower is better).
    pub qp_max: u8,
    /// Threads the built-in encoder codes on: its GOP workers and OpenH264's threads for the
    /// slices of a picture together (default: the machine's threads, at most 16). The mp4's bytes
    /// do not depend on it.
    pub mp4_threads: usize,
    /// PNG worker threads (default: the machine's threads, at most 8).
    pub png_threads: usize,
    /// Frames that may wait for each consumer (PNG pool, mp4 encoder) before `push` blocks.
    pub queue_frames: usize,
    /// Replace a complete clip of the same number instead of refusing to start it.
    pub replace: bool,
}

impl ClipOptions {
    pub fn new(width: u32, height: u32, fps: Fps) -> ClipOptions {
        ClipOptions {
            width,
            height,
            fps,
            png_frames: true,
            mp4: Mp4Choice::Auto,
            ffmpeg: PathBuf::from("ffmpeg"),
            crf: 18,
            qp_max: 26,
            mp4_threads: std::thread::available_parallelism().map_or(2, |n| n.get()).min(16),
            png_threads: PngPool::default_threads(),
            queue_frames: 8,
            replace: false,
        }
    }

    fn validate(&self) -> Result<()> {
        let (w, h) = (self.width, self.height);
        if w == 0 || h == 0 || w > 16384 || h > 16384 {
            return Err(Error::Input(format!("clip of {w}x{h} pixels: each side must be within 1..=16384")));
        }
        if self.mp4 != Mp4Choice::Off && (w % 2 != 0 || h % 2 != 0) {
            return Err(Error::Input(format!(
                "clip of {w}x{h} pixels: H.264 yuv420p video needs an even width and height (one chroma \
                 sample per 2x2 pixels); render at an even size (SDXL sizes, multiples of 8, are) or turn \
                 the mp4 off"
            )));
        }
        if !self.png_frames && self.mp4 == Mp4Choice::Off {
            return Err(Error::Input("clip with neither PNG frames nor an mp4: nothing to write".into()));
        }
        if self.crf > 51 || self.qp_max > 51 {
            return Err(Error::Input(format!(
                "crf {} / qp_max {}: H.264 quantisers run 0..=51",
                self.crf, self.qp_max
            )));
        }
        Ok(())
    }
}

/// What a finished clip wrote.
#[derive(Clone, Debug)]
pub struct ClipReport {
    pub index: u32,
    /// `video/clip_NNN`.
    pub dir: PathBuf,
    pub frames: u64,
    pub png_frames: u64,
    /// `video/clip_NNN/clip_NNN.mp4`, if one was written.
    pub mp4: Option<PathBuf>,
    pub encoder: Option<Mp4Encoder>,
    /// From `begin_clip` to the clip's folder renamed into place.
    pub seconds: f64,
}

/// The outputs tree of one run (module documentation: layout, atomicity, locking).
pub struct OutputTree {
    root: PathBuf,
    /// Holds the lock on the root folder for the life of the tree (exclusive, or shared by shards).
    _lock: File,
    /// A shard's exclusive lock on its own lock file.
    _shard_lock: Option<File>,
}

fn clip_name(index: u32) -> String {
    format!("clip_{index:03}")
}

const RESUME_SUFFIX: &str = ".resume";

/// A clip's resume folder `resume` as a new run finds it: removed if the clip folder `clip` is
/// complete, else kept without the temporaries of an interrupted save.
fn tidy_resume(resume: &Path, clip: &Path) -> Result<()> {
    if !resume.is_dir() {
        return Ok(());
    }
    if clip.is_dir() {
        fs::remove_dir_all(resume).map_err(io_error("removing leftover", resume))
    } else {
        sweep_temporaries(resume)
    }
}

/// How long a busy lock is retried before the folder is reported as in use.
const LOCK_GRACE: Duration = Duration::from_millis(500);

/// `try_lock` (`File::try_lock` or `File::try_lock_shared`) on `file`, retried for up to
/// LOCK_GRACE while the lock is busy. A child process forked by another thread of this process
/// (ffmpeg, a worker) holds a copy of every descriptor, the lock's included, from its fork until
/// its exec closes them, so a lock this process just released can look held for a moment; another
/// run holds it far longer.
fn lock_briefly(
    file: &File,
    try_lock: fn(&File) -> std::result::Result<(), std::fs::TryLockError>,
) -> std::result::Result<(), std::fs::TryLockError> {
    let start = Instant::now();
    loop {
        match try_lock(file) {
            Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < LOCK_GRACE => {
                std::thread::sleep(Duration::from_millis(10))
            }
            other => return other,
        }
    }
}

impl OutputTree {
    /// Opens (creating as needed) `root` with `images/`, `video/` and `configs/`, takes the
    /// exclusive lock, and removes what an interrupted run left: temporary files and partial clip
    /// folders. A clip's saved latents (`resume_dir`) are kept for the rerun unless the clip is
    /// complete.
    pub fn open(root: &Path) -> Result<OutputTree> {
        let lock = create_tree(root)?;
        match lock_briefly(&lock, File::try_lock) {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Input(format!(
                    "output folder {}: another celframe run is writing to it (it holds the folder's lock)",
                    root.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_error("locking output folder", root)(e)),
        }
        let tree = OutputTree { root: root.to_path_buf(), _lock: lock, _shard_lock: None };
        for sub in ["images", "configs", "video"] {
            sweep_temporaries(&tree.root.join(sub))?;
        }
        let video = tree.root.join("video");
        for entry in fs::read_dir(&video).map_err(io_error("listing", &video))? {
            let entry = entry.map_err(io_error("listing", &video))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".clip_") && (name.ends_with(".partial") || name.ends_with(".old")) {
                let path = entry.path();
                fs::remove_dir_all(&path).map_err(io_error("removing leftover", &path))?;
            }
            if let Some(clip) = name.strip_prefix('.').and_then(|n| n.strip_suffix(RESUME_SUFFIX)) {
                tidy_resume(&entry.path(), &video.join(clip))?;
            }
        }
        Ok(tree)
    }

    /// Opens `root` for one shard of a batch, which shares the tree with the other shards: a
    /// shared lock on the root folder (a whole run's `open`, or `celframe merge-report`, waits for
    /// every shard to finish) and an exclusive one on `.lock-NAME` (one process per shard). Only
    /// what an interrupted run of this shard left is removed: the partial folders of `clips`
    /// (the shard's); temporaries of shared files wait for the next `open`.
    pub fn open_shard(root: &Path, name: &str, clips: &[u32]) -> Result<OutputTree> {
        check_name(name, "shard name")?;
        let lock = create_tree(root)?;
        let busy =
            |what: &str| Error::Input(format!("output folder {}: {what} (it holds the folder's lock)", root.display()));
        match lock_briefly(&lock, File::try_lock_shared) {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(busy("a whole run or merge-report is writing to it")),
            Err(std::fs::TryLockError::Error(e)) => return Err(io_error("locking output folder", root)(e)),
        }
        let shard_path = root.join(format!(".lock-{name}"));
        let shard_lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&shard_path)
            .map_err(io_error("opening shard lock", &shard_path))?;
        match lock_briefly(&shard_lock, File::try_lock) {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(busy(&format!("another process runs {name}"))),
            Err(std::fs::TryLockError::Error(e)) => return Err(io_error("locking", &shard_path)(e)),
        }
        for &clip in clips {
            for suffix in ["partial", "old"] {
                let leftover = root.join("video").join(format!(".{}.{suffix}", clip_name(clip)));
                if leftover.exists() {
                    fs::remove_dir_all(&leftover).map_err(io_error("removing leftover", &leftover))?;
                }
            }
            let video = root.join("video");
            tidy_resume(&video.join(format!(".{}{RESUME_SUFFIX}", clip_name(clip))), &video.join(clip_name(clip)))?;
        }
        Ok(OutputTree { root: root.to_path_buf(), _lock: lock, _shard_lock: Some(shard_lock) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `video/clip_NNN` (three digits at least, from 1 by convention).
    pub fn clip_dir(&self, index: u32) -> PathBuf {
        self.root.join("video").join(clip_name(index))
    }

    /// `video/.clip_NNN.resume`: where a clip keeps its denoised latents while it renders, so an
    /// interrupted run resumes (`pipeline::resume`). Removed once the clip is complete.
    pub fn resume_dir(&self, index: u32) -> PathBuf {
        self.root.join("video").join(format!(".{}{RESUME_SUFFIX}", clip_name(index)))
    }

    /// Whether clip `index` is complete: its folder exists, which happens only by the final rename
    /// of a finished clip. A rerun skips such clips.
    pub fn clip_complete(&self, index: u32) -> bool {
        self.clip_dir(index).is_dir()
    }

    /// Starts writing clip `index`. Refuses a complete clip unless `options.replace`.
    pub fn begin_clip(&self, index: u32, options: &ClipOptions) -> Result<ClipWriter> {
        options.validate()?;
        let started = Instant::now();
        let name = clip_name(index);
        let final_dir = self.clip_dir(index);
        if final_dir.exists() && !options.replace {
            return Err(Error::Input(format!(
                "{}: the clip is complete already; skip it or ask to replace it",
                final_dir.display()
            )));
        }
        let video = self.root.join("video");
        let staging = video.join(format!(".{name}.partial"));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_error("removing leftover", &staging))?;
        }
        fs::create_dir(&staging).map_err(io_error("creating", &staging))?;
        let mut writer = ClipWriter {
            index,
            name: name.clone(),
            final_dir,
            staging: staging.clone(),
            frames_dir: None,
            width: options.width,
            height: options.height,
            pngs: None,
            video: None,
            encoder: None,
            frames: 0,
            finished: false,
            started,
        };
        if options.png_frames {
            let frames_dir = staging.join("frames");
            fs::create_dir(&frames_dir).map_err(io_error("creating", &frames_dir))?;
            writer.frames_dir = Some(frames_dir);
            writer.pngs = Some(PngPool::new(options.png_threads, options.queue_frames)?);
        }
        if options.mp4 != Mp4Choice::Off {
            let mp4 = staging.join(format!("{name}.mp4"));
            let (sink, encoder) = start_sink(&mp4, options)?;
            writer.video = Some(VideoThread::spawn(sink, options.queue_frames)?);
            writer.encoder = Some(encoder);
        }
        Ok(writer)
    }

    /// Writes `images/prompt_grid_NAME.png`: the given images (first frames of the clips) in a
    /// grid with their captions (prompts). `name`: letters, digits, `-` and `_`.
    pub fn write_prompt_grid(&self, name: &str, cells: &[GridCell]) -> Result<PathBuf> {
        check_name(name, "prompt grid name")?;
        let grid = prompt_grid(cells)?;
        let path = self.root.join("images").join(format!("prompt_grid_{name}.png"));
        write_png(&path, &grid)?;
        Ok(path)
    }

    /// Writes `configs/FILE` (a plain `*.json` file name) as pretty-printed JSON, atomically.
    pub fn write_config(&self, file_name: &str, value: &serde_json::Value) -> Result<PathBuf> {
        let Some(stem) = file_name.strip_suffix(".json") else {
            return Err(Error::Input(format!("config file name {file_name:?}: must end in .json")));
        };
        check_name(stem, "config file name")?;
        let mut text = serde_json::to_string_pretty(value)
            .map_err(|e| Error::Internal(format!("serialising {file_name}: {e}")))?;
        text.push('\n');
        let path = self.root.join("configs").join(file_name);
        write_atomic(&path, text.as_bytes())?;
        Ok(path)
    }
}

fn check_name(name: &str, what: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::Input(format!(
            "{what} {name:?}: use 1 to 128 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

/// The mp4 encoder of one clip, owned by its thread.
enum Sink {
    Ffmpeg(FfmpegWriter),
    BuiltIn(Box<BuiltInWriter>),
}

impl Sink {
    fn push(&mut self, image: &RgbImage) -> Result<()> {
        match self {
            Sink::Ffmpeg(w) => w.push(image),
            Sink::BuiltIn(w) => w.push(image),
        }
    }

    fn finish(self) -> Result<()> {
        match self {
            Sink::Ffmpeg(w) => w.finish(),
            Sink::BuiltIn(w) => w.finish(),
        }
    }
}

fn start_sink(mp4: &Path, options: &ClipOptions) -> Result<(Sink, Mp4Encoder)> {
    let (w, h, fps) = (options.width, options.height, options.fps);
    let built_in = |why: Option<String>| -> Result<(Sink, Mp4Encoder)> {
        let writer = BuiltInWriter::start(mp4, w, h, fps, options.qp_max, options.mp4_threads)?;
        Ok((Sink::BuiltIn(Box::new(writer)), Mp4Encoder::BuiltIn { why }))
    };
    let ffmpeg = |info: FfmpegInfo| -> Result<(Sink, Mp4Encoder)> {
        let writer = FfmpegWriter::start(&info, mp4, w, h, fps, options.crf)?;
        Ok((Sink::Ffmpeg(writer), Mp4Encoder::Ffmpeg { version: info.version }))
    };
    match options.mp4 {
        Mp4Choice::BuiltIn => built_in(None),
        Mp4Choice::Ffmpeg => match probe_ffmpeg(&options.ffmpeg) {
            Ok(info) => ffmpeg(info),
            Err(why) => Err(Error::Input(format!("the mp4 was asked of ffmpeg, which cannot be used: {why}"))),
        },
        Mp4Choice::Auto => match probe_ffmpeg(&options.ffmpeg) {
            Ok(info) => ffmpeg(info),
            Err(why) => built_in(Some(why)),
        },
        Mp4Choice::Off => Err(Error::Internal("start_sink called with the mp4 off".into())),
    }
}

/// The mp4 encoder on its own thread behind a bounded queue, so the caller returns as soon as a
/// frame is queued. Closing the queue finishes the mp4; `abort` drops it unfinished.
struct VideoThread {
    sender: Option<SyncSender<RgbImage>>,
    handle: Option<JoinHandle<Result<()>>>,
    abort: Arc<AtomicBool>,
}

impl VideoThread {
    fn spawn(mut sink: Sink, queue: usize) -> Result<VideoThread> {
        let (sender, receiver) = sync_channel::<RgbImage>(queue.max(1));
        let abort = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&abort);
        let handle = std::thread::Builder::new()
            .name("celframe-mp4".into())
            .spawn(move || {
                for frame in receiver.iter() {
                    if stop.load(Ordering::SeqCst) {
                        return Ok(()); // sink dropped: ffmpeg killed, temporaries removed
                    }
                    sink.push(&frame)?;
                }
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                sink.finish()
            })
            .map_err(|e| Error::Io { context: "starting the mp4 encoder thread".into(), source: e })?;
        Ok(VideoThread { sender: Some(sender), handle: Some(handle), abort })
    }

    /// Queues a frame; if the encoder has stopped on an error, returns that error.
    fn push(&mut self, frame: RgbImage) -> Result<()> {
        let sent = self.sender.as_ref().map(|s| s.send(frame).is_ok()).unwrap_or(false);
        if sent { Ok(()) } else { Err(self.join().err().unwrap_or_else(stopped_early)) }
    }

    /// Closes the queue and waits for the mp4 to be written.
    fn finish(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        self.sender = None;
        match self.handle.take() {
            Some(h) => h.join().unwrap_or_else(|_| Err(Error::Internal("the mp4 encoder thread panicked".into()))),
            None => Err(stopped_early()),
        }
    }
}

fn stopped_early() -> Error {
    Error::Internal("the mp4 encoder stopped earlier (its error was reported)".into())
}

impl Drop for VideoThread {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.abort.store(true, Ordering::SeqCst);
            let _ = self.join();
        }
    }
}

/// Writes one clip: [`push`](ClipWriter::push) each frame, then [`finish`](ClipWriter::finish).
/// Dropped unfinished (an error, a panic, an early return), it aborts: PNG workers stop, the mp4
/// encoder is stopped (ffmpeg killed), and the partial folder is removed.
pub struct ClipWriter {
    index: u32,
    name: String,
    final_dir: PathBuf,
    staging: PathBuf,
    frames_dir: Option<PathBuf>,
    width: u32,
    height: u32,
    pngs: Option<PngPool>,
    video: Option<VideoThread>,
    encoder: Option<Mp4Encoder>,
    frames: u64,
    finished: bool,
    started: Instant,
}

impl ClipWriter {
    /// The mp4 encoder this clip uses (None: mp4 off).
    pub fn encoder(&self) -> Option<&Mp4Encoder> {
        self.encoder.as_ref()
    }

    /// Frames pushed so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Queues the next frame for its PNG file and the mp4. Blocks while the queues are full.
    pub fn push(&mut self, frame: RgbImage) -> Result<()> {
        if frame.width() != self.width || frame.height() != self.height {
            return Err(Error::Input(format!(
                "{}: frame {} is {}x{}, the clip is {}x{}",
                self.name,
                self.frames,
                frame.width(),
                frame.height(),
                self.width,
                self.height
            )));
        }
        if let (Some(pool), Some(dir)) = (&self.pngs, &self.frames_dir) {
            pool.submit(dir.join(format!("{:06}.png", self.frames)), frame.clone())?;
        }
        if let Some(video) = &mut self.video {
            video.push(frame)?;
        }
        self.frames += 1;
        Ok(())
    }

    /// Waits for every PNG and the mp4, then renames the clip's folder into place.
    pub fn finish(mut self) -> Result<ClipReport> {
        if self.frames == 0 {
            return Err(Error::Input(format!("{}: no frames were given", self.name)));
        }
        let png_frames = match self.pngs.take() {
            Some(pool) => pool.finish()?,
            None => 0,
        };
        if let Some(video) = self.video.take() {
            video.finish()?;
        }
        if let Some(dir) = &self.frames_dir {
            sync_dir(dir)?;
        }
        sync_dir(&self.staging)?;
        let video_dir = self.staging.parent().map(Path::to_path_buf).unwrap_or_default();
        // Replacing a complete clip: move it aside, move the new one in, then delete the old one.
        // An interruption in between leaves no clip folder (the rerun renders it again) and a
        // dot-named leftover that the next open removes.
        let old = video_dir.join(format!(".{}.old", self.name));
        let replaced = self.final_dir.exists();
        if replaced {
            fs::rename(&self.final_dir, &old).map_err(io_error("moving aside", &self.final_dir))?;
        }
        fs::rename(&self.staging, &self.final_dir).map_err(io_error("renaming into place", &self.final_dir))?;
        self.finished = true;
        sync_dir(&video_dir)?;
        if replaced {
            fs::remove_dir_all(&old).map_err(io_error("removing the replaced clip", &old))?;
        }
        // The saved latents are spent. Best effort: the clip is complete whatever happens here,
        // and the next open removes a complete clip's leftover.
        let _ = fs::remove_dir_all(video_dir.join(format!(".{}{RESUME_SUFFIX}", self.name)));
        let mp4 = self.encoder.as_ref().map(|_| self.final_dir.join(format!("{}.mp4", self.name)));
        Ok(ClipReport {
            index: self.index,
            dir: self.final_dir.clone(),
            frames: self.frames,
            png_frames,
            mp4,
            encoder: self.encoder.clone(),
            seconds: self.started.elapsed().as_secs_f64(),
        })
    }
}

impl Drop for ClipWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Stop the writers first (they write inside the partial folder), then remove it.
        self.pngs = None;
        self.video = None;
        let _ = fs::remove_dir_all(&self.staging);
    }
}

/// Creates `root` with `images/`, `video/` and `configs/` (a file in its place is refused) and
/// opens the root folder for locking.
fn create_tree(root: &Path) -> Result<File> {
    if let Ok(meta) = fs::metadata(root)
        && !meta.is_dir()
    {
        return Err(Error::Input(format!("output folder {}: exists and is not a folder", root.display())));
    }
    for sub in ["", "images", "video", "configs"] {
        let dir = root.join(sub);
        fs::create_dir_all(&dir).map_err(io_error("creating output folder", &dir))?;
    }
    File::open(root).map_err(io_error("opening output folder", root))
}
