//! FreeInit (Wu et al. 2023, "FreeInit: Bridging Initialization Gap in Video Diffusion Models";
//! diffusers `pipelines/free_init_utils.py`, `FreeInitMixin`): the clip is sampled `iterations`
//! times. Before every pass after the first, the previous pass's denoised latents are noised again
//! to the start of the schedule with the first pass's initial noise, and a 3-D low-pass filter
//! over (frames, h, w) keeps the low spatio-temporal frequencies of that while the high ones come
//! from fresh noise. At the last training timestep the noised videos still hold their low
//! frequencies (the SNR there is not zero), which Gaussian noise at inference lacks: the refined
//! initial latents carry the previous result's coarse layout and motion instead, so the frames
//! agree on it (less flicker) at `iterations` times the cost.
//!
//! The filter and the mixing run on the host in f64 (a clip's latents are a few MB), one channel
//! at a time.

use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The filters diffusers 0.42.1 builds (`_get_free_init_freq_filter`).
pub const FREE_INIT_METHODS: [&str; 3] = ["butterworth", "gaussian", "ideal"];
/// Each pass is a whole sampling run; more than this is a mistake rather than a setting.
pub const MAX_ITERATIONS: usize = 10;
/// Butterworth orders accepted (diffusers takes any; past this the filter is the ideal one).
pub const MAX_ORDER: u32 = 64;

/// `[video.free_init]`: present means on. Defaults are diffusers' `enable_free_init`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FreeInitSettings {
    /// Sampling passes over the clip, the first from the initial noise (default 3).
    pub iterations: usize,
    /// The low-pass filter: butterworth (default), gaussian or ideal.
    pub method: String,
    /// The Butterworth filter's order (default 4).
    pub order: u32,
    /// Normalised stop frequency over h and w, in [0, 1] (default 0.25; 0 keeps nothing).
    pub spatial_stop_frequency: f64,
    /// Normalised stop frequency over the frames, in [0, 1] (default 0.25; 0 keeps nothing).
    pub temporal_stop_frequency: f64,
    /// Coarse-to-fine: pass k of n runs max(1, int(steps / n · (k + 1))) steps (default false).
    pub use_fast_sampling: bool,
}

impl Default for FreeInitSettings {
    fn default() -> Self {
        FreeInitSettings {
            iterations: 3,
            method: "butterworth".into(),
            order: 4,
            spatial_stop_frequency: 0.25,
            temporal_stop_frequency: 0.25,
            use_fast_sampling: false,
        }
    }
}

/// The shape of the filter's response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Butterworth,
    Gaussian,
    Ideal,
}

impl Method {
    /// `name` as the config writes it; the error names the choices.
    pub fn parse(name: &str) -> std::result::Result<Method, String> {
        match name {
            "butterworth" => Ok(Method::Butterworth),
            "gaussian" => Ok(Method::Gaussian),
            "ideal" => Ok(Method::Ideal),
            _ => Err(format!("'{name}' is not one of {}", FREE_INIT_METHODS.join(", "))),
        }
    }
}

impl FreeInitSettings {
    /// Adds a line per invalid setting to `problems`, each naming `field`'s key.
    pub fn problems(&self, field: &str, problems: &mut Vec<String>) {
        if !(1..=MAX_ITERATIONS).contains(&self.iterations) {
            problems.push(format!(
                "{field}.iterations: {}; it must be in 1..={MAX_ITERATIONS} (each is a whole sampling pass)",
                self.iterations
            ));
        }
        if let Err(e) = Method::parse(&self.method) {
            problems.push(format!("{field}.method: {e}"));
        }
        if !(1..=MAX_ORDER).contains(&self.order) {
            problems.push(format!("{field}.order: {}; it must be in 1..={MAX_ORDER}", self.order));
        }
        for (key, value) in [
            ("spatial_stop_frequency", self.spatial_stop_frequency),
            ("temporal_stop_frequency", self.temporal_stop_frequency),
        ] {
            if !(0.0..=1.0).contains(&value) {
                problems.push(format!("{field}.{key}: {value}; it must be in [0, 1] (a normalised frequency)"));
            }
        }
    }

