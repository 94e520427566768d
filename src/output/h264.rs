//! The built-in mp4 path: our RGB -> BT.709 limited-range 4:2:0 conversion, Cisco's OpenH264
//! (compiled from source by `openh264-sys2`, driven through its C API) for the H.264 bitstream,
//! and our MP4 muxing.
//!
//! OpenH264 returns each frame as Annex B NAL units (start-code prefixed, ITU-T H.264 Annex B).
//! MP4 wants them as samples of 4-byte-length-prefixed NAL units with the SPS and PPS moved into
//! the avcC box (ISO/IEC 14496-15 section 5.3).
//!
//! Encoding runs a GOP at a time: the frames from one IDR up to the next go to their own OpenH264
//! encoder on a worker thread, several GOPs at once, and the coded GOPs are appended in order to a
//! temporary file beside the mp4 (so a long clip does not sit in memory); `finish` writes the mp4
//! (moov first) and copies them after it. An encoder starts fresh at its GOP's IDR and sees only
//! that GOP's frames, so the bytes are the same whatever the number of workers.
//!
//! Within a GOP, a picture is cut into a fixed number of slices by rows of macroblocks
//! ([`slice_count`], from the frame size only). OpenH264 codes the slices of a picture either one
//! after another on the GOP's worker or at once on its thread pool, which is one per process and
//! has at most four threads: a GOP takes the pool while few others use it ([`PoolSeat`]), so a
//! one-GOP clip gets the pool's threads and a long clip keeps one thread per GOP. Both ways give
//! the same bytes (for pictures small enough for OpenH264's buffers either way; `encode_gop`
//! restarts on larger ones), so the bytes depend on neither the thread count nor the timing.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use openh264_sys2 as sys;

use crate::error::{Error, Result};

use super::fs::{io_error, temp_path};
use super::mp4::{Track, write_mp4};
use super::yuv::{Yuv420, rgb_to_yuv420};
use super::{Fps, RgbImage};

/// OpenH264's largest picture (its README: "Encoder errors when resolution exceeds 3840x2160").
pub(crate) const MAX_LONG_SIDE: u32 = 3840;
pub(crate) const MAX_SHORT_SIDE: u32 = 2160;

/// NAL unit types (ITU-T H.264 Table 7-1).
const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;
const NAL_AUD: u8 = 9;

