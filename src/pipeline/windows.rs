//! Context windows for clips longer than the motion module's trained length (AnimateDiff-Evolved's
//! "Context Options", `animatediff/context.py` and `sampling.py` in
//! github.com/Kosinkadink/ComfyUI-AnimateDiff-Evolved).
//!
//! Why windows and not segment chaining: with overlapping windows, every sampler step runs the
//! UNet on each window and fuses the neighbouring windows' predictions for the shared frames
//! (weighted by position, `Fuser`), so every frame's denoising is tied to its neighbours' at every
//! noise level and the motion stays continuous across window borders. Chaining segments instead
//! restarts each segment from one latent frame of the previous one: only that frame links them, so
//! motion and colour drift between segments and the join shows as a seam or a flicker. The uniform
//! schedules also move the window borders between steps (`ordered_halving`), so no frame sits on a
//! border at every step. FreeNoise (Qiu et al. 2023, "FreeNoise: Tuning-Free Longer Video Diffusion
//! via Noise Rescheduling") adds the fused-window average and correlated initial noise
//! (`super::noise_init`) for the same reason.

use crate::error::{Error, Result};

/// Longest clip accepted: 45 minutes at 24 fps, far past any render, and it keeps the window lists
/// and their index arithmetic small.
pub const MAX_FRAMES: usize = 1 << 16;

/// How windows are laid over the clip (AnimateDiff-Evolved `ContextSchedules`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Windows wrap around the clip's end onto its start and shift with the step counter.
    UniformLooped,
    /// As `UniformLooped`, but a wrapping window is moved to end on the last frame.
    UniformStandard,
    /// The same windows at every step: starts 0, L - overlap, ..., the last one ending on the last frame.
    StaticStandard,
    /// Non-overlapping chunks of `length` frames (the last may be shorter).
    Batched,
}

/// How a window's predictions are weighted by position when fused (AnimateDiff-Evolved
/// `ContextFuseMethod`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fuse {
    /// Every frame weighs 1.
    Flat,
    /// 1, 2, ..., up to the middle and back down: frames near a window's edge count least.
    Pyramid,
    /// 1 except linear ramps across `overlap` frames at the edges a window shares with others.
    OverlapLinear,
}

/// Context-window settings. The defaults are AnimateDiff-Evolved's "Context Options◆Standard
/// Uniform" node (`nodes_context.py`): 16 frames (the length the AnimateDiff motion modules were
/// trained on), 4 frames of overlap, stride 1 (one window size, no dilated windows), no closed
/// loop (that node forces it off), the uniform standard schedule (windows move between steps but
/// never wrap the clip's end onto its start) and pyramid fusing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextOptions {
    /// Frames per window.
    pub length: usize,
    /// Frames shared by neighbouring windows; less than `length`.
    pub overlap: usize,
    /// Uniform schedules: number of dilation levels (1, 2, 4, ... frames apart), capped by the clip.
    pub stride: usize,
    /// Uniform looped schedule: also place windows that wrap across the clip's end.
    pub closed_loop: bool,
    pub schedule: Schedule,
    pub fuse: Fuse,
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions {
            length: 16,
            overlap: 4,
            stride: 1,
            closed_loop: false,
            schedule: Schedule::UniformStandard,
            fuse: Fuse::Pyramid,
        }
    }
}

/// The fraction AnimateDiff-Evolved shifts uniform windows by at a step: the step counter's 64 bits
/// reversed, over 2^64 (0, 1/2, 1/4, 3/4, 1/8, ...), so successive steps spread the window borders.
fn ordered_halving(step: u64) -> f64 {
    step.reverse_bits() as f64 / 2f64.powi(64)
}

impl ContextOptions {
    /// Refuses settings upstream would loop on or fail with.
    pub fn validate(&self) -> Result<()> {
        if self.length == 0 {
            return Err(Error::Input("context length must be at least 1".into()));
        }
        if self.stride == 0 {
            return Err(Error::Input("context stride must be at least 1".into()));
        }
        if self.overlap >= self.length {
            return Err(Error::Input(format!(
                "context overlap {} must be less than the context length {}",
                self.overlap, self.length
            )));
        }
        Ok(())
    }