    /// The steps of pass `iteration` (0-based) for a schedule of `steps`: all of them, or with
    /// fast sampling diffusers' max(1, int(steps / iterations · (iteration + 1))), in the same f64
    /// arithmetic (which gives 60 for the last of 7 passes over 61 steps, as diffusers runs).
    pub fn steps(&self, steps: usize, iteration: usize) -> usize {
        if !self.use_fast_sampling {
            return steps;
        }
        ((steps as f64 / self.iterations as f64 * (iteration + 1) as f64) as usize).max(1)
    }

    /// The low-pass filter of a `frames` x `h` x `w` latent.
    pub fn low_pass(&self, frames: usize, h: usize, w: usize) -> Result<LowPass> {
        let method = Method::parse(&self.method).map_err(|e| Error::Input(format!("video.free_init.method: {e}")))?;
        LowPass::new(method, self.order, self.spatial_stop_frequency, self.temporal_stop_frequency, [frames, h, w])
    }
}

/// A low-pass filter over (frames, h, w), stored with frequency 0 first along each axis (the
/// layout of an unshifted FFT).
pub struct LowPass {
    dims: [usize; 3],
    values: Vec<f32>,
}

impl LowPass {
    /// diffusers' `_get_free_init_freq_filter` for `dims` = (frames, h, w).
    pub fn new(method: Method, order: u32, spatial: f64, temporal: f64, dims: [usize; 3]) -> Result<LowPass> {
        let shifted = centred_filter(method, order, spatial, temporal, dims)?;
        // diffusers multiplies the fftshift-ed spectrum: frequency k sits at (k + n / 2) mod n there.
        let [t_n, h_n, w_n] = dims;
        let mut values = vec![0f32; shifted.len()];
        for t in 0..t_n {
            for y in 0..h_n {
                for x in 0..w_n {
                    let (st, sy, sx) = ((t + t_n / 2) % t_n, (y + h_n / 2) % h_n, (x + w_n / 2) % w_n);
                    values[(t * h_n + y) * w_n + x] = shifted[(st * h_n + sy) * w_n + sx];
                }
            }
        }
        Ok(LowPass { dims, values })
    }

    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }
}

/// The filter as diffusers builds it, centred (the fftshift-ed layout), [frames][h][w] row-major:
/// d² = ((s / t)·(2f/F − 1))² + (2y/H − 1)² + (2x/W − 1)² for spatial and temporal stop frequencies
/// s and t, then butterworth 1 / (1 + (d² / s²)^order), gaussian exp(−d² / (2s²)), ideal
/// [d² ≤ 2s] (diffusers compares d² with 2s, not s²). All zeros when s or t is 0. Computed in f64
/// and stored as f32, as diffusers fills a float32 tensor from Python floats.
pub fn centred_filter(method: Method, order: u32, spatial: f64, temporal: f64, dims: [usize; 3]) -> Result<Vec<f32>> {
    let [t_n, h_n, w_n] = dims;
    let len = checked_len(dims)?;
    let mut mask = vec![0f32; len];
    if spatial == 0.0 || temporal == 0.0 {
        return Ok(mask);
    }
    let ratio = spatial / temporal;
    let centred = |i: usize, n: usize| 2.0 * i as f64 / n as f64 - 1.0;
    for t in 0..t_n {
        for y in 0..h_n {
            for x in 0..w_n {
                let d2 = (ratio * centred(t, t_n)).powi(2) + centred(y, h_n).powi(2) + centred(x, w_n).powi(2);
                let value = match method {
                    Method::Butterworth => 1.0 / (1.0 + (d2 / spatial.powi(2)).powi(order as i32)),
                    Method::Gaussian => (-1.0 / (2.0 * spatial.powi(2)) * d2).exp(),
                    Method::Ideal => {
                        if d2 <= spatial * 2.0 {
                            1.0
                        } else {
                            0.0
                        }
                    }
                };
                mask[(t * h_n + y) * w_n + x] = value as f32;
            }
        }
    }
    Ok(mask)
}