/// Splits an Annex B byte stream into NAL units (start codes `00 00 01` / `00 00 00 01` removed).
pub(crate) fn annex_b_units(stream: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new(); // (start code begins, payload begins)
    let mut i = 0;
    while i + 3 <= stream.len() {
        if stream[i] == 0 && stream[i + 1] == 0 && stream[i + 2] == 1 {
            let begin = if i > 0 && stream[i - 1] == 0 { i - 1 } else { i };
            starts.push((begin, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut units = Vec::with_capacity(starts.len());
    for (k, &(_, payload)) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map_or(stream.len(), |&(begin, _)| begin);
        // Zero bytes before the next start code are trailing_zero_8bits of the byte stream, not
        // part of the NAL unit (whose last byte holds the RBSP stop bit, or 0x03 of a
        // cabac_zero_word).
        while end > payload && stream[end - 1] == 0 {
            end -= 1;
        }
        if end > payload {
            units.push(&stream[payload..end]);
        }
    }
    units
}

/// Frames the GOP workers may hold at once (queued or being coded), in bytes of 4:2:0 pictures:
/// enough for 16 workers on 2-second GOPs of 1024x576 frames at 10 fps; fewer GOPs run at once
/// where frames are larger.
const MAX_QUEUED_BYTES: u64 = 320 << 20;

/// What every GOP encoder of one mp4 is configured with.
#[derive(Clone, Copy)]
struct Settings {
    width: u32,
    height: u32,
    fps: Fps,
    /// Frames from one IDR to the next: every encoder's intra period.
    intra_period: u32,
    /// The quantiser cap each GOP encoder starts with.
    qp_max: u8,
    /// Slices per picture ([`slice_count`]).
    slices: u32,
    /// OpenH264 pool threads for the slices of a picture; 1: coded one after another on the GOP's
    /// worker. Set per GOP when its worker starts.
    slice_threads: u32,
}

/// One mp4 being encoded by OpenH264, a GOP per encoder (module documentation).
pub(crate) struct BuiltInWriter {
    settings: Settings,
    /// Frames per GOP worker.
    gop: u64,
    /// GOP workers at most at once.
    threads: usize,
    /// Pool threads a GOP's encoder asks for when it gets a [`PoolSeat`].
    slice_threads: u32,
    budget: Arc<Budget>,
    /// Set when the mp4 is abandoned: workers stop at their next frame.
    cancel: Arc<AtomicBool>,
    /// Running GOP workers, oldest first; only the last one may still take frames.
    workers: VecDeque<GopWorker>,
    frames: u64,
    samples: BufWriter<File>,
    samples_path: PathBuf,
    samples_len: u64,
    sample_sizes: Vec<u32>,
    sync_samples: Vec<u32>,
    sps: Option<Vec<u8>>,
    pps: Option<Vec<u8>>,
    path: PathBuf,
}

impl BuiltInWriter {
    /// Prepares to write `path` from `width x height` frames at `fps`, coding on at most `threads`
    /// threads: GOP workers and OpenH264's pool together. `qp_max` caps the quantiser (H.264's
    /// 0..=51; lower is better quality and larger files).
    pub(crate) fn start(path: &Path, width: u32, height: u32, fps: Fps, qp_max: u8, threads: usize) -> Result<Self> {
        let (long, short) = (width.max(height), width.min(height));
        if long > MAX_LONG_SIDE || short > MAX_SHORT_SIDE {
            return Err(Error::Unsupported(format!(
                "{width}x{height} video with the built-in encoder: OpenH264 encodes up to \
                 {MAX_LONG_SIDE}x{MAX_SHORT_SIDE}; install ffmpeg for larger frames"
            )));
        }
        // An IDR (a seek point) every 2 seconds of video.
        let intra_period = (2.0 * fps.as_f64()).ceil().clamp(1.0, u32::MAX as f64) as u32;
        let threads = threads.max(1);
        let slices = slice_count(width, height);
        let slice_threads = (threads as u32).min(slices).min(MAX_SLICE_THREADS);
        let settings = Settings { width, height, fps, intra_period, qp_max: qp_max.min(51), slices, slice_threads: 1 };
        // With an IDR on every frame a worker still takes two, so that consecutive IDRs come from
        // one encoder, which numbers them apart (idr_pic_id; ITU-T H.264 7.4.3 wants consecutive
        // IDR pictures to differ in it).
        let gop = intra_period.max(2) as u64;
        // A worker on the pool waits while the pool's threads code its slices, so with this many
        // workers at most `threads` threads code at once.
        let threads = if slice_threads > 1 { threads + 1 - slice_threads as usize } else { threads };
        let frame_bytes = width as u64 * height as u64 * 3 / 2;
        let limit = (threads as u64 * gop).min(MAX_QUEUED_BYTES / frame_bytes.max(1)).max(1) as usize;
        let samples_path = temp_path(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&samples_path)
            .map_err(io_error("writing", &samples_path))?;
        Ok(BuiltInWriter {
            settings,
            gop,
            threads,
            slice_threads,
            budget: Arc::new(Budget::new(limit)),
            cancel: Arc::new(AtomicBool::new(false)),
            workers: VecDeque::new(),
            frames: 0,
            samples: BufWriter::with_capacity(1 << 20, file),
            samples_path,
            samples_len: 0,
            sample_sizes: Vec::new(),
            sync_samples: Vec::new(),
            sps: None,
            pps: None,
            path: path.to_path_buf(),
        })
    }

    /// Hands the next frame to its GOP's worker; blocks while the workers hold their budget of
    /// frames, or, at a GOP's first frame, while `threads` GOPs are still being coded.
    pub(crate) fn push(&mut self, image: &RgbImage) -> Result<()> {
        if self.frames.is_multiple_of(self.gop) {
            if let Some(last) = self.workers.back_mut() {
                last.sender = None; // its GOP is complete
            }
            while self.workers.len() >= self.threads {
                self.collect_oldest()?;
            }
            let seat = if self.slice_threads > 1 { PoolSeat::take() } else { None };
            let settings =
                Settings { slice_threads: if seat.is_some() { self.slice_threads } else { 1 }, ..self.settings };
            let worker = GopWorker::spawn(settings, seat, self.frames, &self.cancel, &self.budget)?;
            self.workers.push_back(worker);
        }
        // Coded GOPs go to disk as soon as they are done, in order.
        while self.workers.front().is_some_and(|w| w.sender.is_none() && w.handle.is_finished()) {
            self.collect_oldest()?;
        }
        let permit = Budget::acquire(&self.budget);
        // Converted here, on the clip's mp4 thread, so that the GOP's worker only codes.
        let picture = rgb_to_yuv420(image)?;
        let sent =
            self.workers.back().and_then(|w| w.sender.as_ref()).is_some_and(|s| s.send((picture, permit)).is_ok());
        if !sent {
            // The worker stopped on an error: report it.
            return match self.workers.pop_back() {
                Some(worker) => Err(worker.join().err().unwrap_or_else(|| {
                    Error::Internal(format!("the OpenH264 worker of frame {} stopped early", self.frames))
                })),
                None => Err(Error::Internal("no OpenH264 worker for the frame".into())),
            };
        }
        self.frames += 1;
        Ok(())
    }

    /// Waits for the oldest GOP worker and appends its samples.
    fn collect_oldest(&mut self) -> Result<()> {
        let Some(worker) = self.workers.pop_front() else { return Ok(()) };
        let first = worker.first;
        let gop = worker.join()?;
        // Every encoder has the same configuration, so the same parameter sets: the mp4's one
        // sample entry holds them.
        keep_parameter_set(&mut self.sps, &gop.sps, "SPS", first)?;
        keep_parameter_set(&mut self.pps, &gop.pps, "PPS", first)?;
        let io = io_error("writing", &self.samples_path);
        self.samples.write_all(&gop.data).map_err(&io)?;
        self.samples_len += gop.data.len() as u64;
        let base = self.sample_sizes.len() as u32;
        self.sync_samples.extend(gop.idr.iter().map(|&k| base + k + 1));
        self.sample_sizes.extend_from_slice(&gop.sizes);
        Ok(())
    }

    /// Waits for every GOP, then writes the mp4: header boxes first, then the samples.
    pub(crate) fn finish(mut self) -> Result<()> {
        if let Some(last) = self.workers.back_mut() {
            last.sender = None;
        }
        while !self.workers.is_empty() {
            self.collect_oldest()?;
        }
        let (Some(sps), Some(pps)) = (self.sps.take(), self.pps.take()) else {
            return Err(Error::Input(format!("{}: no frames were encoded", self.path.display())));
        };
        let io = io_error("reading back", &self.samples_path);
        self.samples.flush().map_err(&io)?;
        let file = self.samples.get_mut();
        file.seek(SeekFrom::Start(0)).map_err(&io)?;
        let track = Track {
            width: self.settings.width,
            height: self.settings.height,
            fps: self.settings.fps,
            sps: &sps,
            pps: &pps,
            sample_sizes: &self.sample_sizes,
            sync_samples: &self.sync_samples,
        };
        write_mp4(&self.path, &track, file, self.samples_len)
    }
}

impl Drop for BuiltInWriter {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::SeqCst);
        for mut worker in self.workers.drain(..) {
            worker.sender = None;
            let _ = worker.join();
        }
        let _ = std::fs::remove_file(&self.samples_path);
    }
}

/// A count of the frames the GOP workers hold, kept at most `limit`: a frame takes a permit
/// before it is queued and gives it back once coded (or dropped unread). Once a worker has
/// failed, permits are given without waiting: the frames it left queued may stay counted until
/// the dispatcher collects its error.
struct Budget {
    state: Mutex<BudgetState>,
    freed: Condvar,
    limit: usize,
}

struct BudgetState {
    held: usize,
    failed: bool,
}

struct Permit(Arc<Budget>);

impl Budget {
    fn new(limit: usize) -> Budget {
        Budget { state: Mutex::new(BudgetState { held: 0, failed: false }), freed: Condvar::new(), limit }
    }

    /// The state; a poisoned lock only means a thread panicked holding it, the count is still right.
    fn state(&self) -> MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn acquire(budget: &Arc<Budget>) -> Permit {
        let mut state = budget.state();
        while state.held >= budget.limit && !state.failed {
            state = budget.freed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.held += 1;
        Permit(Arc::clone(budget))
    }

    fn fail(&self) {
        self.state().failed = true;
        self.freed.notify_all();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.state().held -= 1;
        self.0.freed.notify_one();
    }
}

/// Encoders coding their slices on OpenH264's thread pool now, in this process (the pool is one
/// per process, WelsThreadPool.cpp).
static POOL_ENCODERS: AtomicUsize = AtomicUsize::new(0);

/// Encoders that may share the pool at once; the others code their slices one after another on
/// their own thread. The pool has at most [`MAX_SLICE_THREADS`] threads for all of them: two
/// encoders still get about two threads each, more would wait on each other.
const MAX_POOL_ENCODERS: usize = 2;

/// A GOP encoder's place on OpenH264's thread pool, given back when dropped.
struct PoolSeat;

impl PoolSeat {
    /// A seat if fewer than [`MAX_POOL_ENCODERS`] encoders hold one.
    fn take() -> Option<PoolSeat> {
        POOL_ENCODERS
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < MAX_POOL_ENCODERS).then_some(n + 1))
            .ok()
            .map(|_| PoolSeat)
    }
}

