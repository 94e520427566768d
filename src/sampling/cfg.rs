//! Classifier-free guidance (Ho & Salimans 2022) and its rescale (Lin et al. 2023, sec. 3.4),
//! as diffusers' SDXL pipelines apply them to the model output before the scheduler step
//! (`pipeline_stable_diffusion_xl.py`: the guidance line and `rescale_noise_cfg`). Both work on
//! the raw model output (ε or v) and only make sense when guidance is on (scale > 1: diffusers
//! skips the unconditional pass otherwise).

use crate::error::{Error, Result};

/// out = uncond + scale·(cond − uncond), element-wise.
pub fn cfg_combine(uncond: &[f32], cond: &[f32], scale: f32, out: &mut [f32]) -> Result<()> {
    if uncond.len() != cond.len() || cond.len() != out.len() {
        return Err(Error::Input(format!(
            "cfg: unconditional output of {}, conditional of {} and result of {} values differ",
            uncond.len(),
            cond.len(),
            out.len()
        )));
    }
    if !scale.is_finite() {
        return Err(Error::Input(format!("cfg: guidance scale {scale} is not finite")));
    }
    for ((o, &u), &c) in out.iter_mut().zip(uncond).zip(cond) {
        *o = u + scale * (c - u);
    }
    Ok(())
}

/// diffusers `rescale_noise_cfg`: per group of `group` consecutive values (one sample: diffusers
/// takes the std over every dimension but the batch, so a whole video [C, F, H, W] for
/// AnimateDiff, one image for SDXL), scale the guided output to the conditional output's std,
/// then blend: out = φ·guided·std(cond)/std(guided) + (1 − φ)·guided, φ = `guidance_rescale`
/// (0.7 in the paper). Standard deviations are unbiased (torch.std), accumulated in float64.
pub fn cfg_rescale(guided: &mut [f32], cond: &[f32], group: usize, guidance_rescale: f32) -> Result<()> {
    if guided.len() != cond.len() {
        return Err(Error::Input(format!(
            "cfg rescale: guided output of {} values, conditional of {}",
            guided.len(),
            cond.len()
        )));
    }
    if group < 2 || !guided.len().is_multiple_of(group) {
        return Err(Error::Input(format!(
            "cfg rescale: groups of {group} values do not tile {} values (each needs at least 2 for a std)",
            guided.len()
        )));
    }
    if !(0.0..=1.0).contains(&guidance_rescale) {
        return Err(Error::Input(format!("cfg rescale: guidance_rescale {guidance_rescale} is outside 0..1")));
    }
    for (g, c) in guided.chunks_mut(group).zip(cond.chunks(group)) {
        let ratio = std_unbiased(c) / std_unbiased(g);
        let phi = guidance_rescale as f64;
        for v in g.iter_mut() {
            let x = *v as f64;
            *v = (phi * (x * ratio) + (1.0 - phi) * x) as f32;
        }
    }
    Ok(())
}

fn std_unbiased(values: &[f32]) -> f64 {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let ss = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>();
    (ss / (n - 1.0)).sqrt()
}
