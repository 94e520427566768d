#!/usr/bin/env python3
"""Writes the VAE-decoder fixtures under tests/fixtures: a tiny AutoencoderKL of the SDXL family
with seeded random weights, run by diffusers on the CPU in float32.

  vae_tiny/config.json + diffusion_pytorch_model.safetensors
      block_out_channels (32, 64), layers_per_block 1 (2 ResNets per up block), 32 norm groups
      (LDM's fixed count, so a single file's shape-derived architecture is this one), 4 latent
      channels, scaling_factor 0.13025, force_upcast false (as the fp16-fix VAE). The file holds
      the encoder too, as a real diffusers VAE does; the decoder ignores it.
  vae_tiny.reference.safetensors
      in.z [3, 4, 8, 12] -> out.sample [3, 3, 16, 24] of `AutoencoderKL.decode(z)`. As in diffusers,
      z is what `decode` takes: latents ALREADY divided by scaling_factor (the pipeline does
      `latents / vae.config.scaling_factor` before calling decode), so `celframe verify` checks
      exactly diffusers' `decode`.
  vae_tiny.tiled.reference.safetensors
      in.z [2, 4, 12, 16] -> out.sample [2, 3, 24, 32] of `decode(z)` with `enable_tiling()` and
      tile_latent_min_size 8, tile_sample_min_size 16, tile_overlap_factor 0.25 (2 x 3 tiles, the
      last column 4 latents wide); those three values are in the file's metadata under the same
      names, which is how a reader knows to decode tiled.
  vae_tiny.single_file.safetensors
      the decoder and post_quant_conv under their LDM/single-file names (`first_stage_model.
      decoder.up.{k}.block.{j}...`, the mid attention's q/k/v/proj_out as 1x1 conv weights
      [64, 64, 1, 1]), plus a few encoder tensors, a UNet tensor and an int64 text-encoder tensor
      that a loader must skip. diffusers' convert_ldm_vae_checkpoint must turn it back into
      exactly the diffusers tensors.

Weights: diffusers' init with a seeded generator, then every norm scale/shift and bias perturbed
so no layer is the identity or zero; all values rounded to float16 and stored as float16 (the
model runs on the same values in float32). About 2.3 MB in all.

Run: /path/to/python tools/make_vae_fixtures.py   (needs torch, diffusers, safetensors)
"""
import json
import pathlib

import torch
from safetensors.torch import load_file, save_file

from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures"
SEED = 20261201

CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=16,
    scaling_factor=0.13025,
    force_upcast=False,
)
TILING = dict(tile_latent_min_size=8, tile_sample_min_size=16, tile_overlap_factor=0.25)


