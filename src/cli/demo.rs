//! `celframe demo`: one SDXL ResNet block (diffusers ResnetBlock2D with the UNet's time embedding)
//! on random weights, through the same op calls on CUDA and on the CPU twins.

use clap::Args;

use super::elements;
use crate::error::{Error, Result};
use crate::gpu::timing::time_gpu;
use crate::gpu::{Arena, Gpu, nvtx};
use crate::ops::Exec;
use crate::ops::conv::{Conv2d, conv2d};
use crate::ops::elementwise::{add, silu};
use crate::ops::embedding::{TimestepEmbedding, timestep_embedding};
use crate::ops::linear::linear;
use crate::ops::norm::{GroupNorm, group_norm};
use crate::tensor::{DType, Tensor};
use crate::verify::Device;

#[derive(Args)]
pub struct DemoArgs {
    /// Images in the batch (a video's frames fold into it).
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Latent height (image height / 8).
    #[arg(long, default_value_t = 32)]
    pub height: usize,
    /// Latent width (image width / 8).
    #[arg(long, default_value_t = 32)]
    pub width: usize,
    /// Channels of the block (SDXL level widths: 320, 640, 1280).
    #[arg(long, default_value_t = 320)]
    pub channels: usize,
    /// Activation dtype: f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    /// Where to run: auto (CUDA if present, and compare with the CPU), cuda, or cpu.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// The block's weights, PyTorch names, conv weights already KRSC.
struct Block {
    time_linear_1: (Tensor, Tensor),
    time_linear_2: (Tensor, Tensor),
    norm1: (Tensor, Tensor),
    conv1: (Tensor, Tensor),
    time_emb_proj: (Tensor, Tensor),
    norm2: (Tensor, Tensor),
    conv2: (Tensor, Tensor),
}

/// Deterministic pseudo-random values in [-scale, scale).
pub(crate) fn random(shape: &[usize], seed: u64, scale: f32, dtype: DType) -> Result<Tensor> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_f32(shape, dtype, &values)
}

impl Block {
    fn random(c: usize, dtype: DType) -> Result<Block> {
        let lin = |o: usize, i: usize, seed| -> Result<(Tensor, Tensor)> {
            Ok((random(&[o, i], seed, 1.0 / (i as f32).sqrt(), dtype)?, random(&[o], seed + 1, 0.1, dtype)?))
        };
        let norm = |seed| -> Result<(Tensor, Tensor)> {
            let g: Vec<f32> = random(&[c], seed, 0.2, DType::F32)?.to_f32_vec()?.iter().map(|v| 1.0 + v).collect();
            Ok((Tensor::from_f32(&[c], dtype, &g)?, random(&[c], seed + 1, 0.1, dtype)?))
        };
        let conv = |seed| -> Result<(Tensor, Tensor)> {
            Ok((
                random(&[c, 3, 3, c], seed, 1.0 / ((9 * c) as f32).sqrt(), dtype)?,
                random(&[c], seed + 1, 0.1, dtype)?,
            ))
        };
        Ok(Block {
            time_linear_1: lin(1280, 320, 10)?,
            time_linear_2: lin(1280, 1280, 20)?,
            norm1: norm(30)?,
            conv1: conv(40)?,
            time_emb_proj: lin(c, 1280, 50)?,
            norm2: norm(60)?,
            conv2: conv(70)?,
        })
    }

    /// Bytes the weights take in a device arena (256 bytes of alignment slack each).
    fn device_bytes(&self) -> usize {
        [
            &self.time_linear_1,
            &self.time_linear_2,
            &self.norm1,
            &self.conv1,
            &self.time_emb_proj,
            &self.norm2,
            &self.conv2,
        ]
        .iter()
        .map(|(w, b)| w.size_bytes() + b.size_bytes() + 512)
        .sum()
    }

    fn upload(&self, gpu: &Gpu, arena: &Arena) -> Result<Block> {
        let up = |(w, b): &(Tensor, Tensor)| -> Result<(Tensor, Tensor)> {
            Ok((gpu.upload(arena, w, w.dtype())?, gpu.upload(arena, b, b.dtype())?))
        };
        Ok(Block {
            time_linear_1: up(&self.time_linear_1)?,
            time_linear_2: up(&self.time_linear_2)?,
            norm1: up(&self.norm1)?,
            conv1: up(&self.conv1)?,
            time_emb_proj: up(&self.time_emb_proj)?,
            norm2: up(&self.norm2)?,
            conv2: up(&self.conv2)?,
        })
    }

