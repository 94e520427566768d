//! `celframe verify <component> --weights PATH --reference FILE`: the arguments and the report of
//! the reference-file harness in `crate::verify`. Exit codes: 0 every output within tolerance; 1 an
//! output outside its tolerance or not finite; 2 bad input (file, argument, shape); 3 `--device
//! cuda` without a GPU; 4 a CUDA failure; 5 an internal error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::error::{EXIT_OUTSIDE_TOLERANCE, Error, Result};
use crate::models::clip::TextEncoderKind;
use crate::models::controlnet::control_lora::is_control_lora;
use crate::models::lora::LoraSpec;
use crate::tensor::{DType, Tensor};
use crate::verify::arenas::MAX_SCRATCH_GB;
use crate::verify::{
    Comparison, Device, LoraOptions, Settings, default_tolerance, verify_controlnet_with_base,
    verify_motion_unet_with_loras, verify_text_encoder_with_loras, verify_unet_with_loras, verify_vae_decoder,
};
use crate::weights;

#[derive(Args)]
pub struct VerifyArgs {
    /// Component to check: unet, motion_unet (the UNet with AnimateDiff motion modules: --motion),
    /// controlnet, vae_decoder, text_encoder or text_encoder_2.
    pub component: String,
    /// Weights: the component's diffusers/transformers folder (config.json + safetensors), a
    /// pipeline folder holding it (unet/, controlnet/, vae/, text_encoder/, text_encoder_2/), or an
    /// SDXL single-file checkpoint (controlnet: diffusers or cldm names).
    #[arg(long)]
    pub weights: PathBuf,
    /// Reference file: safetensors with in.<name> inputs and out.<name> outputs (NCHW; motion_unet:
    /// in.sample and out.sample [videos, channels, frames, height, width]).
    #[arg(long)]
    pub reference: PathBuf,
    /// controlnet with a Control-LoRA as --weights (stabilityai/control-lora): the base UNet it
    /// rebuilds the ControlNet from (a diffusers UNet folder, a pipeline folder or an SDXL single
    /// file).
    #[arg(long, value_name = "UNET")]
    pub base: Option<PathBuf>,
    /// motion_unet: the motion modules: a diffusers MotionAdapter folder, or one safetensors file
    /// with diffusers' or the original AnimateDiff names.
    #[arg(long)]
    pub motion: Option<PathBuf>,
    /// motion_unet: every UNet group norm takes its statistics across the frames of each video
    /// (AnimateDiff-Evolved's default); without it, per frame (diffusers and the official code).
    #[arg(long)]
    pub group_norm_across_frames: bool,
    /// cpu (the CPU twins), cuda, or auto (cuda when a GPU is present).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype: f16, bf16 or f32 (default: f32 on the CPU, f16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Relative L2 tolerance (default: 1e-4 for f32, 1e-2 for f16, 3e-2 for bf16).
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// Also write the computed outputs (out.<name>, NCHW, compute dtype) to this safetensors file
    /// (a new path or a regular file, replaced whole).
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// CUDA scratch arena in GiB (default: three quarters of the device memory less the weights).
    #[arg(long)]
    pub scratch_gb: Option<f64>,
    /// A LoRA merged into the component before it runs (unet, motion_unet: UNet and motion LoRAs,
    /// text_encoder, text_encoder_2): [ROLE=]PATH[:WEIGHT], WEIGHT 1.0 by default, ROLE one of
    /// style, character, utility, lcm, motion (checked against the pipeline's LoRA rules; without
    /// one, only the count limits apply); repeat for several.
    #[arg(long = "lora", value_name = "[ROLE=]PATH[:WEIGHT]")]
    pub lora: Vec<String>,
    /// LoRA keys that target nothing in the component become a warning in the summary instead of
    /// an error.
    #[arg(long)]
    pub lora_lenient: bool,
}

