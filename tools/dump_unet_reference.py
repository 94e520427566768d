#!/usr/bin/env python3
"""Dumps a UNet reference file for `celframe verify unet`: random inputs run through a diffusers
UNet2DConditionModel, saved as safetensors with the inputs under `in.<name>` and the output under
`out.sample` (names of the diffusers forward arguments, nested dicts joined by dots; NCHW layout).

    python3 tools/dump_unet_reference.py --unet path/to/sdxl/unet --out unet_ref.safetensors
    python3 tools/dump_unet_reference.py --unet path/to/sdxl/unet --out ref.safetensors \
        --device cuda --dtype float16 --height 128 --width 128 --batch 2
    celframe verify unet --weights path/to/sdxl/unet --reference unet_ref.safetensors

`--unet` is a diffusers UNet folder (config.json + weights). For a single-file checkpoint pass
`--single-file model.safetensors --config path/to/sdxl/unet` (the folder or repo whose config
describes it). `--residuals` also feeds ControlNet-style additive residuals (random, one per skip
connection plus the mid block) and stores them as `in.down_block_additional_residuals.<k>` and
`in.mid_block_additional_residual`.

Needs torch, diffusers, safetensors. The inputs are stored as computed (dtype of --dtype, except
timestep and time_ids, which are float32 as diffusers computes their sinusoids in float32).
"""
import argparse

import torch
from safetensors.torch import save_file


def random_inputs(unet, batch, height, width, tokens, generator, dtype=torch.float32):
    """Inputs for one forward of `unet` at latent size height x width: a different timestep per
    batch item, SDXL-style time ids (original size, crop, target size in pixels)."""
    cfg = unet.config
    cross = cfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, height, width, generator=generator).to(dtype),
        "timestep": torch.linspace(999.0, 1.0, batch) if batch > 1 else torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(batch, tokens, cross, generator=generator).to(dtype),
    }
    if cfg.addition_embed_type == "text_time":
        time_ids = 6
        pooled = cfg.projection_class_embeddings_input_dim - time_ids * cfg.addition_time_embed_dim
        px = [8 * height, 8 * width]
        ids = [px + [0, 0] + px if b % 2 == 0 else [px[0] + 64, px[1] - 64, 16, 32] + px for b in range(batch)]
        inputs["added_cond_kwargs.text_embeds"] = torch.randn(batch, pooled, generator=generator).to(dtype)
        inputs["added_cond_kwargs.time_ids"] = torch.tensor(ids, dtype=torch.float32)
    return inputs


def random_residuals(unet, inputs, generator, scale=0.5):
    """ControlNet-style residuals with the shapes of the UNet's skip connections and mid block,
    found by hooking one forward pass."""
    shapes = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: shapes.append(o.shape))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, i, o: shapes.extend(r.shape for r in o[1])))
    mid = []
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: mid.append(o.shape)))
    run(unet, inputs)
    for h in hooks:
        h.remove()
    dtype = inputs["sample"].dtype
    down = [torch.randn(s, generator=generator).to(dtype) * scale for s in shapes]
    return down, torch.randn(mid[0], generator=generator).to(dtype) * scale


def run(unet, inputs, residuals=None):
    device = unet.device
    kwargs = {}
    added = {}
    for name, value in inputs.items():
        value = value.to(device)
        if name.startswith("added_cond_kwargs."):
            added[name.split(".", 1)[1]] = value
        else:
            kwargs[name] = value
    if added:
        kwargs["added_cond_kwargs"] = added
    if residuals is not None:
        kwargs["down_block_additional_residuals"] = [r.to(device) for r in residuals[0]]
        kwargs["mid_block_additional_residual"] = residuals[1].to(device)
    with torch.no_grad():
        return unet(**kwargs, return_dict=False)[0]


def reference_tensors(unet, inputs, residuals=None):
    """The reference file's tensors: `in.*` as given, `out.sample` from the forward."""
    tensors = {f"in.{name}": t.contiguous().cpu() for name, t in inputs.items()}
    if residuals is not None:
        for k, r in enumerate(residuals[0]):
            tensors[f"in.down_block_additional_residuals.{k}"] = r.contiguous().cpu()
        tensors["in.mid_block_additional_residual"] = residuals[1].contiguous().cpu()
    tensors["out.sample"] = run(unet, inputs, residuals).contiguous().cpu()
    return tensors


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--unet", help="diffusers UNet folder (config.json + diffusion_pytorch_model*.safetensors)")
    src.add_argument("--single-file", help="single-file checkpoint (model.diffusion_model.* names)")
    p.add_argument("--config", help="with --single-file: folder or repo holding the UNet config")
    p.add_argument("--out", required=True, help="reference file to write (.safetensors)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--height", type=int, default=128, help="latent height (image height / 8)")
    p.add_argument("--width", type=int, default=128, help="latent width (image width / 8)")
    p.add_argument("--tokens", type=int, default=77, help="text tokens (77 per CLIP chunk)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--residuals", action="store_true", help="also feed random ControlNet-style residuals")
    args = p.parse_args()

    from diffusers import UNet2DConditionModel

    dtype = getattr(torch, args.dtype)
    if args.unet:
        unet = UNet2DConditionModel.from_pretrained(args.unet, torch_dtype=dtype)
    else:
        unet = UNet2DConditionModel.from_single_file(args.single_file, config=args.config, torch_dtype=dtype)
    unet = unet.to(args.device).eval()
    g = torch.Generator().manual_seed(args.seed)
    inputs = random_inputs(unet, args.batch, args.height, args.width, args.tokens, g, dtype)
    residuals = random_residuals(unet, inputs, g) if args.residuals else None
    tensors = reference_tensors(unet, inputs, residuals)
    save_file(tensors, args.out, metadata={"generator": "tools/dump_unet_reference.py", "dtype": args.dtype})
    print(f"wrote {args.out}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items()))


if __name__ == "__main__":
    main()
