#!/usr/bin/env python3
"""Writes tests/fixtures/windows.json: the context windows and fuse weights of
ComfyUI-AnimateDiff-Evolved and the FreeNoise noise shuffle of diffusers, for the unit tests of
src/pipeline/windows.rs and src/pipeline/noise_init.rs to compare with.

Nothing here reimplements the upstream rules; the script runs the upstream functions themselves:

* AnimateDiff-Evolved `animatediff/context.py` (commit d8d163cd90b1111f6227495e3467633676fbb346).
  The extension is not pip-installable and imports ComfyUI, so pass the file's text, downloaded
  for the occasion and not committed:
      curl -o /tmp/context.py https://raw.githubusercontent.com/Kosinkadink/ComfyUI-AnimateDiff-Evolved/d8d163cd90b1111f6227495e3467633676fbb346/animatediff/context.py
      python tools/make_window_fixtures.py /tmp/context.py
  The modules it imports only for types, sampling glue and drawing (comfy.*, torchvision, its
  sibling modules) are stubbed; the window and weight functions use numpy and torch only.
* diffusers 0.42.1 `pipelines/free_noise_utils.py`, `AnimateDiffFreeNoiseMixin.
  _prepare_latents_free_noise` with noise_type "shuffle_context", called on a stub pipeline. Its
  initial noise is replaced by frame numbers (frame f holds the value f), so the output says which
  noise frame every frame copies; `torch.randperm` is wrapped to record the permutations drawn,
  which the Rust test feeds to its own rule (torch's generator cannot be matched in Rust).

Output, "windows": one case per (schedule, frames, length, overlap, stride, closed_loop) with
`steps` (sampler step counters) and `windows[k]` the windows at steps[k]; "weights": per fuse
method, window and frame count, upstream's weights; "freenoise": per (frames, length, stride) the
permutations drawn and the source noise frame of every output frame.
"""

import json
import os
import sys
import types

import numpy as np
import torch

from diffusers.pipelines import free_noise_utils

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "windows.json")


def load_context_module(path):
    """Executes AnimateDiff-Evolved's context.py with its ComfyUI imports stubbed."""

    def stub(name, **attrs):
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
        return module

    class Placeholder:
        pass

    stub("torchvision", transforms=types.SimpleNamespace())
    stub("comfy")
    stub("comfy.samplers", KSampler=Placeholder)
    stub("comfy.model_base", BaseModel=Placeholder)
    stub("comfy.model_patcher", ModelPatcher=Placeholder)
    package = stub("ade")
    package.__path__ = []
    stub("ade.context_extras", ContextExtrasGroup=Placeholder)
    stub("ade.utils_model", BIGMAX_TENSOR=torch.tensor(9999999.9))
    stub("ade.utils_motion", get_sorted_list_via_attr=lambda items, attr: sorted(items, key=lambda x: getattr(x, attr)))

    context = types.ModuleType("ade.context")
    context.__package__ = "ade"
    with open(path) as f:
        source = f.read()
    exec(compile(source, path, "exec"), context.__dict__)
    return context