impl Drop for PoolSeat {
    fn drop(&mut self) {
        POOL_ENCODERS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One GOP's encoder thread and the queue of its frames (closed once the GOP is complete).
struct GopWorker {
    first: u64,
    sender: Option<Sender<(Yuv420, Permit)>>,
    handle: JoinHandle<Result<CodedGop>>,
}

impl GopWorker {
    fn spawn(
        settings: Settings,
        seat: Option<PoolSeat>,
        first: u64,
        cancel: &Arc<AtomicBool>,
        budget: &Arc<Budget>,
    ) -> Result<GopWorker> {
        let (sender, receiver) = channel();
        let (cancel, budget) = (Arc::clone(cancel), Arc::clone(budget));
        let handle = std::thread::Builder::new()
            .name("celframe-h264".into())
            .spawn(move || {
                let coded = encode_gop(settings, first, receiver, &cancel);
                if coded.is_err() {
                    budget.fail();
                }
                drop(seat); // after the encoder, which left the pool in encode_gop
                coded
            })
            .map_err(|e| Error::Io { context: "starting an OpenH264 worker thread".into(), source: e })?;
        Ok(GopWorker { first, sender: Some(sender), handle })
    }

    fn join(mut self) -> Result<CodedGop> {
        self.sender = None;
        self.handle.join().unwrap_or_else(|_| Err(Error::Internal("an OpenH264 worker thread panicked".into())))
    }
}

/// One GOP coded: its samples (length-prefixed NAL units) back to back.
#[derive(Default)]
struct CodedGop {
    data: Vec<u8>,
    sizes: Vec<u32>,
    /// 0-based numbers, within the GOP, of the IDR samples.
    idr: Vec<u32>,
    sps: Vec<u8>,
    pps: Vec<u8>,
}

/// Codes the frames of the GOP starting at clip frame `first` as they arrive, on a fresh encoder.
fn encode_gop(
    settings: Settings,
    first: u64,
    frames: Receiver<(Yuv420, Permit)>,
    cancel: &AtomicBool,
) -> Result<CodedGop> {
    let mut qp_max = settings.qp_max;
    let mut encoder = Encoder::new(&settings, qp_max)?;
    // A slice's share of the raw 4:2:0 picture, in bytes (see the restarts below).
    let raw = settings.width as usize * settings.height as usize * 3 / 2;
    let slice_limit = raw / settings.slices as usize;
    let mut stream = Vec::new();
    let mut gop = CodedGop::default();
    let (mut sps, mut pps) = (None, None);
    for (index, (yuv, _permit)) in (first..).zip(frames.iter()) {
        if cancel.load(Ordering::SeqCst) {
            return Err(Error::Internal("the mp4 was abandoned".into()));
        }
        let millis = index * 1000 * settings.fps.den() as u64 / settings.fps.num() as u64;
        loop {
            // OpenH264 sizes its bitstream buffers to the raw picture and fails a frame whose
            // coded size would not fit (welsEncoderExt.cpp returns cmMallocMemeError and
            // uninitialises the encoder). Noise-like frames at low quantisers do that, so restart
            // the encoder with a higher quantiser cap (the restart codes this frame as an IDR; SPS
            // and PPS do not depend on the quantiser) and keep that cap for the rest of the GOP.
            // Where the limit lies depends on whether the slices were coded on one thread (one
            // buffer for the picture) or on the pool (one per slice), so a slice coded larger than
            // its share of the raw picture restarts the encoder too: below that share neither way
            // fails (encoder_ext.cpp RequestMemorySvc, slice_multi_threading.cpp WriteSliceBs),
            // and the restarts, like the bytes, do not depend on the threads.
            let failure = match encoder.encode(&yuv, index, millis as i64, &mut stream)? {
                Coded::Picture if annex_b_units(&stream).iter().all(|u| u.len() <= slice_limit) => break,
                Coded::Picture => None,
                Coded::Failed(code) => Some(code),
            };
            if qp_max >= 51 {
                let why = match failure {
                    Some(code) => format!("OpenH264 failed (return code {code})"),
                    None => format!("a slice coded to more than {slice_limit} bytes"),
                };
                return Err(Error::Internal(format!("frame {index} does not fit at quantiser 51: {why}")));
            }
            qp_max = (qp_max + 12).min(51);
            encoder = Encoder::new(&settings, qp_max)?;
        }

        let start = gop.data.len();
        let mut idr = false;
        for unit in annex_b_units(&stream) {
            match unit[0] & 0x1f {
                NAL_SPS => keep_parameter_set(&mut sps, unit, "SPS", index)?,
                NAL_PPS => keep_parameter_set(&mut pps, unit, "PPS", index)?,
                NAL_AUD => {}
                kind => {
                    idr |= kind == NAL_IDR;
                    gop.data.extend_from_slice(&(unit.len() as u32).to_be_bytes());
                    gop.data.extend_from_slice(unit);
                }
            }
        }
        let size = (gop.data.len() - start) as u64;
        if size == 0 {
            return Err(Error::Internal(format!("OpenH264 returned no slice data for frame {index}")));
        }
        let size = u32::try_from(size)
            .map_err(|_| Error::Internal(format!("frame {index} coded to {size} bytes, beyond an MP4 sample size")))?;
        if idr {
            gop.idr.push(gop.sizes.len() as u32);
        }
        gop.sizes.push(size);
    }
    let (Some(sps), Some(pps)) = (sps, pps) else {
        return Err(Error::Internal(format!("OpenH264 wrote no SPS/PPS for the GOP from frame {first}")));
    };
    (gop.sps, gop.pps) = (sps, pps);
    Ok(gop)
}

/// The most threads OpenH264 codes the slices of one picture on (MAX_THREADS_NUM,
/// wels_const.h). Its thread pool is one per process, started with the thread count of the first
/// encoder that needs it and shared by every encoder while one is alive (WelsThreadPool.cpp).
pub(crate) const MAX_SLICE_THREADS: u32 = 4;

/// Slices per picture for `width x height` frames: a function of the size only, so the bytes do
/// not depend on the machine. OpenH264 codes the slices of a picture at once on its pool (one task
/// per slice, up to [`MAX_SLICE_THREADS`] at a time), so a picture takes about as long as its
/// largest slice. This is the fewest slices (1 to 4, at least [`MIN_SLICE_ROWS`] macroblock rows
/// each on average) whose largest is as small as any: 3 for 1024x576 (12 rows each, where 4 slices
/// would be 8 + 8 + 8 + 12). OpenH264 codes pictures of at most 48 macroblocks as one slice
/// (MIN_NUM_MB_PER_SLICE).
pub(crate) fn slice_count(width: u32, height: u32) -> u32 {
    let (mb_w, mb_h) = (width.div_ceil(16), height.div_ceil(16));
    if mb_w * mb_h <= 48 {
        return 1;
    }
    let mut best = (mb_w * mb_h, 1);
    for n in 2..=(mb_h / MIN_SLICE_ROWS).min(MAX_SLICE_THREADS) {
        if let Some(largest) = largest_slice(mb_w, mb_h, n)
            && largest < best.0
        {
            best = (largest, n);
        }
    }
    best.1
}

/// Macroblock rows per slice, on average, at least. Each slice edge costs quality (prediction
/// starts afresh, deblocking stops at it, and OpenH264 drops its per-row quantiser adjustment with
/// several slices): on the 256x144 test clip the mean error grew from 0.93 with one slice to 1.17
/// with four of 2 rows, while at 1024x576 three slices of 12 rows gave the same PSNR as one
/// (42.13 dB on flat frames, 33.86 dB on grainy ones; 0.04 to 11% more bytes).
const MIN_SLICE_ROWS: u32 = 8;

/// The macroblocks of the largest slice when OpenH264 cuts a picture of `mb_w x mb_h` macroblocks
/// into `n` slices, or None where it refuses that count. Its fixed-count mode with rate control
/// cuts at groups of macroblock rows (GOMs: 2 rows in pictures up to 30 macroblocks wide, else 4;
/// rc.h), each slice the rounded even share in whole GOMs, the last one the rest
/// (GomValidCheckSliceMbNum, svc_enc_slice_segment.cpp).
fn largest_slice(mb_w: u32, mb_h: u32, n: u32) -> Option<u32> {
    let total = mb_w * mb_h;
    let gom = mb_w * if mb_w <= 30 { 2 } else { 4 };
    if gom * n > total {
        return None;
    }
    // WELS_DIV_ROUND: the share rounded half up to whole GOMs.
    let share = (gom / 2 + total / n) / gom * gom;
    let (mut left, mut largest) = (total, 0);
    for k in 0..n - 1 {
        let most = left - (n - k - 1) * gom;
        let size = if share < gom {
            gom
        } else if share > most {
            most / gom * gom
        } else {
            share
        };
        if size == 0 || size >= left {
            return None;
        }
        left -= size;
        largest = largest.max(size);
    }
    (left >= gom).then_some(largest.max(left))
}

/// What [`Encoder::encode`] made of a picture.
enum Coded {
    /// Coded; its NAL units are in the stream.
    Picture,
    /// OpenH264 refused the frame with this return code (CM_RETURN, codec_def.h) and is no longer
    /// usable.
    Failed(i32),
}

/// One OpenH264 encoder, driven through its C API (codec_api.h, `ISVCEncoder`).
struct Encoder {
    handle: *mut sys::ISVCEncoder,
    /// Where OpenH264 describes each coded picture (its layers and NAL units).
    coded: Box<sys::SFrameBSInfo>,
}

// SAFETY: an encoder is used by one thread at a time (its GOP worker). OpenH264 keeps no state tied
// to the thread that created an encoder; its slice threads belong to its own pool.
unsafe impl Send for Encoder {}

impl Encoder {
    /// An encoder for `settings`, quantiser at most `qp_max`.
    fn new(settings: &Settings, qp_max: u8) -> Result<Encoder> {
        let failed =
            |call: &str, code: i32| Error::Internal(format!("starting the OpenH264 encoder: {call} returned {code}"));
        let mut handle = std::ptr::null_mut();
        // SAFETY: WelsCreateSVCEncoder stores a new encoder in `handle` (or leaves it null).
        let code = unsafe { sys::source::APILoader::WelsCreateSVCEncoder(&mut handle) };
        if code != 0 || handle.is_null() {
            return Err(failed("WelsCreateSVCEncoder", code));
        }
        let encoder = Encoder { handle, coded: Box::default() };
        let vtable = encoder.vtable()?;
        let (Some(defaults), Some(initialize), Some(set_option)) =
            (vtable.GetDefaultParams, vtable.InitializeExt, vtable.SetOption)
        else {
            return Err(Error::Internal("the OpenH264 encoder lacks a function of its interface".into()));
        };
        let mut params = sys::SEncParamExt::default();
        // SAFETY: the encoder is live and `params` outlives the call.
        let code = unsafe { defaults(handle, &mut params) };
        if code != 0 {
            return Err(failed("GetDefaultParams", code));
        }
        configure(&mut params, settings, qp_max);
        // Quiet before InitializeExt, which logs the parameters it adjusts on stderr.
        let mut quiet = sys::WELS_LOG_QUIET;
        // SAFETY: TRACE_LEVEL reads one int from the pointer; DATAFORMAT likewise.
        let code = unsafe { set_option(handle, sys::ENCODER_OPTION_TRACE_LEVEL, (&raw mut quiet).cast()) };
        if code != 0 {
            return Err(failed("SetOption(TRACE_LEVEL)", code));
        }
        // SAFETY: the encoder is live and `params` outlives the call (OpenH264 copies it).
        let code = unsafe { initialize(handle, &params) };
        if code != 0 {
            return Err(failed("InitializeExt", code));
        }
        let mut format = sys::videoFormatI420;
        // SAFETY: as above.
        let code = unsafe { set_option(handle, sys::ENCODER_OPTION_DATAFORMAT, (&raw mut format).cast()) };
        if code != 0 {
            return Err(failed("SetOption(DATAFORMAT)", code));
        }
        Ok(encoder)
    }

    fn vtable(&self) -> Result<&sys::ISVCEncoderVtbl> {
        // SAFETY: `handle` points at the encoder's vtable pointer from WelsCreateSVCEncoder until
        // WelsDestroySVCEncoder in drop.
        unsafe { (*self.handle).as_ref() }
            .ok_or_else(|| Error::Internal("the OpenH264 encoder has no interface table".into()))
    }

    /// Codes `picture` (the encoder's size), clip frame `index`, at `millis`; on success its NAL units, Annex B, replace
    /// the contents of `stream`.
    fn encode(&mut self, picture: &Yuv420, index: u64, millis: i64, stream: &mut Vec<u8>) -> Result<Coded> {
        let Some(encode_frame) = self.vtable()?.EncodeFrame else {
            return Err(Error::Internal("the OpenH264 encoder lacks EncodeFrame".into()));
        };
        let (w, h) = (picture.width as i32, picture.height as i32);
        let source = sys::SSourcePicture {
            iColorFormat: sys::videoFormatI420,
            iStride: [w, w / 2, w / 2, 0],
            // OpenH264 only reads the planes (the pointers are not const in its C API).
            pData: [
                picture.y.as_ptr().cast_mut(),
                picture.u.as_ptr().cast_mut(),
                picture.v.as_ptr().cast_mut(),
                std::ptr::null_mut(),
            ],
            iPicWidth: w,
            iPicHeight: h,
            uiTimeStamp: millis,
            bPsnrY: false,
            bPsnrU: false,
            bPsnrV: false,
        };
        // SAFETY: the encoder is live; `source` points at planes of its size that outlive the call;
        // `coded` is written by OpenH264 and points into the encoder's own buffers afterwards.
        let code = unsafe { encode_frame(self.handle, &source, &mut *self.coded) };
        if code != 0 {
            return Ok(Coded::Failed(code));
        }
        let coded = &*self.coded;
        if matches!(coded.eFrameType, sys::videoFrameTypeSkip | sys::videoFrameTypeInvalid) {
            let kind = coded.eFrameType;
            return Err(Error::Internal(format!("OpenH264 returned no picture for frame {index} (frame type {kind})")));
        }
        stream.clear();
        let layers = usize::try_from(coded.iLayerNum).unwrap_or(0).min(coded.sLayerInfo.len());
        for layer in &coded.sLayerInfo[..layers] {
            let nals = usize::try_from(layer.iNalCount).unwrap_or(0);
            if nals == 0 || layer.pNalLengthInByte.is_null() || layer.pBsBuf.is_null() {
                continue;
            }
            // SAFETY: after a successful EncodeFrame, `pNalLengthInByte` holds `iNalCount` lengths
            // and `pBsBuf` that many NAL units back to back, valid until the next call.
            let lengths = unsafe { std::slice::from_raw_parts(layer.pNalLengthInByte, nals) };
            let bytes: usize = lengths.iter().map(|&n| usize::try_from(n).unwrap_or(0)).sum();
            // SAFETY: as above.
            stream.extend_from_slice(unsafe { std::slice::from_raw_parts(layer.pBsBuf, bytes) });
        }
        Ok(Coded::Picture)
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        // SAFETY: `handle` came from WelsCreateSVCEncoder and is not used again; the destructor
        // uninitialises the encoder first.
        unsafe { sys::source::APILoader::WelsDestroySVCEncoder(self.handle) };
    }
}

/// Fills OpenH264's parameters (GetDefaultParams' values otherwise) for `settings`.
///
/// Buffer-based rate control (no bitrate target enforced; the quantiser follows the encoder's
/// buffer within qp_max - 8 ..= qp_max) with a generous nominal bitrate (about 0.25 bit per pixel
/// per frame, 1 to 60 Mb/s) so the buffer rarely pushes the quantiser to its cap. Frame skipping is
/// off: the mp4 must hold every frame. (The bitrate modes cannot run without frame skipping;
/// OpenH264 warns on stderr if asked to.) Baseline profile, CAVLC: OpenH264 recovers from a
/// macroblock overflowing its buffer only with CAVLC (svc_encode_slice.cpp).
fn configure(p: &mut sys::SEncParamExt, settings: &Settings, qp_max: u8) {
    let (width, height, fps) = (settings.width as i32, settings.height as i32, settings.fps.as_f64() as f32);
    let bits = (width as f64 * height as f64 * fps as f64 * 0.25).clamp(1e6, 60e6) as i32;
    p.iUsageType = sys::CAMERA_VIDEO_REAL_TIME;
    p.iPicWidth = width;
    p.iPicHeight = height;
    p.iRCMode = sys::RC_BUFFERBASED_MODE;
    p.iTargetBitrate = bits;
    p.fMaxFrameRate = fps;
    p.bEnableFrameSkip = false;
    p.iMinQp = qp_max.saturating_sub(8) as i32;
    p.iMaxQp = qp_max as i32;
    p.iComplexityMode = sys::HIGH_COMPLEXITY;
    p.uiIntraPeriod = settings.intra_period;
    p.eSpsPpsIdStrategy = sys::CONSTANT_ID;
    p.iTemporalLayerNum = 1;
    p.iSpatialLayerNum = 1;
    p.bEnableDenoise = false;
    p.bEnableSceneChangeDetect = true;
    p.bEnableAdaptiveQuant = true;
    // Background detection codes "static" blocks as skips; on slow gradients that left visible
    // drift (mean error 1.66 vs 0.90 without it on the test clip).
    p.bEnableBackgroundDetection = false;
    p.bEnableLongTermReference = false;
    p.iLtrMarkPeriod = 30;
    // Slice threads: said explicitly, as 0 ("auto") would follow the machine's cores.
    // Load balancing moves slice boundaries by measured coding times, which would make the bytes
    // differ from run to run (codec_app_def.h says so).
    p.iMultipleThreadIdc = settings.slice_threads.clamp(1, MAX_SLICE_THREADS) as u16;
    p.bUseLoadBalancing = false;
    // Deblocking inside slices only: OpenH264 forces this whenever slices run on several threads
    // (InitSliceSettings in encoder_ext.cpp); asked for with one thread too, so the thread count
    // does not change the pictures.
    p.iLoopFilterDisableIdc = if settings.slices > 1 { 2 } else { 0 };
    let layer = &mut p.sSpatialLayers[0];
    layer.iVideoWidth = width;
    layer.iVideoHeight = height;
    layer.fFrameRate = fps;
    layer.iSpatialBitrate = bits;
    layer.iMaxSpatialBitrate = bits;
    layer.sSliceArgument.uiSliceMode =
        if settings.slices > 1 { sys::SM_FIXEDSLCNUM_SLICE } else { sys::SM_SINGLE_SLICE };
    layer.sSliceArgument.uiSliceNum = settings.slices;
    // VUI: BT.709 primaries, transfer and matrix (1, ITU-T H.273), limited range, as `yuv.rs`
    // converts and the mp4's colr box says.
    layer.bVideoSignalTypePresent = true;
    layer.bFullRange = false;
    layer.bColorDescriptionPresent = true;
    layer.uiColorPrimaries = 1;
    layer.uiTransferCharacteristics = 1;
    layer.uiColorMatrix = 1;
}

/// Keeps the first SPS or PPS; a different one later (from frame `frame` on) would need a second
/// sample entry, which OpenH264 with a constant parameter-set id and one configuration never
/// produces.
fn keep_parameter_set(slot: &mut Option<Vec<u8>>, unit: &[u8], what: &str, frame: u64) -> Result<()> {
    match slot {
        None => *slot = Some(unit.to_vec()),
        Some(first) if first.as_slice() == unit => {}
        Some(_) => {
            return Err(Error::Internal(format!(
                "OpenH264 wrote a different {what} from frame {frame} on (one mp4 track holds one)"
            )));
        }
    }
    Ok(())
}
