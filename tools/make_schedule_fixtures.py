#!/usr/bin/env python3
"""Writes tests/fixtures/schedules.json and tests/fixtures/schedules_trajectories.json: what
diffusers' schedulers produce, for tests/sampling.rs to compare src/sampling with.

Needs: diffusers 0.42.1, torch, numpy, torchsde (diffusers' DPMSolverSDEScheduler module imports it). No weights and no network: every scheduler is built with
`from_config` from the SDXL base model's scheduler config (`SDXL_SCHEDULER_CONFIG` below, the
contents of stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json) plus the
options under test, as a diffusers user switches schedulers (`Cls.from_config(pipe.scheduler.config,
...)`). Our sampler names map onto diffusers classes as in diffusers' docs (api/schedulers/overview.md,
the A1111 table):

  lcm            LCMScheduler
  tcd            TCDScheduler (stochasticity eta = gamma passed to step, as the pipelines do)
  euler          EulerDiscreteScheduler
  euler_ancestral EulerAncestralDiscreteScheduler
  ddim           DDIMScheduler (eta 0, the SDXL pipeline's default)
  dpmpp_2m       DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)
  dpmpp_2m_sde   DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)
  dpmpp_sde      DPMSolverSDEScheduler (k-diffusion's sample_dpmpp_sde ported)

schedules.json, "cases": one entry per setting (sampler, steps, strength, spacing, Karras,
prediction, zero-SNR, beta schedule) with
  timesteps         the UNet timestep of every model evaluation, as the pipeline feeds them
                    (after img2img strength; DPM++ SDE interleaves its midpoint evaluations)
  sigmas            the steps' noise levels in VE terms (sigma = sqrt((1 - abar) / abar)), one per
                    step plus the level the last step lands on: the scheduler's own `sigmas` for
                    the Euler and DPM families (de-interleaved for DPM++ SDE; with an arange
                    overshoot, below, also the extra step's); for DDIM and LCM, computed here
                    from the scheduler's alphas_cumprod at each timestep (and DDIM's last target)
  init_noise_sigma  what the initial noise is multiplied by
  c_skip, c_out     LCM's boundary-condition scalings per step
                    (LCMScheduler.get_scalings_for_boundary_condition_discrete)
  prev_timesteps    DDIM's target timestep per step (-1: final_alpha_cumprod)
  extra_timesteps   timesteps diffusers appends beyond the requested step count (numpy's arange
                    overshoots for some step counts with trailing spacing, e.g. 61 steps gives a
                    62nd timestep of -1); src/sampling keeps exactly N steps
Strength follows the diffusers pipelines: LCM takes it in LCMScheduler.set_timesteps(strength=...)
(LatentConsistencyModelImg2ImgPipeline); every other scheduler is cut by the SDXL img2img
pipeline's get_timesteps (StableDiffusionXLImg2ImgPipeline.get_timesteps, called here on a stub
holding the scheduler), which also sets the scheduler's begin index.

schedules.json, "tables": alphas_cumprod (the training table) of each beta schedule, with and
without zero-SNR rescaling, at the indices "table_indices".

schedules_trajectories.json: whole sampling runs through diffusers' own step functions with a
tiny analytic "model" shared with the Rust test,
    model(x, t)[k] = f32(0.1 * x[k] + 0.5 * sin(t / 100 + 0.37 * k))    (computed in float64)
fed the scheduler's scaled model input (scale_model_input), from fixed initial latents. The
latents are 1x4x2x4 (32 values). Stochastic samplers get their noise from a fixed pool of
Gaussian tensors, `noise[i]` for model evaluation i (counted from the first evaluation of the run),
injected by replacing `randn_tensor` in the scheduler modules (Euler ancestral, LCM), through
`variance_noise` (DPM++ 2M SDE), or by replacing the scheduler's Brownian-tree noise sampler (DPM++
SDE; torchsde must be installed because diffusers imports it, but its tree is not used). Each run
records the final latents of the float32 run ("final") and of the same run with float64 latents
and model outputs ("final_f64", see trajectory_case). img2img runs start from
`scheduler.add_noise(image, initial, timesteps[:1])`, as the pipelines do.

cfg: classifier-free guidance with diffusers' combine (pipeline_stable_diffusion_xl.py:
uncond + scale * (cond - uncond)) and rescale_noise_cfg (guidance_rescale, Lin et al. 2023, sec.
3.4) on random 2x4x4x4 tensors.

Values are written with 9 significant digits (enough to round-trip float32).

Usage: python3 tools/make_schedule_fixtures.py
"""

