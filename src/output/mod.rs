//! The output stage of a render: 8-bit RGB frames become PNG files (encoded on a thread pool), an
//! H.264 mp4 (through ffmpeg where it is installed, else the built-in OpenH264 encoder and our own
//! MP4 muxing), a prompt grid and the run's config files, laid out as the outputs tree:
//!
//! ```text
//! outputs/
//!   images/prompt_grid_NAME.png        first frames of the clips, prompt text under each
//!   video/clip_001/frames/000000.png   every frame, 8-bit RGB
//!   video/clip_001/clip_001.mp4        H.264 yuv420p, BT.709 limited range, faststart
//!   configs/*.json                     JSON handed over by the caller
//! ```
//!
//! Atomicity: every file is written under a temporary name in its folder, flushed to disk and
//! renamed. A clip is assembled in `video/.clip_001.partial/` and that folder is renamed to
//! `video/clip_001/` once its mp4 and every PNG are complete, so `clip_001/` exists only for a
//! complete clip ([`OutputTree::clip_complete`]) and an interrupted run leaves only dot-named
//! leftovers, which the next [`OutputTree::open`] removes, except an unfinished clip's saved
//! latents in `video/.clip_001.resume/` ([`OutputTree::resume_dir`], `pipeline::resume`), kept
//! until the clip is complete. One run writes a tree at a time: `open` takes an exclusive lock on
//! the root folder.
//!
//! The flow for one clip: [`OutputTree::begin_clip`] -> [`ClipWriter::push`] per frame (returns
//! once the frame is queued; bounded queues make a slow disk or encoder hold the caller back
//! instead of buffering without limit) -> [`ClipWriter::finish`], which says which mp4 encoder ran.
//! Dropping a `ClipWriter` without `finish` aborts the clip: workers stop, ffmpeg is killed and the
//! partial folder removed.

mod ffmpeg;
mod font;
mod fs;
mod grid;
mod h264;
mod mp4;
mod pngs;
mod tree;
mod yuv;

use std::sync::Arc;

use crate::error::{Error, Result};

pub use ffmpeg::{FfmpegInfo, probe_ffmpeg};
pub use fs::write_atomic;
pub use grid::{GridCell, prompt_grid};
pub use pngs::{PngPool, decode_png, encode_png, write_png};
pub use tree::{ClipOptions, ClipReport, ClipWriter, Mp4Choice, Mp4Encoder, OutputTree};
pub use yuv::{Yuv420, rgb_to_yuv420};

/// An 8-bit RGB image: `height` rows of `width` pixels, each pixel R, G, B (sRGB-encoded values,
/// as the VAE's output is converted to 8 bits). The pixels are shared, so handing one frame to the
/// PNG pool and to the video encoder does not copy it.
#[derive(Clone)]
pub struct RgbImage {
    width: u32,
    height: u32,
    pixels: Arc<Vec<u8>>,
}

impl RgbImage {
    /// Takes `pixels` (row-major, `width * height * 3` bytes) without copying.
    pub fn new(width: u32, height: u32, pixels: Vec<u8>) -> Result<RgbImage> {
        if width == 0 || height == 0 {
            return Err(Error::Input(format!("image of {width}x{height} pixels: both sizes must be at least 1")));
        }
        let expected = (width as u64) * (height as u64) * 3;
        if pixels.len() as u64 != expected {
            return Err(Error::Input(format!(
                "image of {width}x{height} pixels needs {expected} bytes of RGB (3 per pixel), got {}",
                pixels.len()
            )));
        }
        Ok(RgbImage { width, height, pixels: Arc::new(pixels) })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Row-major RGB bytes.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}x{})", self.width, self.height)
    }
}

/// A frame rate as a fraction `num / den` frames per second (10/1, 24000/1001).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fps {
    num: u32,
    den: u32,
}

impl Fps {
    /// Largest numerator and denominator accepted: enough for NTSC-style rates (24000/1001) and
    /// small enough that sample times in the mp4's time scale stay far from overflow.
    pub const MAX_TERM: u32 = 1_000_000;
    /// Highest rate accepted, frames per second.
    pub const MAX_RATE: u32 = 240;

    pub fn new(num: u32, den: u32) -> Result<Fps> {
        if num == 0 || den == 0 || num > Fps::MAX_TERM || den > Fps::MAX_TERM {
            return Err(Error::Input(format!(
                "frame rate {num}/{den}: numerator and denominator must be within 1..={}",
                Fps::MAX_TERM
            )));
        }
        if num as u64 > Fps::MAX_RATE as u64 * den as u64 {
            return Err(Error::Input(format!("frame rate {num}/{den}: more than {} frames per second", Fps::MAX_RATE)));
        }
        let g = gcd(num, den);
        Ok(Fps { num: num / g, den: den / g })
    }

    /// A whole number of frames per second.
    pub fn whole(fps: u32) -> Result<Fps> {
        Fps::new(fps, 1)
    }

    pub fn num(self) -> u32 {
        self.num
    }

    pub fn den(self) -> u32 {
        self.den
    }

    pub fn as_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }
}

impl std::fmt::Display for Fps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.den == 1 { write!(f, "{}", self.num) } else { write!(f, "{}/{}", self.num, self.den) }
    }
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}
