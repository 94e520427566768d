//! The built-in mp4 path: our RGB -> BT.709 limited-range 4:2:0 conversion, Cisco's OpenH264
//! (compiled from source by the `openh264` crate) for the H.264 bitstream, and our MP4 muxing.
//!
//! OpenH264 returns each frame as Annex B NAL units (start-code prefixed, ITU-T H.264 Annex B).
//! MP4 wants them as samples of 4-byte-length-prefixed NAL units with the SPS and PPS moved into
//! the avcC box (ISO/IEC 14496-15 section 5.3). The samples go to a temporary file beside the mp4
//! as they come, so a long clip does not sit in memory; `finish` writes the mp4 (moov first) and
//! copies them after it.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use openh264::OpenH264API;
use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, QpRange, RateControlMode,
    UsageType, VuiConfig,
};
use openh264::formats::YUVSlices;

use crate::error::{Error, Result};

use super::fs::{io_error, temp_path};
use super::mp4::{Track, write_mp4};
use super::yuv::{Yuv420, rgb_to_yuv420_into};
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

/// One mp4 being encoded by OpenH264.
pub(crate) struct BuiltInWriter {
    encoder: Encoder,
    /// The quantiser cap in use: raised (and the encoder restarted) when a frame does not fit
    /// OpenH264's output buffer, see `push`.
    qp_max: u8,
    fps: Fps,
    width: u32,
    height: u32,
    yuv: Yuv420,
    /// Annex B output of the current frame.
    stream: Vec<u8>,
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
    /// Prepares to write `path` from `width x height` frames at `fps`. `qp_max` caps the
    /// quantiser (H.264's 0..=51; lower is better quality and larger files).
    pub(crate) fn start(path: &Path, width: u32, height: u32, fps: Fps, qp_max: u8) -> Result<Self> {
        let (long, short) = (width.max(height), width.min(height));
        if long > MAX_LONG_SIDE || short > MAX_SHORT_SIDE {
            return Err(Error::Unsupported(format!(
                "{width}x{height} video with the built-in encoder: OpenH264 encodes up to \
                 {MAX_LONG_SIDE}x{MAX_SHORT_SIDE}; install ffmpeg for larger frames"
            )));
        }
        let qp_max = qp_max.min(51);
        let encoder = new_encoder(width, height, fps, qp_max)?;
        let samples_path = temp_path(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&samples_path)
            .map_err(io_error("writing", &samples_path))?;
        Ok(BuiltInWriter {
            encoder,
            qp_max,
            fps,
            width,
            height,
            yuv: Yuv420::default(),
            stream: Vec::new(),
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

    pub(crate) fn push(&mut self, image: &RgbImage) -> Result<()> {
        rgb_to_yuv420_into(image, &mut self.yuv)?;
        let (w, h) = (self.width as usize, self.height as usize);
        let source = YUVSlices::new((&self.yuv.y, &self.yuv.u, &self.yuv.v), (w, h), (w, w / 2, w / 2));
        let index = self.sample_sizes.len() as u64;
        let millis = index * 1000 * self.fps.den() as u64 / self.fps.num() as u64;
        let timestamp = openh264::Timestamp::from_millis(millis);
        loop {
            match self.encoder.encode_at(&source, timestamp) {
                Ok(frame) => {
                    let frame_type = frame.frame_type();
                    if matches!(frame_type, FrameType::Skip | FrameType::Invalid) {
                        return Err(Error::Internal(format!(
                            "OpenH264 returned no picture for frame {index} ({frame_type:?})"
                        )));
                    }
                    self.stream.clear();
                    frame.write_vec(&mut self.stream);
                    break;
                }
                // OpenH264 sizes its frame buffer to the raw picture and fails a frame whose
                // coded size would not fit (welsEncoderExt.cpp returns cmMallocMemeError and
                // uninitialises the encoder). Noise-like frames at low quantisers do that, so
                // restart the encoder with a higher quantiser cap (the restart codes this frame
                // as an IDR; SPS and PPS do not depend on the quantiser) and keep that cap for
                // the rest of the clip.
                Err(_) if self.qp_max < 51 => {
                    self.qp_max = (self.qp_max + 12).min(51);
                    self.encoder = new_encoder(self.width, self.height, self.fps, self.qp_max)?;
                }
                Err(e) => return Err(Error::Internal(format!("OpenH264 failed on frame {index}: {e}"))),
            }
        }

        let mut size = 0u64;
        let mut idr = false;
        let io = io_error("writing", &self.samples_path);
        for unit in annex_b_units(&self.stream) {
            match unit[0] & 0x1f {
                NAL_SPS => keep_parameter_set(&mut self.sps, unit, "SPS")?,
                NAL_PPS => keep_parameter_set(&mut self.pps, unit, "PPS")?,
                NAL_AUD => {}
                kind => {
                    idr |= kind == NAL_IDR;
                    self.samples.write_all(&(unit.len() as u32).to_be_bytes()).map_err(&io)?;
                    self.samples.write_all(unit).map_err(&io)?;
                    size += 4 + unit.len() as u64;
                }
            }
        }
        if size == 0 {
            return Err(Error::Internal(format!("OpenH264 returned no slice data for frame {index}")));
        }
        let size = u32::try_from(size)
            .map_err(|_| Error::Internal(format!("frame {index} coded to {size} bytes, beyond an MP4 sample size")))?;
        self.sample_sizes.push(size);
        self.samples_len += size as u64;
        if idr {
            self.sync_samples.push(self.sample_sizes.len() as u32);
        }
        Ok(())
    }

    /// Writes the mp4: header boxes first, then the samples.
    pub(crate) fn finish(mut self) -> Result<()> {
        let (Some(sps), Some(pps)) = (self.sps.take(), self.pps.take()) else {
            return Err(Error::Input(format!("{}: no frames were encoded", self.path.display())));
        };
        let io = io_error("reading back", &self.samples_path);
        self.samples.flush().map_err(&io)?;
        let file = self.samples.get_mut();
        file.seek(SeekFrom::Start(0)).map_err(&io)?;
        let track = Track {
            width: self.width,
            height: self.height,
            fps: self.fps,
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
        let _ = std::fs::remove_file(&self.samples_path);
    }
}

/// An OpenH264 encoder for `width x height` frames at `fps`, quantiser at most `qp_max`.
fn new_encoder(width: u32, height: u32, fps: Fps, qp_max: u8) -> Result<Encoder> {
    // Buffer-based rate control (no bitrate target enforced; the quantiser follows the encoder's
    // buffer within qp_max - 8 ..= qp_max) with a generous nominal bitrate (about 0.25 bit per
    // pixel per frame, 1 to 60 Mb/s) so the buffer rarely pushes the quantiser to its cap. Frame
    // skipping is off: the mp4 must hold every frame. (The bitrate modes cannot run without frame
    // skipping; OpenH264 warns on stderr if asked to.) Baseline profile, CAVLC: OpenH264 recovers
    // from a macroblock overflowing its buffer only with CAVLC (svc_encode_slice.cpp).
    let bits = (width as f64 * height as f64 * fps.as_f64() * 0.25).clamp(1e6, 60e6) as u32;
    let config = EncoderConfig::new()
        .usage_type(UsageType::CameraVideoRealTime)
        .rate_control_mode(RateControlMode::Bufferbased)
        .bitrate(BitRate::from_bps(bits))
        .max_frame_rate(FrameRate::from_hz(fps.as_f64() as f32))
        .skip_frames(false)
        .qp(QpRange::new(qp_max.saturating_sub(8), qp_max))
        .complexity(Complexity::High)
        // Background detection codes "static" blocks as skips; on slow gradients that left
        // visible drift (mean error 1.66 vs 0.90 without it on the test clip).
        .background_detection(false)
        // An IDR (a seek point) every 2 seconds of video.
        .intra_frame_period(IntraFramePeriod::from_num_frames((2.0 * fps.as_f64()).ceil().max(1.0) as u32))
        .vui(VuiConfig::bt709());
    Encoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| Error::Internal(format!("starting the OpenH264 encoder: {e}")))
}

/// Keeps the first SPS or PPS; a different one later would need a second sample entry, which
/// OpenH264 with a constant parameter-set id never produces.
fn keep_parameter_set(slot: &mut Option<Vec<u8>>, unit: &[u8], what: &str) -> Result<()> {
    match slot {
        None => *slot = Some(unit.to_vec()),
        Some(first) if first.as_slice() == unit => {}
        Some(_) => return Err(Error::Internal(format!("OpenH264 changed its {what} mid-stream"))),
    }
    Ok(())
}