import json
import math
import os

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm, scheduling_tcd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# The AnimateDiff-SDXL motion module's schedule (guoyww/AnimateDiff sdxl branch,
# configs/inference/inference.yaml): scaled_linear 0.00085 -> 0.020.
BETA_END = {"sdxl": 0.012, "animatediff": 0.020}

LATENT_SHAPE = (1, 4, 2, 4)

# Where the training tables are sampled: every 37th entry and the last five (where zero-SNR
# rescaling moves the values most).
TABLE_INDICES = list(range(0, 995, 37)) + [995, 996, 997, 998, 999]


def g(x):
    """A float rounded to 9 significant digits (round-trips float32); None for inf/nan."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.9g}")


def flat(t):
    return [g(v) for v in torch.as_tensor(t).reshape(-1).tolist()]


def build(sampler, spacing="trailing", karras=False, prediction="epsilon", zero_snr=False, beta="sdxl"):
    cfg = dict(SDXL_SCHEDULER_CONFIG, beta_end=BETA_END[beta], prediction_type=prediction)
    if sampler == "lcm":
        return LCMScheduler.from_config(cfg, rescale_betas_zero_snr=zero_snr)
    if sampler == "tcd":
        return TCDScheduler.from_config(cfg, rescale_betas_zero_snr=zero_snr)
    if sampler == "euler":
        return EulerDiscreteScheduler.from_config(
            cfg, timestep_spacing=spacing, use_karras_sigmas=karras, rescale_betas_zero_snr=zero_snr
        )
    if sampler == "euler_ancestral":
        assert not karras
        return EulerAncestralDiscreteScheduler.from_config(
            cfg, timestep_spacing=spacing, rescale_betas_zero_snr=zero_snr
        )
    if sampler == "ddim":
        assert not karras
        return DDIMScheduler.from_config(cfg, timestep_spacing=spacing, rescale_betas_zero_snr=zero_snr)
    if sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
        algorithm = "dpmsolver++" if sampler == "dpmpp_2m" else "sde-dpmsolver++"
        return DPMSolverMultistepScheduler.from_config(
            cfg,
            algorithm_type=algorithm,
            solver_order=2,
            lower_order_final=True,
            timestep_spacing=spacing,
            use_karras_sigmas=karras,
            rescale_betas_zero_snr=zero_snr,
        )
    if sampler == "dpmpp_sde":
        assert not zero_snr  # DPMSolverSDEScheduler has no zero-SNR option
        return DPMSolverSDEScheduler.from_config(cfg, timestep_spacing=spacing, use_karras_sigmas=karras)
    raise ValueError(sampler)


class _PipelineStub:
    """Just enough of a pipeline for StableDiffusionXLImg2ImgPipeline.get_timesteps."""

    def __init__(self, scheduler):
        self.scheduler = scheduler


def set_up(sampler, steps, strength, eta=None, **options):
    """A scheduler with its timesteps set as the pipelines set them; returns (scheduler, the
    timesteps the pipeline iterates over, the first step's index into the scheduler's arrays).
    `eta` is TCD's step argument, not a scheduler option."""
    s = build(sampler, **options)
    if sampler in ("lcm", "tcd"):
        s.set_timesteps(steps, strength=strength)
        return s, s.timesteps, 0
    s.set_timesteps(steps)
    if strength == 1.0:
        return s, s.timesteps, 0
    timesteps, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(_PipelineStub(s), steps, strength, "cpu")
    # get_timesteps cuts t_start * order entries off the front (and sets that as the begin index
    # where the scheduler has one; DDIM has none and needs none).
    return s, timesteps, len(s.timesteps) - len(timesteps)


def sigma_of(abar):
    abar = torch.as_tensor(abar, dtype=torch.float32)
    return ((1 - abar) / abar) ** 0.5


