#!/usr/bin/env python3
"""Writes the Control-LoRA fixtures under tests/fixtures/control_lora, run by diffusers on the CPU
in float32.

A Control-LoRA (stabilityai/control-lora) stores a ControlNet as changes to the base UNet's encoder:
a file marked by a `lora_controlnet` key, in SGM/cldm names (lllyasviel ControlNet `cldm/cldm.py`),
holding full tensors for the ControlNet's own modules (`input_hint_block.*`, `zero_convs.*`,
`middle_block_out.0.*`) and for whatever else it replaces (biases, norms, an embedding), and a pair
`<module>.up` / `<module>.down` for each Linear or Conv2d weight it adapts:
W = W_base + up.flatten(1) @ down.flatten(1), reshaped to W, no alpha (ComfyUI `comfy/controlnet.py`
ControlLora / ControlLoraOps; diffusers `utils/state_dict_utils.py`
`convert_sai_sd_control_lora_state_dict_to_peft`, which gives PEFT lora_alpha = r). PEFT's
shapes: down [r, in] or [r, in, kh, kw], up [out, r] or [out, r, 1, 1].

The Control-LoRA: that layout over tests/fixtures/unet_a's encoder (the tiny UNet of the ControlNet
fixtures, widths 32/64/64, transformer depths [1, 1, 2]), float16. Its ControlNet's own modules are
the ControlNet fixtures' (controlnet_a/controlnet_only.safetensors, conditioning embedding widths
8, 16, 16, 32) under their cldm names (controlnet_a/names.json), so only the rest is stored:
control_lora/encoder.safetensors, seeded random: `lora_controlnet`, every bias and norm of the
encoder and time_embed.0.weight in full (replacing unet_a's, as Stability's files replace every
bias and norm), and up/down pairs of rank 4 to 8 (`LOW_RANK`) on 3x3 convs (conv_in, ResNet convs,
a downsampler), a 1x1 shortcut, the time and label embeddings' Linears, attention projections
(self and cross), proj_in / proj_out and the feed-forward; PEFT's shapes, but for one conv whose
down is flattened to [r, in * kh * kw] (ComfyUI flattens both the same way); time_embed.0 both
replaced in full and adapted (ComfyUI sets the weight, then adds up @ down to it). The tests write
the whole file from the two. Every other encoder tensor comes from unet_a.

control_lora/reference.safetensors (`celframe verify controlnet` names, NCHW): the ControlNet as
ComfyUI builds it: ControlNetModel.from_unet(unet_a), the file's full tensors copied in under their
diffusers names (the cldm map that make_controlnet_fixtures checks with diffusers' converter), each
up @ down added in float32; 1 image at latent 8x8 (control image 64x64), in.conditioning_scale 0-d
0.8. diffusers' own Control-LoRA loader (`ControlNetModel.load_lora_adapter(...,
controlnet_config=...)`, PEFT with lora_alpha = r) is checked against the same construction, with
one difference taken out: diffusers leaves the full weight and bias of an adapted module at the
base's (ComfyUI sets them from the file).

Run: /path/to/python tools/make_control_lora_fixtures.py   (needs torch, diffusers, safetensors)
"""
import pathlib
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_controlnet_fixtures import (  # noqa: E402
    EMBEDDING, TOKENS, cldm_names, controlnet_inputs, reference_tensors, save_fixture_reference, HALF_INPUTS,
)

