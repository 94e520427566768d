#!/usr/bin/env python3
"""The diffusers side of the full-size ControlNet check, on the GPU machine (tools/controlnet_gpu.sh
runs it).

1. Writes a full SDXL ControlNet (the config of diffusers/controlnet-canny-sdxl-1.0, as
   xinsir/thibaud openpose have it: FORMATS 4.1) with seeded random weights to
   WORK/sdxl_controlnet (fp16, diffusers folder), unless it is there. diffusers zero-initialises the
   zero convs and the conditioning embedding's conv_out, which would make every residual a bias:
   they get noise of unit gain instead.
2. For 2 images at 1024x1024 (scale 1) and 32 at 1024x576 (scale 0.8): random inputs in fp16 and a
   control image in [0, 1] at the output size, and two reference files for `celframe verify
   controlnet`: diffusers in fp16 (WORK/ref_controlnet_<h>x<w>_b<batch>_f16.safetensors) and in fp32
   without TF32 on the same fp16 values (..._f32); prints diffusers fp16's own error against fp32
   per residual, the yardstick for ours.
3. Times one forward of diffusers (fp16, eager) at both shapes, and two forwards summed at 32 x
   1024x576 (two separate ControlNets), as PEER lines for tools/report.py.

With --union, instead: a full-size ControlNet Union (controlnet-union-sdxl-1.0's config: FORMATS 4.6,
6 control types, random weights, its zero-initialised parts given noise) in WORK/sdxl_controlnet_union;
fp16 and fp32 references for ONE sample at 1024x1024 with OpenPose + Depth (control_type_idx [0, 1],
scales [1.0, 0.8]: diffusers' token attention mixes a batch's rows, celframe computes each on its
own, so Union references hold one sample); and diffusers' Union timed on 32 x 1024x576 with the same
two conditions (the shape `celframe bench controlnet --conditions 2` times).
"""
import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from cuda_timing import cuda_ms  # noqa: E402
from make_controlnet_fixtures import controlnet_inputs, reference_tensors, run  # noqa: E402
from make_controlnet_union_fixtures import hint  # noqa: E402
from make_controlnet_union_fixtures import reference_tensors as union_reference_tensors  # noqa: E402
from make_controlnet_union_fixtures import run as run_union  # noqa: E402
from unet_gpu import rel_l2  # noqa: E402

# config.json of diffusers/controlnet-canny-sdxl-1.0 (the UNet's encoder hyper-parameters plus the
# conditioning embedding's).
SDXL_CONTROLNET = {
    "_class_name": "ControlNetModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "class_embed_type": None,
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "global_pool_conditions": False,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": [1, 2, 10],
    "upcast_attention": False,
    "use_linear_projection": True,
}
# (batch, latent height, latent width, conditioning_scale)
SHAPES = [(2, 128, 128, 1.0), (32, 72, 128, 0.8)]
# xinsir/controlnet-union-sdxl-1.0's config.json: the SDXL ControlNet's plus the Union's fields
SDXL_UNION = {**SDXL_CONTROLNET, "_class_name": "ControlNetUnionModel", "num_control_type": 6,
              "num_trans_channel": 320, "num_trans_head": 8, "num_trans_layer": 1, "num_proj_channel": 320}
# OpenPose + Depth, the seed setup's pair, with their scales
UNION_TYPES, UNION_SCALES = [0, 1], [1.0, 0.8]


def make_weights(folder, seed=3, union=False):
    """`seed` seeds the init and `seed + 1` the zero convs' noise: other seeds give other nets of
    the same architecture (tools/render_gpu.py's OpenPose and Depth). `union`: a ControlNetUnionModel
    (spatial_ch_projs, zero-initialised too, gets noise of gain 0.3)."""
    from diffusers import ControlNetModel, ControlNetUnionModel

    if os.path.exists(os.path.join(folder, "config.json")):
        return
    t0 = time.time()
    torch.manual_seed(seed)
    with torch.device("cuda"):
        cn = ControlNetUnionModel.from_config(SDXL_UNION) if union else ControlNetModel.from_config(SDXL_CONTROLNET)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            zero = name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out"))
            if zero and p.dim() == 4:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(torch.randn(p.shape, generator=g, device="cuda") / fan_in ** 0.5)
            elif zero:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, device="cuda"))
            elif name.startswith("spatial_ch_projs"):
                scale = 0.3 / p.shape[1] ** 0.5 if p.dim() == 2 else 0.1
                p.copy_(scale * torch.randn(p.shape, generator=g, device="cuda"))
    cn.half().save_pretrained(folder, safe_serialization=True)
    params = sum(p.numel() for p in cn.parameters())
    print(f"wrote {folder}: {params / 1e9:.3f}B parameters in {time.time() - t0:.0f} s", flush=True)


def union_inputs(cn, batch, h, w, g):
    """ControlNetUnionModel.forward's inputs: the UNet's in fp16 and one [0, 1] image per condition."""
    x = controlnet_inputs(cn, batch, h, w, 77, g, torch.float16)
    del x["controlnet_cond"]
    x["controlnet_cond"] = [torch.cat([hint(8 * h, 8 * w, g) for _ in range(batch)]).half() for _ in UNION_TYPES]
    x["control_type"] = torch.zeros(batch, SDXL_UNION["num_control_type"]).scatter_(
        1, torch.tensor([UNION_TYPES] * batch), 1.0)
    x["control_type_idx"] = list(UNION_TYPES)
    return x