def schedule_case(sampler, steps, strength=1.0, **options):
    s, timesteps, begin = set_up(sampler, steps, strength, **options)
    case = {
        "sampler": sampler,
        "steps": steps,
        "strength": strength,
        "eta": options.get("eta"),
        "spacing": options.get("spacing", "trailing") if sampler not in ("lcm", "tcd") else None,
        "karras": options.get("karras", False),
        "prediction": options.get("prediction", "epsilon"),
        "zero_snr": options.get("zero_snr", False),
        "beta_schedule": options.get("beta", "sdxl"),
        "init_noise_sigma": g(s.init_noise_sigma),
    }
    ts = [float(t) for t in timesteps]
    evaluations = 2 * steps - 1 if sampler == "dpmpp_sde" else steps
    if len(s.timesteps) != evaluations:
        # numpy's arange overshoot (trailing spacing): diffusers runs extra timesteps (DPM++ SDE:
        # the last step's midpoint and the extra step).
        assert strength == 1.0
        extra = len(s.timesteps) - evaluations
        case["extra_timesteps"] = ts[len(ts) - extra :]
        ts = ts[: len(ts) - extra]
    case["timesteps"] = ts
    if sampler in ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"):
        # With an overshoot this holds diffusers' sigma of the extra step too (N + 2 values).
        case["sigmas"] = flat(s.sigmas[begin:])
    elif sampler == "dpmpp_sde":
        sig = s.sigmas[begin:]
        case["sigmas"] = flat(torch.cat([sig[0::2], sig[-1:]]))
    elif sampler == "ddim":
        ratio = s.config.num_train_timesteps // s.num_inference_steps
        prev = [int(t) - ratio for t in ts]
        case["prev_timesteps"] = [p if p >= 0 else -1 for p in prev]
        last = s.alphas_cumprod[prev[-1]] if prev[-1] >= 0 else s.final_alpha_cumprod
        case["sigmas"] = flat(sigma_of(torch.stack([s.alphas_cumprod[int(t)] for t in ts] + [last])))
    elif sampler == "lcm":
        case["sigmas"] = flat(sigma_of(torch.stack([s.alphas_cumprod[int(t)] for t in ts]))) + [0.0]
        scalings = [s.get_scalings_for_boundary_condition_discrete(int(t)) for t in timesteps]
        case["c_skip"] = [g(c) for c, _ in scalings]
        case["c_out"] = [g(c) for _, c in scalings]
    elif sampler == "tcd":
        # The last step lands on t = 0 (TCDScheduler.step: prev_timestep = 0 after the last entry).
        case["sigmas"] = flat(sigma_of(torch.stack([s.alphas_cumprod[int(t)] for t in ts] + [s.alphas_cumprod[0]])))
        # s per step, with TCDScheduler.step's own expression.
        eta = options.get("eta", 0.3)
        nexts = list(timesteps[1:]) + [torch.tensor(0)]
        case["s_timesteps"] = [int(torch.floor((1 - eta) * t_next).to(dtype=torch.long)) for t_next in nexts]
    return case


