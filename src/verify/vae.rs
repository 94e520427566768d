//! `celframe verify vae_decoder`: diffusers' `AutoencoderKL.decode(z)` on a reference file's
//! `in.z` (NCHW latents ALREADY divided by the scaling factor, as diffusers' decode takes them),
//! compared with its `out.sample` (NCHW image, roughly in [-1, 1]). A reference made with
//! diffusers' tiling on says so in its safetensors metadata (`tile_latent_min_size`,
//! `tile_sample_min_size`, `tile_overlap_factor`: diffusers' attribute names) and is decoded
//! tiled the same way.

use std::path::Path;

use super::arenas::{model_arenas, most_of_memory, scratch_bytes};
use super::{Device, Reference, Settings, Verification, compare};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::models::Place;
use crate::models::layout::{nchw_to_nhwc, nhwc_to_nchw};
use crate::models::vae::{DecodeOptions, DecodeReport, Tiling, Vae, VaeCheckpoint, VaeFormat, open_vae};
use crate::ops::Exec;
use crate::tensor::{DType, Tensor};

/// Frames per decoder pass: the result does not depend on it; device memory does.
const CHUNK_FRAMES: usize = 8;

/// Loads the VAE and the reference, decodes on `device` in `dtype` and compares.
pub fn verify_vae_decoder(weights_path: &Path, reference: &Path, settings: &Settings) -> Result<Verification> {
    let Settings { device, dtype, tolerance, scratch_gb } = *settings;
    let checkpoint = open_vae(weights_path)?;
    let r = Reference::open(reference)?;
    let (z, expected) = read_reference(&r, checkpoint.config.latent_channels)?;
    let tiling = read_tiling(&r, checkpoint.config.upsample_factor())?;
    let opts = DecodeOptions { chunk_frames: CHUNK_FRAMES, tiling };
    let (image, report) = match device {
        Device::Cpu => Vae::new(&checkpoint, Place::Host(dtype))?.decode_z(&Exec::Cpu, &z, &opts)?,
        Device::Cuda => decode_cuda(&checkpoint, &z, &opts, dtype, scratch_gb)?,
    };
    let s = z.shape();
    let format = match checkpoint.format {
        VaeFormat::Diffusers => "diffusers",
        VaeFormat::SingleFile => "single file",
    };
    let mut summary = format!(
        "{} ({format}): {}\n{} on {device:?} in {dtype:?}: {} frames of {}x{} latents, {} chunk(s) of at most \
         {CHUNK_FRAMES} frames, {}",
        weights_path.display(),
        checkpoint.config,
        reference.display(),
        s[0],
        s[1],
        s[2],
        report.chunks,
        match tiling {
            Some(t) if report.tiles > 1 =>
                format!("{} tiles of {} latents (overlap {})", report.tiles, t.latent_tile, t.overlap),
            _ => "untiled".to_string(),
        }
    );
    if checkpoint.config.compute_dtype(dtype) != dtype {
        summary.push_str("\nnote: this VAE sets force_upcast; diffusers would decode it in float32");
    }
    let image = nhwc_to_nchw(&Tensor::from_f32(image.shape(), dtype, &image.to_f32_vec()?)?)?;
    let comparisons = vec![compare("out.sample", &image, &expected, tolerance)?];
    Ok(Verification { comparisons, outputs: vec![("out.sample".to_string(), image)], summary })
}

/// in.z as NHWC and out.sample (NCHW), both in the file's dtype; nothing else may be in the file.
/// Shapes in errors are the file's (NCHW).
fn read_reference(r: &Reference, latent_channels: usize) -> Result<(Tensor, Tensor)> {
    r.only(|n| ["in.z", "out.sample"].contains(&n), "the VAE decoder takes in.z and gives out.sample")?;
    r.require(&["in.z", "out.sample"])?;
    let s = r.shape("in.z")?;
    if s.len() != 4 || s[1] != latent_channels || s.contains(&0) {
        return Err(r.bad(format!(
            "in.z has shape {s:?}; this VAE decodes NCHW [frames, {latent_channels}, height, width], every size \
             positive"
        )));
    }
    Ok((nchw_to_nhwc(&r.float("in.z")?)?, r.float("out.sample")?))
}

/// The tiling a reference declares in its metadata, or None (untiled).
fn read_tiling(r: &Reference, factor: usize) -> Result<Option<Tiling>> {
    let field = |name: &str| r.metadata().get(name).map(String::as_str);
    let (latent, sample, overlap) =
        match (field("tile_latent_min_size"), field("tile_sample_min_size"), field("tile_overlap_factor")) {
            (None, None, None) => return Ok(None),
            (Some(l), Some(s), Some(o)) => (l, s, o),
            _ => {
                return Err(r.bad(
                    "a tiled reference needs all of tile_latent_min_size, tile_sample_min_size and \
                     tile_overlap_factor in its metadata"
                        .into(),
                ));
            }
        };
    let number = |what: &str, v: &str| r.bad(format!("metadata {what} = '{v}' is not a number"));
    let latent: usize = latent.parse().map_err(|_| number("tile_latent_min_size", latent))?;
    let sample: usize = sample.parse().map_err(|_| number("tile_sample_min_size", sample))?;
    let overlap: f64 = overlap.parse().map_err(|_| number("tile_overlap_factor", overlap))?;
    if latent.checked_mul(factor) != Some(sample) {
        return Err(Error::Unsupported(format!(
            "reference {}: image tiles of {sample} for latent tiles of {latent}: this engine's tiles are the \
             latent tile times the VAE's upsampling ({factor})",
            r.path().display()
        )));
    }
    Ok(Some(Tiling { latent_tile: latent, overlap }))
}

fn decode_cuda(
    checkpoint: &VaeCheckpoint,
    z: &Tensor,
    opts: &DecodeOptions,
    dtype: DType,
    scratch_gb: Option<f64>,
) -> Result<(Tensor, DecodeReport)> {
    let gpu = Gpu::from_env()?;
    let explicit = scratch_gb.map(|gb| scratch_bytes(&gpu, gb)).transpose()?;
    let (weights_arena, scratch) =
        model_arenas(&checkpoint.weights, dtype, 1 << 20, |w| explicit.unwrap_or_else(|| most_of_memory(&gpu, w)))?;
    let vae = Vae::new(checkpoint, Place::device(&gpu, &weights_arena, dtype))?;
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    // Twice: the first run also picks cuDNN's algorithms (once per shape), the second is the
    // steady state. Both include the host side (uploads, downloads, blending).
    let timed = || -> Result<((Tensor, DecodeReport), f64)> {
        let start = std::time::Instant::now();
        let decoded = vae.decode_z(&ex, z, opts)?;
        Ok((decoded, start.elapsed().as_secs_f64() * 1e3))
    };
    let (_, first_ms) = timed()?;
    let (decoded, steady_ms) = timed()?;
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    eprintln!(
        "CUDA decode of {} frames: {:.1} ms (first run {:.1} ms); scratch arena peak {:.3} GiB of {:.2} GiB",
        z.shape()[0],
        steady_ms,
        first_ms,
        gib(decoded.1.peak_scratch_bytes.unwrap_or(0)),
        gib(scratch.capacity())
    );
    Ok(decoded)
}
