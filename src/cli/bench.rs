//! `celframe bench unet | motion_unet | controlnet | text_encoders | vae_decoder`: times whole forwards on CUDA with a checkpoint's weights
//! and random inputs (CUDA events, warm-up, median), printing one `BENCH {json}` line that
//! tools/report.py pairs with the peer timings of tools/unet_gpu.py and tools/text_encoder_gpu.py
//! (`PEER` lines with the same key). `celframe bench encode` times the built-in mp4 encoder on the
//! CPU (no weights, no GPU). `--tune-gemms FILE` picks cuBLASLt's fastest algorithm for every GEMM
//! shape the forwards meet and records it in FILE (`gpu::tuning`), which `CELFRAME_GEMM_TUNING`
//! hands to later processes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;

use super::elements;
use crate::error::{Error, Result};
use crate::gpu::blas::Gemm;
use crate::gpu::profile::format_rows;
use crate::gpu::timing::{Timing, time_gpu};
use crate::gpu::{Arena, Gpu, Graph, GraphPool, nvtx};
use crate::models::clip::{ClipTextModel, TextEncoderKind, open_text_encoder};
use crate::models::lora::device::{DeviceLoraSet, LoraSwitcher, Restore};
use crate::models::lora::{self, Component, LoraSpec, Loras, Targets};
use crate::models::motion::MAX_FRAMES;
use crate::models::transformer::{CrossKv, Fp8Linears};
use crate::models::vae::{Vae, open_vae};
use crate::models::{
    ControlNet, ControlNetUnion, ControlScale, ControlType, Frames, ModelWeights, MotionModules, Place, Unet,
    UnetConfig, UnetInputs, UnetResiduals, UnionCondition, UnionOptions, open_controlnet, open_motion, open_unet,
};
use crate::ops::Exec;
use crate::ops::elementwise::add;
use crate::ops::fp8::Fp8Scaling;
use crate::ops::random::random_uniform;
use crate::output::{ClipOptions, Fps, Mp4Choice, OutputTree, RgbImage};
use crate::sampling::NoiseStream;
use crate::tensor::{DType, Tensor};
use crate::verify::arenas::{MAX_SCRATCH_GB, model_arenas, scratch_bytes, weight_bytes};
use crate::verify::unet::ForwardInputs;

#[derive(Args)]
pub struct BenchArgs {
    /// What to time: unet; lora (merging `--lora`'s set into the UNet's device weights and
    /// switching to `--switch-lora`'s and back); motion_unet (the UNet with `--motion`'s modules on
    /// `--batch` videos of `--frames` frames); controlnet (`--batch` images with control images at
    /// the output size; a Union with `--conditions` of them, a plain ControlNet `--nets` times);
    /// text_encoders (both SDXL encoders on a CFG pair of prompts);
    /// vae_decoder (`--batch` frames of `--height` x `--width` latents, `--chunk` at a time);
    /// encode (the built-in mp4 encoder on `--frames` frames of 8 `--width` x 8 `--height` pixels,
    /// on 1, 2, 4 and all of the machine's threads; no weights, no GPU).
    pub component: String,
    /// unet: a diffusers UNet folder or a single-file checkpoint; controlnet: a diffusers
    /// ControlNet folder or a single file; text_encoders: a folder holding
    /// text_encoder/ and text_encoder_2/ (a pipeline folder) or a single-file checkpoint.
    /// Every component but encode needs it.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Images (unet), videos (motion_unet) or frames (vae_decoder).
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// motion_unet: the motion modules (a diffusers MotionAdapter folder or one safetensors file).
    #[arg(long)]
    pub motion: Option<PathBuf>,
    /// motion_unet: frames per video (1 to 32); encode: frames of the clip.
    #[arg(long, default_value_t = 16)]
    pub frames: usize,
    /// Latent height (image height / 8).
    #[arg(long, default_value_t = 128)]
    pub height: usize,
    /// Latent width (image width / 8).
    #[arg(long, default_value_t = 128)]
    pub width: usize,
    /// Text tokens of the context (77 per prompt chunk).
    #[arg(long, default_value_t = 77)]
    pub tokens: usize,
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    /// Timed forwards (after two untimed ones), at most 10000.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// controlnet, a Union checkpoint: conditions per forward, of types 0, 1, ... (openpose,
    /// depth, hed, canny, ...), each at scale 1.
    #[arg(long)]
    pub conditions: Option<usize>,
    /// controlnet, a plain checkpoint: forwards per timed run, their residuals summed (what that
    /// many separate ControlNets of this architecture cost, as a multi-ControlNet step sums them).
    #[arg(long)]
    pub nets: Option<usize>,
    /// vae_decoder: frames per decoder forward.
    #[arg(long, default_value_t = 8)]
    pub chunk: usize,
    /// CUDA scratch arena in GiB.
    #[arg(long, default_value_t = 24.0)]
    pub scratch_gb: f64,
    /// lora: the set merged first, `PATH[:WEIGHT]`, repeatable.
    #[arg(long = "lora")]
    pub loras: Vec<String>,
    /// lora: the set switched to and back, `PATH[:WEIGHT]`, repeatable.
    #[arg(long = "switch-lora")]
    pub switch_loras: Vec<String>,
    /// lora: how a switch restores the base weights: copy (device copies) or reload (from the files).
    #[arg(long, default_value = "copy")]
    pub lora_restore: String,
    /// lora: a folder with text_encoder/ and text_encoder_2/ (or a single-file checkpoint) whose
    /// weights the sets' text-encoder parts merge into as well.
    #[arg(long)]
    pub text_encoders: Option<PathBuf>,
    /// After the timed runs, one more forward with every kernel, matmul and convolution timed on
    /// its own, printed as a table of GPU time by model part (resnet, transformer, motion, ...) and
    /// kind of work (gemm, conv, flash_attention, group_norm, ...).
    #[arg(long)]
    pub breakdown: bool,
    /// As --breakdown, with each GEMM description (m, n, k, bias, residual added), each
    /// convolution shape and each flash-attention shape a kind of its own, with its TFLOP/s.
    #[arg(long)]
    pub breakdown_gemms: bool,
    /// Time cuBLASLt's candidate algorithms for every GEMM description the forwards meet that FILE
    /// has no entry for, run the fastest, and write FILE (made, or extended when it exists; it must
    /// have been made on this device and cuBLASLt). Renders and benches run the recorded choices
    /// when CELFRAME_GEMM_TUNING=FILE is set. Not with CELFRAME_GEMM_TUNING=FILE set, nor for
    /// encode; a built-in file for this device is set aside while tuning.
    #[arg(long, value_name = "FILE")]
    pub tune_gemms: Option<PathBuf>,
    /// unet, motion_unet, controlnet: after the eager runs, capture one forward into a CUDA graph,
    /// check that a replay's outputs are bit-identical to an eager forward's on the same inputs,
    /// and time replays the same way (a second `BENCH` line, its key ending in " graph").
    #[arg(long)]
    pub graph: bool,
    /// unet, motion_unet, controlnet: last, run the transformer blocks' linears in FP8 (e4m3, one
    /// scale per tensor; `on`: those with at least 1536 outputs, `all`: every one; as the render
    /// config's `fp8`) and time the forward again (key + " fp8 on" / " fp8 all"), with its
    /// outputs' relative L2 distance from the plain forward's on the same inputs (an `FP8` JSON
    /// line; above 0.25 the bench fails: a broken FP8 path). Compute capability 8.9 or later.
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "on", default_value = "off")]
    pub fp8: String,
}

