//! Video files as control input, decoded by ffmpeg as a subprocess: `ffprobe` gives the first
//! video stream's size (turned by its rotation tag, as ffmpeg's autorotate turns the frames), then
//! `ffmpeg` writes raw frames (`rgb24`, or `gray16le` for depth) on a pipe, forced to that size so
//! every frame has the bytes expected.
//!
//! Which video frame a clip frame takes ([`VideoTiming`]):
//! - `Time` (the default): clip frame i is the video frame shown at i / fps seconds from the
//!   video's start (ffmpeg's `fps` filter, which takes for each output time the frame nearest to
//!   it, dropping or repeating frames). The hint's motion keeps the speed it has in the video,
//!   whatever the video's own frame rate: a 30 fps dance drives a 10 fps clip at the same tempo.
//! - `Frames`: the video's frames in order, one per clip frame (`-vsync passthrough`): for
//!   sequences made frame by frame for the clip (an exported pose or depth pass). A video at
//!   another rate than the clip then plays faster or slower.
//!
//! Only the frames a clip needs are decoded (`-frames:v`). A video with fewer is an error, as are
//! a missing ffmpeg, a file ffprobe cannot read as video, a frame larger than `MAX_SIDE` on a side
//! and more than [`VIDEO_BYTES_LIMIT`] bytes of decoded frames.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;

use serde_json::Value;

use super::check_size;
use super::depth::DepthMap;
use crate::error::{Error, Result};
use crate::output::RgbImage;

/// File extensions read as video.
pub const VIDEO_EXTENSIONS: [&str; 10] = ["mp4", "m4v", "mov", "mkv", "webm", "avi", "gif", "mpg", "mpeg", "ts"];

/// Most bytes of decoded frames one video may give (frames x width x height x bytes per pixel):
/// 2 GiB, about 350 frames of 1080p RGB.
pub const VIDEO_BYTES_LIMIT: u64 = 2 << 30;

/// Bytes of ffmpeg's or ffprobe's stderr kept for error messages.
const STDERR_TAIL: usize = 4000;

/// Whether `path` names a video file (by its extension).
pub fn is_video(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| VIDEO_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// How the clip's frames are matched to the video's (see the module notes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VideoTiming {
    #[default]
    Time,
    Frames,
}

/// The ffmpeg and ffprobe programs (default: looked up on PATH).
#[derive(Clone, Debug)]
pub struct VideoTools {
    pub ffmpeg: PathBuf,
    pub ffprobe: PathBuf,
}

impl Default for VideoTools {
    fn default() -> Self {
        VideoTools { ffmpeg: PathBuf::from("ffmpeg"), ffprobe: PathBuf::from("ffprobe") }
    }
}

/// What the clip asks of a video: `frames` frames for a clip at `fps` frames per second.
#[derive(Clone, Copy, Debug)]
pub struct VideoRequest {
    pub frames: usize,
    pub fps: u32,
    pub timing: VideoTiming,
}

/// The frames of a video as RGB images, at the video's size.
pub fn read_video_rgb(path: &Path, request: VideoRequest, tools: &VideoTools) -> Result<Vec<RgbImage>> {
    let (width, height, frames) = read_frames(path, request, tools, PixelFormat::Rgb)?;
    frames.into_iter().map(|pixels| RgbImage::new(width, height, pixels)).collect()
}

/// The frames of a depth video as depth maps: each frame's grey level (its luma, in 16 bits, so
/// a 16-bit grey video keeps its precision and an 8-bit one reads v x 257).
pub fn read_video_depth(path: &Path, request: VideoRequest, tools: &VideoTools) -> Result<Vec<DepthMap>> {
    let (width, height, frames) = read_frames(path, request, tools, PixelFormat::Gray16)?;
    let name = path.display().to_string();
    frames
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| {
            let values = bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as f32).collect();
            DepthMap::from_values(width, height, values, &format!("{name} frame {i}"))
        })
        .collect()
}

#[derive(Clone, Copy)]
enum PixelFormat {
    Rgb,
    Gray16,
}

