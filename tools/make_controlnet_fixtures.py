#!/usr/bin/env python3
"""Writes the ControlNet fixtures under tests/fixtures, run by diffusers on the CPU in float32.

Three SDXL-style ControlNetModels on the encoder of tests/fixtures/unet_a (widths 32/64/64, text_time,
head size 64), as diffusers builds the SDXL variants:
  full   ControlNetModel.from_unet(unet_a): the UNet's encoder config, transformer depths [1, 1, 2]
         (mid block 2);
  mid    the same class with transformer_layers_per_block [0, 0, 1]: level 1 keeps its
         CrossAttnDownBlock2D but its Transformer2DModels have no blocks (GroupNorm, proj_in,
         proj_out, residual), level 2 and the mid block one block each (diffusers/controlnet-*-sdxl-1.0-mid:
         `down_blocks.1.attentions.0.norm.weight` without transformer blocks);
  small  down_block_types DownBlock2D x 3 and transformer_layers_per_block 0: no attention in the
         down path, a mid block whose transformer has no blocks (diffusers/controlnet-*-sdxl-1.0-small:
         no `down_blocks.1.attentions`).
All three use conditioning_embedding_out_channels (8, 16, 16, 32) (four stages as SDXL's
(16, 32, 96, 256), narrower to keep the files small).

Weights: every encoder tensor is unet_a's (what `from_unet` copies, and the same tensors for the
variants, whose encoder tensors are a subset of the UNet's), so only the ControlNet's own modules
are stored: controlnet_a/controlnet_only.safetensors holds the conditioning embedding and the zero
convs (shared by the variants: their shapes depend only on the skip connections), seeded random
(diffusers zero-initialises the zero convs and the embedding's conv_out, which would make every
residual a bias: they get noise), rounded to and stored as float16.
controlnet_a/names.json lists, per variant, the unet_a tensors its state dict holds (the keys of
diffusers' own ControlNetModel, not a list our loader made), and for full and mid the SGM/cldm name
of every tensor (lllyasviel ControlNet `cldm/cldm.py` module names, written out here and checked
by diffusers' `convert_controlnet_checkpoint`, which leaves `label_emb` out: checked against
`DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]`). The tests assemble the
folders and single files from these.
controlnet_a/config.<variant>.json: each variant's config.json as diffusers saves it.

References (`celframe verify controlnet`, diffusers ControlNetModel.forward argument names, NCHW):
  controlnet_a.full.reference.safetensors   2 images, latent 8x12 (control image 64x96),
                                            in.conditioning_scale [1] = 0.75
  controlnet_a.mid.reference.safetensors    2 images at 8x8, no in.conditioning_scale (default 1)
  controlnet_a.small.reference.safetensors  1 image at 8x8, in.conditioning_scale 0-d 1.3
  controlnet_a.guess.reference.safetensors  full, 2 images at 8x8, in.guess_mode (bool) true,
                                            in.conditioning_scale 0-d 0.5
inputs: in.sample, in.timestep, in.encoder_hidden_states, in.controlnet_cond ([0, 1] image at 8x the
latent), in.added_cond_kwargs.text_embeds / time_ids; outputs: out.down_block_res_samples.<k>
(k = 0..8) and out.mid_block_res_sample.
  controlnet_a.full.unet_sample.safetensors out.sample of unet_a on the full reference's inputs with
                                            the full ControlNet's residuals (diffusers'
                                            down_block_additional_residuals / mid_block_additional_residual).

Run: /path/to/python tools/make_controlnet_fixtures.py   (needs torch, diffusers, safetensors)

Full-size references (the same format) for `celframe verify controlnet` on the GPU machine
(tools/controlnet_gpu.py uses these functions).
"""
import json
import pathlib
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from dump_unet_reference import random_inputs  # noqa: E402
from make_unet_fixtures import ldm_modules, to_ldm  # noqa: E402

from diffusers import ControlNetModel, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures"
FOLDER = ROOT / "controlnet_a"
EMBEDDING = (8, 16, 16, 32)
VARIANTS = {
    "full": {},
    "mid": {"transformer_layers_per_block": [0, 0, 1]},
    "small": {"down_block_types": ["DownBlock2D"] * 3, "transformer_layers_per_block": 0},
}
OWN = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
TOKENS = 7
HALF_INPUTS = ("in.sample", "in.encoder_hidden_states", "in.controlnet_cond", "in.added_cond_kwargs.text_embeds")


