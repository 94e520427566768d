//! FreeNoise initial noise (Qiu et al. 2023, "FreeNoise: Tuning-Free Longer Video Diffusion via
//! Noise Rescheduling"; diffusers `pipelines/free_noise_utils.py`,
//! `AnimateDiffFreeNoiseMixin._prepare_latents_free_noise`): frames past the first context window
//! reuse shuffled copies of earlier noise frames, so every window starts from noise with the same
//! statistics as the first and long clips keep their content instead of drifting.
//!
//! Expressed over frame indices: the caller draws base noise for every frame and then sets frame
//! `f` to base frame `sources[f]`.

use super::windows::MAX_FRAMES;
use crate::error::{Error, Result};

/// diffusers' "shuffle_context": for each `i` in `length, length + stride, ...` below `frames`,
/// frames `[i, i + stride)` (cut at the clip's end) take the noise of frames
/// `[i - length, i - length + stride)` in a shuffled order; later blocks copy from frames already
/// rewritten, so every frame's noise comes from the first `length` frames when
/// `stride <= length`. The shuffle is [`SplitMix64`]-driven Fisher-Yates seeded with `seed`, one
/// permutation per block in clip order (torch's generator, which diffusers uses, cannot be
/// matched, so the same seed does not give diffusers' order). A clip of at most `length` frames is
/// its own noise.
pub fn freenoise_frame_sources(frames: usize, length: usize, stride: usize, seed: u64) -> Result<Vec<usize>> {
    check_settings(frames, length, stride)?;
    let mut rng = SplitMix64::new(seed);
    Ok(shuffle_context_sources(frames, length, stride, |n| rng.permutation(n)))
}

/// diffusers' "repeat_context" as documented: the first `length` frames' noise repeated over the
/// clip (frame `f` copies `f % length`). diffusers 0.42.1 compares the context length with the
/// string "repeat_context" when sizing its noise, so it draws noise for every frame and its
/// repeat leaves that fresh noise unchanged; we follow the documented behaviour.
pub fn repeat_context_sources(frames: usize, length: usize) -> Result<Vec<usize>> {
    check_settings(frames, length, 1)?;
    Ok((0..frames).map(|f| f % length).collect())
}

fn check_settings(frames: usize, length: usize, stride: usize) -> Result<()> {
    if frames > MAX_FRAMES {
        return Err(Error::Input(format!("FreeNoise over a clip of {frames} frames (at most {MAX_FRAMES})")));
    }
    if length == 0 {
        return Err(Error::Input("FreeNoise context length must be at least 1".into()));
    }
    if stride == 0 {
        return Err(Error::Input("FreeNoise context stride must be at least 1".into()));
    }
    Ok(())
}

/// The shuffle_context rule with the permutations supplied by `permutation(n)` (a permutation of
/// `0..n`), so a test can replay the ones diffusers drew.
fn shuffle_context_sources(
    frames: usize,
    length: usize,
    stride: usize,
    mut permutation: impl FnMut(usize) -> Vec<usize>,
) -> Vec<usize> {
    let mut sources: Vec<usize> = (0..frames).collect();
    for start in (length..frames).step_by(stride) {
        let from = start - length;
        let from_end = frames.min(from + stride);
        let order = permutation(from_end - from);
        // Read every source before writing: with stride > length the two ranges overlap, and
        // diffusers gathers the source frames into a copy before assigning.
        let shuffled: Vec<usize> = order.iter().map(|&k| sources[from + k]).collect();
        let end = frames.min(start + shuffled.len());
        sources[start..end].copy_from_slice(&shuffled[..end - start]);
    }
    sources
}

