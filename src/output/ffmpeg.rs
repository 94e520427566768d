//! The mp4 through ffmpeg as a subprocess: raw RGB frames on its stdin (`-f rawvideo -pix_fmt
//! rgb24`), libx264, yuv420p, BT.709 limited range, `-movflags +faststart`.
//!
//! No deadlock: ffmpeg's stdout goes to /dev/null, its stderr is drained by a thread (keeping the
//! tail for error messages) and only stdin is written by the caller, so ffmpeg never waits on a full
//! pipe we do not read. If ffmpeg exits early, writing stdin fails with a broken pipe (Rust ignores
//! SIGPIPE) and the error carries ffmpeg's exit status and the tail of its stderr.
//!
//! No orphan: ffmpeg dies with the thread that started it. Otherwise a killed render's ffmpeg
//! would see EOF on its stdin, finish the partial mp4 and keep writing into the clip's staging
//! folder while the next run sweeps it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::process::dies_with_its_parent;

use super::fs::{io_error, temp_path};
use super::{Fps, RgbImage};

/// Bytes of ffmpeg's stderr kept for error messages.
const STDERR_TAIL: usize = 4000;

/// An ffmpeg found by [`probe_ffmpeg`].
#[derive(Clone, Debug)]
pub struct FfmpegInfo {
    /// The program as it was run (a name looked up on PATH, or a path).
    pub program: PathBuf,
    /// The first line of its banner, e.g. `ffmpeg version 5.1.6-0+deb12u1 Copyright ...` cut
    /// before "Copyright".
    pub version: String,
}

/// Runs `program -encoders` (at most 20 s) and returns its version if it runs and lists the
/// libx264 encoder; otherwise the reason it cannot be used, for the run's report.
pub fn probe_ffmpeg(program: &Path) -> std::result::Result<FfmpegInfo, String> {
    let name = program.display();
    let mut child = Command::new(program)
        .arg("-encoders")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("{name} not found"),
            _ => format!("{name} cannot be run: {e}"),
        })?;
    let stdout = drain(child.stdout.take(), usize::MAX);
    let stderr = drain(child.stderr.take(), 64 << 10);
    let status = wait_timeout(&mut child, Duration::from_secs(20));
    let (stdout, stderr) = (join_text(stdout), join_text(stderr));
    match status {
        Some(s) if s.success() => {}
        Some(s) => return Err(format!("{name} -encoders failed ({s}): {}", stderr.trim())),
        None => return Err(format!("{name} -encoders did not finish within 20 s")),
    }
    // Encoder lines look like " V....D libx264              libx264 H.264 / AVC / ..."
    if !stdout.lines().any(|l| l.split_whitespace().nth(1) == Some("libx264")) {
        return Err(format!("{name} has no libx264 encoder"));
    }
    let first = stderr.lines().next().unwrap_or("ffmpeg (version unknown)");
    let version = first.split(" Copyright").next().unwrap_or(first).trim().to_string();
    Ok(FfmpegInfo { program: program.to_path_buf(), version })
}

/// Reads a pipe to its end on a thread, keeping at most the last `keep` bytes.
fn drain<R: Read + Send + 'static>(pipe: Option<R>, keep: usize) -> Option<JoinHandle<Vec<u8>>> {
    let mut pipe = pipe?;
    std::thread::Builder::new()
        .name("celframe-ffmpeg-pipe".into())
        .spawn(move || {
            let mut kept = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        kept.extend_from_slice(&buf[..n]);
                        if kept.len() > keep.saturating_mul(2) {
                            kept.drain(..kept.len() - keep);
                        }
                    }
                }
            }
            if kept.len() > keep {
                kept.drain(..kept.len() - keep);
            }
            kept
        })
        .ok()
}

