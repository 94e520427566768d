//! The seeded counter-based generator behind every random tensor (initial latents, step noise,
//! random weights), on the CPU here and on the GPU in `kernels/sampling/philox.cu`
//! (`ops::random`): the same seed gives the same values whatever the batch size, window layout,
//! shard or device count, because a value depends only on its address, never on what was drawn
//! before it.
//!
//! * Core: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel Random Numbers: As Easy as 1, 2,
//!   3", SC 2011), checked against Random123's known-answer vectors (`tests/kat_vectors`).
//! * Address: a [`NoiseStream`] is (seed, stream id). Element i of a stream is lane i % 4 of the
//!   Philox block with key (seed low, seed high) and counter (i / 4 low, i / 4 high, stream low,
//!   stream high), words as u32, low first. Indices wrap modulo 2^64.
//! * Uniforms: u = ((x >> 9) + 1/2) / 2^23, the midpoints of 2^23 cells of (0, 1): exact in f32,
//!   never 0 (the logarithm below stays finite) nor 1.
//! * Normals: Box-Muller on lane pairs (0, 1) and (2, 3): r = sqrt(-2 ln u0),
//!   z0 = r cos(2π u1), z1 = r sin(2π u1). The kernel computes ln, sin and cos in f32 (`logf`,
//!   `sincospif`, each within an ulp or two); here they are f64 values rounded once to f32, and the
//!   square root and products are the same f32 operations on both sides, so the two agree to a few
//!   f32 ulps (|Δ| <= 1e-6 · max(1, |z|), the GPU test's bound). |z| <= sqrt(-2 ln 2^-24) ≈ 5.77.
//!
//! A frame's noise is then the slice [frame · frame_len, (frame + 1) · frame_len) of its clip's
//! stream: any window of frames, computed anywhere, reads the same values.

/// Philox4x32 round multipliers and Weyl key increments (Random123 `philox.h`).
const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds: four pseudo-random words for a 128-bit counter and 64-bit key.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for _ in 0..10 {
        let p0 = PHILOX_M0 as u64 * c0 as u64;
        let p1 = PHILOX_M1 as u64 * c2 as u64;
        (c0, c1, c2, c3) = ((p1 >> 32) as u32 ^ c1 ^ k0, p1 as u32, (p0 >> 32) as u32 ^ c3 ^ k1, p0 as u32);
        k0 = k0.wrapping_add(PHILOX_W0);
        k1 = k1.wrapping_add(PHILOX_W1);
    }
    [c0, c1, c2, c3]
}

/// A uniform in (0, 1) from the top 23 bits of `bits`.
pub fn open_uniform(bits: u32) -> f32 {
    ((bits >> 9) as f32 + 0.5) * (1.0 / (1u32 << 23) as f32)
}

/// Two standard normals from two words (Box-Muller, see the module documentation).
pub fn box_muller(bits0: u32, bits1: u32) -> (f32, f32) {
    let log_u = (open_uniform(bits0) as f64).ln() as f32;
    let r = (-2.0 * log_u).sqrt();
    let angle = std::f64::consts::PI * (2.0 * open_uniform(bits1)) as f64;
    let (sin, cos) = angle.sin_cos();
    (r * cos as f32, r * sin as f32)
}

/// The SplitMix64 output function (Steele, Lea, Flood, "Fast Splittable Pseudorandom Number
/// Generators", OOPSLA 2014; Vigna's `splitmix64.c`) applied to x: a bijection of u64.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a stream's values are for; by convention the second part of a [`stream_id`] (after the
/// clip index), so that no two purposes share a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum Purpose {
    InitialLatents = 1,
    StepNoise = 2,
    Weights = 3,
}

/// A stream id from named parts, e.g. `[clip, Purpose::StepNoise as u64, step]`:
/// h = splitmix64(parts.len()), then h = splitmix64(h ^ part) for each part. Lists that differ
/// only in their last part, or differ in length, never collide (SplitMix64 is a bijection);
/// other distinct lists collide with probability about 2^-64.
pub fn stream_id(parts: &[u64]) -> u64 {
    parts.iter().fold(splitmix64(parts.len() as u64), |h, &part| splitmix64(h ^ part))
}

/// One random stream: a seed and a stream id (see [`stream_id`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NoiseStream {
    pub seed: u64,
    pub stream: u64,
}

impl NoiseStream {
    pub fn new(seed: u64, stream: u64) -> Self {
        NoiseStream { seed, stream }
    }

    /// The four words of Philox block `block` (elements 4·block .. 4·block + 3).
    pub fn block(&self, block: u64) -> [u32; 4] {
        let counter = [block as u32, (block >> 32) as u32, self.stream as u32, (self.stream >> 32) as u32];
        philox4x32_10(counter, [self.seed as u32, (self.seed >> 32) as u32])
    }

    /// Standard normals: out[j] is element offset + j of the stream.
    pub fn fill_normal(&self, offset: u64, out: &mut [f32]) {
        self.fill(offset, out, |[x0, x1, x2, x3]| {
            let (z0, z1) = box_muller(x0, x1);
            let (z2, z3) = box_muller(x2, x3);
            [z0, z1, z2, z3]
        });
    }