    /// The frame indices of each window at sampler step `step` (counted from 0 at the first step of
    /// the sampling run, as AnimateDiff-Evolved's `current_step`; every model evaluation within a
    /// step uses the same windows). A clip of at most `length` frames is one window: upstream then
    /// samples without context windows (its `use_on_equal_length` off). With `stride` > 1 the
    /// widest level's windows can hold a frame twice (upstream too); under `UniformStandard` they
    /// can also reach past the last frame, where upstream fails, and so do we.
    pub fn windows(&self, frames: usize, step: u64) -> Result<Vec<Vec<usize>>> {
        self.validate()?;
        if frames == 0 || frames > MAX_FRAMES {
            return Err(Error::Input(format!(
                "context windows over a clip of {frames} frames (1 to {MAX_FRAMES} allowed)"
            )));
        }
        if frames <= self.length {
            return Ok(vec![(0..frames).collect()]);
        }
        let windows = match self.schedule {
            Schedule::UniformLooped => self.uniform_windows(frames, step, self.closed_loop),
            Schedule::UniformStandard => self.standard_windows(frames, step),
            Schedule::StaticStandard => self.static_windows(frames),
            Schedule::Batched => (0..frames)
                .step_by(self.length)
                .map(|start| (start..frames.min(start + self.length)).collect())
                .collect(),
        };
        if let Some(past) = windows.iter().flatten().find(|&&f| f >= frames) {
            return Err(Error::Input(format!(
                "context stride {} with length {} over {frames} frames places a window past the last \
                 frame (frame {past}); use stride 1 or the looped schedule",
                self.stride, self.length
            )));
        }
        Ok(windows)
    }

    /// Windows at every dilation level, wrapping modulo `frames`, offset by the step's
    /// `ordered_halving` fraction of the clip (`create_windows_uniform_looped`).
    fn uniform_windows(&self, frames: usize, step: u64, closed_loop: bool) -> Vec<Vec<usize>> {
        // Upstream's min(stride, ceil(log2(frames / length)) + 1), in integers.
        let mut widest = 0;
        while (self.length as u128) << widest < frames as u128 {
            widest += 1;
        }
        let levels = self.stride.min(widest + 1);
        let shift = ordered_halving(step);
        // Python's round() rounds halves to even.
        let pad = (frames as f64 * shift).round_ties_even() as usize;
        let end = frames + pad - if closed_loop { 0 } else { self.overlap };
        let mut windows = Vec::new();
        for level in 0..levels {
            let spacing = 1usize << level;
            let first = (shift * spacing as f64) as usize + pad;
            for start in (first..end).step_by(self.length * spacing - self.overlap) {
                windows.push((0..self.length).map(|k| (start + k * spacing) % frames).collect());
            }
        }
        windows
    }

    /// The looped windows with each wrapping window moved to end on the last frame, a window added
    /// after it from the wrapped frame when the next one lacks that frame, and repeats dropped
    /// (`create_windows_uniform_standard`).
    fn standard_windows(&self, frames: usize, step: u64) -> Vec<Vec<usize>> {
        let mut windows = self.uniform_windows(frames, step, false);
        let mut repeated = Vec::new();
        let mut i = 0;
        while i < windows.len() {
            if let Some(wrap) = wrap_position(&windows[i], frames) {
                let wrapped_frame = windows[i][wrap];
                shift_to_end(&mut windows[i], frames);
                if !windows[(i + 1) % windows.len()].contains(&wrapped_frame) {
                    windows.insert(i + 1, (wrapped_frame..wrapped_frame + self.length).collect());
                }
            }
            if windows[..i].contains(&windows[i]) {
                repeated.push(i);
            }
            i += 1;
        }
        for &i in repeated.iter().rev() {
            windows.remove(i);
        }
        windows
    }