    /// UNet time embedding then ResnetBlock2D: h = conv1(silu(gn1(x))) + proj(silu(emb));
    /// out = x + conv2(silu(gn2(h))).
    fn forward(&self, ex: &Exec, x: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let gn = GroupNorm { groups: 32, eps: 1e-5, silu: true, frames: 1 };
        let same = Conv2d { stride: 1, padding: 1 };
        // 1. time embedding: [N] -> [N, 320] -> [N, 1280]
        let _range = nvtx::range("resnet_block");
        let step = nvtx::range("time_embedding");
        let t = timestep_embedding(ex, timesteps, TimestepEmbedding::sdxl(320), dtype)?;
        let t = silu(ex, &linear(ex, &t, &self.time_linear_1.0, Some(&self.time_linear_1.1))?)?;
        let emb = linear(ex, &t, &self.time_linear_2.0, Some(&self.time_linear_2.1))?;
        drop(step);
        // 2. first half: [N, H, W, C]
        let step = nvtx::range("norm1_conv1_emb");
        let h = group_norm(ex, x, &self.norm1.0, &self.norm1.1, gn)?;
        let h = conv2d(ex, &h, &self.conv1.0, Some(&self.conv1.1), same)?;
        let e = linear(ex, &silu(ex, &emb)?, &self.time_emb_proj.0, Some(&self.time_emb_proj.1))?; // [N, C]
        let h = add(ex, &h, &e, 1.0)?;
        drop(step);
        // 3. second half and residual
        let _step = nvtx::range("norm2_conv2_residual");
        let h = group_norm(ex, &h, &self.norm2.0, &self.norm2.1, gn)?;
        let h = conv2d(ex, &h, &self.conv2.0, Some(&self.conv2.1), same)?;
        add(ex, x, &h, 1.0)
    }
}

/// Most elements of the block's activation and of each weight: the CPU twins run on every demo
/// and keep several float32 copies of the activation in host memory (2^27 elements: 512 MiB each).
const MAX_ELEMENTS: usize = 1 << 27;

pub fn run(args: &DemoArgs) -> Result<()> {
    let dtype = DType::parse(&args.dtype)?;
    let (n, h, w, c) = (args.batch, args.height, args.width, args.channels);
    if c % 32 != 0 {
        return Err(Error::Input(format!("--channels must be a multiple of 32, the block's norm groups (got {c})")));
    }
    let why = "the CPU twins run every demo and keep several float32 copies in host memory";
    let dims = [("--batch", n), ("--height", h), ("--width", w), ("--channels", c)];
    elements("activation", &dims, MAX_ELEMENTS, why)?;
    elements("conv weight", &[("--channels", c), ("--channels", c), ("kernel taps", 9)], MAX_ELEMENTS, why)?;
    let use_cuda = Device::parse(&args.device)? == Device::Cuda;
    println!("SDXL ResNet block, {c} channels, batch {n}, latent {h}x{w}, {dtype:?}, random weights");
    let block = Block::random(c, dtype)?;
    let x = random(&[n, h, w, c], 99, 1.0, dtype)?;
    let t: Vec<f32> = (0..n).map(|i| 999.0 - 250.0 * (i % 4) as f32).collect();
    let timesteps = Tensor::from_f32(&[n], DType::F32, &t)?;

    let started = std::time::Instant::now();
    let cpu_out = block.forward(&Exec::Cpu, &x, &timesteps)?;
    println!("CPU twins: {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    let cpu_values = cpu_out.to_f32_vec()?;
    if !use_cuda {
        println!("no CUDA device in use: ran on the CPU twins only");
        print_summary(&cpu_values);
        return Ok(());
    }

    let gpu = Gpu::from_env()?;
    println!(
        "CUDA device: {} (sm_{}{})",
        gpu.info().name,
        gpu.info().compute_capability.0,
        gpu.info().compute_capability.1
    );
    // The block's weights and inputs (with alignment slack), and scratch for the forward.
    let weight_bytes = block.device_bytes() + x.size_bytes() + timesteps.size_bytes() + 512;
    let scratch_bytes = (64 << 20) + 16 * x.size_bytes();
    let total = gpu.info().total_memory;
    if weight_bytes + scratch_bytes > total {
        return Err(Error::Input(format!(
            "--batch {n} x --height {h} x --width {w} x --channels {c} needs {:.2} GiB of device memory; the \
             device has {:.2} GiB",
            (weight_bytes + scratch_bytes) as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        )));
    }
    let weights = Arena::new("weights", weight_bytes)?;
    let scratch = Arena::new("scratch", scratch_bytes)?;
    let dev_block = block.upload(&gpu, &weights)?;
    let (xd, td) = (gpu.upload(&weights, &x, dtype)?, gpu.upload(&weights, &timesteps, DType::F32)?);
    let ex = Exec::Cuda { gpu: &gpu, scratch: &scratch };
    let gpu_out = gpu.download(&dev_block.forward(&ex, &xd, &td)?)?.to_f32_vec()?;
    let (mut diff, mut norm) = (0f64, 0f64);
    for (a, b) in gpu_out.iter().zip(&cpu_values) {
        diff += ((a - b) as f64).powi(2);
        norm += (*b as f64).powi(2);
    }
    scratch.reset();
    let timing = time_gpu(&gpu, 3, 20, || {
        dev_block.forward(&ex, &xd, &td)?;
        scratch.reset();
        Ok(())
    })?;
    println!("CUDA vs CPU twins: relative L2 error {:.2e}", (diff / norm).sqrt());
    println!("CUDA block forward: {:.3} ms (median of 20)", timing.median_ms());
    print_summary(&gpu_out);
    Ok(())
}

fn print_summary(values: &[f32]) {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    println!("output: {} values, mean {mean:.4}, std {std:.4}", values.len());
}