fn join_text(handle: Option<JoinHandle<Vec<u8>>>) -> String {
    handle.and_then(|h| h.join().ok()).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

/// Waits for `child` at most `limit`; kills it (and reaps it) when the time is up.
fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// One mp4 being written by an ffmpeg process.
pub(crate) struct FfmpegWriter {
    child: Child,
    stdin: Option<ChildStdin>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    program: PathBuf,
    /// ffmpeg writes here; renamed to `path` after it exits with success.
    temp: PathBuf,
    path: PathBuf,
    frame_bytes: usize,
    done: bool,
}

impl FfmpegWriter {
    /// Starts ffmpeg writing `path` (through a temporary name) from `width x height` RGB frames at
    /// `fps`; `crf` is libx264's constant rate factor (18: visually lossless, FFmpeg's H.264 guide).
    pub(crate) fn start(info: &FfmpegInfo, path: &Path, width: u32, height: u32, fps: Fps, crf: u8) -> Result<Self> {
        let temp = temp_path(path);
        let mut command = Command::new(&info.program);
        command
            .args(["-hide_banner", "-nostats", "-loglevel", "error"])
            // Input: raw 8-bit RGB at the clip's rate. -framerate is the rawvideo demuxer's rate
            // option (an input option); -r would instead re-time frames on output.
            .args(["-f", "rawvideo", "-pix_fmt", "rgb24"])
            .args(["-video_size", &format!("{width}x{height}"), "-framerate", &format!("{}/{}", fps.num(), fps.den())])
            .args(["-i", "pipe:0"])
            // RGB -> BT.709 limited-range 4:2:0 in swscale (its default matrix for RGB -> YUV is
            // BT.601), with exact rounding; then tag the stream as what it is.
            .args(["-vf", "scale=out_color_matrix=bt709:out_range=tv:flags=accurate_rnd,format=yuv420p"])
            .args(["-c:v", "libx264", "-preset", "medium", "-crf", &crf.to_string(), "-pix_fmt", "yuv420p"])
            .args(["-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709", "-color_range", "tv"])
            // moov before mdat, so playback can start before the whole file has arrived.
            .args(["-movflags", "+faststart", "-f", "mp4", "-y"])
            .arg(&temp)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SIGKILL, not SIGTERM: on SIGTERM ffmpeg finishes and closes its output.
        dies_with_its_parent(&mut command, libc::SIGKILL);
        let mut child = command.spawn().map_err(|e| Error::Io {
            context: format!("starting {} to write {}", info.program.display(), path.display()),
            source: e,
        })?;
        let stdin = child.stdin.take();
        let stderr = drain(child.stderr.take(), STDERR_TAIL);
        Ok(FfmpegWriter {
            child,
            stdin,
            stderr,
            program: info.program.clone(),
            temp,
            path: path.to_path_buf(),
            frame_bytes: width as usize * height as usize * 3,
            done: false,
        })
    }

    pub(crate) fn push(&mut self, image: &RgbImage) -> Result<()> {
        debug_assert_eq!(image.pixels().len(), self.frame_bytes);
        let stdin = self.stdin.as_mut().ok_or_else(|| Error::Internal("ffmpeg's stdin is closed".into()))?;
        if let Err(e) = stdin.write_all(image.pixels()) {
            // ffmpeg stopped reading: it has failed or is failing; its status and message say why.
            self.stdin = None;
            let status = self.child.wait().ok();
            return Err(self.failure(status, Some(e)));
        }
        Ok(())
    }

    /// Closes ffmpeg's input, waits for it and renames its file into place.
    pub(crate) fn finish(mut self) -> Result<()> {
        self.stdin = None; // EOF: ffmpeg flushes the encoder and writes the moov (faststart pass).
        let status = self.child.wait().map_err(io_error("waiting for ffmpeg writing", &self.path))?;
        if !status.success() {
            return Err(self.failure(Some(status), None));
        }
        self.done = true;
        let io = io_error("writing", &self.path);
        std::fs::File::open(&self.temp).and_then(|f| f.sync_all()).map_err(&io)?;
        std::fs::rename(&self.temp, &self.path).map_err(io)
    }

    fn failure(&mut self, status: Option<ExitStatus>, write: Option<std::io::Error>) -> Error {
        let tail = join_text(self.stderr.take());
        let tail = tail.trim();
        let status = match status {
            Some(s) => s.to_string(),
            None => "status unknown".into(),
        };
        let mut message = format!("{} failed ({status})", self.program.display());
        if let Some(e) = write {
            message.push_str(&format!(" after refusing its input ({e})"));
        }
        if tail.is_empty() {
            message.push_str(", no message on stderr");
        } else {
            message.push_str(&format!(": {tail}"));
        }
        Error::Io { context: format!("writing {}", self.path.display()), source: std::io::Error::other(message) }
    }
}

impl Drop for FfmpegWriter {
    /// Unfinished or failed: stop ffmpeg, reap it, remove its temporary file.
    fn drop(&mut self) {
        self.stdin = None;
        if !self.done {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(h) = self.stderr.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.temp);
    }
}
