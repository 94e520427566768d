//! `celframe verify <component> --weights PATH --reference FILE`: runs a component on a reference
//! file's inputs (`in.<name>`, diffusers argument names, NCHW) and compares with its outputs
//! (`out.<name>`): max abs and relative L2 error per output. Exit 0 within tolerance, 1 outside it,
//! 2 when the inputs cannot be compared (bad or unsupported file, argument or shape).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use crate::cli::arenas::{gib, model_arenas, most_of_memory};
use crate::error::{EXIT_OUTSIDE_TOLERANCE, Error, Result};
use crate::gpu::Gpu;
use crate::models::clip::TextEncoderKind;
use crate::models::layout::{nchw_to_nhwc, nhwc_to_nchw};
use crate::models::{Place, Unet, UnetFormat, UnetInputs, UnetResiduals, open_unet};
use crate::ops::Exec;
use crate::tensor::{DType, Tensor};
use crate::weights;

pub mod text_encoder;
pub mod vae;

#[derive(Args)]
pub struct VerifyArgs {
    /// Component to check: unet, vae_decoder, text_encoder or text_encoder_2.
    pub component: String,
    /// Weights: the component's diffusers/transformers folder (config.json + safetensors), a
    /// pipeline folder holding it (unet/, vae/, text_encoder/, text_encoder_2/), or an SDXL
    /// single-file checkpoint.
    #[arg(long)]
    pub weights: PathBuf,
    /// Reference file: safetensors with in.<name> inputs and out.<name> outputs (NCHW).
    #[arg(long)]
    pub reference: PathBuf,
    /// cpu (the CPU twins), cuda, or auto (cuda when a GPU is present).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype: f16, bf16 or f32 (default: f32 on the CPU, f16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Relative L2 tolerance (default: 1e-4 for f32, 1e-2 for f16, 3e-2 for bf16).
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// Also write the computed outputs (out.<name>, NCHW, compute dtype) to this safetensors file.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// CUDA scratch arena in GiB (default: three quarters of the device memory less the weights).
    #[arg(long)]
    pub scratch_gb: Option<f64>,
}

/// Default tolerances (relative L2 against a float32 reference). f32: the reference and the twins
/// both compute in fp32 and differ by summation order over a few hundred layers (~9e-7 measured on
/// the fixtures). f16 / bf16: every op rounds its output (2^-11 / 2^-8 relative) and the errors
/// compound through the residual stream: measured on the fixtures 1.3e-3 / 1.3e-2 through the CPU
/// twins in those dtypes and 1.5e-3 / 1.4e-2 through CUDA on an H100, so 1e-2 / 3e-2 leave room for
/// deeper models without hiding a wrong layer (those move the output by 1e-1 or more).
pub fn default_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        DType::BF16 => 3e-2,
    }
}

/// One output compared with its reference.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub name: String,
    pub shape: Vec<usize>,
    pub max_abs: f64,
    pub rel_l2: f64,
    pub tolerance: f64,
    /// Non-finite values in the computed output.
    pub non_finite: usize,
}

impl Comparison {
    pub fn ok(&self) -> bool {
        self.non_finite == 0 && self.rel_l2 <= self.tolerance
    }
}

/// The outcome of one verification: comparisons and the computed outputs (NCHW, host).
pub struct Verification {
    pub comparisons: Vec<Comparison>,
    pub outputs: Vec<(String, Tensor)>,
    pub summary: String,
}

/// Where to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

impl Device {
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            "auto" if Gpu::is_available() => Ok(Device::Cuda),
            "auto" => Ok(Device::Cpu),
            other => Err(Error::Input(format!("--device must be cpu, cuda or auto (got '{other}')"))),
        }
    }
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