def randomize_own(cn, seed):
    """The ControlNet's own modules off their initial values: zero convs and conv_out get noise of
    roughly unit gain, the other embedding convs perturbed, biases shifted; rounded to float16."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if not name.startswith(OWN):
                continue
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(p + 0.1 * noise)
            elif p.dim() == 4 and (name.startswith(("controlnet_down_blocks", "controlnet_mid_block")) or ".conv_out." in name):
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(noise / fan_in ** 0.5)
            else:
                p.copy_(p + 0.02 * noise)
            p.copy_(p.half().float())


def controlnet_inputs(cn, batch, h, w, tokens, g, dtype=torch.float32):
    """ControlNetModel.forward's inputs: the UNet's (dump_unet_reference.random_inputs) and a control
    image in [0, 1] at 2^(stages - 1) times the latent size."""
    inputs = random_inputs(cn, batch, h, w, tokens, g, dtype)
    f = 2 ** (len(cn.config.conditioning_embedding_out_channels) - 1)
    c = cn.config.conditioning_channels
    inputs["controlnet_cond"] = torch.rand(batch, c, f * h, f * w, generator=g).to(dtype)
    return inputs


def run(cn, inputs):
    """(down residuals, mid residual) of one forward; `conditioning_scale` and `guess_mode` in
    `inputs` are passed as the Python values diffusers takes."""
    kwargs, added = {}, {}
    for name, value in inputs.items():
        if name.startswith("added_cond_kwargs."):
            added[name.split(".", 1)[1]] = value.to(cn.device)
        elif name == "conditioning_scale":
            kwargs[name] = float(value)
        elif name == "guess_mode":
            kwargs[name] = bool(value)
        else:
            kwargs[name] = value.to(cn.device)
    with torch.no_grad():
        return cn(**kwargs, added_cond_kwargs=added, return_dict=False)


def reference_tensors(cn, inputs):
    """The reference file's tensors: `in.*` as given, the outputs under ControlNetOutput's names."""
    down, mid = run(cn, inputs)
    tensors = {f"in.{k}": v.contiguous().cpu() for k, v in inputs.items()}
    for k, r in enumerate(down):
        tensors[f"out.down_block_res_samples.{k}"] = r.contiguous().cpu()
    tensors["out.mid_block_res_sample"] = mid.contiguous().cpu()
    return tensors, (down, mid)


def save_fixture_reference(path, tensors):
    """Inputs rounded to float16 stored as float16 (exact), the rest as float32; flags as stored."""
    stored = {}
    for k, v in tensors.items():
        if k in HALF_INPUTS:
            stored[k] = v.half()
        elif v.dtype == torch.bool:
            stored[k] = v
        else:
            stored[k] = v.float()
    save_file(stored, str(path), metadata={"generator": "tools/make_controlnet_fixtures.py", "torch": torch.__version__})


def cldm_names(cn, unet_cfg):
    """The SGM/cldm name of every tensor of `cn` (below `control_model.`): the UNet's single-file
    names for the encoder (make_unet_fixtures.ldm_modules), and input_hint_block (convs at even
    Sequential indices), zero_convs.<k>.0, middle_block_out.0 for the ControlNet's own modules."""
    cfg = dict(unet_cfg)
    cfg["down_block_types"] = list(cn.config.down_block_types)
    modules = ldm_modules(cfg)
    stages = len(cn.config.conditioning_embedding_out_channels)
    names = {}
    for k in cn.state_dict():
        if k.startswith("controlnet_cond_embedding."):
            parts = k.split(".")
            if parts[1] == "blocks":  # blocks.<b> -> 2b + 2 (conv_in is 0, SiLUs sit at odd indices)
                index, rest = 2 * int(parts[2]) + 2, ".".join(parts[3:])
            else:
                index, rest = (0 if parts[1] == "conv_in" else 2 * (2 * stages - 1)), ".".join(parts[2:])
            names[f"input_hint_block.{index}.{rest}"] = k
        elif k.startswith("controlnet_down_blocks."):
            _, i, rest = k.split(".", 2)
            names[f"zero_convs.{i}.0.{rest}"] = k
        elif k.startswith("controlnet_mid_block."):
            names[f"middle_block_out.0.{k.split('.', 1)[1]}"] = k
        else:
            names[to_ldm(k, modules).removeprefix("model.diffusion_model.")] = k
    # diffusers' converter must give back the same state dict (all but label_emb, which it skips)
    state = cn.state_dict()
    cldm = {o: state[d] for o, d in names.items()}
    back = convert_controlnet_checkpoint(cldm, {"layers_per_block": cn.config.layers_per_block})
    skipped = set(state) - set(back)
    label = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]
    assert skipped == set(label), skipped
    for d, o in label.items():
        assert names[o] == d, (o, d)
    for k, v in back.items():
        assert torch.equal(v, state[k]), k
    return dict(sorted(names.items()))