/// Most elements of one activation: cuDNN and the kernels index with 32-bit integers (ops/conv.rs
/// splits a larger batch, but one image must fit).
const MAX_ELEMENTS: usize = i32::MAX as usize;
const WHY: &str = "cuDNN and the kernels index one tensor with 32-bit integers";
/// Most timed runs: enough for any median, and each run's CUDA events are allocated up front.
const MAX_RUNS: usize = 10_000;
/// Most ControlNets (`--nets`) or Union conditions (`--conditions`) per timed run.
const MAX_NETS: usize = 16;
/// Most frames of an `encode` clip.
const MAX_ENCODE_FRAMES: usize = 10_000;

impl BenchArgs {
    fn weights(&self) -> Result<&Path> {
        self.weights.as_deref().ok_or_else(|| Error::Input(format!("bench {}: --weights is required", self.component)))
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let dtype = DType::parse(&args.dtype)?;
    Fp8Linears::parse(&args.fp8).map_err(|e| e.with_prefix("--fp8: "))?;
    let counts = [
        ("--batch", args.batch, None),
        ("--height", args.height, None),
        ("--width", args.width, None),
        ("--tokens", args.tokens, None),
        ("--chunk", args.chunk, None),
        ("--frames", args.frames, Some(if args.component == "encode" { MAX_ENCODE_FRAMES } else { MAX_FRAMES })),
        ("--runs", args.runs, Some(MAX_RUNS)),
        ("--conditions", args.conditions.unwrap_or(1), Some(MAX_NETS)),
        ("--nets", args.nets.unwrap_or(1), Some(MAX_NETS)),
    ];
    for (flag, value, most) in counts {
        match most {
            _ if value == 0 => return Err(Error::Input(format!("{flag} must be at least 1"))),
            Some(most) if value > most => {
                return Err(Error::Input(format!("{flag} must be 1 to {most} (got {value})")));
            }
            _ => {}
        }
    }
    if !(args.scratch_gb > 0.0 && args.scratch_gb <= MAX_SCRATCH_GB) {
        return Err(Error::Input(format!(
            "--scratch-gb must be more than 0 and at most {MAX_SCRATCH_GB} (got {})",
            args.scratch_gb
        )));
    }
    if args.motion.is_some() != (args.component == "motion_unet") {
        return Err(Error::Input("bench: --motion goes with motion_unet, and motion_unet needs it".into()));
    }
    if (args.conditions.is_some() || args.nets.is_some()) && args.component != "controlnet" {
        return Err(Error::Input("bench: --conditions and --nets go with controlnet".into()));
    }
    if args.graph && !["unet", "motion_unet", "controlnet"].contains(&args.component.as_str()) {
        return Err(Error::Input("bench: --graph goes with unet, motion_unet and controlnet".into()));
    }
    if args.tune_gemms.is_some() && args.component == "encode" {
        return Err(Error::Input("bench encode: --tune-gemms goes with the GPU components".into()));
    }
    match args.component.as_str() {
        "unet" => bench_unet(args, dtype),
        "motion_unet" => bench_motion_unet(args, dtype),
        "controlnet" => bench_controlnet(args, dtype),
        "text_encoders" => bench_text_encoders(args, dtype),
        "vae_decoder" => bench_vae_decoder(args, dtype),
        "lora" => bench_lora(args, dtype),
        "encode" => bench_encode(args),
        other => Err(Error::Input(format!(
            "bench: unknown component '{other}' (supported: unet, lora, motion_unet, controlnet, text_encoders, \
             vae_decoder, encode)"
        ))),
    }
}

fn bench_unet(args: &BenchArgs, dtype: DType) -> Result<()> {
    let checkpoint = open_unet(args.weights()?)?;
    let cfg = &checkpoint.config;
    let (b, h, w) = (args.batch, args.height, args.width);
    let widest = cfg.block_out_channels.iter().copied().chain([cfg.in_channels]).max().unwrap_or(0);
    elements(
        "largest activation",
        &[("--batch", b), ("--height", h), ("--width", w), ("channels", widest)],
        MAX_ELEMENTS,
        WHY,
    )?;
    let cross = cfg.cross_attention_dims().first().copied().unwrap_or(0);
    elements("context", &[("--batch", b), ("--tokens", args.tokens), ("width", cross)], MAX_ELEMENTS, WHY)?;
    let gpu = open_gpu(args)?;
    let scratch = scratch_bytes(&gpu, args.scratch_gb)?;
    let (weights, scratch) = model_arenas(&checkpoint.weights, dtype, 64 << 20, |_| scratch)?;
    let unet = Unet::new(&checkpoint, Place::device(&gpu, &weights, dtype))?;

    let uploaded = random_inputs(cfg, [b, 1, h, w], args.tokens, dtype)?.upload(&gpu, &weights)?;
    let inputs = uploaded.unet_inputs();
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let key = format!("unet {} b{b} {}x{}", dtype.kernel_suffix(), 8 * h, 8 * w);
    let run = || {
        let _r = nvtx::range(&key);
        unet.forward(&ex, &inputs, None).map(|out| vec![out])
    };
    let mut forward = || run().map(drop);
    let t = time_gpu(&gpu, 2, args.runs, &mut forward)?;
    report("unet", &key, &t, args.runs, &scratch);
    let with_kv = |kv: Option<&CrossKv>| unet.forward(&ex, &UnetInputs { cross_kv: kv, ..inputs }, None).map(drop);
    text_kv_computed_once(args, &ex, ("unet", &key, &t), unet.weights(), inputs.encoder_hidden_states, with_kv)?;
    replays(args, &gpu, &scratch, "unet", &key, &t, run)?;
    finish(args, &gpu, &key, &t, forward)?;
    let fp8 = Fp8Linears::parse(&args.fp8)?;
    if fp8 != Fp8Linears::Off {
        let plain = host_outputs(&gpu, || unet.forward(&ex, &inputs, None).map(|out| vec![out]))?;
        let mut unet = unet;
        let twins = (unet.enable_fp8(&ex, fp8)?, unet.weights().fp8_layout());
        let run = || unet.forward(&ex, &inputs, None).map(|out| vec![out]);
        fp8_forward(args, &ex, ("unet", &key, &t), plain, twins, run)?;
    }
    Ok(())
}

/// The UNet with motion modules on `--batch` videos of `--frames` frames (diffusers'
/// UNetMotionModel.forward: one timestep and text_time per video; one text context per video, as a
/// render passes it when the frames share the prompt).
fn bench_motion_unet(args: &BenchArgs, dtype: DType) -> Result<()> {
    let checkpoint = open_unet(args.weights()?)?;
    let motion_path = args.motion.as_ref().ok_or_else(|| Error::Internal("motion_unet without --motion".into()))?;
    let motion = open_motion(motion_path)?;
    motion.config.check_unet(&checkpoint.config)?;
    let cfg = &checkpoint.config;
    let (b, f, h, w) = (args.batch, args.frames, args.height, args.width);
    let widest = cfg.block_out_channels.iter().copied().chain([cfg.in_channels]).max().unwrap_or(0);
    let dims = [("--batch", b), ("--frames", f), ("--height", h), ("--width", w), ("channels", widest)];
    elements("largest activation", &dims, MAX_ELEMENTS, WHY)?;
    let cross = cfg.cross_attention_dims().first().copied().unwrap_or(0);
    let dims = [("--batch", b), ("--tokens", args.tokens), ("width", cross)];
    elements("context", &dims, MAX_ELEMENTS, WHY)?;
    let gpu = open_gpu(args)?;
    let scratch = scratch_bytes(&gpu, args.scratch_gb)?;
    let motion_bytes = weight_bytes(&motion.weights, dtype);
    let (weights, scratch) = model_arenas(&checkpoint.weights, dtype, motion_bytes + (64 << 20), |_| scratch)?;
    let place = Place::device(&gpu, &weights, dtype);
    let unet = Unet::new(&checkpoint, place)?;
    let modules = MotionModules::new(&motion, &unet, place)?;

    let uploaded = random_inputs(cfg, [b, f, h, w], args.tokens, dtype)?.upload(&gpu, &weights)?;
    let inputs = uploaded.unet_inputs();
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let video = Frames { frames: f, group_norm_across_frames: false };
    let key = format!("motion unet {} b{b}x{f} {}x{}", dtype.kernel_suffix(), 8 * h, 8 * w);
    let run = || {
        let _r = nvtx::range(&key);
        modules.forward_unet(&ex, &unet, &inputs, video, None).map(|out| vec![out])
    };
    let mut forward = || run().map(drop);
    let t = time_gpu(&gpu, 2, args.runs, &mut forward)?;
    report("motion_unet", &key, &t, args.runs, &scratch);
    let with_kv = |kv: Option<&CrossKv>| {
        modules.forward_unet(&ex, &unet, &UnetInputs { cross_kv: kv, ..inputs }, video, None).map(drop)
    };
    let context = inputs.encoder_hidden_states;
    text_kv_computed_once(args, &ex, ("motion_unet", &key, &t), unet.weights(), context, with_kv)?;
    replays(args, &gpu, &scratch, "motion_unet", &key, &t, run)?;
    finish(args, &gpu, &key, &t, forward)?;
    let fp8 = Fp8Linears::parse(&args.fp8)?;
    if fp8 != Fp8Linears::Off {
        let run_fp8 = |unet: &Unet, modules: &MotionModules| {
            modules.forward_unet(&ex, unet, &inputs, video, None).map(|out| vec![out])
        };
        let plain = host_outputs(&gpu, || run_fp8(&unet, &modules))?;
        let (mut unet, mut modules) = (unet, modules);
        let twins = (unet.enable_fp8(&ex, fp8)? + modules.enable_fp8(&ex, fp8)?, unet.weights().fp8_layout());
        fp8_forward(args, &ex, ("motion_unet", &key, &t), plain, twins, || run_fp8(&unet, &modules))?;
    }
    Ok(())
}

/// The ControlNet on `--batch` images of `--height` x `--width` latents (the UNet's random inputs)
/// and control images at its `hint_factor` times that size, scale 1 (diffusers
/// ControlNetModel.forward on one CFG-less batch): a plain net `--nets` times with the residuals
/// summed, a Union once with `--conditions` conditions (ControlNetUnionModel.forward).
fn bench_controlnet(args: &BenchArgs, dtype: DType) -> Result<()> {
    let checkpoint = open_controlnet(args.weights()?)?;
    let cfg = &checkpoint.config;
    let (conditions, nets) = match (&cfg.union, args.conditions, args.nets) {
        (Some(_), _, Some(_)) => {
            return Err(Error::Input(
                "bench controlnet: --nets is for a plain ControlNet; a Union takes --conditions".into(),
            ));
        }
        (None, Some(_), _) => {
            return Err(Error::Input(
                "bench controlnet: --conditions is for a Union ControlNet; --nets repeats a plain one".into(),
            ));
        }
        (Some(u), c, None) => {
            let c = c.unwrap_or(1);
            if c > u.control_types {
                return Err(Error::Input(format!(
                    "--conditions {c}: this Union has {} control types",
                    u.control_types
                )));
            }
            (c, 1)
        }
        (None, None, n) => (1, n.unwrap_or(1)),
    };
    let (b, h, w, f) = (args.batch, args.height, args.width, cfg.hint_factor());
    let enc = &cfg.encoder;
    let widest = enc.block_out_channels.iter().copied().chain([enc.in_channels]).max().unwrap_or(0);
    elements(
        "largest activation",
        &[("--batch", b), ("--height", h), ("--width", w), ("channels", widest)],
        MAX_ELEMENTS,
        WHY,
    )?;
    // The conditioning embedding's first stage runs at the control image's size.
    let stage0 = cfg.conditioning_embedding_out_channels[0].max(cfg.conditioning_channels);
    let dims = [("--batch", b), ("--height", h), ("hint factor", f), ("--width", w), ("hint factor", f)];
    elements("control-image activation", &[&dims[..], &[("channels", stage0)]].concat(), MAX_ELEMENTS, WHY)?;
    let cross = enc.cross_attention_dims().first().copied().unwrap_or(1);
    elements("context", &[("--batch", b), ("--tokens", args.tokens), ("width", cross)], MAX_ELEMENTS, WHY)?;
    let gpu = open_gpu(args)?;
    let scratch = scratch_bytes(&gpu, args.scratch_gb)?;
    let hint_shape = [b, h * f, w * f, cfg.conditioning_channels];
    let hint_bytes = hint_shape.iter().product::<usize>() * dtype.size();
    let extra = conditions * (hint_bytes + 256) + (64 << 20);
    let (weights, scratch) = model_arenas(&checkpoint.weights, dtype, extra, |_| scratch)?;
    let place = Place::device(&gpu, &weights, dtype);

    let uploaded = random_inputs(enc, [b, 1, h, w], args.tokens, dtype)?.upload(&gpu, &weights)?;
    let hints = (0..conditions)
        .map(|i| gpu.upload(&weights, &random(&hint_shape, 5 + i as u64, 0.5, dtype)?, dtype))
        .collect::<Result<Vec<_>>>()?;
    let inputs = uploaded.unet_inputs();
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let size = format!("b{b} {}x{}", 8 * h, 8 * w);
    let (name, key) = match (&cfg.union, nets) {
        (Some(_), _) => {
            ("controlnet_union", format!("controlnet_union {} {size} {conditions} conditions", dtype.kernel_suffix()))
        }
        (None, 1) => ("controlnet", format!("controlnet {} {size}", dtype.kernel_suffix())),
        (None, n) => ("controlnet", format!("controlnet x{n} {} {size}", dtype.kernel_suffix())),
    };
    match &cfg.union {
        Some(_) => {
            let mut net = ControlNetUnion::new(&checkpoint, place)?;
            let list: Vec<UnionCondition> = hints
                .iter()
                .enumerate()
                .map(|(i, image)| UnionCondition { control_type: ControlType(i), image, scale: &[1.0] })
                .collect();
            let run_with = |net: &ControlNetUnion, kv: Option<&CrossKv>| {
                let _r = nvtx::range(&key);
                let x = UnetInputs { cross_kv: kv, ..inputs };
                net.forward(&ex, &x, &list, UnionOptions::default()).map(residual_list)
            };
            let run = || run_with(&net, None);
            let mut forward = || run().map(drop);
            let t = time_gpu(&gpu, 2, args.runs, &mut forward)?;
            report(name, &key, &t, args.runs, &scratch);
            let cached = |kv: Option<&CrossKv>| run_with(&net, kv).map(drop);
            text_kv_computed_once(
                args,
                &ex,
                (name, &key, &t),
                net.net_weights(),
                inputs.encoder_hidden_states,
                cached,
            )?;
            replays(args, &gpu, &scratch, name, &key, &t, run)?;
            finish(args, &gpu, &key, &t, forward)?;
            let fp8 = Fp8Linears::parse(&args.fp8)?;
            if fp8 != Fp8Linears::Off {
                let plain = host_outputs(&gpu, || run_with(&net, None))?;
                let twins = (net.enable_fp8(&ex, fp8)?, net.net_weights().fp8_layout());
                fp8_forward(args, &ex, (name, &key, &t), plain, twins, || run_with(&net, None))?;
            }
            Ok(())
        }
        None => {
            let mut cn = ControlNet::new(&checkpoint, place)?;
            let run_with = |cn: &ControlNet, kv: Option<&CrossKv>| {
                let _r = nvtx::range(&key);
                let x = UnetInputs { cross_kv: kv, ..inputs };
                let mut sum = cn.forward(&ex, &x, &hints[0], ControlScale::new(1.0))?;
                for _ in 1..nets {
                    let r = cn.forward(&ex, &x, &hints[0], ControlScale::new(1.0))?;
                    sum = UnetResiduals {
                        down: sum.down.iter().zip(&r.down).map(|(a, b)| add(&ex, a, b, 1.0)).collect::<Result<_>>()?,
                        mid: add(&ex, &sum.mid, &r.mid, 1.0)?,
                    };
                }
                Ok(residual_list(sum))
            };
            let run = || run_with(&cn, None);
            let mut forward = || run().map(drop);
            let t = time_gpu(&gpu, 2, args.runs, &mut forward)?;
            report(name, &key, &t, args.runs, &scratch);
            let cached = |kv: Option<&CrossKv>| run_with(&cn, kv).map(drop);
            text_kv_computed_once(args, &ex, (name, &key, &t), cn.weights(), inputs.encoder_hidden_states, cached)?;
            replays(args, &gpu, &scratch, name, &key, &t, run)?;
            finish(args, &gpu, &key, &t, forward)?;
            let fp8 = Fp8Linears::parse(&args.fp8)?;
            if fp8 != Fp8Linears::Off {
                let plain = host_outputs(&gpu, || run_with(&cn, None))?;
                let twins = (cn.enable_fp8(&ex, fp8)?, cn.weights().fp8_layout());
                fp8_forward(args, &ex, (name, &key, &t), plain, twins, || run_with(&cn, None))?;
            }
            Ok(())
        }
    }
}

/// LoRA sets merged into device weights and switched: the UNet's, and with `--text-encoders` both
/// text encoders' too. Prints the time to lay out and upload each set (host clock), to merge
/// `--lora`'s set over itself (restoring its weights first, as a repeated apply does) and to switch
/// between the two sets (GPU time), how many weights take each merge route, and the memory the
/// factors and base copies take; with `--breakdown`, one switch split into restore copies, GEMMs
/// and merge kernels.
fn bench_lora(args: &BenchArgs, dtype: DType) -> Result<()> {
    if args.loras.is_empty() || args.switch_loras.is_empty() {
        return Err(Error::Input("bench lora needs --lora and --switch-lora (the two sets switched between)".into()));
    }
    let restore = Restore::parse(&args.lora_restore)?;
    let unet_checkpoint = open_unet(args.weights()?)?;
    let text_checkpoints = match &args.text_encoders {
        Some(dir) => [TextEncoderKind::ClipL, TextEncoderKind::ClipG]
            .into_iter()
            .map(|kind| open_text_encoder(dir, kind))
            .collect::<Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    let mut targets = Targets::new();
    targets.add_unet(&unet_checkpoint)?;
    for c in &text_checkpoints {
        targets.add_text_encoder(c)?;
    }
    let resolve = |list: &[String]| -> Result<Loras> {
        let specs = list.iter().map(|a| LoraSpec::parse(a)).collect::<Result<Vec<_>>>()?;
        let loras = lora::resolve(&specs, &targets, false)?;
        loras.summary.iter().for_each(|line| eprintln!("{line}"));
        Ok(loras)
    };
    let (first, second) = (resolve(&args.loras)?, resolve(&args.switch_loras)?);

    let gpu = open_gpu(args)?;
    let place = |arena| Place::device(&gpu, arena, dtype);
    let (unet_arena, scratch) = model_arenas(&unet_checkpoint.weights, dtype, 64 << 20, |_| 256 << 20)?;
    let unet = Unet::new(&unet_checkpoint, place(&unet_arena))?;
    let text_arenas = text_checkpoints
        .iter()
        .map(|c| Arena::new("weights", weight_bytes(&c.weights, dtype) + (1 << 20)))
        .collect::<Result<Vec<_>>>()?;
    let texts = text_checkpoints
        .iter()
        .zip(&text_arenas)
        .map(|(c, arena)| ClipTextModel::new(c, place(arena)))
        .collect::<Result<Vec<_>>>()?;
    let mut models = vec![(Component::Unet, unet.weights())];
    models.extend(texts.iter().map(|m| (Component::of_text_encoder(m.kind), m.weights())));

    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    // Per model: its weights, both sets uploaded (None where a set has nothing for it), a switcher.
    let mut sets = Vec::new();
    for (component, weights) in &models {
        let upload = |loras: &Loras| -> Result<Option<DeviceLoraSet>> {
            let Some(merge) = loras.merge(*component) else { return Ok(None) };
            let started = std::time::Instant::now();
            let set = DeviceLoraSet::upload(&gpu, weights, merge, |_| true)?;
            gpu.synchronize()?;
            let touched: usize = set.names().filter_map(|n| weights.tensor(n)).map(Tensor::size_bytes).sum();
            let routes = set.routes();
            eprintln!(
                "{}: {} weights ({:.2} GiB; {} through cuBLASLt, {} through the merge kernel, {} of them DoRA), \
                 factors {:.3} GiB, laid out and uploaded in {:.0} ms",
                component.name(),
                set.names().count(),
                gib(touched),
                routes.gemm,
                routes.kernel,
                routes.dora,
                gib(set.bytes()),
                started.elapsed().as_secs_f64() * 1e3
            );
            Ok(Some(set))
        };
        sets.push((*weights, upload(&first)?, upload(&second)?, LoraSwitcher::new(restore)));
    }
    // What the switchers hold after the first switch: copies of every weight either set touches.
    let base_bytes: usize = match restore {
        Restore::Reload | Restore::Never => 0,
        Restore::Copy => sets
            .iter()
            .map(|(w, a, b, _)| {
                let names: std::collections::HashSet<&str> = a.iter().chain(b).flat_map(|s| s.names()).collect();
                names.into_iter().filter_map(|n| w.tensor(n)).map(Tensor::size_bytes).sum::<usize>()
            })
            .sum(),
    };
    let mut apply_all = |to_b: bool| -> Result<()> {
        for (weights, a, b, switcher) in sets.iter_mut() {
            switcher.apply(&ex, weights, if to_b { b.as_ref() } else { a.as_ref() })?;
        }
        Ok(())
    };
    let started = std::time::Instant::now();
    apply_all(false)?;
    gpu.synchronize()?;
    eprintln!(
        "first apply of set A, base copies included: {:.1} ms (host clock); base copies {:.2} GiB ({restore:?})",
        started.elapsed().as_secs_f64() * 1e3,
        gib(base_bytes)
    );
    let models_key = if texts.is_empty() { "unet" } else { "unet+text encoders" };
    let merge = time_gpu(&gpu, 1, args.runs, || apply_all(false))?;
    report(
        "lora",
        &format!("lora {} {models_key} restore A + merge A", dtype.kernel_suffix()),
        &merge,
        args.runs,
        &scratch,
    );
    let mut to_b = true;
    let mut switch = || {
        to_b = !to_b;
        apply_all(!to_b)
    };
    let key = format!("lora {} {models_key} switch A-B", dtype.kernel_suffix());
    let t = time_gpu(&gpu, 2, args.runs, &mut switch)?;
    report("lora", &key, &t, args.runs, &scratch);
    finish(args, &gpu, &key, &t, switch)
}

/// Random UNet inputs for `videos` x `frames` images of h x w latents (frames folded into the
/// batch, one per image for `frames` 1): SDXL-style time ids, one timestep and one text context per
/// video (as a render passes them when a window's frames share the prompt).
fn random_inputs(
    cfg: &UnetConfig,
    [videos, frames, h, w]: [usize; 4],
    tokens: usize,
    dtype: DType,
) -> Result<ForwardInputs> {
    let (b, rows) = (videos, videos * frames);
    // A model without cross-attention (a "small" ControlNet) never reads the context: 1 wide.
    let cross = cfg.cross_attention_dims().first().copied().unwrap_or(1);
    let steps: Vec<f32> = (0..b).map(|i| 999.0 - (i * 37 % 1000) as f32).collect();
    let (text_embeds, time_ids) = match &cfg.text_time {
        Some(tt) => {
            let ids: Vec<f32> = (0..b).flat_map(|_| [8 * h, 8 * w, 0, 0, 8 * h, 8 * w].map(|v| v as f32)).collect();
            let pooled = tt.input_dim.saturating_sub(6 * tt.time_embed_dim);
            (Some(random(&[b, pooled], 3, 1.0, dtype)?), Some(Tensor::from_f32(&[b, 6], DType::F32, &ids)?))
        }
        None => (None, None),
    };
    Ok(ForwardInputs {
        sample: random(&[rows, h, w, cfg.in_channels], 1, 1.0, dtype)?,
        timestep: Tensor::from_f32(&[b], DType::F32, &steps)?,
        encoder_hidden_states: random(&[b, tokens, cross], 2, 1.0, dtype)?,
        text_embeds,
        time_ids,
        residuals: None,
    })
}

/// The timing on stderr and the `BENCH` line tools/report.py reads.
fn report(name: &str, key: &str, t: &Timing, runs: usize, scratch: &Arena) {
    eprintln!(
        "{key}: median {:.3} ms, min {:.3} ms over {runs} runs; scratch peak {:.2} GiB",
        t.median_ms(),
        t.min_ms(),
        scratch.peak() as f64 / (1u64 << 30) as f64
    );
    println!(
        "BENCH {{\"name\":\"{name}\",\"key\":\"{key}\",\"ms\":{:.4},\"min_ms\":{:.4},\"gbps\":null,\"tflops\":null}}",
        t.median_ms(),
        t.min_ms()
    );
}

/// `forward` timed again with every cross-attention's k and v of `context` computed once
/// beforehand by `weights` (what a render's steps after the first on one text context run),
/// reported under the key + " text k/v cached" beside `eager`'s (name, key, timing); and the one
/// GEMM that computes them, under the key + " text k/v once".
fn text_kv_computed_once(
    args: &BenchArgs,
    ex: &Exec,
    (name, key, eager): (&str, &str, &Timing),
    weights: &ModelWeights,
    context: &Tensor,
    mut forward: impl FnMut(Option<&CrossKv>) -> Result<()>,
) -> Result<()> {
    let Exec::Cuda { gpu, scratch } = ex else { return Err(Error::Internal("bench on the CPU".into())) };
    let mut kv = None;
    let once = time_gpu(gpu, 2, args.runs, || {
        kv = CrossKv::compute(ex, weights, context)?;
        Ok(())
    })?;
    let Some(kv) = kv else { return Ok(()) };
    report(name, &format!("{key} text k/v once"), &once, args.runs, scratch);
    let t = time_gpu(gpu, 2, args.runs, || forward(Some(&kv)))?;
    report(name, &format!("{key} text k/v cached"), &t, args.runs, scratch);
    eprintln!(
        "{key}: with the text k/v computed once ({:.3} ms, {:.1} MB), a forward takes {:.3} ms vs {:.3} ms ({:.3}x)",
        once.median_ms(),
        kv.tensor().size_bytes() as f64 / 1e6,
        t.median_ms(),
        eager.median_ms(),
        eager.median_ms() / t.median_ms().max(1e-9)
    );
    Ok(())
}

/// The residuals as one list, the mid block's last.
fn residual_list(r: UnetResiduals) -> Vec<Tensor> {
    r.down.into_iter().chain([r.mid]).collect()
}

/// The FP8 forward's distance from the plain one (relative L2) above which `--fp8` fails.
const FP8_BROKEN: f64 = 0.25;

/// With `--fp8`: `plain` (a forward's outputs before the models got their `twins` FP8 twins, and
/// how they are scaled and whether their bias and residual go in the GEMM's epilogue) against
/// `run`'s outputs now, then `run` timed under `key` + " fp8" beside `eager`.
fn fp8_forward(
    args: &BenchArgs,
    ex: &Exec,
    (name, key, eager): (&str, &str, &Timing),
    plain: Vec<Tensor>,
    (twins, layout): (usize, Option<(Fp8Scaling, bool)>),
    run: impl Fn() -> Result<Vec<Tensor>>,
) -> Result<()> {
    let Exec::Cuda { gpu, scratch } = ex else { return Err(Error::Internal("bench on the CPU".into())) };
    let got = run()?.iter().map(|t| gpu.download(t)).collect::<Result<Vec<_>>>()?;
    let (mut diff, mut norm) = (0f64, 0f64);
    for (g, p) in got.iter().zip(&plain) {
        for (a, b) in g.to_f32_vec()?.iter().zip(p.to_f32_vec()?) {
            diff += (*a as f64 - b as f64).powi(2);
            norm += (b as f64).powi(2);
        }
    }
    let rel = (diff / norm.max(f64::MIN_POSITIVE)).sqrt();
    // e4m3's rounding moves a forward by a few percent; a wrong scale or operand order by O(1).
    if rel.is_nan() || rel > FP8_BROKEN {
        return Err(Error::Internal(format!(
            "{key}: the FP8 forward's outputs are {rel:.3e} (relative L2) from the plain forward's, more than \
             {FP8_BROKEN}: the FP8 path is broken"
        )));
    }
    let t = time_gpu(gpu, 2, args.runs, || run().map(drop))?;
    let fp8_key = format!("{key} fp8 {}", args.fp8.trim());
    report(name, &fp8_key, &t, args.runs, scratch);
    let scales = match layout {
        Some((Fp8Scaling::Rows, _)) => "rows",
        Some((Fp8Scaling::Tensor, _)) => "tensor",
        None => "none",
    };
    let epilogue = layout.is_some_and(|(_, fused)| fused);
    let bias_in = if epilogue { "the GEMM's epilogue" } else { "a pass" };
    eprintln!(
        "{fp8_key}: {twins} linears in FP8 (scales per {scales}, bias and residual in {bias_in}); median {:.3} ms vs {:.3} ms ({:.3}x); outputs \
         {rel:.3e} (relative L2) from the plain forward's",
        t.median_ms(),
        eager.median_ms(),
        eager.median_ms() / t.median_ms().max(1e-9)
    );
    let line = serde_json::json!({"key": fp8_key, "twins": twins, "scales": scales, "fused_epilogue": epilogue, "rel_l2": rel, "ms": t.median_ms(), "plain_ms": eager.median_ms()});
    println!("FP8 {line}");
    breakdown(args, gpu, &fp8_key, &t, || run().map(drop))
}

/// The outputs of one `run`, on the host (the reference `fp8_forward` compares with).
fn host_outputs(gpu: &Gpu, run: impl Fn() -> Result<Vec<Tensor>>) -> Result<Vec<Tensor>> {
    run()?.iter().map(|t| gpu.download(t)).collect()
}

/// With `--graph` (after the eager runs, which warmed everything up): `run` captured into a CUDA
/// graph, a replay's outputs checked bit for bit against an eager `run` on the same inputs, then
/// replays timed like the eager forwards and reported under `key` + " graph".
fn replays(
    args: &BenchArgs,
    gpu: &Gpu,
    scratch: &Arena,
    name: &str,
    key: &str,
    eager: &Timing,
    run: impl Fn() -> Result<Vec<Tensor>>,
) -> Result<()> {
    if !args.graph {
        return Ok(());
    }
    let pool = GraphPool::new();
    let (graph, outputs) = Graph::capture(gpu, scratch, &pool, &run)?;
    graph.launch(gpu)?;
    let replayed = outputs.iter().map(|t| gpu.download(t)).collect::<Result<Vec<_>>>()?;
    let expected = run()?.iter().map(|t| gpu.download(t)).collect::<Result<Vec<_>>>()?;
    if replayed.len() != expected.len() {
        return Err(Error::Internal(format!("{key}: the captured forward returned {} outputs", replayed.len())));
    }
    for (i, (r, e)) in replayed.iter().zip(&expected).enumerate() {
        let (r, e) = (r.host_bytes()?, e.host_bytes()?);
        if r != e {
            let byte = r.iter().zip(e).position(|(a, b)| a != b).unwrap_or(r.len().min(e.len()));
            return Err(Error::Internal(format!(
                "{key}: the CUDA graph's replay differs from an eager forward on the same inputs (output {i} of {}, \
                 first at byte {byte})",
                replayed.len()
            )));
        }
    }
    let t = time_gpu(gpu, 2, args.runs, || graph.launch(gpu))?;
    let graph_key = format!("{key} graph");
    report(name, &graph_key, &t, args.runs, scratch);
    eprintln!(
        "{graph_key}: replay bit-identical to eager; median {:.3} ms vs eager {:.3} ms ({:.3}x); scratch reserved \
         for the graph {:.2} GiB, its outputs {:.2} GiB",
        t.median_ms(),
        eager.median_ms(),
        eager.median_ms() / t.median_ms().max(1e-9),
        pool.reserved_bytes() as f64 / (1u64 << 30) as f64,
        graph.held_bytes() as f64 / (1u64 << 30) as f64
    );
    Ok(())
}

/// The GPU; with `--tune-gemms`, GEMMs are tuned into its file from the first call on.
fn open_gpu(args: &BenchArgs) -> Result<Gpu> {
    let gpu = Gpu::from_env()?;
    if let Some(path) = &args.tune_gemms {
        gpu.blas()?.tune_into(path)?;
    }
    Ok(gpu)
}

/// After the timed runs. With a GEMM tuning file in use (`CELFRAME_GEMM_TUNING`, the built-in
/// one or `--tune-gemms`): one more `forward` counts the GEMM calls of one forward, and a line says what
/// the file's timings make of them with heuristic #1 and with its choices (a `GEMMTUNING` JSON line
/// too); `--tune-gemms`'s file is written. Then `--breakdown`.
fn finish(args: &BenchArgs, gpu: &Gpu, key: &str, t: &Timing, mut forward: impl FnMut() -> Result<()>) -> Result<()> {
    // Each gpu.blas() borrow ends before `forward` runs: the ops borrow it too.
    if gpu.blas()?.tuning().is_some() {
        let before: HashMap<Gemm, u64> = gpu.blas()?.calls().into_iter().collect();
        forward()?;
        gpu.synchronize()?;
        let blas = gpu.blas()?;
        let calls: Vec<(Gemm, u64)> =
            blas.calls().into_iter().map(|(g, n)| (g, n - before.get(&g).copied().unwrap_or(0))).collect();
        if let Some((path, file)) = blas.tuning() {
            let e = file.estimate(&calls);
            let total: u64 = calls.iter().map(|(_, n)| n).sum();
            eprintln!(
                "{key}: GEMM tuning {}: one forward runs {total} GEMM calls; {} descriptions have an entry ({} run \
                 another candidate than heuristic #1): by the file's timings {:.3} ms with heuristic #1, {:.3} ms \
                 tuned ({:.3}x); {} descriptions ({} calls) have none and run heuristic #1",
                path.display(),
                e.tuned_descriptions,
                e.changed,
                e.heuristic_ms,
                e.tuned_ms,
                if e.tuned_ms > 0.0 { e.heuristic_ms / e.tuned_ms } else { 1.0 },
                e.missing_descriptions,
                e.missing_calls
            );
            let line = serde_json::json!({
                "key": key, "file": path.display().to_string(), "calls": total,
                "tuned_descriptions": e.tuned_descriptions, "changed": e.changed,
                "missing_descriptions": e.missing_descriptions, "missing_calls": e.missing_calls,
                "heuristic_ms": e.heuristic_ms, "tuned_ms": e.tuned_ms,
            });
            println!("GEMMTUNING {line}");
        }
        if let Some(path) = blas.save_tuning()? {
            eprintln!("wrote {} ({} GEMM descriptions)", path.display(), blas.tuning().map_or(0, |(_, f)| f.len()));
        }
    }
    breakdown(args, gpu, key, t, forward)
}

/// With `--breakdown`: one more `forward` under a GPU profile, printed as a table after a line
/// comparing the profiled sum with the timed median (the difference is the gaps between launches
/// plus the events' own cost).
fn breakdown(
    args: &BenchArgs,
    gpu: &Gpu,
    key: &str,
    t: &Timing,
    mut forward: impl FnMut() -> Result<()>,
) -> Result<()> {
    if args.breakdown_gemms {
        gpu.start_profile_by_gemm_shape();
    } else if args.breakdown {
        gpu.start_profile();
    } else {
        return Ok(());
    }
    let ran = forward();
    let rows = gpu.finish_profile()?;
    ran?;
    let sum: f64 = rows.iter().map(|r| r.ms).sum();
    println!(
        "BREAKDOWN {key}: {sum:.3} ms in {} timed launches (timed median {:.3} ms)",
        rows.iter().map(|r| r.launches).sum::<usize>(),
        t.median_ms()
    );
    println!("{}", format_rows(&rows)?);
    Ok(())
}

/// CLIP-L and bigG one after the other on `--batch` sequences of 77 tokens (2: a CFG pair), keeping
/// the penultimate hidden states SDXL uses.
fn bench_text_encoders(args: &BenchArgs, dtype: DType) -> Result<()> {
    let seq = 77;
    let checkpoints = [TextEncoderKind::ClipL, TextEncoderKind::ClipG]
        .map(|kind| open_text_encoder(args.weights()?, kind))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    for checkpoint in &checkpoints {
        let widest = checkpoint.config.intermediate_size.max(checkpoint.config.hidden_size);
        let dims = [("--batch", args.batch), ("tokens", seq), ("width", widest)];
        elements("largest activation", &dims, MAX_ELEMENTS, WHY)?;
    }
    let gpu = open_gpu(args)?;
    let scratch = Arena::new("scratch", scratch_bytes(&gpu, args.scratch_gb)?)?;
    let mut models = Vec::new();
    let mut arenas = Vec::new();
    for checkpoint in &checkpoints {
        arenas.push(Arena::new("weights", weight_bytes(&checkpoint.weights, dtype) + (1 << 20))?);
        let arena = arenas.last().unwrap();
        models.push(ClipTextModel::new(checkpoint, Place::device(&gpu, arena, dtype))?);
    }
    // BOS, a stretch of ordinary word ids, EOS padding: the prompt lengths do not change the work.
    let ids: Vec<u32> = (0..args.batch * seq)
        .map(|i| match i % seq {
            0 => 49406,
            t if t <= 20 + 40 * (i / seq % 2) => 256 + (i as u32 * 7919) % 49000,
            _ => 49407,
        })
        .collect();
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let key = format!("text encoders {} CFG pair", dtype.kernel_suffix());
    let mut forward = || {
        let _r = nvtx::range(&key);
        for m in &models {
            m.forward(&ex, &ids, seq, &[m.config.num_hidden_layers - 1])?;
        }
        Ok(())
    };
    let t = time_gpu(&gpu, 2, args.runs.max(20), &mut forward)?;
    eprintln!("{key} (batch {}): median {:.3} ms, min {:.3} ms", args.batch, t.median_ms(), t.min_ms());
    println!(
        "BENCH {{\"name\":\"text_encoders\",\"key\":\"{key}\",\"ms\":{:.4},\"min_ms\":{:.4},\"gbps\":null,\"tflops\":null}}",
        t.median_ms(),
        t.min_ms()
    );
    finish(args, &gpu, &key, &t, forward)
}

/// The VAE decoder's forwards over `--batch` frames in chunks of `--chunk` (device latents in,
/// device images out: what diffusers' `vae.decode` on GPU tensors does).
fn bench_vae_decoder(args: &BenchArgs, dtype: DType) -> Result<()> {
    let checkpoint = open_vae(args.weights()?)?;
    let cfg = &checkpoint.config;
    let f = cfg.upsample_factor();
    let widest = cfg.block_out_channels.iter().copied().max().unwrap_or(0);
    let dims = [
        ("--height", args.height),
        ("--width", args.width),
        ("upsampling", f),
        ("upsampling", f),
        ("channels", widest),
    ];
    elements("largest activation of one frame", &dims, MAX_ELEMENTS, WHY)?;
    let dims = [
        ("--batch", args.batch),
        ("--height", args.height),
        ("--width", args.width),
        ("channels", cfg.latent_channels),
    ];
    elements("latents", &dims, MAX_ELEMENTS, WHY)?;
    let gpu = open_gpu(args)?;
    let scratch = scratch_bytes(&gpu, args.scratch_gb)?;
    let (weights, scratch) = model_arenas(&checkpoint.weights, dtype, 64 << 20, |_| scratch)?;
    let vae = Vae::new(&checkpoint, Place::device(&gpu, &weights, dtype))?;
    let (h, w, c) = (args.height, args.width, vae.config.latent_channels);
    let chunks: Vec<Tensor> = (0..args.batch)
        .step_by(args.chunk)
        .map(|first| {
            let k = args.chunk.min(args.batch - first);
            gpu.upload(&weights, &random(&[k, h, w, c], 4 + first as u64, 1.0, dtype)?, dtype)
        })
        .collect::<Result<_>>()?;
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let key = format!("vae decode {} {}x{}x{}", dtype.kernel_suffix(), args.batch, f * w, f * h);
    let mut forward = || {
        let _r = nvtx::range(&key);
        chunks.iter().try_for_each(|z| vae.forward(&ex, z).map(drop))
    };
    let t = time_gpu(&gpu, 1, args.runs, &mut forward)?;
    eprintln!(
        "{key} (chunks of {}): median {:.3} ms, min {:.3} ms; scratch peak {:.2} GiB",
        args.chunk,
        t.median_ms(),
        t.min_ms(),
        scratch.peak() as f64 / (1u64 << 30) as f64
    );
    println!(
        "BENCH {{\"name\":\"vae_decoder\",\"key\":\"{key}\",\"ms\":{:.4},\"min_ms\":{:.4},\"gbps\":null,\"tflops\":null}}",
        t.median_ms(),
        t.min_ms()
    );
    finish(args, &gpu, &key, &t, forward)
}

/// The built-in mp4 encoder (OpenH264, `output::ClipWriter` with PNGs off) on `--frames` frames of
/// 8 `--width` x 8 `--height` pixels at 10 fps, with 1, 2, 4 and all of the machine's threads
/// (`ClipOptions::mp4_threads`): from the clip started to its mp4 renamed into place, the frames
/// made beforehand, one untimed run then `--runs` timed ones. Two kinds of frames: uniform noise
/// (what models with random weights decode to) and smooth gradients with a moving disc and light
/// grain (closer to rendered frames).
fn bench_encode(args: &BenchArgs) -> Result<()> {
    let (w, h) = (8 * args.width, 8 * args.height);
    let frame_bytes =
        elements("a frame", &[("8 --width", w), ("8 --height", h), ("RGB", 3)], 1 << 30, "frames are made in memory")?;
    // Up to 48 distinct frames, repeated: longer clips need not hold every frame in memory.
    let distinct = args.frames.min(48);
    if frame_bytes.saturating_mul(distinct) > 4 << 30 {
        return Err(Error::Input(format!("bench encode: {w}x{h} frames take more than 4 GiB for {distinct} of them")));
    }
    let root = std::env::temp_dir().join(format!("celframe-bench-encode-{}", std::process::id()));
    let all = ClipOptions::new(w as u32, h as u32, Fps::whole(10)?).mp4_threads;
    let mut threads = vec![1, 2, 4, all];
    threads.sort_unstable();
    threads.dedup();
    let result = (|| {
        let tree = OutputTree::open(&root)?;
        let mut index = 0;
        for kind in ["noise", "textured"] {
            let frames: Vec<RgbImage> = (0..distinct).map(|t| bench_frame(kind, w, h, t)).collect::<Result<_>>()?;
            for &n in &threads {
                let mut options = ClipOptions::new(w as u32, h as u32, Fps::whole(10)?);
                options.mp4 = Mp4Choice::BuiltIn;
                options.png_frames = false;
                options.mp4_threads = n;
                options.replace = true;
                let mut ms = Vec::with_capacity(args.runs);
                let mut bytes = 0;
                for run in 0..=args.runs {
                    index = index % 999 + 1;
                    let start = Instant::now();
                    let mut clip = tree.begin_clip(index, &options)?;
                    for t in 0..args.frames {
                        clip.push(frames[t % distinct].clone())?;
                    }
                    let done = clip.finish()?;
                    if run > 0 {
                        ms.push(start.elapsed().as_secs_f64() * 1e3);
                    }
                    bytes = done.mp4.as_deref().and_then(|p| std::fs::metadata(p).ok()).map_or(0, |m| m.len());
                    std::fs::remove_dir_all(&done.dir)
                        .map_err(|e| Error::Io { context: format!("removing {}", done.dir.display()), source: e })?;
                }
                ms.sort_by(f64::total_cmp);
                let (median, min) = (ms[ms.len() / 2], ms[0]);
                let key = format!("encode built-in {kind} {w}x{h} x{} {n} threads", args.frames);
                eprintln!(
                    "{key}: median {median:.1} ms ({:.2} ms per frame), min {min:.1} ms over {} runs; mp4 {bytes} bytes",
                    median / args.frames as f64,
                    args.runs
                );
                println!(
                    "BENCH {{\"name\":\"encode\",\"key\":\"{key}\",\"ms\":{median:.4},\"min_ms\":{min:.4},\"gbps\":null,\"tflops\":null}}"
                );
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&root);
    result
}

/// Frame `t` of a bench clip: `noise` (uniform, from the seeded RNG) or `textured` (gradients,
/// a disc moving 9 pixels a frame, +-8 levels of grain).
fn bench_frame(kind: &str, w: usize, h: usize, t: usize) -> Result<RgbImage> {
    let mut px = vec![0u8; w * h * 3];
    let grain = random(&[h, w, 3], 7 + t as u64, 1.0, DType::F32)?.to_f32_vec()?;
    let (cx, cy, r) = ((w / 5 + 9 * t) % w.max(1), h / 2, (h / 5) as i64);
    for (i, p) in px.iter_mut().enumerate() {
        let (y, x, c) = (i / (3 * w), i / 3 % w, i % 3);
        *p = if kind == "noise" {
            (grain[i] * 127.5 + 127.5) as u8
        } else {
            let (dx, dy) = (x as i64 - cx as i64, y as i64 - cy as i64);
            let base = if dx * dx + dy * dy < r * r {
                [240.0, 200.0, 180.0][c]
            } else {
                [
                    60.0 + 120.0 * y as f32 / h as f32,
                    110.0 + 100.0 * y as f32 / h as f32,
                    200.0 + 40.0 * x as f32 / w as f32,
                ][c]
            };
            (base + 8.0 * grain[i]).clamp(0.0, 255.0) as u8
        };
    }
    RgbImage::new(w as u32, h as u32, px)
}

/// Seeded values uniform in [-scale, scale] (the random op's CPU twin), for benchmark inputs.
fn random(shape: &[usize], seed: u64, scale: f32, dtype: DType) -> Result<Tensor> {
    random_uniform(&Exec::Cpu, NoiseStream::new(seed, 0), 0, shape, dtype, -scale, scale)
}
