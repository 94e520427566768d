//! MP4 muxing for the built-in path: one H.264 video track, every sample in one chunk, moov before
//! mdat ("faststart"), boxes encoded by the `mp4-atom` crate.
//!
//! Layout (ISO/IEC 14496-12, ISO base media file format; ISO/IEC 14496-15 for AVC):
//! ```text
//! ftyp  isom, minor 512, compatible isom iso2 avc1 mp41
//! moov  mvhd (time scale 1000)
//!       trak  tkhd (track 1, enabled, in movie, width x height)
//!             mdia  mdhd (time scale = a multiple of the rate's numerator) hdlr vide
//!                   minf  vmhd  dinf/dref/url (self-contained)
//!                         stbl  stsd: avc1 (avcC: SPS + PPS, 4-byte NAL lengths; colr nclx; pasp 1:1)
//!                               stts: every sample lasts one frame   stss: the IDR samples
//!                               stsc: one chunk of all samples       stsz: sample sizes
//!                               stco: the chunk's offset (just past the mdat header)
//! mdat  the samples: each an access unit of length-prefixed NAL units (no start codes, no SPS/PPS)
//! ```
//! No edit list or composition offsets: OpenH264 codes no B-frames, so decode order is
//! presentation order and the first sample is shown at time 0.

use std::io::{Read, Write};
use std::path::Path;

use mp4_atom::{
    Avc1, Avcc, Codec, Colr, Dinf, Dref, Encode, Ftyp, Hdlr, Mdhd, Mdia, Minf, Moov, Mvhd, Pasp, Stbl, Stco, Stsc,
    StscEntry, Stsd, Stss, Stsz, StszSamples, Stts, SttsEntry, Tkhd, Trak, Url, Visual, Vmhd,
};

use crate::error::{Error, Result};

use super::Fps;
use super::fs::write_atomic_with;

/// Colour description shared by the SPS (VUI) and the `colr` box: ITU-T H.273 code points
/// (the same numbers H.264 Annex E uses): BT.709 primaries (1), BT.709 transfer (1), BT.709
/// matrix (1), limited range.
pub(crate) const COLOUR_PRIMARIES_BT709: u16 = 1;
pub(crate) const TRANSFER_BT709: u16 = 1;
pub(crate) const MATRIX_BT709: u16 = 1;

/// What the muxer needs to know about the coded track.
pub(crate) struct Track<'a> {
    pub width: u32,
    pub height: u32,
    pub fps: Fps,
    /// The sequence and picture parameter sets (NAL units without start codes).
    pub sps: &'a [u8],
    pub pps: &'a [u8],
    /// Size of each sample in bytes, in decode order.
    pub sample_sizes: &'a [u32],
    /// 1-based numbers of the samples that are IDR pictures (sync samples).
    pub sync_samples: &'a [u32],
}

/// The media time scale and one frame's duration in it: `num * k` and `den * k` with `k` chosen
/// so the scale is at least 10000 (players round times to the scale; 10 fps -> 10000 / 1000).
fn media_timing(fps: Fps) -> (u32, u32) {
    let k = 10_000u32.div_ceil(fps.num()).max(1);
    (fps.num() * k, fps.den() * k)
}

fn mp4_error(e: mp4_atom::Error) -> Error {
    Error::Internal(format!("encoding an MP4 box: {e}"))
}

