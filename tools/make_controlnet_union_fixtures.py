#!/usr/bin/env python3
"""Writes the ControlNet Union fixtures under tests/fixtures, run by diffusers' ControlNetUnionModel on
the CPU in float32.

The model: ControlNetUnionModel on the encoder of tests/fixtures/unet_a (the "full" ControlNet of
tools/make_controlnet_fixtures.py: the same encoder tensors and zero convs, from unet_a and
controlnet_a/controlnet_only.safetensors), num_control_type 6 (controlnet-union-sdxl-1.0's),
token blocks 32 wide (num_trans_channel = num_proj_channel = block_out_channels[0], as SDXL's 320),
num_trans_head 8, one block. Its own modules are seeded random, rounded to and stored as float16 in
controlnet_a/union_only.safetensors: task_embedding, transformer_layes.0.*, spatial_ch_projs.*
(diffusers zero-initialises it, which would hide the token path: it gets noise), control_add_embedding.*,
and its own controlnet_cond_embedding.* (randomize_union says why).
controlnet_a/config.union.json: its config.json as diffusers saves it.

References (`celframe verify controlnet`, ControlNetUnionModel.forward argument names, NCHW, ONE sample
each: diffusers' token attention (nn.MultiheadAttention without batch_first) mixes the rows of a
batch, celframe computes each row on its own; with one sample both are the same):
  controlnet_a.union_pose           openpose alone (control_type_idx [0]), conditioning_scale 0.8:
                                    the residuals scaled, as a plain ControlNet's
  controlnet_a.union_pose_depth     openpose + depth ([0, 1]), scales [1.0, 0.6]: the scales inside
                                    the fusion
  controlnet_a.union_pose_depth_b   the same conditions and scales on other inputs (the CPU test runs
                                    both as one batch of 2)
  controlnet_a.union_lineart_depth  lineart then depth ([3, 1], not in type order), scales [0.7, 1.2],
                                    guess_mode, latent 8x12
  controlnet_a.union_multi          hed + normal ([2, 4]) with from_multi (MultiControlNetUnionModel's
                                    call: one scale 0.9 on the residuals)
inputs: in.sample, in.timestep, in.encoder_hidden_states, in.controlnet_cond.<i> ([0, 1] images at 8x
the latent), in.control_type [1, 6] (flags), in.control_type_idx [n] (int64), in.conditioning_scale,
in.guess_mode / in.from_multi (bool, where set), in.added_cond_kwargs.text_embeds / time_ids; outputs:
out.down_block_res_samples.<k> (k = 0..8) and out.mid_block_res_sample.

Printed as well: how much the token path moves the residuals, and how far diffusers' batch of the two
pose_depth samples is from the same samples one per call (the documented difference).

Run: /path/to/python tools/make_controlnet_union_fixtures.py   (needs torch, diffusers, safetensors)
"""
import json
import pathlib
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from dump_unet_reference import random_inputs  # noqa: E402
from make_controlnet_fixtures import EMBEDDING, FOLDER, HALF_INPUTS, OWN, ROOT, TOKENS  # noqa: E402

from diffusers import ControlNetUnionModel, UNet2DConditionModel  # noqa: E402

UNION = ("task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding.")
# The Union's own conditioning embedding (controlnet_only's responds to an image's mean by 1e-4 of
# its output, which would leave the tokens, means of these features, all alike).
HINT = "controlnet_cond_embedding."
STORED = UNION + (HINT,)
TYPES = 6


