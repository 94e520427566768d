//! CUDA graphs (celframe::gpu::graph) on the motion UNet: SDXL-shaped models with random weights
//! (the set `celframe demo` draws, cached in $CELFRAME_DEMO_CACHE or target/celframe-demo; the
//! tiny test models cannot run on CUDA: their motion heads are below the temporal-attention
//! kernel's 33), at 32x32 latents, 2 videos of 8 frames, f16, outputs poisoned.
//!
//! A replay must give the eager forward's bytes exactly: the same kernels, algorithms and addresses
//! run in the same order, so nothing may differ. Checked: the first replay; a replay after new
//! inputs are copied into the static input tensors; a replay after a weight is rewritten in place
//! (what a LoRA switch does); eager tensors made after the capture surviving replays (the scratch
//! reservation); refused operations inside a capture, after which the Gpu still captures and runs.
//!
//! A render with graphs (the default on CUDA) writes the bytes an eager render
//! (`CELFRAME_CUDA_GRAPHS=0`) writes: one 16-frame clip (one window: its model call is captured at
//! step 2 and replayed at steps 3 and 4) and one of 24 frames (two moving windows), LCM 4 steps at
//! CFG 1.5 with an OpenPose ControlNet, 512x288. Equal frames and mp4s stand for equal latents:
//! the VAE decode is deterministic.
//!
//! This needs an NVIDIA GPU, so CI (no GPU) lists it as ignored; tools/gpu_run.sh runs it on the
//! GPU machine with `--include-ignored`, from the repository root. Run without a GPU it fails,
//! never passes silently.

#[path = "common/trees.rs"]
mod trees;
#[path = "common/unet_fixtures.rs"]
mod unet_fixtures;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use celframe::gpu::{Arena, Gpu, Graph, GraphPool};
use celframe::models::{Frames, MotionModules, Place, Unet, UnetInputs, open_motion, open_unet};
use celframe::ops::Exec;
use celframe::pipeline::random_models::{ModelSize, cached_random_pipeline};
use celframe::tensor::Storage;
use celframe::{DType, Error, Tensor};
use trees::{assert_same_tree, celframe_command};
use unet_fixtures::TempDir;

const VIDEOS: usize = 2;
const FRAMES: usize = 8;
const LATENT: usize = 32;
const DTYPE: DType = DType::F16;

fn models() -> PathBuf {
    assert!(Gpu::is_available(), "no CUDA device: this GPU test cannot run here (it is not skipped silently)");
    let cache = std::env::var_os("CELFRAME_DEMO_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/celframe-demo"));
    std::fs::create_dir_all(&cache).unwrap();
    // Absolute: a render config's relative paths are its folder's.
    std::fs::canonicalize(cached_random_pipeline(&cache, ModelSize::Full, 0).unwrap()).unwrap()
}

/// Values in [-1, 1) from a small LCG, different per seed.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The bytes of a device tensor.
fn bytes(gpu: &Gpu, t: &Tensor) -> Vec<u8> {
    gpu.download(t).unwrap().host_bytes().unwrap().to_vec()
}

/// Static device inputs of the motion UNet: sample, timestep, context, pooled text, time ids.
struct Inputs {
    sample: Tensor,
    timestep: Tensor,
    context: Tensor,
    pooled: Tensor,
    time_ids: Tensor,
}

impl Inputs {
    fn host(seed: u64) -> Inputs {
        let rows = VIDEOS * FRAMES;
        let t = |shape: &[usize], dtype, v: Vec<f32>| Tensor::from_f32(shape, dtype, &v).unwrap();
        Inputs {
            sample: t(&[rows, LATENT, LATENT, 4], DTYPE, values(rows * LATENT * LATENT * 4, seed)),
            timestep: t(&[VIDEOS], DType::F32, (0..VIDEOS).map(|v| 900.0 - 100.0 * (seed + v as u64) as f32).collect()),
            context: t(&[VIDEOS, 77, 2048], DTYPE, values(VIDEOS * 77 * 2048, seed + 1)),
            pooled: t(&[VIDEOS, 1280], DTYPE, values(VIDEOS * 1280, seed + 2)),
            time_ids: t(&[VIDEOS, 6], DType::F32, [256.0, 256.0, 0.0, 0.0, 256.0, 256.0].repeat(VIDEOS)),
        }
    }