def randomize(vae, seed):
    """Perturbs norms and biases (diffusers initialises them to 1 / 0) and rounds to float16."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(p + 0.1 * noise)
            elif "norm" in name:  # GroupNorm scales
                p.copy_(1.0 + 0.25 * noise)
            else:
                p.copy_(p + 0.02 * noise)
            p.copy_(p.half().float())


# LDM names of the decoder's diffusers modules (Stability-AI generative-models `sgm/modules/
# diffusionmodules/model.py` Decoder), written out independently of diffusers' converter
# (`loaders/single_file_utils.py`, `convert_ldm_vae_checkpoint`), which then checks them.
ATTENTION_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def to_ldm(name, levels):
    parts = name.split(".")
    if parts[0] == "post_quant_conv":
        return name
    rest = ".".join(parts[1:])
    if rest.startswith("mid_block.resnets."):
        j = int(parts[3])
        rest = f"mid.block_{j + 1}." + ".".join(parts[4:])
    elif rest.startswith("mid_block.attentions.0."):
        module = ".".join(parts[4:-1])
        rest = f"mid.attn_1.{ATTENTION_LDM[module]}.{parts[-1]}"
    elif rest.startswith("up_blocks."):
        i = int(parts[2])
        k = levels - 1 - i  # LDM numbers up blocks by resolution; the decoder runs the last first
        if parts[3] == "resnets":
            tail = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
            rest = f"up.{k}.block.{parts[4]}.{tail}"
        else:  # upsamplers.0.conv.*
            rest = f"up.{k}.upsample.conv.{parts[-1]}"
    elif rest.startswith("conv_norm_out."):
        rest = "norm_out." + parts[-1]
    return "decoder." + rest


def write_single_file(state):
    levels = len(CONFIG["block_out_channels"])
    decoder = {k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))}
    ldm = {}
    for k, v in decoder.items():
        name = to_ldm(k, levels)
        if ".mid.attn_1." in name and name.endswith("weight") and v.dim() == 2:
            v = v[:, :, None, None].contiguous()  # LDM's attention projections are 1x1 convolutions
        ldm["first_stage_model." + name] = v
    extra = {"encoder.conv_in.weight", "encoder.conv_in.bias", "quant_conv.weight", "quant_conv.bias"}
    for k in extra:
        ldm["first_stage_model." + k] = state[k]
    # diffusers' own converter must give back exactly the diffusers tensors.
    back = convert_ldm_vae_checkpoint(ldm, CONFIG)
    want = {**decoder, **{k: state[k] for k in extra}}
    assert set(back) == set(want), set(back) ^ set(want)
    for k, v in want.items():
        assert torch.equal(back[k], v), k
    # What else a full SDXL checkpoint holds, which a VAE loader must skip.
    ldm["model.diffusion_model.conv_in.bias"] = torch.zeros(8, dtype=torch.float16)
    ldm["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = ROOT / "vae_tiny.single_file.safetensors"
    save_file(ldm, str(path), metadata={"generator": "tools/make_vae_fixtures.py"})
    print(f"  single file: {len(decoder)} decoder tensors under LDM names, checked by convert_ldm_vae_checkpoint")


def save_reference(path, z, sample, metadata=None):
    meta = {"generator": "tools/make_vae_fixtures.py", "torch": torch.__version__}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    save_file({"in.z": z.float().contiguous(), "out.sample": sample.float().contiguous()}, str(path), metadata=meta)


def main():
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**CONFIG).eval()
    randomize(vae, SEED + 1)
    folder = ROOT / "vae_tiny"
    folder.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(folder, safe_serialization=True)
    # Store float16 (exact: every value was rounded to float16) and reload, so the model we run is
    # the one in the file.
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = {k: v.half() for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()
    params = sum(v.numel() for v in state.values())
    decoder_params = sum(v.numel() for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv.")))

    g = torch.Generator().manual_seed(SEED + 2)
    sf = vae.config.scaling_factor
    with torch.no_grad():
        # z as the pipeline hands it to decode: unit-variance latents divided by the scaling factor.
        z = torch.randn(3, 4, 8, 12, generator=g) / sf
        out = vae.decode(z).sample
        save_reference(ROOT / "vae_tiny.reference.safetensors", z, out)
        print(f"vae_tiny: {params} params ({decoder_params} decoder), out.sample {list(out.shape)} "
              f"std {out.std():.3f}")

        z = torch.randn(2, 4, 12, 16, generator=g) / sf
        vae.enable_tiling()
        for k, v in TILING.items():
            setattr(vae, k, v)
        tiled = vae.decode(z).sample
        vae.disable_tiling()
        untiled = vae.decode(z).sample
        change = (tiled - untiled).norm() / untiled.norm()
        save_reference(ROOT / "vae_tiny.tiled.reference.safetensors", z, tiled, TILING)
        print(f"  tiled: out.sample {list(tiled.shape)}, relative difference to the untiled decode {change:.3f}")

    write_single_file(state)
    files = sorted(p for p in ROOT.rglob("*") if p.is_file() and "vae_tiny" in str(p.relative_to(ROOT)))
    for p in files:
        print(f"  {p.relative_to(ROOT)}: {p.stat().st_size / 1e6:.3f} MB")
    print(f"VAE fixtures: {sum(p.stat().st_size for p in files) / 1e6:.2f} MB")
    json.loads((folder / "config.json").read_text())  # written by diffusers; must stay valid JSON


if __name__ == "__main__":
    main()