impl PixelFormat {
    fn name(self) -> &'static str {
        match self {
            PixelFormat::Rgb => "rgb24",
            PixelFormat::Gray16 => "gray16le",
        }
    }

    fn bytes(self) -> u64 {
        match self {
            PixelFormat::Rgb => 3,
            PixelFormat::Gray16 => 2,
        }
    }
}

/// Width, height and the raw bytes of each of `request.frames` frames.
fn read_frames(
    path: &Path,
    request: VideoRequest,
    tools: &VideoTools,
    format: PixelFormat,
) -> Result<(u32, u32, Vec<Vec<u8>>)> {
    let name = path.display();
    // A FIFO or a device would hang ffprobe; a folder is no video.
    drop(crate::io::open_regular(path, "control video")?);
    if request.frames == 0 || request.fps == 0 {
        return crate::input_err!("{name}: asked for {} frames at {} fps", request.frames, request.fps);
    }
    let (width, height) = probe_size(path, tools)?;
    check_size(width, height, &format!("{name}: video frames"))?;
    let frame_bytes = width as u64 * height as u64 * format.bytes();
    let total = frame_bytes * request.frames as u64;
    if total > VIDEO_BYTES_LIMIT {
        return crate::input_err!(
            "{name}: {} frames of {width}x{height} are {total} bytes decoded, more than the {VIDEO_BYTES_LIMIT}-byte \
             limit; give a smaller video (the hints are resized to the render size anyway) or fewer frames",
            request.frames
        );
    }
    let mut filters = Vec::new();
    if request.timing == VideoTiming::Time {
        filters.push(format!("fps={}", request.fps));
    }
    filters.push(format!("scale={width}:{height}"));
    let mut child = Command::new(&tools.ffmpeg)
        .args(["-hide_banner", "-nostdin", "-loglevel", "error", "-i"])
        .arg(path)
        .args(["-map", "0:v:0", "-vf", &filters.join(","), "-vsync", "passthrough"])
        .args(["-frames:v", &request.frames.to_string(), "-f", "rawvideo", "-pix_fmt", format.name(), "pipe:1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| not_runnable(&tools.ffmpeg, path, e))?;
    let stderr = drain_tail(child.stderr.take());
    let mut stdout = child.stdout.take().ok_or_else(|| Error::Internal("ffmpeg's stdout is not piped".into()))?;
    let mut frames = Vec::with_capacity(request.frames);
    let mut read_error = None;
    while frames.len() < request.frames {
        let mut frame = vec![0u8; frame_bytes as usize];
        match stdout.read_exact(&mut frame) {
            Ok(()) => frames.push(frame),
            Err(e) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    read_error = Some(e);
                }
                break;
            }
        }
    }
    // All frames read: ffmpeg may still be flushing; closing the pipe ends it.
    drop(stdout);
    let status =
        child.wait().map_err(|e| Error::Io { context: format!("waiting for ffmpeg reading {name}"), source: e })?;
    let tail = join_tail(stderr);
    if frames.len() == request.frames {
        return Ok((width, height, frames));
    }
    if let Some(e) = read_error {
        return Err(Error::Io { context: format!("reading frames of {name} from ffmpeg"), source: e });
    }
    if !status.success() {
        return crate::input_err!("{name}: ffmpeg could not decode it ({status}): {}", tail.trim());
    }
    let (got, needed) = (frames.len(), request.frames);
    match request.timing {
        VideoTiming::Time => crate::input_err!(
            "{name}: the video gives {got} frames at {} fps (it is about {:.2} s long); the clip needs {needed} \
             ({:.2} s): give a longer video or fewer frames",
            request.fps,
            got as f64 / request.fps as f64,
            needed as f64 / request.fps as f64
        ),
        VideoTiming::Frames => crate::input_err!(
            "{name}: the video has {got} frames; the clip needs {needed} (video_timing = \"frames\" takes one video \
             frame per clip frame): give a longer video or fewer frames"
        ),
    }
}