/// The CLI entry: prints the report and returns the exit code.
pub fn main(args: &VerifyArgs) -> ExitCode {
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_OUTSIDE_TOLERANCE),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs the verification and prints it; Ok(false) when an output is outside its tolerance or not
/// finite.
pub fn run(args: &VerifyArgs) -> Result<bool> {
    const COMPONENTS: [&str; 6] =
        ["unet", "motion_unet", "controlnet", "vae_decoder", "text_encoder", "text_encoder_2"];
    if !COMPONENTS.contains(&args.component.as_str()) {
        return Err(Error::Input(format!(
            "unknown component '{}' (supported: {})",
            args.component,
            COMPONENTS.join(", ")
        )));
    }
    let motion = args.component == "motion_unet";
    if motion != args.motion.is_some() {
        return Err(Error::Input(match motion {
            true => "verify motion_unet needs --motion (the motion modules' folder or file)".into(),
            false => format!("--motion is for motion_unet, not {}", args.component),
        }));
    }
    if args.group_norm_across_frames && !motion {
        return Err(Error::Input(format!("--group-norm-across-frames is for motion_unet, not {}", args.component)));
    }
    if args.base.is_some() && args.component != "controlnet" {
        return Err(Error::Input(format!("--base is for controlnet with a Control-LoRA, not {}", args.component)));
    }
    let device = Device::parse(&args.device)?;
    let dtype = match &args.dtype {
        Some(d) => DType::parse(d)?,
        None if device == Device::Cuda => DType::F16,
        None => DType::F32,
    };
    let tolerance = args.tolerance.unwrap_or(default_tolerance(dtype));
    if !(tolerance >= 0.0 && tolerance.is_finite()) {
        return Err(Error::Input(format!("--tolerance must be a finite non-negative number (got {tolerance})")));
    }
    if args.scratch_gb.is_some_and(|g| !(g > 0.0 && g <= MAX_SCRATCH_GB)) {
        return Err(Error::Input(format!("--scratch-gb must be more than 0 and at most {MAX_SCRATCH_GB}")));
    }
    if let Some(path) = &args.save {
        // Before the run, which may take minutes: a target that cannot be replaced fails now.
        weights::check_save_path(path)?;
    }
    let loras = LoraOptions {
        files: args.lora.iter().map(|a| LoraSpec::parse(a)).collect::<Result<_>>()?,
        lenient: args.lora_lenient,
    };
    if ["vae_decoder", "controlnet"].contains(&args.component.as_str()) && !loras.files.is_empty() {
        return Err(Error::Input(format!(
            "--lora applies to unet, motion_unet, text_encoder and text_encoder_2, not {}",
            args.component
        )));
    }
    let settings = Settings { device, dtype, tolerance, scratch_gb: args.scratch_gb };
    let result = match args.component.as_str() {
        "text_encoder" | "text_encoder_2" => {
            let kind = if args.component == "text_encoder" { TextEncoderKind::ClipL } else { TextEncoderKind::ClipG };
            verify_text_encoder_with_loras(kind, &args.weights, &args.reference, &settings, &loras)?
        }
        "vae_decoder" => verify_vae_decoder(&args.weights, &args.reference, &settings)?,
        "controlnet" => {
            match (is_control_lora(&args.weights), &args.base) {
                (true, None) => {
                    return Err(Error::Input(format!(
                        "--weights {} is a Control-LoRA (stabilityai/control-lora): give the base UNet it rebuilds \
                         the ControlNet from with --base UNET",
                        args.weights.display()
                    )));
                }
                (false, Some(_)) => {
                    return Err(Error::Input(format!(
                        "--base is for a Control-LoRA; --weights {} is a ControlNet with its own encoder",
                        args.weights.display()
                    )));
                }
                _ => {}
            }
            verify_controlnet_with_base(&args.weights, args.base.as_deref(), &args.reference, &settings)?
        }
        "motion_unet" => match &args.motion {
            Some(m) => verify_motion_unet_with_loras(
                &args.weights,
                m,
                &args.reference,
                &settings,
                args.group_norm_across_frames,
                &loras,
            )?,
            None => return Err(Error::Internal("motion_unet without --motion passed the argument check".into())),
        },
        _ => verify_unet_with_loras(&args.weights, &args.reference, &settings, &loras)?,
    };
    println!("{}", result.summary);
    for c in &result.comparisons {
        println!("{}", line(c));
    }
    if let Some(path) = &args.save {
        let named: Vec<(String, &Tensor)> = result.outputs.iter().map(|(n, t)| (n.clone(), t)).collect();
        weights::save(path, &named, None)?;
        println!("wrote {}", path.display());
    }
    Ok(result.comparisons.iter().all(Comparison::ok))
}

/// One output's report line: its errors (over its finite values when some are not) and verdict.
fn line(c: &Comparison) -> String {
    let errors = format!("max abs error {:.3e}, relative L2 error {:.3e}", c.max_abs, c.rel_l2);
    let tolerance = format!("(tolerance {:.0e})", c.tolerance);
    let (name, shape) = (&c.name, &c.shape);
    if c.non_finite > 0 {
        let total: usize = shape.iter().product();
        let rest = if c.non_finite < total { format!("; over the rest, {errors}") } else { String::new() };
        format!("{name} {shape:?}: {} of {total} values NaN or infinite{rest} {tolerance}: NOT FINITE", c.non_finite)
    } else if c.ok() {
        format!("{name} {shape:?}: {errors} {tolerance}: ok")
    } else {
        format!("{name} {shape:?}: {errors} {tolerance}: OUTSIDE TOLERANCE")
    }
}