    /// Uniforms in (0, 1): out[j] is element offset + j of the stream.
    pub fn fill_uniform(&self, offset: u64, out: &mut [f32]) {
        self.fill(offset, out, |bits| bits.map(open_uniform));
    }

    fn fill(&self, offset: u64, out: &mut [f32], values: impl Fn([u32; 4]) -> [f32; 4]) {
        let mut j = 0;
        while j < out.len() {
            let index = offset.wrapping_add(j as u64);
            let lane = (index % 4) as usize;
            let take = (4 - lane).min(out.len() - j);
            out[j..j + take].copy_from_slice(&values(self.block(index / 4))[lane..lane + take]);
            j += take;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Random123 `tests/kat_vectors` (github.com/DEShawResearch/random123), the three
    /// `philox4x32 10` lines: counter, key, expected output.
    const KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        ([0; 4], [0; 2], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
        ([u32::MAX; 4], [u32::MAX; 2], [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];

    #[test]
    fn philox_matches_random123_known_answers() {
        for (counter, key, expected) in KAT {
            assert_eq!(philox4x32_10(counter, key), expected, "counter {counter:08x?} key {key:08x?}");
        }
    }

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // Vigna's splitmix64.c seeded with 1234567: the state advances by the golden gamma and
        // each output is the mix of the new state (the published first two outputs).
        assert_eq!(splitmix64(1234567), 6457827717110365317);
        assert_eq!(splitmix64(1234567u64.wrapping_add(0x9E37_79B9_7F4A_7C15)), 3203168211198807973);
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn stream_ids_separate_purposes_positions_and_lengths() {
        let lists: Vec<Vec<u64>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            vec![1],
            vec![0, Purpose::InitialLatents as u64],
            vec![0, Purpose::StepNoise as u64],
            vec![0, Purpose::StepNoise as u64, 0],
            vec![0, Purpose::StepNoise as u64, 1],
            vec![1, Purpose::StepNoise as u64, 0],
            vec![0, Purpose::Weights as u64],
            vec![Purpose::StepNoise as u64, 0],
        ];
        let ids: std::collections::HashSet<u64> = lists.iter().map(|l| stream_id(l)).collect();
        assert_eq!(ids.len(), lists.len());
        // The documented mixing, spelled out.
        let by_hand = splitmix64(splitmix64(splitmix64(splitmix64(3) ^ 7) ^ 2) ^ 11);
        assert_eq!(stream_id(&[7, 2, 11]), by_hand);
        // Many step indices of one clip and purpose: all distinct.
        let steps: std::collections::HashSet<u64> =
            (0..100_000).map(|s| stream_id(&[3, Purpose::StepNoise as u64, s])).collect();
        assert_eq!(steps.len(), 100_000);
    }

    /// Element i of a stream from its definition: Philox block i / 4 of counter
    /// (i / 4, stream) and key seed, lane i % 4, turned to a normal in f64.
    fn normal_by_definition(seed: u64, stream: u64, i: u64) -> f64 {
        let block = i / 4;
        let counter = [block as u32, (block >> 32) as u32, stream as u32, (stream >> 32) as u32];
        let bits = philox4x32_10(counter, [seed as u32, (seed >> 32) as u32]);
        let pair = (i % 4 / 2 * 2) as usize;
        let uniform = |x: u32| ((x >> 9) as f64 + 0.5) / 8388608.0;
        let (u0, u1) = (uniform(bits[pair]), uniform(bits[pair + 1]));
        let r = (-2.0 * u0.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * u1;
        if i.is_multiple_of(2) { r * angle.cos() } else { r * angle.sin() }
    }

    #[test]
    fn normals_follow_their_definition() {
        let cases = [(0u64, 0u64, 0u64), (42, 7, 3), (u64::MAX, u64::MAX, 1 << 40), (0x1234_5678_9abc, 99, 5)];
        for (seed, stream, offset) in cases {
            let mut out = vec![0f32; 1001];
            NoiseStream::new(seed, stream).fill_normal(offset, &mut out);
            for (j, &z) in out.iter().enumerate() {
                let want = normal_by_definition(seed, stream, offset + j as u64);
                let tol = 1e-6 * want.abs().max(1.0);
                assert!((z as f64 - want).abs() <= tol, "seed {seed} stream {stream} element {j}: {z} vs {want}");
            }
        }
    }

    #[test]
    fn uniforms_are_inside_the_open_interval() {
        assert_eq!(open_uniform(0), 0.5 / 8388608.0);
        assert_eq!(open_uniform(u32::MAX), 1.0 - 0.5 / 8388608.0);
        let mut out = vec![0f32; 10_000];
        NoiseStream::new(5, 6).fill_uniform(123, &mut out);
        let bits: Vec<u32> = (123..10_123u64).map(|i| NoiseStream::new(5, 6).block(i / 4)[(i % 4) as usize]).collect();
        for (u, x) in out.iter().zip(bits) {
            assert_eq!(*u as f64, ((x >> 9) as f64 + 0.5) / 8388608.0);
        }
        // The extreme normals stay finite.
        let (z0, z1) = box_muller(0, 0);
        assert!(z0.is_finite() && (z0 - 5.7683).abs() < 1e-3 && z1.abs() < 1e-5, "{z0} {z1}");
    }

    #[test]
    fn any_sub_range_equals_the_same_slice_of_a_longer_fill() {
        for (seed, stream, base) in [(1u64, 2u64, 0u64), (9, stream_id(&[4, 2, 17]), u64::MAX - 600)] {
            let noise = NoiseStream::new(seed, stream);
            let mut long = vec![0f32; 1200];
            noise.fill_normal(base, &mut long);
            let mut long_uniform = vec![0f32; 1200];
            noise.fill_uniform(base, &mut long_uniform);
            for start in [0usize, 1, 2, 3, 4, 5, 63, 598, 599, 600, 601, 1197] {
                for len in [0usize, 1, 2, 3, 5, 8, 97, 1200 - start] {
                    let len = len.min(1200 - start);
                    let mut part = vec![f32::NAN; len];
                    noise.fill_normal(base.wrapping_add(start as u64), &mut part);
                    assert_eq!(part, long[start..start + len], "normal start {start} len {len}");
                    noise.fill_uniform(base.wrapping_add(start as u64), &mut part);
                    assert_eq!(part, long_uniform[start..start + len], "uniform start {start} len {len}");
                }
            }
            // Frames drawn one at a time equal one fill over the clip.
            let frame = 48;
            for f in 0..25 {
                let mut one = vec![0f32; frame];
                noise.fill_normal(base.wrapping_add((f * frame) as u64), &mut one);
                assert_eq!(one, long[f * frame..(f + 1) * frame]);
            }
        }
        // Index wrap: the element after 2^64 - 1 is element 0.
        let noise = NoiseStream::new(3, 4);
        let (mut tail, mut head) = (vec![0f32; 6], vec![0f32; 4]);
        noise.fill_normal(u64::MAX - 1, &mut tail);
        noise.fill_normal(0, &mut head);
        assert_eq!(tail[2..], head[..]);
    }

    fn moments(x: &[f32], lag: usize) -> (f64, f64, f64, f64) {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let m4 = x.iter().map(|&v| (v as f64 - mean).powi(4)).sum::<f64>() / n / (var * var);
        let cov =
            x.windows(lag + 1).map(|w| (w[0] as f64 - mean) * (w[lag] as f64 - mean)).sum::<f64>() / (n - lag as f64);
        (mean, var, m4, cov / var)
    }

    #[test]
    fn normals_have_the_moments_of_a_standard_normal() {
        // 1e6 values: standard errors are 1e-3 (mean, correlations), 1.4e-3 (variance),
        // 1e-2 (kurtosis, whose variance is 96 / n); bounds at 5 standard errors.
        let n = 1_000_000;
        let mut z = vec![0f32; n];
        let start = Instant::now();
        NoiseStream::new(0x5eed, stream_id(&[0, Purpose::InitialLatents as u64])).fill_normal(17, &mut z);
        let normal_rate = n as f64 / start.elapsed().as_secs_f64();
        let mut u = vec![0f32; n];
        let start = Instant::now();
        NoiseStream::new(0x5eed, 1).fill_uniform(0, &mut u);
        let uniform_rate = n as f64 / start.elapsed().as_secs_f64();
        println!("CPU fill, one thread: normals {normal_rate:.3e} values/s, uniforms {uniform_rate:.3e} values/s");

        for lag in [1, 2, 3, 4, 5, 8] {
            let (mean, var, kurtosis, corr) = moments(&z, lag);
            assert!(mean.abs() < 5e-3, "mean {mean}");
            assert!((var - 1.0).abs() < 7e-3, "variance {var}");
            assert!((kurtosis - 3.0).abs() < 5e-2, "kurtosis {kurtosis}");
            assert!(corr.abs() < 5e-3, "lag {lag} correlation {corr}");
        }
        // Uniform: mean 1/2, variance 1/12 (standard errors 2.9e-4 and 7.5e-5).
        let (mean, var, _, corr) = moments(&u, 1);
        assert!((mean - 0.5).abs() < 1.5e-3 && (var - 1.0 / 12.0).abs() < 4e-4 && corr.abs() < 5e-3);
        // Tail mass beyond 3σ: 0.0027 (standard error 5.2e-5).
        let tail = z.iter().filter(|v| v.abs() > 3.0).count() as f64 / n as f64;
        assert!((tail - 0.0026998).abs() < 2.6e-4, "P(|z| > 3) = {tail}");
    }

    #[test]
    fn seeds_and_streams_are_uncorrelated() {
        let n = 1_000_000;
        let fill = |seed, stream| {
            let mut z = vec![0f32; n];
            NoiseStream::new(seed, stream).fill_normal(0, &mut z);
            z
        };
        let base = fill(1, 1);
        for other in [fill(2, 1), fill(1, 2), fill(1 << 32, 1), fill(1, 1 << 32)] {
            let corr = base.iter().zip(&other).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / n as f64;
            assert!(corr.abs() < 5e-3, "correlation {corr}");
            assert_ne!(base[..8], other[..8]);
        }
    }
}