/// The first video stream's displayed size: ffprobe's coded width and height, swapped when the
/// stream is rotated by a quarter turn (ffmpeg turns the frames upright when decoding).
fn probe_size(path: &Path, tools: &VideoTools) -> Result<(u32, u32)> {
    let name = path.display();
    let output = Command::new(&tools.ffprobe)
        .args(["-v", "error", "-select_streams", "v:0"])
        .args(["-show_entries", "stream=width,height:stream_side_data=rotation:stream_tags=rotate", "-of", "json"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| not_runnable(&tools.ffprobe, path, e))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return crate::input_err!("{name}: not a video ffprobe can read: {}", first_line(&stderr));
    }
    let root: Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| Error::Input(format!("{name}: ffprobe's answer is not JSON ({e})")))?;
    let Some(stream) = root.get("streams").and_then(Value::as_array).and_then(|s| s.first()) else {
        return crate::input_err!("{name}: no video stream in the file");
    };
    let side = |key: &str| stream.get(key).and_then(Value::as_u64).filter(|&v| v > 0 && v <= u32::MAX as u64);
    let (Some(width), Some(height)) = (side("width"), side("height")) else {
        return crate::input_err!("{name}: ffprobe gives the video stream no size (is it an image or audio file?)");
    };
    let side_data = stream.get("side_data_list").and_then(Value::as_array).into_iter().flatten();
    let rotation = side_data
        .filter_map(|d| d.get("rotation").and_then(Value::as_f64))
        .chain(stream.get("tags").and_then(|t| t.get("rotate")).and_then(Value::as_str).and_then(|r| r.parse().ok()))
        .next()
        .unwrap_or(0.0);
    let quarter_turn = (rotation.round() as i64).rem_euclid(180) == 90;
    Ok(if quarter_turn { (height as u32, width as u32) } else { (width as u32, height as u32) })
}

fn not_runnable(program: &Path, path: &Path, e: std::io::Error) -> Error {
    let program = program.display();
    match e.kind() {
        std::io::ErrorKind::NotFound => Error::Input(format!(
            "{}: reading a video needs {program}, which was not found (install ffmpeg, which brings ffprobe)",
            path.display()
        )),
        _ => Error::Input(format!("{}: {program} cannot be run: {e}", path.display())),
    }
}

fn first_line(text: &str) -> &str {
    text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no message")
}

/// Reads a pipe to its end on a thread, keeping its last `STDERR_TAIL` bytes.
fn drain_tail<R: Read + Send + 'static>(pipe: Option<R>) -> Option<JoinHandle<Vec<u8>>> {
    let mut pipe = pipe?;
    std::thread::Builder::new()
        .name("celframe-video-stderr".into())
        .spawn(move || {
            let (mut kept, mut buf) = (Vec::new(), [0u8; 4096]);
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * STDERR_TAIL {
                    kept.drain(..kept.len() - STDERR_TAIL);
                }
            }
            kept
        })
        .ok()
}

fn join_tail(handle: Option<JoinHandle<Vec<u8>>>) -> String {
    handle.and_then(|h| h.join().ok()).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn video_files_are_known_by_extension() {
        for name in ["a.mp4", "b.WEBM", "c.mov", "d.gif", "e.mkv"] {
            assert!(is_video(Path::new(name)), "{name}");
        }
        for name in ["a.png", "b.json", "c", "mp4"] {
            assert!(!is_video(Path::new(name)), "{name}");
        }
    }

    #[test]
    fn a_missing_ffmpeg_is_an_input_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("celframe-video-tools-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("clip.mp4");
        std::fs::write(&path, b"not really a video").unwrap();
        let tools = VideoTools { ffmpeg: dir.join("no-ffmpeg"), ffprobe: dir.join("no-ffprobe") };
        let request = VideoRequest { frames: 4, fps: 8, timing: VideoTiming::Time };
        let err = read_video_rgb(&path, request, &tools).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, Error::Input(_)) && message.contains("clip.mp4") && message.contains("install ffmpeg"),
            "{message}"
        );
        let err = read_video_rgb(&dir, request, &tools).unwrap_err();
        assert!(matches!(err, Error::Input(_)) && err.to_string().contains("folder"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