def window_cases(ctx):
    schedules = {
        "uniform_looped": ctx.ContextSchedules.UNIFORM_LOOPED,
        "uniform_standard": ctx.ContextSchedules.UNIFORM_STANDARD,
        "static_standard": ctx.ContextSchedules.STATIC_STANDARD,
        "batched": ctx.ContextSchedules.BATCHED,
    }
    # (frames, length, overlap, stride, closed_loop); frames <= length gives one window.
    settings = [
        (48, 16, 4, 1, False),
        (48, 16, 4, 1, True),
        (49, 16, 4, 1, False),
        (37, 16, 0, 1, False),
        (30, 16, 12, 1, False),
        (100, 16, 4, 1, False),
        (64, 16, 4, 3, False),
        (48, 16, 4, 3, False),
        (40, 8, 2, 2, True),
        (17, 16, 4, 1, False),
        (16, 16, 4, 1, False),
        (10, 16, 4, 1, False),
        (25, 1, 0, 1, False),
    ]
    steps = list(range(9)) + [1000, 123456789, 2**63 + 5]
    cases = []
    for name, schedule in schedules.items():
        for frames, length, overlap, stride, closed_loop in settings:
            opts = ctx.ContextOptions(
                context_length=length,
                context_stride=stride,
                context_overlap=overlap,
                context_schedule=schedule,
                closed_loop=closed_loop,
            )
            windows = []
            for step in steps:
                opts.step = step
                windows.append(ctx.get_context_windows(frames, opts))
            cases.append(
                {
                    "schedule": name,
                    "frames": frames,
                    "length": length,
                    "overlap": overlap,
                    "stride": stride,
                    "closed_loop": closed_loop,
                    "steps": [str(s) for s in steps],  # 2**63 + 5 does not fit an f64 exactly
                    "windows": windows,
                }
            )
    return cases


def weight_cases(ctx):
    methods = {
        "flat": ctx.ContextFuseMethod.FLAT,
        "pyramid": ctx.ContextFuseMethod.PYRAMID,
        "overlap_linear": ctx.ContextFuseMethod.OVERLAP_LINEAR,
    }
    # (window, frames, overlap): first, middle, last and whole-clip windows, odd and even lengths.
    windows = [
        (list(range(0, 16)), 48, 4),
        (list(range(12, 28)), 48, 4),
        (list(range(32, 48)), 48, 4),
        (list(range(36, 48)) + list(range(0, 4)), 48, 4),
        (list(range(5, 20)), 40, 3),
        (list(range(0, 10)), 10, 4),
        (list(range(8, 17)), 30, 1),
        (list(range(1, 2)), 3, 1),
    ]
    cases = []
    for name, method in methods.items():
        for window, frames, overlap in windows:
            opts = ctx.ContextOptions(context_length=16, context_overlap=overlap, fuse_method=method)
            weights = ctx.get_context_weights(len(window), frames, window, opts)
            weights = [float(w) for w in (weights.tolist() if torch.is_tensor(weights) else weights)]
            cases.append({"fuse": name, "window": window, "frames": frames, "overlap": overlap, "weights": weights})
    return cases


class FreeNoiseStub:
    vae_scale_factor = 8

    def __init__(self, length, stride):
        self._free_noise_context_length = length
        self._free_noise_context_stride = stride
        self._free_noise_noise_type = "shuffle_context"


def freenoise_cases():
    def frame_numbers(shape, generator=None, device=None, dtype=None):
        return torch.arange(shape[2], dtype=torch.float64).view(1, 1, -1, 1, 1).expand(shape).clone()

    free_noise_utils.randn_tensor = frame_numbers
    randperm = torch.randperm
    cases = []
    for frames, length, stride in [(48, 16, 4), (30, 16, 4), (40, 16, 16), (61, 16, 5), (20, 4, 8), (16, 16, 4), (10, 16, 4)]:
        drawn = []

        def recording_randperm(n, generator=None):
            perm = randperm(n, generator=generator)
            drawn.append(perm.tolist())
            return perm

        torch.randperm = recording_randperm
        generator = torch.Generator().manual_seed(frames * 1000 + stride)
        latents = free_noise_utils.AnimateDiffFreeNoiseMixin._prepare_latents_free_noise(
            FreeNoiseStub(length, stride), 1, 1, frames, 8, 8, torch.float64, torch.device("cpu"), generator
        )
        torch.randperm = randperm
        sources = [int(v) for v in latents[0, 0, :, 0, 0].tolist()]
        cases.append({"frames": frames, "length": length, "stride": stride, "permutations": drawn, "sources": sources})
    return cases


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    ctx = load_context_module(sys.argv[1])
    fixture = {"windows": window_cases(ctx), "weights": weight_cases(ctx), "freenoise": freenoise_cases()}
    with open(OUT, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}: {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
