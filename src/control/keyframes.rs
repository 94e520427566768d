//! Per-frame ControlNet strength over a clip: hints at keyframes, a rule for the frames between.
//!
//! Each frame gets a strength (the ControlNet's conditioning scale for that frame) and the hint of
//! its nearest keyframe (the earlier one on a tie). A frame of strength 0 is not given to the net
//! at all: [`KeyframeSchedule::active_frames`] is the gather list of frames the net runs on, and
//! its residuals are scattered back to those frames only.
//!
//! Default rule: [`Interpolation::OnlyKeyframes`]. With an AnimateDiff motion module the frames
//! between keyframes are better left to the temporal layers than pinned to a neighbour's hint:
//! holding a pose freezes the figure between keyframes and makes it jump at each change of hint,
//! while sparse hints let the motion module move it from one pose to the next (the practice of
//! SparseCtrl, arXiv:2311.16933, and of ComfyUI's latent keyframes in
//! Kosinkadink/ComfyUI-Advanced-ControlNet). It is also the cheapest: five keyframes cost the net
//! five frames, not the clip. `Hold` suits hints that stay valid for a stretch (a depth map of a
//! static scene); `Linear` fades one keyframe's strength into the next's. Dense inputs (a hint per
//! frame) are a keyframe on every frame, where the rules agree.

use crate::error::Result;

/// Largest number of frames a schedule covers (far more than a clip renders).
pub const MAX_FRAMES: usize = 1 << 20;

/// How frames between keyframes get their strength.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Interpolation {
    /// The nearest keyframe's strength.
    Hold,
    /// Linear between the two surrounding keyframes' strengths; the nearest keyframe's hint.
    /// Before the first and after the last keyframe, that keyframe's strength.
    Linear,
    /// Keyframes only; other frames get 0 and skip the net.
    #[default]
    OnlyKeyframes,
}

/// Keyframes at 0, 25, 50, 75 and 100% of a clip of `frames` frames (rounded to the nearest frame,
/// halves up; repeated frames of short clips merged).
pub fn default_keyframes(frames: usize) -> Vec<usize> {
    let mut keyframes: Vec<usize> = (0..5).map(|quarter| (quarter * frames.saturating_sub(1) * 2 + 4) / 8).collect();
    keyframes.dedup();
    keyframes
}

/// Strengths at keyframes and the rule between them, for a clip of a given length.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyframeSchedule {
    frames: usize,
    keyframes: Vec<usize>,
    strengths: Vec<f32>,
    rule: Interpolation,
}

impl KeyframeSchedule {
    /// `keyframes`: strictly increasing frame indices below `frames`; `strengths`: one finite
    /// value >= 0 per keyframe.
    pub fn new(frames: usize, keyframes: Vec<usize>, strengths: Vec<f32>, rule: Interpolation) -> Result<Self> {
        if frames == 0 || frames > MAX_FRAMES {
            return crate::input_err!("keyframe schedule over {frames} frames: needs 1..={MAX_FRAMES}");
        }
        if keyframes.is_empty() || keyframes.len() != strengths.len() {
            return crate::input_err!(
                "keyframe schedule: {} keyframes and {} strengths; give at least one keyframe and one strength each",
                keyframes.len(),
                strengths.len()
            );
        }
        if let Some(pair) = keyframes.windows(2).find(|pair| pair[0] >= pair[1]) {
            return crate::input_err!("keyframes {} then {}: keyframes must be strictly increasing", pair[0], pair[1]);
        }
        if let Some(&last) = keyframes.last().filter(|&&last| last >= frames) {
            return crate::input_err!(
                "keyframe {last} of a {frames}-frame clip: keyframes are frame indices below {frames}"
            );
        }
        if let Some((k, s)) = keyframes.iter().zip(&strengths).find(|(_, s)| !(s.is_finite() && **s >= 0.0)) {
            return crate::input_err!("strength {s} at keyframe {k}: strengths must be finite and at least 0");
        }
        Ok(KeyframeSchedule { frames, keyframes, strengths, rule })
    }

    pub fn frames(&self) -> usize {
        self.frames
    }

    pub fn keyframes(&self) -> &[usize] {
        &self.keyframes
    }

    pub fn rule(&self) -> Interpolation {
        self.rule
    }

    /// Index into [`Self::keyframes`] of the keyframe nearest to `frame` (the earlier on a tie):
    /// whose hint the frame uses.
    pub fn hint_keyframe(&self, frame: usize) -> usize {
        let after = self.keyframes.partition_point(|&k| k <= frame);
        match after {
            0 => 0,
            n if n == self.keyframes.len() => n - 1,
            n if frame - self.keyframes[n - 1] <= self.keyframes[n] - frame => n - 1,
            n => n,
        }
    }

    /// Strength of every frame.
    pub fn strengths(&self) -> Vec<f32> {
        (0..self.frames).map(|frame| self.strength(frame)).collect()
    }