fn checked_len(dims: [usize; 3]) -> Result<usize> {
    match dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(Error::Input(format!("FreeInit filter over {dims:?}: every side must be at least 1"))),
    }
}

/// diffusers' `_apply_freq_filter`: the low frequencies of `z` and the high ones of `noise`,
/// LPF·FFT(z) + (1 − LPF)·FFT(noise), back through the inverse FFT (real part). Both are
/// frame-major NHWC [frames, h, w, channels] with the filter's (frames, h, w); each channel is
/// transformed on its own. Computed as noise + IFFT(LPF·FFT(z − noise)), the same by linearity,
/// with one transform pair.
pub fn mix_frequencies(z: &[f32], noise: &[f32], filter: &LowPass, channels: usize) -> Result<Vec<f32>> {
    let [t_n, h_n, w_n] = filter.dims;
    let per_channel = filter.values.len();
    let total = per_channel.checked_mul(channels).filter(|&n| n > 0);
    if total != Some(z.len()) || z.len() != noise.len() {
        return Err(Error::Input(format!(
            "FreeInit mixing: latents of {} and noise of {} values for {t_n} frames x {h_n} x {w_n} x {channels} channels",
            z.len(),
            noise.len()
        )));
    }
    let mut planner = FftPlanner::<f64>::new();
    let forward = [t_n, h_n, w_n].map(|n| planner.plan_fft_forward(n));
    let inverse = [t_n, h_n, w_n].map(|n| planner.plan_fft_inverse(n));
    let scale = 1.0 / per_channel as f64;
    let mut out = noise.to_vec();
    let mut grid = vec![Complex::new(0f64, 0f64); per_channel];
    for c in 0..channels {
        for (i, v) in grid.iter_mut().enumerate() {
            let e = i * channels + c;
            *v = Complex::new(z[e] as f64 - noise[e] as f64, 0.0);
        }
        fft_3d(&mut grid, filter.dims, &forward);
        for (v, &k) in grid.iter_mut().zip(&filter.values) {
            *v *= k as f64 * scale;
        }
        fft_3d(&mut grid, filter.dims, &inverse);
        for (i, v) in grid.iter().enumerate() {
            let e = i * channels + c;
            out[e] = (noise[e] as f64 + v.re) as f32;
        }
    }
    Ok(out)
}