/// `ftyp` + `moov` for `track`, with its samples starting at file offset `data_offset`.
fn header_boxes(track: &Track, data_offset: u64) -> Result<Vec<u8>> {
    let frames = track.sample_sizes.len() as u64;
    let (timescale, delta) = media_timing(track.fps);
    let media_duration = frames * delta as u64;
    // Movie time scale 1000 (milliseconds), duration rounded up.
    let movie_duration = (frames * track.fps.den() as u64 * 1000).div_ceil(track.fps.num() as u64);
    let (w, h) = (track.width, track.height);
    let too_large = || Error::Input(format!("{w}x{h} frames: an MP4 sample entry holds sizes up to 65535"));
    let (w16, h16) = (u16::try_from(w).map_err(|_| too_large())?, u16::try_from(h).map_err(|_| too_large())?);
    let count =
        u32::try_from(frames).map_err(|_| Error::Input(format!("{frames} frames: too many for one MP4 track")))?;
    let chunk_offset = u32::try_from(data_offset)
        .map_err(|_| Error::Internal(format!("MP4 header of {data_offset} bytes: the chunk offset overflows stco")))?;

    let avcc = Avcc::new(track.sps, track.pps).map_err(mp4_error)?;
    let avc1 = Avc1 {
        visual: Visual {
            data_reference_index: 1,
            width: w16,
            height: h16,
            horizresolution: 72.into(),
            vertresolution: 72.into(),
            frame_count: 1,
            compressor: "".into(),
            depth: 0x18,
        },
        avcc,
        btrt: None,
        colr: Some(Colr::Nclx {
            colour_primaries: COLOUR_PRIMARIES_BT709,
            transfer_characteristics: TRANSFER_BT709,
            matrix_coefficients: MATRIX_BT709,
            full_range_flag: false,
        }),
        pasp: Some(Pasp { h_spacing: 1, v_spacing: 1 }),
        taic: None,
        fiel: None,
        spatial: Default::default(),
    };
    let stbl = Stbl {
        stsd: Stsd { codecs: vec![Codec::Avc1(avc1)] },
        stts: Stts { entries: vec![SttsEntry { sample_count: count, sample_delta: delta }] },
        stss: Some(Stss { entries: track.sync_samples.to_vec() }),
        stsc: Stsc {
            entries: vec![StscEntry { first_chunk: 1, samples_per_chunk: count, sample_description_index: 1 }],
        },
        stsz: Stsz { samples: StszSamples::Different { sizes: track.sample_sizes.to_vec() } },
        stco: Some(Stco { entries: vec![chunk_offset] }),
        ..Default::default()
    };
    let moov = Moov {
        mvhd: Mvhd {
            creation_time: 0,
            modification_time: 0,
            timescale: 1000,
            duration: movie_duration,
            rate: 1.into(),
            volume: 1.into(),
            matrix: Default::default(),
            next_track_id: 2,
        },
        trak: vec![Trak {
            tkhd: Tkhd {
                track_id: 1,
                duration: movie_duration,
                enabled: true,
                in_movie: true,
                width: w16.into(),
                height: h16.into(),
                ..Default::default()
            },
            mdia: Mdia {
                mdhd: Mdhd {
                    creation_time: 0,
                    modification_time: 0,
                    timescale,
                    duration: media_duration,
                    language: "und".into(),
                },
                hdlr: Hdlr { handler: b"vide".into(), name: "VideoHandler".into() },
                minf: Minf {
                    vmhd: Some(Vmhd::default()),
                    dinf: Dinf { dref: Dref { entries: vec![Url::default().into()] } },
                    stbl,
                    ..Default::default()
                },
            },
            ..Default::default()
        }],
        ..Default::default()
    };
    let ftyp = Ftyp {
        major_brand: b"isom".into(),
        minor_version: 512,
        compatible_brands: vec![b"isom".into(), b"iso2".into(), b"avc1".into(), b"mp41".into()],
    };
    let mut out = Vec::new();
    ftyp.encode(&mut out).map_err(mp4_error)?;
    moov.encode(&mut out).map_err(mp4_error)?;
    Ok(out)
}

/// The mdat box header for `payload` bytes: 8 bytes, or 16 with a 64-bit size (ISO/IEC 14496-12
/// section 4.2: size 1 means a `largesize` follows the type).
fn mdat_header(payload: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    if payload + 8 <= u32::MAX as u64 {
        out.extend_from_slice(&((payload + 8) as u32).to_be_bytes());
        out.extend_from_slice(b"mdat");
    } else {
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(b"mdat");
        out.extend_from_slice(&(payload + 16).to_be_bytes());
    }
    out
}

/// Writes the mp4 at `path` (temporary name, sync, rename): header boxes, then the `payload_len`
/// bytes of samples read from `payload`.
pub(crate) fn write_mp4(path: &Path, track: &Track, payload: &mut impl Read, payload_len: u64) -> Result<()> {
    let total: u64 = track.sample_sizes.iter().map(|&s| s as u64).sum();
    if total != payload_len {
        return Err(Error::Internal(format!("MP4 samples add up to {total} bytes but {payload_len} were written")));
    }
    let mdat = mdat_header(payload_len);
    // The chunk offset is a value inside moov, not its size, so one pass with a placeholder gives
    // the header's length and a second pass the real offset.
    let provisional = header_boxes(track, 0)?;
    let data_offset = (provisional.len() + mdat.len()) as u64;
    let header = header_boxes(track, data_offset)?;
    if header.len() != provisional.len() {
        return Err(Error::Internal("the MP4 header changed size with its chunk offset".into()));
    }
    write_atomic_with(path, |out| {
        out.write_all(&header)?;
        out.write_all(&mdat)?;
        let copied = std::io::copy(payload, out)?;
        if copied != payload_len {
            return Err(std::io::Error::other(format!("sample file held {copied} bytes, expected {payload_len}")));
        }
        Ok(())
    })
}
