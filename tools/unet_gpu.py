#!/usr/bin/env python3
"""The diffusers side of the full-size UNet check, on the GPU machine (tools/unet_gpu.sh runs it).

1. Writes a full SDXL 1.0 base UNet with seeded random weights (fp16, diffusers folder) to
   WORK/sdxl_unet, unless it is there already.
2. For 2 images at 1024x1024 and 2 at 1024x576: random inputs (fp16) and two reference files for
   `celframe verify unet`: diffusers in fp16 (WORK/ref_<h>x<w>_f16.safetensors) and in fp32 on the
   same fp16 values (WORK/ref_<h>x<w>_f32.safetensors); prints diffusers fp16's own error against
   fp32, so our error has a yardstick.
3. Times one forward of diffusers (fp16, eager; with --compile also torch.compile) at batch 2 at
   1024x1024 and batch 32 at 1024x576, as PEER lines for tools/report.py.
"""
import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from cuda_timing import cuda_and_host_ms, cuda_ms  # noqa: E402
from dump_unet_reference import random_inputs, reference_tensors, run  # noqa: E402

# diffusers' unet/config.json of stabilityai/stable-diffusion-xl-base-1.0.
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_weights(folder):
    from diffusers import UNet2DConditionModel

    if os.path.exists(os.path.join(folder, "config.json")):
        return
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(SDXL_UNET)
    unet.half().save_pretrained(folder, safe_serialization=True)
    print(f"wrote {folder}: {sum(p.numel() for p in unet.parameters()) / 1e9:.3f}B parameters", flush=True)




def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    p.add_argument("--skip-references", action="store_true")
    args = p.parse_args()
    from diffusers import UNet2DConditionModel

    folder = os.path.join(args.work, "sdxl_unet")
    make_weights(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float16).to("cuda").eval()

    if not args.skip_references:
        unet32 = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32).to("cuda").eval()
        for h, w in [(128, 128), (72, 128)]:
            g = torch.Generator().manual_seed(h * 1000 + w)
            inputs = random_inputs(unet, 2, h, w, 77, g, torch.float16)
            ref16 = reference_tensors(unet, inputs)
            inputs32 = {k: v.float() for k, v in inputs.items()}
            ref32 = reference_tensors(unet32, inputs32)
            for name, t in [("f16", ref16), ("f32", ref32)]:
                save_file(t, os.path.join(args.work, f"ref_{h}x{w}_{name}.safetensors"))
            err = rel_l2(ref16["out.sample"], ref32["out.sample"])
            print("UNETREF " + json.dumps({"latent": f"{h}x{w}", "diffusers_f16_vs_f32_rel_l2": err}), flush=True)
        del unet32
        torch.cuda.empty_cache()

    for batch, h, w in [(2, 128, 128), (32, 72, 128)]:
        key = f"unet f16 b{batch} {8 * h}x{8 * w}"
        g = torch.Generator().manual_seed(1)
        inputs = random_inputs(unet, batch, h, w, 77, g, torch.float16)
        ms, host_ms = cuda_and_host_ms(lambda: run(unet, inputs), 3, 10)
        peer = {"key": key, "variant": "diffusers eager", "ms": round(ms, 3), "host_ms": round(host_ms, 3)}
        print("PEER " + json.dumps(peer), flush=True)
        if args.compile:
            compiled = torch.compile(unet)
            t0 = time.time()
            ms = cuda_ms(lambda: run(compiled, inputs), 3, 10)
            print(f"# torch.compile of {key}: {time.time() - t0:.0f} s including compilation", flush=True)
            print("PEER " + json.dumps({"key": key, "variant": "diffusers torch.compile", "ms": round(ms, 3)}), flush=True)


if __name__ == "__main__":
    main()