def make_fixtures():
    unet = UNet2DConditionModel.from_pretrained(ROOT / "unet_a", torch_dtype=torch.float32).eval()
    unet_state = unet.state_dict()
    FOLDER.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(20261210)
    full = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING).eval()
    randomize_own(full, 20261211)
    own = {k: v.half() for k, v in full.state_dict().items() if k.startswith(OWN)}
    save_file(own, str(FOLDER / "controlnet_only.safetensors"), metadata={"format": "pt"})
    print(f"controlnet_only: {sum(v.numel() for v in own.values())} params in {len(own)} tensors")

    models, listing = {}, {}
    for name, change in VARIANTS.items():
        cn = ControlNetModel.from_config({**dict(full.config), **change}).eval()
        state = cn.state_dict()
        # the encoder from unet_a, the own modules from the shared file: every key accounted for
        from_unet = sorted(k for k in state if not k.startswith(OWN))
        for k in from_unet:
            assert k in unet_state and unet_state[k].shape == state[k].shape, k
        cn.load_state_dict({**{k: unet_state[k] for k in from_unet}, **{k: v.float() for k, v in own.items()}})
        cn.save_config(FOLDER)
        (FOLDER / "config.json").rename(FOLDER / f"config.{name}.json")
        listing[name] = {"from_unet_a": from_unet}
        if name in ("full", "mid"):
            listing[name]["cldm_to_diffusers"] = cldm_names(cn, unet.config)
        models[name] = cn
        params = sum(v.numel() for v in state.values())
        print(f"  {name}: {params} params, {len(state)} tensors ({len(from_unet)} from unet_a)")
    (FOLDER / "names.json").write_text(json.dumps(listing, indent=1) + "\n")

    g = torch.Generator().manual_seed(20261212)

    def inputs_for(cn, batch, h, w):
        x = controlnet_inputs(cn, batch, h, w, TOKENS, g)
        if batch == 2:
            x["timestep"] = torch.tensor([17.0, 743.5])
        for k in list(x):
            if "in." + k in HALF_INPUTS:
                x[k] = x[k].half().float()
        return x

    cases = [
        ("full", "full", 2, (8, 12), {"conditioning_scale": torch.tensor([0.75])}),
        ("mid", "mid", 2, (8, 8), {}),
        ("small", "small", 1, (8, 8), {"conditioning_scale": torch.tensor(1.3)}),
        ("guess", "full", 2, (8, 8), {"conditioning_scale": torch.tensor(0.5), "guess_mode": torch.tensor(True)}),
    ]
    for ref, variant, batch, (h, w), extra in cases:
        cn = models[variant]
        x = {**inputs_for(cn, batch, h, w), **extra}
        tensors, (down, mid) = reference_tensors(cn, x)
        save_fixture_reference(ROOT / f"controlnet_a.{ref}.reference.safetensors", tensors)
        norms = [f"{r.norm() / r.numel() ** 0.5:.2f}" for r in list(down) + [mid]]
        print(f"  {ref}: {len(down)} down + mid residuals, rms {' '.join(norms)}")
        if ref == "guess":
            plain, _ = run(cn, {**x, "guess_mode": torch.tensor(False)})
            ratios = [f"{(a.norm() / b.norm()).item():.4f}" for a, b in zip(down, plain)]
            print(f"    guess / plain per down residual: {' '.join(ratios)}")
        if ref == "full":
            # the UNet with these residuals: what a render step computes
            added = {k.split(".", 1)[1]: v for k, v in x.items() if k.startswith("added_cond_kwargs.")}
            with torch.no_grad():
                args = (x["sample"], x["timestep"], x["encoder_hidden_states"])
                out = unet(*args, added_cond_kwargs=added, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid).sample
                plain = unet(*args, added_cond_kwargs=added).sample
            save_file({"out.sample": out.contiguous()}, str(ROOT / "controlnet_a.full.unet_sample.safetensors"),
                      metadata={"generator": "tools/make_controlnet_fixtures.py"})
            print(f"    unet_a + residuals: relative change of out.sample {(out - plain).norm() / plain.norm():.3f}")

    files = sorted(p for p in ROOT.rglob("*") if p.is_file() and p.relative_to(ROOT).parts[0].startswith("controlnet_"))
    for p in files:
        print(f"  {p.relative_to(ROOT)}: {p.stat().st_size / 1e3:.1f} kB")
    print(f"ControlNet fixtures: {sum(p.stat().st_size for p in files) / 1e3:.0f} kB")


if __name__ == "__main__":
    make_fixtures()
