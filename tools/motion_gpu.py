"""The diffusers side of the full-size motion UNet check, on the GPU machine (tools/motion_gpu.sh).

1. The SDXL 1.0 base UNet with seeded random weights (tools/unet_gpu.py writes it to WORK/sdxl_unet
   unless it is there) and an AnimateDiff-SDXL MotionAdapter at its real shapes
   (tools/make_motion_fixtures.py's SDXL_ADAPTER: the guoyww/AnimateDiff sdxl branch's
   inference.yaml) with every parameter moved off its initial value (diffusers' zero proj_out would
   hide a wrong temporal path), saved to WORK/motion_adapter (fp16, diffusers folder).
2. UNetMotionModel.from_unet2d(unet, adapter) with the add_embedding diffusers 0.42 forgets to
   copy, every non-motion tensor checked equal to the UNet's (make_motion_fixtures.motion_unet).
3. 2 videos x 16 frames at 1024x576 (latents 72x128): random inputs in fp16 (one context per frame,
   as diffusers' AnimateDiff pipelines pass it), references from diffusers in fp16 and in fp32 on the
   same values (WORK/ref_motion_<name>.safetensors), diffusers fp16's own error against fp32.
4. One forward of diffusers' UNetMotionModel (fp16, eager) and, with --compile, torch.compile, as
   PEER lines; and diffusers' plain UNet on the same 32 images for the motion modules' share.
With --weights-only, step 1 alone (the weights `celframe bench` reads, for tools/gpu_steps.sh).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from cuda_timing import cuda_ms  # noqa: E402
from dump_unet_reference import run as run_unet  # noqa: E402
from make_motion_fixtures import SDXL_ADAPTER, motion_unet, random_inputs, randomize, run, save_reference, to  # noqa: E402
from unet_gpu import make_weights, rel_l2  # noqa: E402


def make_adapter(folder):
    from diffusers import MotionAdapter

    if os.path.exists(os.path.join(folder, "config.json")):
        return
    torch.manual_seed(1)
    adapter = MotionAdapter(**SDXL_ADAPTER).eval()
    randomize(adapter, 2)
    adapter.half().save_pretrained(folder, safe_serialization=True)
    print(f"wrote {folder}: {sum(p.numel() for p in adapter.parameters()) / 1e6:.1f}M parameters", flush=True)


def main():
    from diffusers import MotionAdapter, UNet2DConditionModel

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--weights-only", action="store_true", help="write the UNet and the adapter, nothing else")
    args = p.parse_args()
    unet_folder, adapter_folder = os.path.join(args.work, "sdxl_unet"), os.path.join(args.work, "motion_adapter")
    make_weights(unet_folder)
    make_adapter(adapter_folder)
    if args.weights_only:
        return
    videos, frames, h, w = 2, 16, 72, 128
    unet = UNet2DConditionModel.from_pretrained(unet_folder, torch_dtype=torch.float32).eval()
    adapter = MotionAdapter.from_pretrained(adapter_folder, torch_dtype=torch.float32).eval()
    model = motion_unet(unet, adapter).to("cuda")
    x = random_inputs(model, videos, frames, h, w, torch.Generator().manual_seed(3), tokens=77)
    out32 = save_reference(os.path.join(args.work, "ref_motion_f32.safetensors"), model, to(x, "cuda", torch.float32))
    model = model.half()
    x16 = to(x, "cuda", torch.float16)
    out16 = save_reference(os.path.join(args.work, "ref_motion_f16.safetensors"), model, x16)
    err = rel_l2(out16, out32)
    print("MOTIONREF " + json.dumps({"shape": f"{videos}x{frames}x{8 * h}x{8 * w}", "diffusers_f16_vs_f32_rel_l2": err}))

    key = f"motion unet f16 b{videos}x{frames} {8 * h}x{8 * w}"
    ms = cuda_ms(lambda: run(model, x16), 3, 10)
    print("PEER " + json.dumps({"key": key, "variant": "diffusers eager", "ms": round(ms, 3)}), flush=True)
    if args.compile:
        compiled = torch.compile(model)
        ms = cuda_ms(lambda: run(compiled, x16), 3, 10)
        print("PEER " + json.dumps({"key": key, "variant": "diffusers torch.compile", "ms": round(ms, 3)}), flush=True)
    # The same 32 images through the plain UNet: what the motion modules add to diffusers' forward.
    # Keyed as the plain UNet's bench (motion_gpu.sh times ours beside it), not as a variant of the
    # motion UNet's: the report shows the fastest variant of a key, which would not be the peer.
    unet = unet.to("cuda", torch.float16)
    flat = {
        "sample": x16["sample"].permute(0, 2, 1, 3, 4).reshape(videos * frames, 4, h, w),
        "timestep": x16["timestep"].repeat_interleave(frames),
        "encoder_hidden_states": x16["encoder_hidden_states"],
        "added_cond_kwargs.text_embeds": x16["added_cond_kwargs.text_embeds"].repeat_interleave(frames, 0),
        "added_cond_kwargs.time_ids": x16["added_cond_kwargs.time_ids"].repeat_interleave(frames, 0),
    }
    ms = cuda_ms(lambda: run_unet(unet, flat), 3, 10)
    unet_key = f"unet f16 b{videos * frames} {8 * h}x{8 * w}"
    print("PEER " + json.dumps({"key": unet_key, "variant": "diffusers eager, the motion call's plain UNet", "ms": round(ms, 3)}))


if __name__ == "__main__":
    main()
