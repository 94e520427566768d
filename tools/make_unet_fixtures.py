#!/usr/bin/env python3
"""Writes the UNet fixtures under tests/fixtures: two small SDXL-family UNet2DConditionModel configs
with seeded random weights, each as a diffusers folder (unet_<name>/config.json +
diffusion_pytorch_model.safetensors) and a reference file (unet_<name>.reference.safetensors, the
format of tools/dump_unet_reference.py), run by diffusers on the CPU in float32.

  a  SDXL-shaped: 3 levels (DownBlock2D, CrossAttnDownBlock2D x2), 2 layers per block, transformer
     depth [1, 1, 2], linear projections, text_time added embedding, head size 64 everywhere.
     Also: the SGM/LDM single-file name of each of its tensors (unet_a.single_file_names.json,
     checked by diffusers' convert_ldm_unet_checkpoint; the tests build the single file from it),
     and a reference with ControlNet-style additive residuals
     (unet_a.residuals.reference.safetensors).
  b  a different variant read from its config.json: 2 levels, both with attention, 1 layer per block,
     depth [2, 1], 1x1-conv projections, 9 input channels (inpainting-style), 16 norm groups, norm
     eps 1e-6, time embedding width 64, other cross-attention / pooled / time-id widths, sin-first
     sinusoids with freq_shift 1.

Weights: diffusers' init with a seeded generator, then every norm scale/shift and every bias
perturbed so no layer is the identity or zero; all values rounded to float16 (stored as float16 to
keep the files small; the model runs on the same values in float32).

Config a keeps what a single-file checkpoint cannot express at SGM's fixed values (32 norm groups,
norm eps 1e-5, time-id sinusoid width 256, head size 64), so the shape-derived architecture of the
single file is config a's. Every attention has head size 64 (the GPU flash kernel's), which is what
sets the minimum widths and hence the file sizes (about 10 MB in all).

Run: /path/to/python tools/make_unet_fixtures.py   (needs torch, diffusers, safetensors)
"""
import json
import pathlib
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from dump_unet_reference import random_inputs, random_residuals, reference_tensors  # noqa: E402

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures"
TOKENS = 77

CONFIGS = {
    "a": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=[32, 64, 64],
        layers_per_block=2,
        transformer_layers_per_block=[1, 1, 2],
        attention_head_dim=[1, 1, 1],  # head COUNTS (diffusers' misnomer): head size 64
        cross_attention_dim=32,
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=32 + 6 * 256,
    ),
    "b": dict(
        sample_size=16,
        in_channels=9,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=[64, 64],
        layers_per_block=1,
        transformer_layers_per_block=[2, 1],
        attention_head_dim=[1, 1],
        cross_attention_dim=80,
        time_embedding_dim=64,
        norm_num_groups=16,
        norm_eps=1e-6,
        use_linear_projection=False,
        flip_sin_to_cos=False,
        freq_shift=1,
        addition_embed_type="text_time",
        addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=48 + 6 * 32,
    ),
}
LATENT = {"a": (16, 24), "b": (16, 16)}