    fn each(&self) -> [&Tensor; 5] {
        [&self.sample, &self.timestep, &self.context, &self.pooled, &self.time_ids]
    }

    fn upload(&self, gpu: &Gpu, arena: &Arena) -> Inputs {
        let [a, b, c, d, e] = self.each().map(|t| gpu.upload(arena, t, t.dtype()).unwrap());
        Inputs { sample: a, timestep: b, context: c, pooled: d, time_ids: e }
    }

    fn unet(&self) -> UnetInputs<'_> {
        UnetInputs {
            sample: &self.sample,
            timestep: &self.timestep,
            encoder_hidden_states: &self.context,
            cross_kv: None,
            text_embeds: Some(&self.pooled),
            time_ids: Some(&self.time_ids),
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn motion_unet_replays_match_eager_forwards() {
    let models = models();
    let gpu = Gpu::from_env().unwrap();
    gpu.set_poison_outputs(true);
    let unet_checkpoint = open_unet(&models.join("unet")).unwrap();
    let motion_checkpoint = open_motion(&models.join("motion_adapter")).unwrap();
    let weight_bytes: usize = [&unet_checkpoint.weights, &motion_checkpoint.weights]
        .iter()
        .flat_map(|w| w.iter().map(|(_, t)| t.numel() * DTYPE.size() + 256))
        .sum();
    let weights = Arena::new("weights", weight_bytes + (256 << 20)).unwrap();
    let scratch = Arena::new("scratch", 16 << 30).unwrap();
    let place = Place::device(&gpu, &weights, DTYPE);
    let unet = Unet::new(&unet_checkpoint, place).unwrap();
    let motion = MotionModules::new(&motion_checkpoint, &unet, place).unwrap();
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let video = Frames { frames: FRAMES, group_norm_across_frames: false };

    let inputs = Inputs::host(1).upload(&gpu, &weights);
    let forward = || motion.forward_unet(&ex, &unet, &inputs.unet(), video, None);
    // Warm-up (modules load, cuDNN searches, cuBLASLt plans), and the premise: eager is repeatable.
    let eager = bytes(&gpu, &forward().unwrap());
    assert_eq!(bytes(&gpu, &forward().unwrap()), eager, "two eager forwards differ: no bit-exact replay possible");

    let pool = GraphPool::new();
    let (graph, out) = Graph::capture(&gpu, &scratch, &pool, forward).unwrap();
    assert!(pool.reserved_bytes() > 0 && graph.held_bytes() >= out.size_bytes());
    // An eager tensor made after the capture lies outside what the replays write.
    let bystander = forward().unwrap();
    let bystander_bytes = bytes(&gpu, &bystander);
    graph.launch(&gpu).unwrap();
    assert_eq!(bytes(&gpu, &out), eager, "first replay");
    assert_eq!(bytes(&gpu, &bystander), bystander_bytes, "a replay overwrote a tensor made after the capture");

    // New inputs written into the static tensors by device copies.
    let fresh = Inputs::host(2).upload(&gpu, &weights);
    for (to, from) in inputs.each().into_iter().zip(fresh.each()) {
        gpu.copy(to, from).unwrap();
    }
    graph.launch(&gpu).unwrap();
    let replayed = bytes(&gpu, &out);
    assert_ne!(replayed, eager, "the replay did not read the new inputs");
    assert_eq!(replayed, bytes(&gpu, &forward().unwrap()), "replay on new inputs");

    // A weight rewritten in place, as a LoRA switch does: the replay reads it.
    let name = "conv_in.weight";
    let w = unet.weights().tensor(name).unwrap_or_else(|| panic!("the UNet has no {name}"));
    let Storage::Device(mem) = w.storage() else { panic!("{name} is not on the device") };
    // At the scale of the random weights (about 1/sqrt(fan_in)), so the output stays finite.
    let scaled: Vec<f32> = values(w.numel(), 9).iter().map(|v| v * 0.15).collect();
    let changed = Tensor::from_f32(w.shape(), w.dtype(), &scaled).unwrap();
    gpu.upload_into(mem, &changed, w.dtype()).unwrap();
    graph.launch(&gpu).unwrap();
    let after_switch = bytes(&gpu, &out);
    assert_ne!(after_switch, replayed, "the replay did not read the rewritten weight");
    assert_eq!(after_switch, bytes(&gpu, &forward().unwrap()), "replay after an in-place weight change");
    drop(graph);
    drop(out);

    // Refused inside a capture, by name; the capture ends and the Gpu carries on.
    let refused = Graph::capture(&gpu, &scratch, &pool, || {
        let out = forward()?;
        gpu.download(&out)
    });
    match refused {
        Err(Error::Internal(m)) => assert!(m.contains("a download while capturing a CUDA graph"), "{m}"),
        Err(e) => panic!("a download in a capture failed otherwise: {e}"),
        Ok(_) => panic!("a download in a capture was not refused"),
    }
    assert!(!gpu.is_capturing());
    let upload = Graph::capture(&gpu, &scratch, &pool, || gpu.upload(&scratch, &Inputs::host(3).pooled, DTYPE));
    assert!(matches!(upload, Err(Error::Internal(m)) if m.contains("staging buffers")));
    let expected = bytes(&gpu, &forward().unwrap());
    let (again, out) = Graph::capture(&gpu, &scratch, &pool, forward).unwrap();
    again.launch(&gpu).unwrap();
    assert_eq!(bytes(&gpu, &out), expected, "a capture after refused ones");
    println!(
        "GRAPH motion unet b{VIDEOS}x{FRAMES} {LATENT}x{LATENT}: replays bit-identical; reserved {:.1} MiB, outputs {:.1} MiB",
        pool.reserved_bytes() as f64 / (1 << 20) as f64,
        again.held_bytes() as f64 / (1 << 20) as f64
    );
}

/// Two clips (16 frames: one window; 24: two), LCM 4 steps, an OpenPose ControlNet, f16.
fn render_config(models: &Path, path: &Path) {
    let dir = |name: &str| models.join(name).display().to_string();
    let config = serde_json::json!({
        "seed": 5, "dtype": "f16", "device": "cuda",
        "models": { "base": models.display().to_string(), "motion_adapter": dir("motion_adapter") },
        "controlnets": [{ "path": dir("controlnet"), "kind": "openpose", "images": "builtin:pose" }],
        "sampler": { "name": "lcm", "steps": 4, "cfg": 1.5 },
        "video": { "width": 512, "height": 288, "fps": 8, "frames": 16 },
        "output": { "root": "outputs/graph-gpu", "mp4": "builtin" },
        "clips": [
            { "id": "wave", "prompt": "1girl, silver hair, waving, cel shading" },
            { "id": "run", "prompt": "1boy, running, city street at night", "frames": 24 },
        ],
    });
    std::fs::write(path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

/// `celframe render CONFIG --out OUT` with CELFRAME_CUDA_GRAPHS set to `graphs` (None: unset);
/// its stderr.
fn render(config: &Path, out: &Path, graphs: Option<&str>) -> String {
    let mut command = celframe_command(&["render", config.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    match graphs {
        Some(v) => command.env("CELFRAME_CUDA_GRAPHS", v),
        None => command.env_remove("CELFRAME_CUDA_GRAPHS"),
    };
    let done = command.stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr).into_owned();
    assert!(done.status.success(), "celframe render: {:?}\n{err}", done.status);
    err
}

#[test]
#[ignore = "needs an NVIDIA GPU: run by tools/gpu_run.sh"]
fn a_render_with_graphs_writes_what_an_eager_render_writes() {
    let models = models();
    let dir = TempDir::new("graph-gpu");
    let config = dir.path("render.json");
    render_config(&models, &config);
    let eager = dir.path("eager");
    let started = std::time::Instant::now();
    let eager_err = render(&config, &eager, Some("0"));
    let eager_s = started.elapsed().as_secs_f64();
    assert!(!eager_err.contains("CUDA graphs:"), "CELFRAME_CUDA_GRAPHS=0 still captured:\n{eager_err}");
    let graphed = dir.path("graphs/eager");
    let started = std::time::Instant::now();
    let err = render(&config, &graphed, None);
    let graphed_s = started.elapsed().as_secs_f64();
    let line = err.lines().find(|l| l.contains("clip 001") && l.contains("CUDA graphs:"));
    let line = line.unwrap_or_else(|| panic!("no CUDA graph line for the 16-frame clip:\n{err}"));
    assert!(line.contains("1 captured, 2 replays"), "{line}");
    assert!(!err.contains("runs without a CUDA graph"), "{err}");
    assert_same_tree(&eager, &graphed, "CUDA graphs on");
    println!("GRAPH render: eager {eager_s:.1} s, with graphs {graphed_s:.1} s; {line}");
}