def to(x, device, dtype=None):
    """Every tensor of `x` (lists of tensors too) on `device`, floating ones in `dtype` if given."""
    def move(v):
        if not torch.is_tensor(v):
            return [move(u) for u in v] if isinstance(v, list) and v and torch.is_tensor(v[0]) else v
        v = v.to(device)
        return v.to(dtype) if dtype is not None and v.is_floating_point() and v.dtype != torch.float32 else v
    return {k: move(v) for k, v in x.items()}


def main_union(args):
    from diffusers import ControlNetUnionModel

    folder = os.path.join(args.work, "sdxl_controlnet_union")
    make_weights(folder, seed=11, union=True)
    cn16 = ControlNetUnionModel.from_pretrained(folder, torch_dtype=torch.float16).to("cuda").eval()
    if not args.skip_references:
        t0 = time.time()
        x = union_inputs(cn16, 1, 128, 128, torch.Generator().manual_seed(1128))
        down16, mid16 = run_union(cn16, to(x, "cuda"), UNION_SCALES)
        ref16 = union_reference_tensors(x, UNION_SCALES, down16, mid16)
        cn32 = ControlNetUnionModel.from_pretrained(folder, torch_dtype=torch.float32).to("cuda").eval()
        torch.backends.cudnn.allow_tf32 = False
        down32, mid32 = run_union(cn32, to(x, "cuda", torch.float32), UNION_SCALES)
        torch.backends.cudnn.allow_tf32 = True
        ref32 = union_reference_tensors(x, UNION_SCALES, down32, mid32)
        errors = [rel_l2(a, b) for a, b in zip(list(down16) + [mid16], list(down32) + [mid32])]
        for name, t in [("f16", ref16), ("f32", ref32)]:
            save_file(t, os.path.join(args.work, f"ref_controlnet_union_128x128_b1_{name}.safetensors"))
        del cn32, down32, mid32, ref32
        torch.cuda.empty_cache()
        print("CNREF " + json.dumps({"shape": "union b1 1024x1024 openpose+depth",
                                     "diffusers_f16_vs_f32_rel_l2": [round(e, 6) for e in errors],
                                     "seconds": round(time.time() - t0, 1)}), flush=True)
    x = to(union_inputs(cn16, 32, 72, 128, torch.Generator().manual_seed(32072)), "cuda")
    ms = cuda_ms(lambda: run_union(cn16, x, [1.0] * len(UNION_TYPES)), 3, 10)
    key = f"controlnet_union f16 b32 1024x576 {len(UNION_TYPES)} conditions"
    print("PEER " + json.dumps({"key": key, "variant": "diffusers eager", "ms": round(ms, 3)}), flush=True)


def main():
    from diffusers import ControlNetModel

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--skip-references", action="store_true")
    p.add_argument("--union", action="store_true", help="the Union model's weights, references and timing")
    args = p.parse_args()
    if args.union:
        return main_union(args)
    folder = os.path.join(args.work, "sdxl_controlnet")
    make_weights(folder)
    cn16 = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float16).to("cuda").eval()

    inputs = {}
    for batch, h, w, scale in SHAPES:
        g = torch.Generator().manual_seed(batch * 1000 + h)
        x = controlnet_inputs(cn16, batch, h, w, 77, g, torch.float16)
        if scale != 1.0:
            x["conditioning_scale"] = torch.tensor(scale)
        inputs[(batch, h, w)] = x

    if not args.skip_references:
        cn32 = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32).to("cuda").eval()
        for (batch, h, w), x in inputs.items():
            t0 = time.time()
            ref16, out16 = reference_tensors(cn16, x)
            # the same fp16 values in fp32 (timestep and time ids are fp32 already), without TF32
            # (PyTorch's cuDNN convolutions default to it, 10-bit products)
            torch.backends.cudnn.allow_tf32 = False
            ref32, out32 = reference_tensors(cn32, {k: v.float() if v.is_floating_point() else v for k, v in x.items()})
            torch.backends.cudnn.allow_tf32 = True
            errors = [rel_l2(a, b) for a, b in zip(list(out16[0]) + [out16[1]], list(out32[0]) + [out32[1]])]
            del out16, out32
            for name, t in [("f16", ref16), ("f32", ref32)]:
                save_file(t, os.path.join(args.work, f"ref_controlnet_{h}x{w}_b{batch}_{name}.safetensors"))
            del ref16, ref32
            torch.cuda.empty_cache()
            print("CNREF " + json.dumps({"shape": f"b{batch} {8 * h}x{8 * w}",
                                         "diffusers_f16_vs_f32_rel_l2": [round(e, 6) for e in errors],
                                         "seconds": round(time.time() - t0, 1)}), flush=True)
        del cn32
        torch.cuda.empty_cache()

    for (batch, h, w), x in inputs.items():
        key = f"controlnet f16 b{batch} {8 * h}x{8 * w}"
        # tensors on the device beforehand; the scale stays a host value (no sync per call)
        x = {k: v if k == "conditioning_scale" else v.to("cuda") for k, v in x.items()}
        ms = cuda_ms(lambda: run(cn16, x), 3, 10)
        print("PEER " + json.dumps({"key": key, "variant": "diffusers eager", "ms": round(ms, 3)}), flush=True)
        if batch == 32:
            # two separate ControlNets of this architecture, residuals summed (MultiControlNetModel)
            def two():
                d1, m1 = run(cn16, x)
                d2, m2 = run(cn16, x)
                return [a + b for a, b in zip(d1, d2)], m1 + m2
            ms = cuda_ms(two, 3, 10)
            key2 = f"controlnet x2 f16 b{batch} {8 * h}x{8 * w}"
            print("PEER " + json.dumps({"key": key2, "variant": "diffusers eager", "ms": round(ms, 3)}), flush=True)


if __name__ == "__main__":
    main()
