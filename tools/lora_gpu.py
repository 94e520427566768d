#!/usr/bin/env python3
"""The diffusers side of the full-size LoRA check, on the GPU machine (tools/lora_gpu.sh runs it).

1. The SDXL UNet with seeded random weights (tools/unet_gpu.py writes WORK/sdxl_unet unless it is
   there).
2. LoRA files at the real shapes, factors seeded and scaled per layer so that each delta is a
   fifth of its weight's spread (random factors of a fixed size would swamp some layers and vanish
   in others):
   - kohya_r64: kohya SGM names (`lora_unet_input_blocks_4_1_...`, as sd-scripts writes SDXL LoRAs),
     rank 64, alpha 32, on every transformer linear and (LoCon) every ResNet convolution;
   - the seed's two sets for `bench lora`: style_a1..3 and style_b1..3 (kohya SGM names, ranks 32,
     64 and 128, transformer linears, and with --text-work both text encoders' attention and MLP
     linears, whose random weights tools/text_encoder_gpu.py writes there) and lcm (kohya
     diffusers paths, rank 64, the LCM-LoRA's targets: transformer linears, ResNet convolutions
     and time projections, samplers; no text encoder, as the LCM-LoRA).
3. References for `celframe verify unet --lora kohya_r64.safetensors:0.8`: diffusers'
   `lora_state_dict` + `load_lora_into_unet` + `fuse_lora(lora_scale=0.8)` on the UNet, then its
   forward on 2 images at 1024x1024 in fp16 (WORK/ref_lora_f16.safetensors) and in fp32 on the same
   fp16 inputs (WORK/ref_lora_f32.safetensors); prints diffusers fp16's own error against fp32 and
   how far the LoRA moves the output.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from dump_unet_reference import random_inputs, reference_tensors  # noqa: E402
from make_lora_fixtures import LCM_KINDS, LOCON_KINDS, TRANSFORMER_LINEARS, ends_with_any, factors, kohya_file, sgm_module  # noqa: E402
from make_unet_fixtures import ldm_modules  # noqa: E402
from unet_gpu import SDXL_UNET, make_weights, rel_l2  # noqa: E402

# The kohya text-encoder LoRA targets (sd-scripts `networks/lora.py`: CLIPAttention and CLIPMLP).
TEXT_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def scaled_factors(rank, alpha):
    """Factors whose delta (alpha / rank) · up · down has a fifth of the weight's standard deviation:
    with both factors N(0, s²) its entries have std (alpha / rank) · sqrt(rank) · s²."""
    def make(weight, g):
        s = (0.2 * weight.float().std().item() * rank ** 0.5 / alpha) ** 0.5
        return factors(weight.shape, weight.shape[1:], g, rank=rank, std=s)
    return make


def write_loras(work, unet_sd, text_sds):
    """`text_sds`: [(kohya prefix, state dict with `text_model.` names)] of the text encoders, or []."""
    modules = ldm_modules(SDXL_UNET)
    sgm = lambda m: sgm_module(m, modules)  # noqa: E731
    g = torch.Generator().manual_seed(21)
    files = {
        "kohya_r64": (TRANSFORMER_LINEARS + LOCON_KINDS, sgm, 64, False),
        "lcm": (LCM_KINDS, lambda m: m, 64, False),
    }
    for set_name in ("a", "b"):
        for k, rank in enumerate((32, 64, 128), 1):
            files[f"style_{set_name}{k}"] = (TRANSFORMER_LINEARS, sgm, rank, True)
    for name, (kinds, path_of, rank, text) in files.items():
        path = os.path.join(work, f"{name}.safetensors")
        if os.path.exists(path):
            continue
        alpha = rank // 2
        make = scaled_factors(rank, alpha)
        sd = kohya_file(unet_sd, ends_with_any(kinds), path_of, "lora_unet_", alpha, g, make)
        for prefix, text_sd in text_sds if text else []:
            sd.update(kohya_file(text_sd, ends_with_any(TEXT_LINEARS), lambda m: m, prefix, alpha, g, make))
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
        print(f"wrote {path}: {sum(v.numel() for v in sd.values()) / 1e6:.1f}M values", flush=True)


def text_state_dicts(text_work):
    """Both text encoders' weights (tools/text_encoder_gpu.py writes them unless they are there)."""
    from text_encoder_gpu import make_weights as make_text_encoders
    from text_encoder_gpu import model_class

    make_text_encoders(text_work)
    out = []
    for name, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        model = model_class(name).from_pretrained(os.path.join(text_work, name), torch_dtype=torch.float16)
        out.append((prefix, {f"text_model.{k.removeprefix('text_model.')}": v for k, v in model.state_dict().items()}))
    return out


def fused_unet(folder, lora, weight, dtype):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).to("cuda").eval()
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(lora, unet_config=unet.config)
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name="lora")
    unet.fuse_lora(lora_scale=weight)
    unet.unload_lora()  # the fused weights stay
    return unet


def main():
    from diffusers import UNet2DConditionModel

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--text-work", help="where the text encoders' weights are (or go): their LoRA parts too")
    args = p.parse_args()
    folder = os.path.join(args.work, "sdxl_unet")
    make_weights(folder)
    base = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float16).to("cuda").eval()
    texts = text_state_dicts(args.text_work) if args.text_work else []
    write_loras(args.work, {k: v.cpu() for k, v in base.state_dict().items()}, texts)
    del texts
    lora, weight = os.path.join(args.work, "kohya_r64.safetensors"), 0.8
    g = torch.Generator().manual_seed(128128)
    inputs = random_inputs(base, 2, 128, 128, 77, g, torch.float16)
    plain = reference_tensors(base, inputs)["out.sample"]
    del base
    refs = {}
    for name, dtype in (("f16", torch.float16), ("f32", torch.float32)):
        unet = fused_unet(folder, lora, weight, dtype)
        x = inputs if dtype == torch.float16 else {k: v.float() for k, v in inputs.items()}
        refs[name] = reference_tensors(unet, x)
        save_file(refs[name], os.path.join(args.work, f"ref_lora_{name}.safetensors"))
        del unet
        torch.cuda.empty_cache()
    print("LORAREF " + json.dumps({
        "diffusers_f16_vs_f32_rel_l2": rel_l2(refs["f16"]["out.sample"], refs["f32"]["out.sample"]),
        "lora_moves_output_rel_l2": rel_l2(refs["f32"]["out.sample"], plain.float()),
    }), flush=True)


if __name__ == "__main__":
    main()