from diffusers import ControlNetModel, UNet2DConditionModel  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures"
OUT = ROOT / "control_lora"
GENERATOR = "tools/make_control_lora_fixtures.py"
OWN = ("input_hint_block.", "zero_convs.", "middle_block_out.")
# Modules (SGM names) adapted by up/down and their ranks.
LOW_RANK = {
    "input_blocks.0.0": 4,                                   # conv_in, 3x3
    "time_embed.0": 6,                                       # Linear, weight also replaced in full
    "label_emb.0.2": 4,                                      # Linear
    "input_blocks.1.0.in_layers.2": 8,                       # ResNet conv1, 3x3
    "input_blocks.3.0.op": 5,                                # downsampler, 3x3 stride 2
    "input_blocks.4.0.skip_connection": 4,                   # 1x1 shortcut
    "input_blocks.4.0.emb_layers.1": 4,                      # time_emb_proj
    "input_blocks.4.1.proj_in": 6,
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q": 8,
    "input_blocks.4.1.transformer_blocks.0.attn2.to_k": 4,   # cross-attention: in = 32
    "input_blocks.5.1.transformer_blocks.0.attn1.to_out.0": 4,
    "input_blocks.7.1.transformer_blocks.1.ff.net.0.proj": 4,
    "input_blocks.8.1.transformer_blocks.0.ff.net.2": 6,
    "input_blocks.8.1.proj_out": 4,
    "middle_block.0.in_layers.2": 6,
    "middle_block.1.transformer_blocks.1.attn1.to_v": 4,
    "middle_block.2.out_layers.3": 8,                        # flattened down, 4-d up
}
FLATTENED = "middle_block.2.out_layers.3"
# A full weight replacing unet_a's (and adapted too); besides it the file replaces every bias and
# norm of the encoder, as Stability's files do (diffusers' converter expects them: it finds the
# input blocks and the downsamplers by their biases).
REPLACED = ["time_embed.0.weight"]


def from_unet(unet):
    """The ControlNet diffusers copies from `unet` (the ControlNet fixtures' hint widths)."""
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING).eval()


def own_modules(names):
    """The ControlNet's own modules (SGM names): the ControlNet fixtures' (controlnet_only)."""
    own = load_file(str(ROOT / "controlnet_a/controlnet_only.safetensors"))
    return {sgm: own[d] for sgm, d in names.items() if sgm.startswith(OWN)}


def control_lora(cn, names, g):
    """The file's tensors (SGM names -> float16 tensors) but the ControlNet's own modules, from `cn`
    (ControlNetModel.from_unet) and its cldm name map."""
    state = cn.state_dict()
    out = {}
    replaced = REPLACED + [s for s, d in names.items() if not s.startswith(OWN) and state[d].dim() == 1]
    for sgm in replaced:
        p = state[names[sgm]]
        noise = torch.randn(p.shape, generator=g)
        # norm scales near 1 move by a quarter, biases and the weight by 0.1
        out[sgm] = p + (0.25 * noise if sgm.endswith("weight") and p.dim() == 1 else 0.1 * noise)
    for module, r in LOW_RANK.items():
        w = state[names[module + ".weight"]]
        cols = w[0].numel()
        # up @ down about as large as W's own values (~0.02 .. 0.2 here)
        up = torch.randn(w.shape[0], r, generator=g) * (0.5 / r ** 0.5)
        down = torch.randn(r, cols, generator=g) * (0.5 / cols ** 0.5)
        if w.dim() == 4:
            up = up.reshape(w.shape[0], r, 1, 1)
            if module != FLATTENED:
                down = down.reshape(r, *w.shape[1:])
        out[module + ".up"], out[module + ".down"] = up, down
    out = {k: v.half() for k, v in out.items()}
    out["lora_controlnet"] = torch.zeros(1, dtype=torch.float16)
    return out


def apply(cn, names, tensors):
    """ComfyUI's construction on a from_unet copy: full tensors copied, then W += up @ down in f32."""
    state = {k: v.clone() for k, v in cn.state_dict().items()}
    for sgm, v in tensors.items():
        if sgm == "lora_controlnet" or sgm.endswith((".up", ".down")):
            continue
        state[names[sgm]] = v.float()
    for module in (k.removesuffix(".up") for k in tensors if k.endswith(".up")):
        up, down = tensors[module + ".up"].float(), tensors[module + ".down"].float()
        d = names[module + ".weight"]
        state[d] = state[d] + (up.flatten(1) @ down.flatten(1)).reshape(state[d].shape)
    cn.load_state_dict(state)
    return cn