/// Runs the verification and prints it; Ok(false) when an output is outside its tolerance.
pub fn run(args: &VerifyArgs) -> Result<bool> {
    if !["unet", "vae_decoder", "text_encoder", "text_encoder_2"].contains(&args.component.as_str()) {
        return Err(Error::Input(format!(
            "unknown component '{}' (supported: unet, vae_decoder, text_encoder, text_encoder_2)",
            args.component
        )));
    }
    let device = Device::parse(&args.device)?;
    let dtype = match &args.dtype {
        Some(d) => DType::parse(d)?,
        None if device == Device::Cuda => DType::F16,
        None => DType::F32,
    };
    let tolerance = args.tolerance.unwrap_or(default_tolerance(dtype));
    if tolerance.is_nan() || tolerance < 0.0 {
        return Err(Error::Input(format!("--tolerance must be a non-negative number (got {tolerance})")));
    }
    if args.scratch_gb.is_some_and(|g| g.is_nan() || g <= 0.0) {
        return Err(Error::Input("--scratch-gb must be positive".into()));
    }
    let result = match args.component.as_str() {
        "text_encoder" | "text_encoder_2" => {
            let kind = if args.component == "text_encoder" { TextEncoderKind::ClipL } else { TextEncoderKind::ClipG };
            text_encoder::verify_text_encoder(
                kind,
                &args.weights,
                &args.reference,
                device,
                dtype,
                tolerance,
                args.scratch_gb,
            )?
        }
        "vae_decoder" => {
            vae::verify_vae_decoder(&args.weights, &args.reference, device, dtype, tolerance, args.scratch_gb)?
        }
        _ => verify_unet(&args.weights, &args.reference, device, dtype, tolerance, args.scratch_gb)?,
    };
    println!("{}", result.summary);
    for c in &result.comparisons {
        println!(
            "{} {:?}: max abs error {:.3e}, relative L2 error {:.3e} (tolerance {:.0e}){}: {}",
            c.name,
            c.shape,
            c.max_abs,
            c.rel_l2,
            c.tolerance,
            if c.non_finite > 0 { format!(", {} non-finite values", c.non_finite) } else { String::new() },
            if c.ok() { "ok" } else { "OUTSIDE TOLERANCE" }
        );
    }
    if let Some(path) = &args.save {
        let named: Vec<(String, &Tensor)> = result.outputs.iter().map(|(n, t)| (n.clone(), t)).collect();
        weights::save(path, &named, None)?;
        println!("wrote {}", path.display());
    }
    Ok(result.comparisons.iter().all(Comparison::ok))
}

/// ‖actual − expected‖ / ‖expected‖ and max |actual − expected| in f64; shapes must match.
pub fn compare(name: &str, actual: &Tensor, expected: &Tensor, tolerance: f64) -> Result<Comparison> {
    if actual.shape() != expected.shape() {
        return Err(Error::Input(format!("{name}: computed {:?}, reference {:?}", actual.shape(), expected.shape())));
    }
    let (a, e) = (actual.to_f32_vec()?, expected.to_f32_vec()?);
    let (mut diff, mut norm, mut max, mut non_finite) = (0f64, 0f64, 0f64, 0);
    for (&x, &y) in a.iter().zip(&e) {
        if !x.is_finite() {
            non_finite += 1;
            continue;
        }
        let d = (x as f64 - y as f64).abs();
        diff += d * d;
        norm += (y as f64) * (y as f64);
        max = max.max(d);
    }
    let rel_l2 = if norm > 0.0 { (diff / norm).sqrt() } else { diff.sqrt() };
    Ok(Comparison {
        name: name.to_string(),
        shape: actual.shape().to_vec(),
        max_abs: max,
        rel_l2,
        tolerance,
        non_finite,
    })
}

/// The UNet's reference inputs, NHWC, converted to the compute dtype (timestep and time ids f32).
struct UnetReference {
    sample: Tensor,
    timestep: Tensor,
    encoder_hidden_states: Tensor,
    text_embeds: Option<Tensor>,
    time_ids: Option<Tensor>,
    residuals: Option<(Vec<Tensor>, Tensor)>,
    expected: BTreeMap<String, Tensor>,
}

const RESIDUAL_PREFIX: &str = "in.down_block_additional_residuals.";
const MID_RESIDUAL: &str = "in.mid_block_additional_residual";