    /// Starts 0, length - overlap, ...; the window that would pass the end ends on the last frame
    /// (`create_windows_static_standard`).
    fn static_windows(&self, frames: usize) -> Vec<Vec<usize>> {
        let mut windows = Vec::new();
        for start in (0..frames).step_by(self.length - self.overlap) {
            if start + self.length >= frames {
                windows.push((frames - self.length..frames).collect());
                break;
            }
            windows.push((start..start + self.length).collect());
        }
        windows
    }

    /// Per-position weights of `window` (a window of a clip of `frames` frames) when its
    /// predictions are fused (`create_weights_*`). Overlap-linear ramps from 1e-37 (upstream's
    /// near-zero start, so a frame never has weight 0) to 1 across `overlap` frames on each side
    /// that is not the clip's first or last frame; a window shorter than the overlap keeps the
    /// ramps' values nearest its edges (upstream fails on it).
    pub fn fuse_weights(&self, window: &[usize], frames: usize) -> Vec<f32> {
        let len = window.len();
        match self.fuse {
            Fuse::Flat => vec![1.0; len],
            // Even lengths repeat the peak (1..8, 8..1 for 16), odd ones peak once.
            Fuse::Pyramid => (0..len).map(|i| (i + 1).min(len - i) as f32).collect(),
            Fuse::OverlapLinear => {
                let mut weights = vec![1.0; len];
                let ramp = self.overlap.min(len);
                let starts_inside = window.iter().min().is_some_and(|&f| f > 0);
                let ends_inside = window.iter().max().is_some_and(|&f| f + 1 < frames);
                if starts_inside {
                    for (i, w) in weights[..ramp].iter_mut().enumerate() {
                        *w = linspace(1e-37, 1.0, self.overlap, i);
                    }
                }
                if ends_inside {
                    for (i, w) in weights[len - ramp..].iter_mut().enumerate() {
                        *w = linspace(1.0, 1e-37, self.overlap, self.overlap - ramp + i);
                    }
                }
                weights
            }
        }
    }
}

/// Value `i` of `count` evenly spaced values from `start` to `end`, computed as torch.linspace
/// does in f32: the first half stepped from `start`, the second from `end`, so both ends are exact
/// (stepping from 1 towards 1e-37 alone would end on 0). One value is `start`.
fn linspace(start: f32, end: f32, count: usize, i: usize) -> f32 {
    if count == 1 {
        return start;
    }
    let step = (end - start) / (count - 1) as f32;
    if i < count / 2 { start + step * i as f32 } else { end - step * (count - 1 - i) as f32 }
}

/// Where a window's frame numbers (modulo `frames`) first decrease: it wrapped past the clip's end.
fn wrap_position(window: &[usize], frames: usize) -> Option<usize> {
    (1..window.len()).find(|&i| window[i] % frames < window[i - 1] % frames)
}

/// Moves a wrapping window to end on the last frame, keeping its spacing (`shift_window_to_end`):
/// renumber from its first frame, then slide so the last entry lands on `frames - 1`.
fn shift_to_end(window: &mut [usize], frames: usize) {
    let first = window[0];
    for f in window.iter_mut() {
        *f = (*f + frames - first) % frames;
    }
    let slide = frames - 1 - window[window.len() - 1];
    for f in window.iter_mut() {
        *f += slide;
    }
}

/// Sums weighted per-window predictions into whole-clip buffers and divides by each frame's total
/// weight (AnimateDiff-Evolved's `conds_final / counts_final`). Buffers are frame-major: frame `f`
/// occupies `[f * frame_len, (f + 1) * frame_len)`.
pub struct Fuser {
    frame_len: usize,
    sums: Vec<f32>,
    weight_totals: Vec<f32>,
}

