//! PNG files: one image encoded and written atomically, and a pool of threads that does that for
//! every frame of a clip while the caller renders the next ones.
//!
//! Files are 8-bit RGB (colour type 2, PNG spec section 11.2.2) with an sRGB chunk (perceptual
//! intent): the frames are sRGB-encoded values. Compression is the png crate's `Fast` level
//! (fdeflate with PNG filters): lossless like every level, much faster than the default level at a
//! slightly larger file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::error::{Error, Result};

use super::RgbImage;
use super::fs::write_atomic_with;

fn encoding_to_io(e: png::EncodingError) -> std::io::Error {
    match e {
        png::EncodingError::IoError(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

fn encode_to<W: Write>(image: &RgbImage, out: W) -> std::io::Result<()> {
    let mut encoder = png::Encoder::new(out, image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    encoder.set_source_srgb(png::SrgbRenderingIntent::Perceptual);
    let mut writer = encoder.write_header().map_err(encoding_to_io)?;
    writer.write_image_data(image.pixels()).map_err(encoding_to_io)?;
    writer.finish().map_err(encoding_to_io)
}

/// The PNG file's bytes.
pub fn encode_png(image: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    encode_to(image, &mut bytes).map_err(|e| Error::Internal(format!("PNG encoding into memory failed: {e}")))?;
    Ok(bytes)
}

/// Writes `image` to `path` as PNG under a temporary name, synced and renamed.
pub fn write_png(path: &Path, image: &RgbImage) -> Result<()> {
    write_atomic_with(path, |out| encode_to(image, out))
}

/// Decodes an 8-bit RGB PNG (what [`encode_png`] writes); other colour types and depths are
/// refused rather than converted.
pub fn decode_png(bytes: &[u8]) -> Result<RgbImage> {
    let bad = |why: String| Error::Input(format!("PNG: {why}"));
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().map_err(|e| bad(e.to_string()))?;
    let (color, depth) = reader.output_color_type();
    if color != png::ColorType::Rgb || depth != png::BitDepth::Eight {
        return Err(bad(format!("{color:?} {depth:?}; only 8-bit RGB is read")));
    }
    let size = reader.output_buffer_size().ok_or_else(|| bad("image too large".into()))?;
    let mut pixels = vec![0u8; size];
    let info = reader.next_frame(&mut pixels).map_err(|e| bad(e.to_string()))?;
    pixels.truncate(info.buffer_size());
    RgbImage::new(info.width, info.height, pixels)
}

struct Job {
    path: PathBuf,
    image: RgbImage,
}

/// What the workers share with the pool's owner.
#[derive(Default)]
struct Shared {
    /// The first error any worker met; later jobs are dropped.
    error: Mutex<Option<Error>>,
    failed: AtomicBool,
    /// Set when the pool is dropped without `finish`: workers stop taking jobs.
    stop: AtomicBool,
    written: AtomicU64,
}

impl Shared {
    fn fail(&self, e: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    fn take_error(&self) -> Error {
        let taken = self.error.lock().unwrap_or_else(|p| p.into_inner()).take();
        taken.unwrap_or_else(|| Error::Internal("a PNG write failed earlier (its error was reported)".into()))
    }
}

/// Writes PNG files on `threads` worker threads. [`PngPool::submit`] queues a job and blocks while
/// `queue` jobs wait already, so a slow disk holds the caller back instead of frames piling up in
/// memory: at most `queue + threads` images are held.
pub struct PngPool {
    sender: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl PngPool {
    pub fn new(threads: usize, queue: usize) -> Result<PngPool> {
        let threads = threads.max(1);
        let (sender, receiver) = sync_channel::<Job>(queue.max(1));
        let receiver = Arc::new(Mutex::new(receiver));
        let shared = Arc::new(Shared::default());
        let mut pool = PngPool { sender: Some(sender), workers: Vec::with_capacity(threads), shared };
        for i in 0..threads {
            let (receiver, shared) = (Arc::clone(&receiver), Arc::clone(&pool.shared));
            let worker = std::thread::Builder::new()
                .name(format!("celframe-png-{i}"))
                .spawn(move || worker(&receiver, &shared))
                .map_err(|e| Error::Io { context: "starting a PNG writer thread".into(), source: e })?;
            pool.workers.push(worker);
        }
        Ok(pool)
    }

    /// The default worker count: the machine's threads, at most 8 (PNG encoding of 1024x576 frames
    /// keeps pace with rendering well before that).
    pub fn default_threads() -> usize {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(8)
    }

    /// Queues `image` to be written to `path`. Returns the first error a worker met, if any.
    pub fn submit(&self, path: PathBuf, image: RgbImage) -> Result<()> {
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(self.shared.take_error());
        }
        let sender = self.sender.as_ref().expect("the sender lives until finish or drop");
        let job = Job { path, image };
        // try_send first so the common case takes no lock-step with the workers.
        let job = match sender.try_send(job) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(job)) => job,
            Err(TrySendError::Disconnected(_)) => return Err(self.shared.take_error()),
        };
        sender.send(job).map_err(|_| self.shared.take_error())
    }

    /// Waits for every queued file; returns how many were written, or the first error.
    pub fn finish(mut self) -> Result<u64> {
        self.sender = None;
        let mut panicked = false;
        for worker in self.workers.drain(..) {
            panicked |= worker.join().is_err();
        }
        if panicked {
            return Err(Error::Internal("a PNG worker thread panicked".into()));
        }
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(self.shared.take_error());
        }
        Ok(self.shared.written.load(Ordering::SeqCst))
    }
}

impl Drop for PngPool {
    /// Without `finish`: queued jobs are dropped, files being written are completed (each is
    /// atomic), and the workers are joined.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.sender = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

fn worker(receiver: &Mutex<Receiver<Job>>, shared: &Shared) {
    loop {
        // Hold the lock only while taking a job, not while encoding it.
        let job = match receiver.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        if shared.stop.load(Ordering::SeqCst) || shared.failed.load(Ordering::SeqCst) {
            continue; // drain without writing, so a blocked submit wakes up
        }
        match write_png(&job.path, &job.image) {
            Ok(()) => {
                shared.written.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => shared.fail(e),
        }
    }
}