fn read_unet_reference(path: &Path, dtype: DType) -> Result<UnetReference> {
    let file = weights::load(&[path])?;
    let bad = |m: String| Error::Input(format!("reference {}: {m}", path.display()));
    let mut inputs: HashMap<&str, &Tensor> = HashMap::new();
    let mut expected = BTreeMap::new();
    let mut down: BTreeMap<usize, &Tensor> = BTreeMap::new();
    for (name, t) in file.iter() {
        if let Some(k) = name.strip_prefix(RESIDUAL_PREFIX) {
            let k: usize = k.parse().map_err(|_| bad(format!("'{name}': the residual index must be a number")))?;
            down.insert(k, t);
        } else if name.starts_with("in.") {
            inputs.insert(name, t);
        } else if name.starts_with("out.") {
            expected.insert(name.to_string(), t.clone());
        } else {
            return Err(bad(format!("'{name}' is neither an input (in.*) nor an output (out.*)")));
        }
    }
    let known = [
        "in.sample",
        "in.timestep",
        "in.encoder_hidden_states",
        "in.added_cond_kwargs.text_embeds",
        "in.added_cond_kwargs.time_ids",
        MID_RESIDUAL,
    ];
    if let Some(name) = inputs.keys().find(|n| !known.contains(n)) {
        return Err(bad(format!(
            "unknown input '{name}' (the UNet takes {} and {RESIDUAL_PREFIX}<k>)",
            known.join(", ")
        )));
    }
    if let Some(name) = expected.keys().find(|n| n.as_str() != "out.sample") {
        return Err(bad(format!("unknown output '{name}' (the UNet gives out.sample)")));
    }
    if !expected.contains_key("out.sample") {
        return Err(bad("no out.sample".into()));
    }
    let need = |name: &str| inputs.get(name).copied().ok_or_else(|| bad(format!("no {name}")));
    let cast = |t: &Tensor, d: DType| -> Result<Tensor> {
        if t.dtype() == d { Ok(t.clone()) } else { Tensor::from_f32(t.shape(), d, &t.to_f32_vec()?) }
    };
    let nhwc = |name: &str, t: &Tensor| -> Result<Tensor> {
        if t.shape().len() != 4 {
            return Err(bad(format!("{name} {t:?} must be NCHW")));
        }
        cast(&nchw_to_nhwc(t)?, dtype)
    };

    let sample = nhwc("in.sample", need("in.sample")?)?;
    let batch = sample.shape()[0];
    // diffusers broadcasts a scalar (or one-element) timestep over the batch.
    let t = need("in.timestep")?;
    let t_values = t.to_f32_vec()?;
    let timestep = match (t.shape(), t_values.as_slice()) {
        ([], [v]) | ([1], [v]) => Tensor::from_f32(&[batch], DType::F32, &vec![*v; batch])?,
        ([n], _) if *n == batch => cast(t, DType::F32)?,
        _ => return Err(bad(format!("in.timestep {t:?} must be a scalar, [1] or [{batch}]"))),
    };
    let residuals = match (down.is_empty(), inputs.get(MID_RESIDUAL)) {
        (true, None) => None,
        (false, Some(mid)) => {
            if down.keys().copied().ne(0..down.len()) {
                return Err(bad(format!("{RESIDUAL_PREFIX}<k> must be numbered 0..{} without gaps", down.len())));
            }
            let down = down.iter().map(|(k, t)| nhwc(&format!("{RESIDUAL_PREFIX}{k}"), t)).collect::<Result<_>>()?;
            Some((down, nhwc(MID_RESIDUAL, mid)?))
        }
        _ => return Err(bad(format!("ControlNet residuals need both {RESIDUAL_PREFIX}<k> and {MID_RESIDUAL}"))),
    };
    Ok(UnetReference {
        sample,
        timestep,
        encoder_hidden_states: cast(need("in.encoder_hidden_states")?, dtype)?,
        text_embeds: inputs.get("in.added_cond_kwargs.text_embeds").map(|t| cast(t, dtype)).transpose()?,
        time_ids: inputs.get("in.added_cond_kwargs.time_ids").map(|t| cast(t, DType::F32)).transpose()?,
        residuals,
        expected,
    })
}