def randomize(unet, seed):
    """Perturbs norms and biases (diffusers initialises them to 1 / 0) and rounds to float16."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(p + 0.1 * noise)
            elif "norm" in name:  # GroupNorm / LayerNorm scales
                p.copy_(1.0 + 0.25 * noise)
            else:
                p.copy_(p + 0.02 * noise)
            p.copy_(p.half().float())


# SGM/LDM names of the diffusers modules (Stability-AI generative-models `sgm/modules/
# diffusionmodules/openaimodel.py` module names), written out independently of diffusers' converter
# (`loaders/single_file_utils.py`, `convert_ldm_unet_checkpoint`), which then checks them.
RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def ldm_modules(cfg):
    top = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    levels, lpb = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    i = 1
    for b, kind in enumerate(cfg["down_block_types"]):
        for j in range(lpb):
            top[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            if kind.startswith("CrossAttn"):
                top[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if b < levels - 1:
            top[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    i = 0
    for b, kind in enumerate(cfg["up_block_types"]):
        attn = kind.startswith("CrossAttn")
        for j in range(lpb + 1):
            top[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            if attn:
                top[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            if j == lpb and b < levels - 1:
                top[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i}.{2 if attn else 1}.conv"
            i += 1
    return top


def to_ldm(name, modules):
    prefix = max((m for m in modules if name.startswith(m + ".")), key=len)
    rest = name[len(prefix) + 1:]
    if ".resnets." in prefix:
        head, tail = rest.split(".", 1)
        rest = RESNET_LDM[head] + "." + tail
    return "model.diffusion_model." + modules[prefix] + "." + rest


def save_reference(path, tensors):
    """Inputs that were rounded to float16 are stored as float16 (exact; exercises a reader's dtype
    handling and halves the file), the rest (timesteps, time ids, outputs) as float32."""
    stored = {k: v.half() if k in HALF_INPUTS or k.startswith(RESIDUAL_PREFIXES) else v.float()
              for k, v in tensors.items()}
    save_file(stored, str(path), metadata={"generator": "tools/make_unet_fixtures.py", "torch": torch.__version__})


HALF_INPUTS = {"in.sample", "in.encoder_hidden_states", "in.added_cond_kwargs.text_embeds"}
RESIDUAL_PREFIXES = ("in.down_block_additional_residuals.", "in.mid_block_additional_residual")


def make(name, cfg, seed):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg).eval()
    randomize(unet, seed + 1)
    folder = ROOT / f"unet_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder, safe_serialization=True)
    # Store float16 (exact: every value was rounded to float16) and reload to make sure the model we
    # run is the one in the file.
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = {k: v.half() for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    params = sum(v.numel() for v in state.values())

    g = torch.Generator().manual_seed(seed + 2)
    h, w = LATENT[name]
    inputs = random_inputs(unet, 2, h, w, TOKENS, g)
    inputs["timestep"] = torch.tensor([17.0, 743.5])
    for k in inputs:
        if "in." + k in HALF_INPUTS:
            inputs[k] = inputs[k].half().float()
    ref = reference_tensors(unet, inputs)
    save_reference(ROOT / f"unet_{name}.reference.safetensors", ref)
    out = ref["out.sample"]
    print(f"unet_{name}: {params} params, out.sample {list(out.shape)} std {out.std():.3f}")

    if name == "a":
        down, mid = random_residuals(unet, inputs, g)
        residuals = ([r.half().float() for r in down], mid.half().float())
        with_res = reference_tensors(unet, inputs, residuals)
        save_reference(ROOT / "unet_a.residuals.reference.safetensors", with_res)
        change = (with_res["out.sample"] - out).norm() / out.norm()
        print(f"  residuals: {len(down)} down + mid, relative change of the output {change:.3f}")
        write_single_file_names(cfg, state)


def write_single_file_names(cfg, state):
    """The single-file (SGM/LDM) name of every tensor of config a, checked by diffusers' converter.
    The tests assemble the single-file checkpoint from the diffusers weights and this list (a
    stored copy would double the fixtures' size)."""
    modules = ldm_modules(cfg)
    ldm = {to_ldm(k, modules): v for k, v in state.items()}
    # diffusers' own converter must give back exactly the diffusers state dict.
    back = convert_ldm_unet_checkpoint(ldm, cfg)
    assert set(back) == set(state), set(back) ^ set(state)
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    names = dict(sorted((to_ldm(k, modules), k) for k in state))
    path = ROOT / "unet_a.single_file_names.json"
    path.write_text(json.dumps({"ldm_to_diffusers": names}, indent=1) + "\n")
    print(f"  single-file names: {len(names)}, checked by convert_ldm_unet_checkpoint")


def main():
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        make(name, cfg, 20261130 + 10 * i)
    files = sorted(p for p in ROOT.rglob("*") if p.is_file() and "unet" in str(p.relative_to(ROOT)))
    total = sum(p.stat().st_size for p in files)
    for p in files:
        print(f"  {p.relative_to(ROOT)}: {p.stat().st_size / 1e6:.2f} MB")
    print(f"UNet fixtures: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