/// In-place transforms of `grid` ([d0][d1][d2] row-major) along its three axes.
fn fft_3d(grid: &mut [Complex<f64>], dims: [usize; 3], plans: &[Arc<dyn Fft<f64>>; 3]) {
    let longest = plans.iter().map(|p| p.get_inplace_scratch_len()).max().unwrap_or(0);
    let mut scratch = vec![Complex::new(0.0, 0.0); longest];
    // The last axis is contiguous: rustfft transforms every run of d2 values in one call.
    plans[2].process_with_scratch(grid, &mut scratch);
    let mut line = vec![Complex::new(0.0, 0.0); dims[0].max(dims[1])];
    for axis in 0..2 {
        let n = dims[axis];
        let stride: usize = dims[axis + 1..].iter().product();
        let outer: usize = dims[..axis].iter().product();
        let line = &mut line[..n];
        for o in 0..outer {
            for inner in 0..stride {
                let base = o * n * stride + inner;
                for (k, v) in line.iter_mut().enumerate() {
                    *v = grid[base + k * stride];
                }
                plans[axis].process_with_scratch(line, &mut scratch);
                for (k, v) in line.iter().enumerate() {
                    grid[base + k * stride] = *v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn floats(v: &Value) -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    }

    fn fixture() -> Value {
        // tools/make_pipeline_fixtures.py ran diffusers' _get_free_init_freq_filter and
        // _apply_freq_filter.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pipeline_tiny/free_init_filters.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn settings(case: &Value) -> (Method, u32, f64, f64, [usize; 3]) {
        let dims: Vec<usize> = case["dims"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        (
            Method::parse(case["method"].as_str().unwrap()).unwrap(),
            case["order"].as_u64().unwrap() as u32,
            case["spatial_stop_frequency"].as_f64().unwrap(),
            case["temporal_stop_frequency"].as_f64().unwrap(),
            [dims[0], dims[1], dims[2]],
        )
    }

    #[test]
    fn filters_match_diffusers() {
        let fixture = fixture();
        let cases = fixture["filters"].as_array().unwrap();
        assert!(cases.len() >= 5);
        for case in cases {
            let (method, order, s, t, dims) = settings(case);
            let ours = centred_filter(method, order, s, t, dims).unwrap();
            let want = floats(&case["mask"]);
            assert_eq!(ours.len(), want.len());
            // f64 arithmetic rounded once to f32 on both sides; pow may differ by an ulp.
            let worst = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-6, "{case}: max |Δ| {worst:e}");
        }
    }

    /// diffusers [C, F, h, w] values -> frame-major NHWC.
    fn to_frames(v: &[f32], [c, f, h, w]: [usize; 4]) -> Vec<f32> {
        let mut out = vec![0f32; v.len()];
        for ch in 0..c {
            for i in 0..f * h * w {
                out[i * c + ch] = v[ch * f * h * w + i];
            }
        }
        out
    }

    #[test]
    fn mixing_matches_diffusers() {
        let fixture = fixture();
        let cases = fixture["mixing"].as_array().unwrap();
        assert!(cases.len() >= 2);
        for case in cases {
            let (method, order, s, t, dims) = settings(case);
            let c = case["channels"].as_u64().unwrap() as usize;
            let shape = [c, dims[0], dims[1], dims[2]];
            let filter = LowPass::new(method, order, s, t, dims).unwrap();
            let z = to_frames(&floats(&case["x"]), shape);
            let noise = to_frames(&floats(&case["noise"]), shape);
            let want = to_frames(&floats(&case["mixed"]), shape);
            let ours = mix_frequencies(&z, &noise, &filter, c).unwrap();
            // diffusers transforms in complex64: errors of a few f32 ulps of the inputs' scale.
            let worst = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= 2e-6, "{}: max |Δ| {worst:e}", case["method"]);
            // The mix is neither input: both contribute.
            let differs = |a: &[f32]| a.iter().zip(&ours).any(|(p, q)| (p - q).abs() > 1e-3);
            assert!(differs(&z) && differs(&noise));
        }
    }

    #[test]
    fn zero_stop_frequency_gives_the_noise_and_an_all_pass_filter_gives_the_latents() {
        let dims = [3, 4, 5];
        let c = 2;
        let n = 3 * 4 * 5 * c;
        let z: Vec<f32> = (0..n).map(|i| ((i * 7919) % 97) as f32 / 10.0 - 4.0).collect();
        let noise: Vec<f32> = (0..n).map(|i| ((i * 104729) % 89) as f32 / 20.0 - 2.0).collect();
        let zero = LowPass::new(Method::Butterworth, 4, 0.0, 0.25, dims).unwrap();
        assert_eq!(mix_frequencies(&z, &noise, &zero, c).unwrap(), noise);
        let all = LowPass { dims, values: vec![1.0; 60] };
        let kept = mix_frequencies(&z, &noise, &all, c).unwrap();
        assert!(kept.iter().zip(&z).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    #[test]
    fn the_filter_is_one_at_frequency_zero() {
        // fftshift puts frequency 0 at n / 2, where diffusers' d² is 0 for even sides.
        let f = LowPass::new(Method::Gaussian, 4, 0.25, 0.25, [4, 6, 8]).unwrap();
        assert_eq!(f.values[0], 1.0);
        assert!(f.values.iter().all(|&v| (0.0..=1.0).contains(&v)));
    }

    #[test]
    fn fast_sampling_steps_follow_diffusers() {
        let mut s = FreeInitSettings { use_fast_sampling: true, ..FreeInitSettings::default() };
        assert_eq!((0..3).map(|k| s.steps(4, k)).collect::<Vec<_>>(), vec![1, 2, 4]);
        s.iterations = 7;
        assert_eq!(s.steps(61, 6), 60, "diffusers' float arithmetic");
        s.use_fast_sampling = false;
        assert_eq!(s.steps(61, 0), 61);
    }

    /// examples/tiny.toml (whose models exist) with `extra` appended to its `[video]` table.
    fn tiny_config(extra: &str) -> Result<crate::pipeline::config::RenderConfig> {
        let root = env!("CARGO_MANIFEST_DIR");
        let text = std::fs::read_to_string(format!("{root}/examples/tiny.toml"))
            .unwrap()
            .replace("\"../", &format!("\"{root}/"))
            .replace("frames = 8\n", &format!("frames = 8\n{extra}\n"));
        let path = std::env::temp_dir().join(format!("celframe-free-init-{}-{}.toml", std::process::id(), extra.len()));
        std::fs::write(&path, text).unwrap();
        let config = crate::pipeline::config::RenderConfig::load(&path);
        std::fs::remove_file(&path).unwrap();
        config
    }

    #[test]
    fn the_render_config_takes_and_checks_free_init() {
        let config = tiny_config("[video.free_init]\nmethod = \"gaussian\"").unwrap();
        config.validate().unwrap();
        let resolved = config.resolved_json();
        let shown = &resolved["video"]["free_init"];
        assert_eq!(shown["iterations"], 3, "{shown}");
        assert_eq!(shown["method"], "gaussian");
        assert_eq!(shown["spatial_stop_frequency"], 0.25);
        assert!(tiny_config("").unwrap().resolved_json()["video"]["free_init"].is_null());

        let chained = tiny_config("long_video = \"chain\"\n[video.free_init]\niterations = 2").unwrap();
        let err = chained.validate().unwrap_err().to_string();
        assert!(err.contains("video.free_init: needs video.long_video = \"windows\""), "{err}");
        let bad = tiny_config("[video.free_init]\norder = 0\nmethod = \"box\"").unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("video.free_init.order") && err.contains("video.free_init.method"), "{err}");
        let unknown = tiny_config("[video.free_init]\nsteps = 2").expect_err("an unknown key was accepted");
        assert!(unknown.to_string().contains("steps"), "{unknown}");
    }

    #[test]
    fn bad_settings_are_named() {
        let s = FreeInitSettings {
            iterations: 0,
            method: "box".into(),
            order: 0,
            spatial_stop_frequency: 1.5,
            temporal_stop_frequency: f64::NAN,
            use_fast_sampling: false,
        };
        let mut problems = Vec::new();
        s.problems("video.free_init", &mut problems);
        let text = problems.join("\n");
        for key in ["iterations", "method: 'box'", "order", "spatial_stop_frequency", "temporal_stop_frequency"] {
            assert!(text.contains(&format!("video.free_init.{key}")), "{key} missing from:\n{text}");
        }
        let mut none = Vec::new();
        FreeInitSettings::default().problems("video.free_init", &mut none);
        assert!(none.is_empty(), "{none:?}");
        let filter = LowPass::new(Method::Ideal, 1, 0.25, 0.25, [1, 2, 2]).unwrap();
        assert!(matches!(mix_frequencies(&[0.0; 5], &[0.0; 5], &filter, 1), Err(Error::Input(_))));
    }
}