    fn strength(&self, frame: usize) -> f32 {
        let nearest = self.hint_keyframe(frame);
        match self.rule {
            Interpolation::Hold => self.strengths[nearest],
            Interpolation::OnlyKeyframes if self.keyframes[nearest] == frame => self.strengths[nearest],
            Interpolation::OnlyKeyframes => 0.0,
            Interpolation::Linear => {
                let after = self.keyframes.partition_point(|&k| k <= frame);
                if after == 0 || after == self.keyframes.len() {
                    return self.strengths[nearest];
                }
                let (k0, k1) = (self.keyframes[after - 1], self.keyframes[after]);
                let t = (frame - k0) as f64 / (k1 - k0) as f64;
                let (s0, s1) = (self.strengths[after - 1] as f64, self.strengths[after] as f64);
                (s0 + (s1 - s0) * t) as f32
            }
        }
    }

    /// Frames whose strength is above 0, in order: the frames the net runs on.
    pub fn active_frames(&self) -> Vec<usize> {
        (0..self.frames).filter(|&frame| self.strength(frame) > 0.0).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_keyframes_are_the_quarters() {
        assert_eq!(default_keyframes(16), vec![0, 4, 8, 11, 15]); // 3.75 -> 4, 7.5 -> 8, 11.25 -> 11
        assert_eq!(default_keyframes(17), vec![0, 4, 8, 12, 16]);
        assert_eq!(default_keyframes(3), vec![0, 1, 2]); // 0.5 and 1.5 round up
        assert_eq!(default_keyframes(1), vec![0]);
    }

    #[test]
    fn the_three_rules_on_one_schedule() {
        let make = |rule| KeyframeSchedule::new(10, vec![2, 6], vec![1.0, 0.5], rule).unwrap();
        let hold = make(Interpolation::Hold);
        assert_eq!(hold.strengths(), vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5]);
        let linear = make(Interpolation::Linear);
        assert_eq!(linear.strengths(), vec![1.0, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.5, 0.5, 0.5]);
        let sparse = make(Interpolation::OnlyKeyframes);
        assert_eq!(sparse.strengths(), vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0]);
        assert_eq!(sparse.active_frames(), vec![2, 6]);
        assert_eq!(hold.active_frames(), (0..10).collect::<Vec<_>>());
        // Frame 4 is 2 from both keyframes: the earlier one's hint.
        let hints: Vec<usize> = (0..10).map(|f| hold.hint_keyframe(f)).collect();
        assert_eq!(hints, vec![0, 0, 0, 0, 0, 1, 1, 1, 1, 1]);
        assert_eq!(Interpolation::default(), Interpolation::OnlyKeyframes);
    }

    #[test]
    fn zero_strength_keyframes_leave_the_gather_list() {
        let linear = KeyframeSchedule::new(7, vec![0, 3, 6], vec![0.0, 1.0, 0.0], Interpolation::Linear).unwrap();
        assert_eq!(linear.active_frames(), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn bad_schedules_are_refused_by_value() {
        let cases = [
            (0, vec![0], vec![1.0], "0 frames"),
            (8, vec![], vec![], "0 keyframes"),
            (8, vec![0, 4], vec![1.0], "1 strengths"),
            (8, vec![4, 4], vec![1.0, 1.0], "4 then 4"),
            (8, vec![0, 8], vec![1.0, 1.0], "keyframe 8 of a 8-frame"),
            (8, vec![0, 3], vec![1.0, -0.5], "strength -0.5 at keyframe 3"),
            (8, vec![0], vec![f32::INFINITY], "strength inf"),
        ];
        for (frames, keyframes, strengths, needle) in cases {
            let message =
                KeyframeSchedule::new(frames, keyframes, strengths, Interpolation::Hold).unwrap_err().to_string();
            assert!(message.contains(needle), "{message} lacks {needle}");
        }
    }

    #[test]
    fn linear_ramps_drop_zero_frames_and_take_the_nearest_keyframes_hint() {
        // What the renderer gathers: the frames of strength above 0, each with its keyframe's hint.
        let schedule = KeyframeSchedule::new(9, vec![0, 4, 8], vec![1.0, 0.0, 0.5], Interpolation::Linear).unwrap();
        // Strengths 1, .75, .5, .25, 0, .125, .25, .375, .5: frame 4 drops out.
        let active = schedule.active_frames();
        assert_eq!(active, vec![0, 1, 2, 3, 5, 6, 7, 8]);
        let strengths = schedule.strengths();
        let scales: Vec<f32> = active.iter().map(|&f| strengths[f]).collect();
        assert_eq!(scales, vec![1.0, 0.75, 0.5, 0.25, 0.125, 0.25, 0.375, 0.5]);
        // Nearest keyframe (its index): frames 0-2 -> frame 0 (frame 2 ties, takes the earlier),
        // 3, 5, 6 -> frame 4, 7, 8 -> frame 8.
        let hints: Vec<usize> = active.iter().map(|&f| schedule.hint_keyframe(f)).collect();
        assert_eq!(hints, vec![0, 0, 0, 1, 1, 1, 2, 2]);
    }
}