/// Loads the UNet and the reference, runs the forward on `device` in `dtype` and compares.
pub fn verify_unet(
    weights_path: &Path,
    reference: &Path,
    device: Device,
    dtype: DType,
    tolerance: f64,
    scratch_gb: Option<f64>,
) -> Result<Verification> {
    let checkpoint = open_unet(weights_path)?;
    let r = read_unet_reference(reference, dtype)?;
    let s = r.sample.shape();
    let format = match checkpoint.format {
        UnetFormat::Diffusers => "diffusers",
        UnetFormat::SingleFile => "single file",
    };
    let summary = format!(
        "{} ({format}): {}\n{} on {device:?} in {dtype:?}: batch {}, latent {}x{}, {} context tokens{}",
        weights_path.display(),
        checkpoint.config,
        reference.display(),
        s[0],
        s[1],
        s[2],
        r.encoder_hidden_states.shape().get(1).unwrap_or(&0),
        if r.residuals.is_some() { ", with ControlNet residuals" } else { "" }
    );
    let sample = match device {
        Device::Cpu => {
            let unet = Unet::new(&checkpoint, Place::Host(dtype))?;
            let residuals = r.residuals.clone().map(|(down, mid)| UnetResiduals { down, mid });
            let inputs = UnetInputs {
                sample: &r.sample,
                timestep: &r.timestep,
                encoder_hidden_states: &r.encoder_hidden_states,
                text_embeds: r.text_embeds.as_ref(),
                time_ids: r.time_ids.as_ref(),
            };
            unet.forward(&Exec::Cpu, &inputs, residuals.as_ref())?
        }
        Device::Cuda => run_cuda(&checkpoint, &r, dtype, scratch_gb)?,
    };
    let sample = nhwc_to_nchw(&sample)?;
    let comparisons = vec![compare("out.sample", &sample, &r.expected["out.sample"], tolerance)?];
    Ok(Verification { comparisons, outputs: vec![("out.sample".to_string(), sample)], summary })
}

fn run_cuda(
    checkpoint: &crate::models::UnetCheckpoint,
    r: &UnetReference,
    dtype: DType,
    scratch_gb: Option<f64>,
) -> Result<Tensor> {
    let gpu = Gpu::from_env()?;
    let input_bytes: usize = [Some(&r.sample), Some(&r.encoder_hidden_states), r.text_embeds.as_ref()]
        .into_iter()
        .flatten()
        .chain(r.residuals.iter().flat_map(|(d, m)| d.iter().chain([m])))
        .map(|t| t.size_bytes() + 256)
        .sum::<usize>()
        + (1 << 20);
    let (weights_arena, scratch) = model_arenas(&checkpoint.weights, dtype, input_bytes, |w| {
        scratch_gb.map_or_else(|| most_of_memory(&gpu, w), gib)
    })?;
    let unet = Unet::new(checkpoint, Place::Device { gpu: &gpu, arena: &weights_arena, dtype })?;
    let up = |t: &Tensor| gpu.upload(&weights_arena, t, t.dtype());
    let (sample, timestep, context) = (up(&r.sample)?, up(&r.timestep)?, up(&r.encoder_hidden_states)?);
    let text_embeds = r.text_embeds.as_ref().map(up).transpose()?;
    let time_ids = r.time_ids.as_ref().map(up).transpose()?;
    let residuals = match &r.residuals {
        Some((down, mid)) => Some(UnetResiduals { down: down.iter().map(up).collect::<Result<_>>()?, mid: up(mid)? }),
        None => None,
    };
    let inputs = UnetInputs {
        sample: &sample,
        timestep: &timestep,
        encoder_hidden_states: &context,
        text_embeds: text_embeds.as_ref(),
        time_ids: time_ids.as_ref(),
    };
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let out = unet.forward(&ex, &inputs, residuals.as_ref())?;
    let host = gpu.download(&out)?;
    eprintln!(
        "CUDA scratch arena: peak {:.2} GiB of {:.2} GiB",
        scratch.peak() as f64 / (1u64 << 30) as f64,
        scratch.capacity() as f64 / (1u64 << 30) as f64
    );
    Ok(host)
}