impl Fuser {
    pub fn new(frames: usize, frame_len: usize) -> Result<Fuser> {
        let len = frames
            .checked_mul(frame_len)
            .ok_or_else(|| Error::Input(format!("a clip of {frames} frames of {frame_len} values is too large")))?;
        Ok(Fuser { frame_len, sums: vec![0.0; len], weight_totals: vec![0.0; frames] })
    }

    /// Adds a window's prediction (`window.len()` frames, frame-major) with per-position weights.
    /// A frame listed twice in a window counts twice.
    pub fn add(&mut self, window: &[usize], weights: &[f32], pred: &[f32]) -> Result<()> {
        if weights.len() != window.len() || pred.len() != window.len() * self.frame_len {
            return Err(Error::Internal(format!(
                "fusing a window of {} frames with {} weights and {} values ({} per frame)",
                window.len(),
                weights.len(),
                pred.len(),
                self.frame_len
            )));
        }
        let frames = self.weight_totals.len();
        if let Some(&f) = window.iter().find(|&&f| f >= frames) {
            return Err(Error::Internal(format!("window frame {f} in a clip of {frames} frames")));
        }
        for ((&frame, &weight), values) in window.iter().zip(weights).zip(pred.chunks_exact(self.frame_len)) {
            let sum = &mut self.sums[frame * self.frame_len..(frame + 1) * self.frame_len];
            for (s, &v) in sum.iter_mut().zip(values) {
                *s += weight * v;
            }
            self.weight_totals[frame] += weight;
        }
        Ok(())
    }

    /// The fused clip; an error if a frame was in no window.
    pub fn finish(self) -> Result<Vec<f32>> {
        let Fuser { frame_len, mut sums, weight_totals } = self;
        if let Some(frame) = weight_totals.iter().position(|&w| w <= 0.0) {
            return Err(Error::Internal(format!("frame {frame} was in no context window")));
        }
        if frame_len > 0 {
            for (values, &total) in sums.chunks_exact_mut(frame_len).zip(&weight_totals) {
                for v in values {
                    *v /= total;
                }
            }
        }
        Ok(sums)
    }
}