/// SplitMix64 (Steele, Lea and Flood 2014; Vigna's reference `splitmix64.c`): a 64-bit counter
/// stepped by the golden-ratio constant and mixed; small, seedable from any u64 and reproducible
/// across platforms.
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (bound > 0): draws at or above the largest multiple of `bound` that
    /// fits are redrawn, so no value is favoured.
    fn below(&mut self, bound: u64) -> u64 {
        let fair_limit = u64::MAX - u64::MAX % bound;
        loop {
            let draw = self.next_u64();
            if draw < fair_limit {
                return draw % bound;
            }
        }
    }

    /// A uniformly random permutation of `0..n`: Fisher-Yates from the last position down, each
    /// swapped with a position at or before it.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut items: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn usizes(v: &Value) -> Vec<usize> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
    }

    #[test]
    fn shuffle_rule_matches_diffusers() {
        // tools/make_window_fixtures.py ran diffusers' _prepare_latents_free_noise on noise that
        // holds each frame's number and recorded the torch.randperm draws.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/windows.json");
        let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for case in fixture["freenoise"].as_array().unwrap() {
            let get = |k: &str| case[k].as_u64().unwrap() as usize;
            let mut drawn = case["permutations"].as_array().unwrap().iter().map(usizes);
            let ours = shuffle_context_sources(get("frames"), get("length"), get("stride"), |n| {
                let perm = drawn.next().expect("more permutations than diffusers drew");
                assert_eq!(perm.len(), n);
                perm
            });
            assert!(drawn.next().is_none(), "fewer permutations than diffusers drew");
            assert_eq!(ours, usizes(&case["sources"]), "{case}");
        }
    }

    #[test]
    fn splitmix64_reference_outputs() {
        // First outputs of Vigna's splitmix64.c seeded with 0.
        let mut rng = SplitMix64::new(0);
        let got = [rng.next_u64(), rng.next_u64(), rng.next_u64()];
        assert_eq!(got, [0xE220_A839_7B1D_CDAF, 0x6E78_9E6A_A1B9_65F4, 0x06C4_5D18_8009_454F]);
    }

    #[test]
    fn permutations_are_uniform() {
        // 6000 shuffles of 3 items: each of the 6 orders about 1000 times (sd 29).
        let mut counts = std::collections::HashMap::new();
        let mut rng = SplitMix64::new(12345);
        for _ in 0..6000 {
            *counts.entry(rng.permutation(3)).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 6);
        assert!(counts.values().all(|&c| (850..1150).contains(&c)), "{counts:?}");
    }

    #[test]
    fn shuffled_blocks_copy_the_block_one_window_back() {
        for (frames, length, stride) in [(48, 16, 4), (61, 16, 5), (40, 16, 16), (35, 8, 3)] {
            let sources = freenoise_frame_sources(frames, length, stride, 7).unwrap();
            assert_eq!(sources[..length], (0..length).collect::<Vec<_>>()[..]);
            assert!(sources.iter().all(|&s| s < length));
            for start in (length..frames).step_by(stride) {
                let end = frames.min(start + stride);
                let mut block = sources[start..end].to_vec();
                let mut earlier = sources[start - length..start - length + stride].to_vec();
                block.sort();
                earlier.sort();
                assert!(earlier.len() >= block.len());
                if block.len() == earlier.len() {
                    assert_eq!(block, earlier, "{frames} {length} {stride} at {start}");
                } else {
                    assert!(block.iter().all(|s| earlier.contains(s)));
                }
            }
            let other_seed = freenoise_frame_sources(frames, length, stride, 8).unwrap();
            assert_ne!(sources, other_seed);
        }
        assert_eq!(freenoise_frame_sources(12, 16, 4, 1).unwrap(), (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn repeat_context_cycles_the_first_window() {
        let sources = repeat_context_sources(40, 16).unwrap();
        let expected: Vec<usize> = (0..16).chain(0..16).chain(0..8).collect();
        assert_eq!(sources, expected);
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(matches!(freenoise_frame_sources(40, 0, 4, 1), Err(Error::Input(_))));
        assert!(matches!(freenoise_frame_sources(40, 16, 0, 1), Err(Error::Input(_))));
        assert!(matches!(repeat_context_sources(40, 0), Err(Error::Input(_))));
        assert!(matches!(repeat_context_sources(MAX_FRAMES + 1, 16), Err(Error::Input(_))));
    }
}