def randomize_union(cn, seed):
    """The Union's own modules off their initial values, rounded to float16: the conditioning
    embedding's convs He-initialised (so each image's mean features follow its content), its
    conv_out at unit gain; spatial_ch_projs gets
    noise of gain 0.3 (diffusers zero-initialises it), task_embedding is scaled to the size of a
    hint's mean features (diffusers draws it at sqrt(32) x N(0, 1), 60x larger here, which would
    make every token nearly its task vector), every bias a shift, the rest keeps diffusers' init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if not name.startswith(STORED):
                continue
            noise = torch.randn(p.shape, generator=g)
            if name.startswith(HINT) and p.dim() == 4:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(noise * ((1 if ".conv_out." in name else 2) / fan_in) ** 0.5)
            elif name == "spatial_ch_projs.weight":
                p.copy_(0.3 * noise / p.shape[1] ** 0.5)
            elif name == "task_embedding":
                p.copy_(0.02 * p)
            elif name.endswith("bias"):
                p.copy_(p + 0.1 * noise)
            p.copy_(p.half().float())


def union_inputs(cn, h, w, idx, g):
    """ControlNetUnionModel.forward's inputs for one sample: the UNet's (random_inputs) rounded to
    float16 values, one [0, 1] control image per condition, the type flags of `idx`."""
    x = random_inputs(cn, 1, h, w, TOKENS, g)
    x["timestep"] = torch.tensor(float(torch.randint(0, 1000, (1,), generator=g)))
    for k in list(x):
        if "in." + k in HALF_INPUTS:
            x[k] = x[k].half().float()
    f = 2 ** (len(cn.config.conditioning_embedding_out_channels) - 1)
    x["controlnet_cond"] = [hint(f * h, f * w, g) for _ in idx]
    x["control_type"] = torch.zeros(1, TYPES).scatter_(1, torch.tensor([idx]), 1.0)
    x["control_type_idx"] = list(idx)
    return x


def hint(h, w, g):
    """A [1, 3, h, w] control image in [0, 1], float16 values: uniform noise with its own gain and
    offset per channel, so that images differ in their means (the tokens' input), as real hints
    do; plain uniform noise would give every image nearly the same mean."""
    gain, offset = 0.2 + 0.6 * torch.rand(1, 3, 1, 1, generator=g), 0.2 * torch.rand(1, 3, 1, 1, generator=g)
    return (offset + gain * torch.rand(1, 3, h, w, generator=g)).half().float()


def run(cn, x, scale, guess_mode=False, from_multi=False):
    added = {k.split(".", 1)[1]: v for k, v in x.items() if k.startswith("added_cond_kwargs.")}
    with torch.no_grad():
        return cn(x["sample"], x["timestep"], x["encoder_hidden_states"], x["controlnet_cond"], x["control_type"],
                  x["control_type_idx"], conditioning_scale=scale, added_cond_kwargs=added,
                  guess_mode=guess_mode, from_multi=from_multi, return_dict=False)


def reference_tensors(x, scale, down, mid, **flags):
    """A reference file's tensors: the inputs (UNet inputs and images as float16, exact for these
    values; flags float32; types int64), the scales, the flags set, the outputs as computed."""
    t = {}
    for k, v in x.items():
        if k == "controlnet_cond":
            for i, c in enumerate(v):
                t[f"in.controlnet_cond.{i}"] = c.half().cpu()
        elif k == "control_type_idx":
            t["in.control_type_idx"] = torch.tensor(v, dtype=torch.int64)
        elif "in." + k in HALF_INPUTS:
            t[f"in.{k}"] = v.half().cpu()
        else:
            t[f"in.{k}"] = v.float().cpu()
    t["in.conditioning_scale"] = torch.tensor(scale, dtype=torch.float32)
    for flag, on in flags.items():
        if on:
            t[f"in.{flag}"] = torch.tensor(True)
    for k, r in enumerate(down):
        t[f"out.down_block_res_samples.{k}"] = r.contiguous().cpu()
    t["out.mid_block_res_sample"] = mid.contiguous().cpu()
    return t


def save_reference(name, x, scale, down, mid, **flags):
    path = ROOT / f"controlnet_a.{name}.reference.safetensors"
    save_file(reference_tensors(x, scale, down, mid, **flags), str(path),
              metadata={"generator": "tools/make_controlnet_union_fixtures.py", "torch": torch.__version__})
    return path


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_fixtures():
    unet = UNet2DConditionModel.from_pretrained(ROOT / "unet_a", torch_dtype=torch.float32).eval()
    torch.manual_seed(20261220)
    cn = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING).eval()
    # (without `_use_default_values`, which would put the defaults back over these)
    config = {k: v for k, v in cn.config.items() if k != "_use_default_values"}
    cn = ControlNetUnionModel.from_config({**config, "num_control_type": TYPES, "num_trans_channel": 32,
                                           "num_proj_channel": 32, "num_trans_head": 8}).eval()
    # the encoder from unet_a (what from_unet copies), the zero convs from controlnet_a
    state = cn.state_dict()
    unet_state = unet.state_dict()
    own = load_file(str(FOLDER / "controlnet_only.safetensors"))
    load = {}
    for k, v in state.items():
        if k.startswith(STORED):
            continue
        if k.startswith(OWN):
            load[k] = own[k].float()
        else:
            assert unet_state[k].shape == v.shape, k
            load[k] = unet_state[k]
    missing, unexpected = cn.load_state_dict(load, strict=False)
    assert not unexpected and all(k.startswith(STORED) for k in missing), (missing, unexpected)
    listed = json.loads((FOLDER / "names.json").read_text())["full"]["from_unet_a"]
    assert sorted(k for k in state if not k.startswith(OWN + UNION)) == sorted(listed)
    randomize_union(cn, 20261221)
    union = {k: v.half() for k, v in cn.state_dict().items() if k.startswith(STORED)}
    save_file(union, str(FOLDER / "union_only.safetensors"), metadata={"format": "pt"})
    print(f"union_only: {sum(v.numel() for v in union.values())} params in {len(union)} tensors")
    cn.save_config(FOLDER)
    (FOLDER / "config.json").rename(FOLDER / "config.union.json")

    g = torch.Generator().manual_seed(20261222)
    cases = [
        ("union_pose", (8, 8), [0], 0.8, {}),
        ("union_pose_depth", (8, 8), [0, 1], [1.0, 0.6], {}),
        ("union_pose_depth_b", (8, 8), [0, 1], [1.0, 0.6], {}),
        ("union_lineart_depth", (8, 12), [3, 1], [0.7, 1.2], {"guess_mode": True}),
        ("union_multi", (8, 8), [2, 4], 0.9, {"from_multi": True}),
    ]
    kept = {}
    for name, (h, w, ), idx, scale, flags in cases:
        x = union_inputs(cn, h, w, idx, g)
        down, mid = run(cn, x, scale, **flags)
        path = save_reference(name, x, scale, down, mid, **flags)
        kept[name] = (x, down, mid)
        # the token path's share: the same call with spatial_ch_projs zeroed (alpha = 0)
        saved = cn.spatial_ch_projs.weight.detach().clone(), cn.spatial_ch_projs.bias.detach().clone()
        with torch.no_grad():
            cn.spatial_ch_projs.weight.zero_()
            cn.spatial_ch_projs.bias.zero_()
        plain, _ = run(cn, x, scale, **flags)
        with torch.no_grad():
            cn.spatial_ch_projs.weight.copy_(saved[0])
            cn.spatial_ch_projs.bias.copy_(saved[1])
        print(f"  {name}: {len(down)} + mid residuals, {path.stat().st_size / 1e3:.1f} kB; without the token "
              f"offsets residual 0 moves by {rel(plain[0], down[0]):.3f}")

    # diffusers' batch of the two pose_depth samples against one per call
    (a, da, _), (b, db, _) = kept["union_pose_depth"], kept["union_pose_depth_b"]
    both = {k: (torch.cat([a[k], b[k]]) if torch.is_tensor(a[k]) and a[k].dim() > 0 else a[k]) for k in a}
    both["timestep"] = torch.stack([a["timestep"], b["timestep"]])
    both["controlnet_cond"] = [torch.cat([p, q]) for p, q in zip(a["controlnet_cond"], b["controlnet_cond"])]
    down, _ = run(cn, both, [1.0, 0.6])
    print(f"  diffusers, the two pose_depth samples as one batch vs one per call: residual 0 rel L2 "
          f"{rel(down[0][:1], da[0]):.3e} and {rel(down[0][1:], db[0]):.3e} (celframe: each equals its own call)")

    files = [FOLDER / "union_only.safetensors", FOLDER / "config.union.json"]
    files += sorted(ROOT.glob("controlnet_a.union_*.reference.safetensors"))
    print(f"ControlNet Union fixtures: {sum(p.stat().st_size for p in files) / 1e3:.0f} kB")


if __name__ == "__main__":
    make_fixtures()
