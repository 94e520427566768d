#!/usr/bin/env python3
"""The transformers side of the full-size text-encoder check, on the GPU machine
(tools/text_encoder_gpu.sh runs it).

1. Writes SDXL's two text encoders with seeded random weights (fp16, transformers folders) to
   WORK/text_encoder (CLIP ViT-L/14, CLIPTextModel) and WORK/text_encoder_2 (OpenCLIP ViT-bigG/14,
   CLIPTextModelWithProjection), unless they are there already.
2. For a CFG pair of 77-token prompts: reference files for `celframe verify text_encoder|
   text_encoder_2` from transformers in fp16 and in fp32 (WORK/ref_<encoder>_<dtype>.safetensors:
   in.input_ids, out.hidden_states.<penultimate>, out.last_hidden_state, and out.pooler_output or
   out.text_embeds); prints transformers fp16's own error against fp32.
3. Times both encoders' fp16 forward on that pair (CUDA events) as a PEER line.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from cuda_timing import cuda_and_host_ms  # noqa: E402

# The configs of stabilityai/stable-diffusion-xl-base-1.0 text_encoder/ and text_encoder_2/.
COMMON = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
              pad_token_id=1)
ENCODERS = {
    "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         hidden_act="quick_gelu", projection_dim=768, **COMMON),
    "text_encoder_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           hidden_act="gelu", projection_dim=1280, **COMMON),
}


def model_class(name):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection


def make_weights(work):
    from transformers import CLIPTextConfig

    for name, cfg in ENCODERS.items():
        folder = os.path.join(work, name)
        if os.path.exists(os.path.join(folder, "config.json")):
            continue
        torch.manual_seed(len(name))
        with torch.device("cuda"):
            model = model_class(name)(CLIPTextConfig(**cfg))
        model.half().save_pretrained(folder, safe_serialization=True)


def prompt_ids(batch=2, seed=0):
    """BOS, some random word ids, EOS, then EOS padding (CLIP-L's pad; the pooled row is the first
    EOS, which argmax finds since EOS is the largest id)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, 77), 49407, dtype=torch.int64)
    for b, length in enumerate([20, 60][:batch]):
        ids[b, 0] = 49406
        ids[b, 1:1 + length] = torch.randint(256, 49406, (length,), generator=g)
    return ids


def outputs(name, model, ids):
    with torch.no_grad():
        out = model(input_ids=ids.to("cuda"), output_hidden_states=True)
    layers = ENCODERS[name]["num_hidden_layers"]
    tensors = {
        f"out.hidden_states.{layers - 1}": out.hidden_states[layers - 1],
        "out.last_hidden_state": out.last_hidden_state,
    }
    if name == "text_encoder":
        tensors["out.pooler_output"] = out.pooler_output
    else:
        tensors["out.text_embeds"] = out.text_embeds
    return {k: v.float().contiguous().cpu() for k, v in tensors.items()}


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    args = p.parse_args()
    make_weights(args.work)
    ids = prompt_ids()
    models = {}
    for name in ENCODERS:
        folder = os.path.join(args.work, name)
        m16 = model_class(name).from_pretrained(folder, torch_dtype=torch.float16).to("cuda").eval()
        m32 = model_class(name).from_pretrained(folder, torch_dtype=torch.float32).to("cuda").eval()
        ref16, ref32 = outputs(name, m16, ids), outputs(name, m32, ids)
        for dtype, ref in [("f16", ref16), ("f32", ref32)]:
            save_file({"in.input_ids": ids, **ref}, os.path.join(args.work, f"ref_{name}_{dtype}.safetensors"))
        errs = {k: rel_l2(ref16[k], ref32[k]) for k in ref16}
        print("TEXTREF " + json.dumps({"encoder": name, "transformers_f16_vs_f32_rel_l2": errs}), flush=True)
        models[name] = m16
        del m32
    torch.cuda.empty_cache()

    dev_ids = ids.to("cuda")

    def both():
        with torch.no_grad():
            for m in models.values():
                m(input_ids=dev_ids, output_hidden_states=True)

    ms, host_ms = cuda_and_host_ms(both, 3, 20)
    peer = {"key": "text encoders f16 CFG pair", "variant": "transformers eager", "ms": round(ms, 3),
            "host_ms": round(host_ms, 3)}
    print("PEER " + json.dumps(peer))


if __name__ == "__main__":
    main()