/// The frames of `window` copied out of a frame-major clip, in window order (the model's input for
/// that window).
pub fn gather(window: &[usize], clip: &[f32], frame_len: usize) -> Result<Vec<f32>> {
    let frames = clip.len().checked_div(frame_len).unwrap_or(0);
    let mut out = Vec::with_capacity(window.len() * frame_len);
    for &f in window {
        if f >= frames {
            return Err(Error::Internal(format!("window frame {f} in a clip of {frames} frames")));
        }
        out.extend_from_slice(&clip[f * frame_len..(f + 1) * frame_len]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// tests/fixtures/windows.json, written by tools/make_window_fixtures.py from
    /// AnimateDiff-Evolved's own context.py.
    fn fixture() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/windows.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn usizes(v: &Value) -> Vec<usize> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
    }

    fn windows_of(v: &Value) -> Vec<Vec<usize>> {
        v.as_array().unwrap().iter().map(usizes).collect()
    }

    fn options(schedule: Schedule, length: usize, overlap: usize) -> ContextOptions {
        ContextOptions { length, overlap, schedule, ..ContextOptions::default() }
    }

    #[test]
    fn windows_match_animatediff_evolved() {
        let mut compared = 0;
        for case in fixture()["windows"].as_array().unwrap() {
            let schedule = match case["schedule"].as_str().unwrap() {
                "uniform_looped" => Schedule::UniformLooped,
                "uniform_standard" => Schedule::UniformStandard,
                "static_standard" => Schedule::StaticStandard,
                "batched" => Schedule::Batched,
                other => panic!("schedule {other}"),
            };
            let get = |k: &str| case[k].as_u64().unwrap() as usize;
            let opts = ContextOptions {
                stride: get("stride"),
                closed_loop: case["closed_loop"].as_bool().unwrap(),
                ..options(schedule, get("length"), get("overlap"))
            };
            let frames = get("frames");
            for (step, expected) in case["steps"].as_array().unwrap().iter().zip(case["windows"].as_array().unwrap()) {
                let step: u64 = step.as_str().unwrap().parse().unwrap();
                let expected = windows_of(expected);
                let ours = opts.windows(frames, step);
                if frames <= opts.length {
                    // Upstream samples such clips without windows (the looped generator alone
                    // would still place windows over exactly `length` frames).
                    assert_eq!(ours.unwrap(), vec![(0..frames).collect::<Vec<_>>()]);
                    continue;
                }
                if expected.iter().flatten().any(|&f| f >= frames) {
                    let message = ours.unwrap_err().to_string();
                    assert!(message.contains("past the last frame"), "{message}");
                } else {
                    assert_eq!(ours.unwrap(), expected, "{opts:?} frames {frames} step {step}");
                }
                compared += 1;
            }
        }
        assert!(compared > 500, "{compared}");
    }

    #[test]
    fn documented_example() {
        let range = |a: usize, b: usize| (a..b).collect::<Vec<_>>();
        let looped = options(Schedule::UniformLooped, 16, 4).windows(48, 0).unwrap();
        let wrapped: Vec<usize> = (36..48).chain(0..4).collect();
        assert_eq!(looped, vec![range(0, 16), range(12, 28), range(24, 40), wrapped]);
        let fixed = options(Schedule::StaticStandard, 16, 4).windows(48, 7).unwrap();
        assert_eq!(fixed, vec![range(0, 16), range(12, 28), range(24, 40), range(32, 48)]);
        let batched = options(Schedule::Batched, 16, 4).windows(40, 3).unwrap();
        assert_eq!(batched, vec![range(0, 16), range(16, 32), range(32, 40)]);
        let pyramid = ContextOptions::default().fuse_weights(&range(0, 16), 48);
        let expected: Vec<f32> = (1..=8).chain((1..=8).rev()).map(|w| w as f32).collect();
        assert_eq!(pyramid, expected);
        let odd = ContextOptions::default().fuse_weights(&range(0, 5), 48);
        assert_eq!(odd, vec![1.0, 2.0, 3.0, 2.0, 1.0]);
    }

    #[test]
    fn every_frame_covered_by_full_windows_at_every_step() {
        let schedules = [Schedule::UniformLooped, Schedule::UniformStandard, Schedule::StaticStandard];
        for schedule in schedules {
            for (frames, length, overlap) in [(17, 16, 4), (48, 16, 4), (97, 16, 8), (33, 8, 0), (21, 4, 3)] {
                let opts = options(schedule, length, overlap);
                let mut starts = std::collections::HashSet::new();
                for step in 0..20 {
                    let windows = opts.windows(frames, step).unwrap();
                    let mut covered = vec![false; frames];
                    for window in &windows {
                        let distinct: std::collections::HashSet<_> = window.iter().collect();
                        assert_eq!(distinct.len(), length, "{schedule:?} {frames} step {step}: {window:?}");
                        window.iter().for_each(|&f| covered[f] = true);
                    }
                    assert!(covered.iter().all(|&c| c), "{schedule:?} {frames} step {step}");
                    starts.insert(windows[0][0]);
                }
                // The uniform schedules move their windows between steps; static ones never do.
                let moving = schedule != Schedule::StaticStandard;
                assert_eq!(starts.len() > 1, moving, "{schedule:?} {frames}: {starts:?}");
            }
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        for opts in [
            ContextOptions { length: 0, ..ContextOptions::default() },
            ContextOptions { stride: 0, ..ContextOptions::default() },
            ContextOptions { overlap: 16, ..ContextOptions::default() },
        ] {
            assert!(matches!(opts.windows(48, 0), Err(Error::Input(_))), "{opts:?}");
        }
        assert!(matches!(ContextOptions::default().windows(0, 0), Err(Error::Input(_))));
        let too_long = ContextOptions::default().windows(MAX_FRAMES + 1, 0);
        assert!(matches!(too_long, Err(Error::Input(_))));
        assert!(ContextOptions::default().windows(MAX_FRAMES, 3).is_ok());
    }

    #[test]
    fn weights_match_animatediff_evolved() {
        for case in fixture()["weights"].as_array().unwrap() {
            let fuse = match case["fuse"].as_str().unwrap() {
                "flat" => Fuse::Flat,
                "pyramid" => Fuse::Pyramid,
                "overlap_linear" => Fuse::OverlapLinear,
                other => panic!("fuse {other}"),
            };
            let opts = ContextOptions {
                fuse,
                overlap: case["overlap"].as_u64().unwrap() as usize,
                ..ContextOptions::default()
            };
            let window = usizes(&case["window"]);
            let ours = opts.fuse_weights(&window, case["frames"].as_u64().unwrap() as usize);
            let expected: Vec<f64> = case["weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
            assert_eq!(ours.len(), expected.len());
            for (&w, &e) in ours.iter().zip(&expected) {
                assert!(w as f64 == e, "{fuse:?} {window:?}: {ours:?} vs {expected:?}");
            }
        }
    }

    /// Frame-major test clip with distinct, nonzero values.
    fn clip(frames: usize, frame_len: usize) -> Vec<f32> {
        (0..frames * frame_len).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect()
    }

    #[test]
    fn windows_that_agree_fuse_to_the_same_clip() {
        // Whatever the weights, a weighted mean of equal predictions is that prediction.
        let (frames, frame_len) = (48, 6);
        let whole = clip(frames, frame_len);
        for fuse in [Fuse::Flat, Fuse::Pyramid, Fuse::OverlapLinear] {
            for step in 0..4 {
                let opts = ContextOptions { fuse, ..ContextOptions::default() };
                let mut fuser = Fuser::new(frames, frame_len).unwrap();
                for window in opts.windows(frames, step).unwrap() {
                    let pred = gather(&window, &whole, frame_len).unwrap();
                    fuser.add(&window, &opts.fuse_weights(&window, frames), &pred).unwrap();
                }
                let fused = fuser.finish().unwrap();
                for (a, b) in fused.iter().zip(&whole) {
                    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{fuse:?} step {step}");
                }
            }
        }
    }

    #[test]
    fn fuser_takes_the_weighted_mean() {
        // Frame 1 is in both windows: (1 * 2 + 3 * 6) / (1 + 3) = 5 per value.
        let mut fuser = Fuser::new(3, 2).unwrap();
        fuser.add(&[0, 1], &[2.0, 1.0], &[1.0, -1.0, 2.0, 4.0]).unwrap();
        fuser.add(&[1, 2], &[3.0, 0.5], &[6.0, 8.0, -3.0, 9.0]).unwrap();
        assert_eq!(fuser.finish().unwrap(), vec![1.0, -1.0, 5.0, 7.0, -3.0, 9.0]);
    }

    #[test]
    fn fuser_refuses_gaps_and_mismatches() {
        let mut fuser = Fuser::new(3, 2).unwrap();
        fuser.add(&[0, 2], &[1.0, 1.0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!(fuser.add(&[0, 3], &[1.0, 1.0], &[1.0; 4]).is_err());
        assert!(fuser.add(&[0, 1], &[1.0], &[1.0; 4]).is_err());
        assert!(fuser.add(&[0, 1], &[1.0, 1.0], &[1.0; 3]).is_err());
        let message = fuser.finish().unwrap_err().to_string();
        assert!(message.contains("frame 1"), "{message}");
        assert!(Fuser::new(usize::MAX, 2).is_err());
    }

    #[test]
    fn gather_copies_window_frames_in_order() {
        let whole = clip(4, 3);
        let got = gather(&[3, 0, 3], &whole, 3).unwrap();
        let expected: Vec<f32> = [&whole[9..12], &whole[0..3], &whole[9..12]].concat();
        assert_eq!(got, expected);
        assert!(gather(&[4], &whole, 3).is_err());
    }
}
