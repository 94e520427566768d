#!/usr/bin/env python3
"""The diffusers side of the full-size VAE-decoder check, on the GPU machine (tools/vae_gpu.sh runs it).

1. Writes an SDXL VAE (the config of madebyollin/sdxl-vae-fp16-fix) with seeded random weights (fp16,
   diffusers folder) to WORK/sdxl_vae, unless it is there already.
2. Reference files for `celframe verify vae_decoder` (in.z -> out.sample of `decode(z)`, z already
   divided by the scaling factor), on fp16-rounded z:
     ref_untiled_f32: 4 frames at 1024x576, diffusers in fp32;
     ref_tiled_f32:   2 frames at 1024x576 with diffusers' tiling, tiles of 64 latents (512 pixels),
                      overlap 0.25 (2 x 3 tiles), in fp32, the tile sizes in the metadata;
     ref_16f_f16:     16 frames at 1024x576, diffusers in fp16 (the peer timing's shape);
   prints diffusers fp16's own error against fp32 (VAEREF lines), the yardstick for ours.
3. Times diffusers' fp16 decode of 16 frames at 1024x576 (PEER line for tools/report.py).
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from cuda_timing import cuda_ms  # noqa: E402

# vae/config.json of madebyollin/sdxl-vae-fp16-fix.
SDXL_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TILING = {"tile_latent_min_size": 64, "tile_sample_min_size": 512, "tile_overlap_factor": 0.25}


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_weights(folder):
    from diffusers import AutoencoderKL

    if os.path.exists(os.path.join(folder, "config.json")):
        return
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(SDXL_VAE)
    with torch.no_grad():  # norms and biases away from 1 / 0, so no layer is trivially the identity
        for name, p in vae.named_parameters():
            if name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    vae.half().save_pretrained(folder, safe_serialization=True)
    print(f"wrote {folder}: {sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M parameters", flush=True)




def save_reference(path, z, sample, metadata=None):
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    save_file({"in.z": z.contiguous().cpu(), "out.sample": sample.contiguous().cpu()}, path, metadata=meta)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    args = p.parse_args()
    from diffusers import AutoencoderKL

    folder = os.path.join(args.work, "sdxl_vae")
    make_weights(folder)
    vae16 = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float16).to("cuda").eval()
    vae32 = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).to("cuda").eval()
    g = torch.Generator().manual_seed(7)
    sf = SDXL_VAE["scaling_factor"]

    def z_of(frames):
        return (torch.randn(frames, 4, 72, 128, generator=g) / sf).half().cuda()

    with torch.no_grad():
        z = z_of(4)
        ref32 = vae32.decode(z.float()).sample
        ref16 = vae16.decode(z).sample
        save_reference(os.path.join(args.work, "ref_untiled_f32.safetensors"), z.float(), ref32)
        print("VAEREF " + json.dumps({"ref": "untiled 4x1024x576", "diffusers_f16_vs_f32_rel_l2": rel_l2(ref16, ref32)}),
              flush=True)

        z = z_of(2)
        for vae in (vae16, vae32):
            vae.enable_tiling()
            for k, v in TILING.items():
                setattr(vae, k, v)
        ref32 = vae32.decode(z.float()).sample
        ref16 = vae16.decode(z).sample
        for vae in (vae16, vae32):
            vae.disable_tiling()
        save_reference(os.path.join(args.work, "ref_tiled_f32.safetensors"), z.float(), ref32, TILING)
        print("VAEREF " + json.dumps({"ref": "tiled 2x1024x576", "diffusers_f16_vs_f32_rel_l2": rel_l2(ref16, ref32)}),
              flush=True)
        del vae32
        torch.cuda.empty_cache()

        z = z_of(16)
        ref16 = vae16.decode(z).sample
        save_reference(os.path.join(args.work, "ref_16f_f16.safetensors"), z, ref16)
        torch.cuda.reset_peak_memory_stats()
        ms = cuda_ms(lambda: vae16.decode(z), 2, 5)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print("PEER " + json.dumps({"key": "vae decode f16 16x1024x576", "variant": "diffusers eager", "ms": round(ms, 3),
                                    "peak_gib": round(peak, 2)}), flush=True)


if __name__ == "__main__":
    main()