def diffusers_loader(unet, names, tensors, inputs):
    """diffusers' own Control-LoRA path (PEFT) against `apply` on the same tensors with the full
    weights and biases of the adapted modules put back to the base's values (diffusers leaves them
    at the base's where ComfyUI sets them; its converter still needs a downsampler's bias to find
    it), FLATTENED's down in the 4-d shape PEFT requires; returns a line for the log."""
    state = from_unet(unet).state_dict()
    adapted = {f"{m}.{p}" for m in LOW_RANK for p in ("weight", "bias")}
    peft = {k: state[names[k]].half() if k in adapted else v for k, v in tensors.items()}
    w = state[names[FLATTENED + ".weight"]]
    peft[FLATTENED + ".down"] = peft[FLATTENED + ".down"].reshape(-1, *w.shape[1:])
    mine = apply(from_unet(unet), names, peft)
    _, (down, mid) = reference_tensors(mine, inputs)
    path = OUT / "peft_shapes.safetensors"
    save_file(peft, str(path))
    try:
        cn = from_unet(unet)
        cn.load_lora_adapter(str(path), prefix=None, controlnet_config=cn.config)
        _, (d2, m2) = reference_tensors(cn, inputs)
    finally:
        path.unlink()
    errs = [((a - b).norm() / b.norm()).item() for a, b in zip(list(d2) + [m2], list(down) + [mid])]
    assert max(errs) < 1e-5, errs
    return f"diffusers load_lora_adapter vs this construction (adapted modules' full tensors at the base's): " \
           f"worst rel L2 {max(errs):.2e}"


def main():
    unet = UNet2DConditionModel.from_pretrained(ROOT / "unet_a", torch_dtype=torch.float32).eval()
    OUT.mkdir(parents=True, exist_ok=True)
    base = from_unet(unet)
    names = cldm_names(base, unet.config)  # SGM name -> diffusers name, checked by diffusers' converter
    g = torch.Generator().manual_seed(20261220)
    encoder = control_lora(base, names, g)
    save_file(encoder, str(OUT / "encoder.safetensors"), metadata={"generator": GENERATOR})
    tensors = {**own_modules(names), **encoder}
    full = sum(1 for k in tensors if not k.endswith((".up", ".down")) and k != "lora_controlnet")
    print(f"control_lora: {len(tensors)} tensors ({full} full, {len(LOW_RANK)} up/down pairs)")

    cn = apply(from_unet(unet), names, tensors)
    x = controlnet_inputs(cn, 1, 8, 8, TOKENS, torch.Generator().manual_seed(20261221))
    for k in list(x):
        if "in." + k in HALF_INPUTS:
            x[k] = x[k].half().float()
    x["conditioning_scale"] = torch.tensor(0.8)
    ref, (down, mid) = reference_tensors(cn, x)
    path = OUT / "reference.safetensors"
    save_fixture_reference(path, ref)
    # the stored dtypes as the ControlNet fixtures', this script named as the generator
    save_file(load_file(str(path)), str(path), metadata={"generator": GENERATOR, "torch": torch.__version__})
    expected = list(down) + [mid]

    # How much the deltas matter: the same file with the up/down pairs left out.
    plain = {k: v for k, v in tensors.items() if not k.endswith((".up", ".down"))}
    without = apply(from_unet(unet), names, plain)
    _, (d2, m2) = reference_tensors(without, x)
    change = [((a - b).norm() / b.norm()).item() for a, b in zip(list(d2) + [m2], expected)]
    print(f"  residuals without the up/down deltas: rel L2 change {min(change):.3f} .. {max(change):.3f}")
    print("  " + diffusers_loader(unet, names, tensors, x))
    for p in sorted(OUT.iterdir()):
        print(f"  {p.relative_to(ROOT)}: {p.stat().st_size / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