def schedule_cases():
    cases = []
    # LCM: the few-step counts users run, its limit (50) and img2img strength.
    for n in (1, 2, 3, 4, 5, 6, 8, 12, 25, 50):
        cases.append(schedule_case("lcm", n))
    # TCD: the same grid; s per step depends on eta (gamma).
    for n in (1, 2, 4, 6, 8, 12):
        cases.append(schedule_case("tcd", n, eta=0.3))
    for eta in (0.0, 0.5, 1.0):
        cases.append(schedule_case("tcd", 4, eta=eta))
    cases.append(schedule_case("tcd", 4, eta=0.3, strength=0.6))
    cases.append(schedule_case("tcd", 6, eta=0.3, prediction="v_prediction", zero_snr=True))
    for n in (4, 6):
        cases.append(schedule_case("lcm", n, strength=0.6))
        cases.append(schedule_case("lcm", n, prediction="v_prediction", zero_snr=True))
        cases.append(schedule_case("lcm", n, beta="animatediff"))
    # DPM++ 2M SDE shares DPM++ 2M's scheduler class and schedule: a few cases suffice.
    cases.append(schedule_case("dpmpp_2m_sde", 6))
    cases.append(schedule_case("dpmpp_2m_sde", 25, karras=True))
    cases.append(schedule_case("dpmpp_2m_sde", 6, strength=0.6, spacing="leading"))
    cases.append(schedule_case("dpmpp_2m_sde", 6, prediction="v_prediction", zero_snr=True))
    for sampler in ("euler", "euler_ancestral", "ddim", "dpmpp_2m", "dpmpp_sde"):
        karras_ok = sampler in ("euler", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde")
        for n in (1, 4, 6, 25):
            for spacing in ("leading", "trailing", "linspace"):
                cases.append(schedule_case(sampler, n, spacing=spacing))
        for n in (4, 6, 25):
            cases.append(schedule_case(sampler, n, strength=0.6))
            if karras_ok:
                cases.append(schedule_case(sampler, n, karras=True))
                cases.append(schedule_case(sampler, n, karras=True, spacing="leading"))
            if sampler != "dpmpp_sde":
                cases.append(schedule_case(sampler, n, prediction="v_prediction", zero_snr=True))
            if n < 25:
                cases.append(schedule_case(sampler, n, beta="animatediff"))
        if karras_ok and sampler != "dpmpp_sde":
            cases.append(schedule_case(sampler, 6, karras=True, prediction="v_prediction", zero_snr=True))
        if karras_ok:
            cases.append(schedule_case(sampler, 25, strength=0.6, karras=True))
        if sampler != "dpmpp_sde":
            cases.append(schedule_case(sampler, 25, strength=0.6, spacing="leading", zero_snr=True,
                                       prediction="v_prediction"))
        # A step count where numpy's arange overshoots with trailing spacing (61 -> 62 timesteps).
        cases.append(schedule_case(sampler, 61, spacing="trailing"))
    return cases


def training_tables():
    """alphas_cumprod at TABLE_INDICES for the variants that differ (diffusers' Euler clamps the
    zero-SNR terminal value to 2**-24; DDIM and LCM keep 0)."""
    tables = []
    for name, sampler, options in (
        ("sdxl", "euler", {}),
        ("animatediff", "euler", {"beta": "animatediff"}),
        ("sdxl_zero_snr_clamped", "euler", {"zero_snr": True, "prediction": "v_prediction"}),
        ("sdxl_zero_snr", "ddim", {"zero_snr": True, "prediction": "v_prediction"}),
        ("animatediff_zero_snr", "lcm", {"zero_snr": True, "prediction": "v_prediction", "beta": "animatediff"}),
    ):
        s = build(sampler, **options)
        tables.append({"name": name, "alphas_cumprod": flat(s.alphas_cumprod[TABLE_INDICES])})
    return tables


# ---- trajectories -------------------------------------------------------------------------------


def model(x, t, dtype):
    """The analytic stand-in for the UNet; the Rust test computes the same in float64 and rounds
    to float32."""
    k = torch.arange(x.numel(), dtype=torch.float64).reshape(x.shape)
    out = 0.1 * x.to(torch.float64) + 0.5 * torch.sin(float(t) / 100.0 + 0.37 * k)
    return out.to(dtype)


class NoisePool:
    """Hands out noise[i] for model evaluation i of the run and records which were used."""

    def __init__(self, pool):
        self.pool = pool
        self.scheduler = None
        self.begin = 0
        self.used = set()

    def take(self):
        i = self.scheduler.step_index - self.begin
        self.used.add(i)
        return self.pool[i].clone()


def trajectory(pool, initial, image, sampler, steps, strength=1.0, dtype=torch.float32, eta=None, **options):
    s, timesteps, begin = set_up(sampler, steps, strength, **options)
    initial, image = initial.to(dtype), image.to(dtype)
    noise = NoisePool(pool)
    noise.scheduler, noise.begin = s, begin

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == LATENT_SHAPE
        return noise.take().to(dtype or torch.float32)

    modules = (scheduling_euler_ancestral_discrete, scheduling_lcm, scheduling_tcd)
    saved = [m.randn_tensor for m in modules]
    for m in modules:
        m.randn_tensor = randn_tensor
    try:
        if strength < 1.0:
            x = s.add_noise(image, initial, timesteps[:1])
        else:
            x = initial * s.init_noise_sigma
        for t in timesteps:
            model_input = s.scale_model_input(x, t)
            m = model(model_input, t, dtype)
            kwargs = {}
            if sampler == "tcd":
                kwargs["eta"] = eta
            if sampler == "dpmpp_2m_sde":
                if s.step_index is None:
                    s._init_step_index(t)
                kwargs["variance_noise"] = noise.take()
            if sampler == "dpmpp_sde":
                if s.step_index is None:
                    s._init_step_index(t)
                s.noise_sampler = lambda sigma, sigma_next: noise.take().to(dtype)
            x = s.step(m, t, x, **kwargs).prev_sample
    finally:
        for m, f in zip(modules, saved):
            m.randn_tensor = f
    assert x.dtype == dtype
    return x, noise.used, len(timesteps)


def trajectory_case(pool, initial, image, sampler, steps, strength=1.0, **options):
    """A run in float32 (as diffusers runs) and the same run with float64 latents and model
    outputs (diffusers' schedulers promote to float64 then; the σ tables stay float32, and
    Euler/DPM round the latent to float32 on entry to each step, which costs far less than
    float32 arithmetic). The float64 run separates our float32 error from diffusers' own: at
    σ_max = 4096 (zero-SNR) diffusers' Euler update x + (x − x̂₀)/σ·(σ' − σ) cancels two values
    of size 4096·|ε| and loses ~1.5e-5 relative in float32; its step scalars stay float32 even
    in the float64 run, and σ' − σ rounded at 4096 (2.4e-4 absolute) still leaves ~6e-6."""
    x, used, evaluations = trajectory(pool, initial, image, sampler, steps, strength, torch.float32, **options)
    x64, used64, _ = trajectory(pool, initial, image, sampler, steps, strength, torch.float64, **options)
    eta = options.pop("eta", None)
    assert used == used64
    return {
        "sampler": sampler,
        "steps": steps,
        "strength": strength,
        "eta": eta,
        "spacing": options.get("spacing", "trailing") if sampler not in ("lcm", "tcd") else None,
        "karras": options.get("karras", False),
        "prediction": options.get("prediction", "epsilon"),
        "zero_snr": options.get("zero_snr", False),
        "beta_schedule": options.get("beta", "sdxl"),
        "evaluations": evaluations,
        "noise_used": sorted(used),
        "final": flat(x),
        "final_f64": flat(x64),
    }


def trajectories(pool, initial, image):
    runs = []
    T = lambda *a, **k: runs.append(trajectory_case(pool, initial, image, *a, **k))  # noqa: E731
    T("lcm", 4)
    T("lcm", 6, prediction="v_prediction", zero_snr=True)
    T("lcm", 4, strength=0.6)
    T("tcd", 4, eta=0.3)
    T("tcd", 6, eta=0.0)
    T("tcd", 4, eta=1.0, prediction="v_prediction", zero_snr=True)
    T("tcd", 4, eta=0.5, strength=0.6)
    T("euler", 6, spacing="leading")
    T("euler", 25, karras=True)
    T("euler", 6, spacing="linspace", beta="animatediff")
    T("euler", 6, prediction="v_prediction", zero_snr=True)
    T("euler_ancestral", 6)
    T("euler_ancestral", 12, spacing="leading", prediction="v_prediction")
    T("euler_ancestral", 6, strength=0.6)
    T("ddim", 6)
    T("ddim", 25, spacing="leading")
    T("ddim", 4, prediction="v_prediction", zero_snr=True)
    T("dpmpp_2m", 6)
    T("dpmpp_2m", 25, karras=True)
    T("dpmpp_2m", 25, spacing="leading", strength=0.6)
    T("dpmpp_2m", 6, prediction="v_prediction", zero_snr=True)
    T("dpmpp_2m_sde", 6)
    T("dpmpp_2m_sde", 12, karras=True)
    T("dpmpp_2m_sde", 6, prediction="v_prediction", zero_snr=True, spacing="linspace")
    T("dpmpp_sde", 6)
    T("dpmpp_sde", 6, karras=True, prediction="v_prediction")
    T("dpmpp_sde", 4, strength=0.6, spacing="leading")
    return runs


def cfg_case():
    gen = torch.Generator().manual_seed(7)
    uncond = torch.randn(2, 4, 4, 4, generator=gen)
    cond = uncond + 0.4 * torch.randn(2, 4, 4, 4, generator=gen)
    scale, rescale = 7.5, 0.7
    # pipeline_stable_diffusion_xl.py, __call__: the guidance line, then rescale_noise_cfg.
    combined = uncond + scale * (cond - uncond)
    rescaled = rescale_noise_cfg(combined, cond, guidance_rescale=rescale)
    return {
        "shape": list(uncond.shape),
        "guidance_scale": scale,
        "guidance_rescale": rescale,
        "uncond": flat(uncond),
        "cond": flat(cond),
        "combined": flat(combined),
        "rescaled": flat(rescaled),
    }


def main():
    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    initial = torch.randn(LATENT_SHAPE)
    image = 0.5 * torch.randn(LATENT_SHAPE)
    pool = torch.randn((12,) + LATENT_SHAPE)
    versions = {"diffusers": diffusers.__version__, "torch": torch.__version__.split("+")[0], "numpy": np.__version__}

    schedules = {
        "generator": "tools/make_schedule_fixtures.py",
        "versions": versions,
        "cases": schedule_cases(),
        "table_indices": TABLE_INDICES,
        "tables": training_tables(),
    }
    runs = trajectories(pool, initial, image)
    pool_used = 1 + max((max(r["noise_used"]) for r in runs if r["noise_used"]), default=-1)
    traj = {
        "generator": "tools/make_schedule_fixtures.py",
        "versions": versions,
        "latent_shape": list(LATENT_SHAPE),
        "initial": flat(initial),
        "image": flat(image),
        "noise": [flat(pool[i]) for i in range(pool_used)],
        "runs": runs,
        "cfg": cfg_case(),
    }
    for name, doc in (("schedules.json", schedules), ("schedules_trajectories.json", traj)):
        path = os.path.join(FIXTURES, name)
        with open(path, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
            f.write("\n")
        print(f"{path}: {os.path.getsize(path)} bytes")
    print(f"{len(schedules['cases'])} schedule cases, {len(runs)} trajectories, noise pool {pool_used}")


if __name__ == "__main__":
    main()
