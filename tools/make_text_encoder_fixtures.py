#!/usr/bin/env python3
"""Writes the text-encoder fixtures under tests/fixtures: two tiny transformers CLIP text models
with seeded random weights, shaped like SDXL's two encoders, each as a folder in the layout of the
SDXL repository (text_encoder_tiny/, text_encoder_2_tiny/: config.json + model.safetensors) and a
reference file (<folder>.reference.safetensors) run by transformers on the CPU in float32.

  text_encoder_tiny    CLIPTextModel (CLIP ViT-L's role): hidden 64, 1 head, 3 layers, MLP 256,
                       quick_gelu, eos_token_id 2 (the legacy value SDXL's configs carry: pooling
                       at the argmax of the ids), padded with the EOS id like CLIP-L.
  text_encoder_2_tiny  CLIPTextModelWithProjection (OpenCLIP bigG's role): hidden 128, 2 heads,
                       3 layers, MLP 256, exact gelu, projection 96 (not square, so a missing
                       transpose cannot pass), eos_token_id 509 (pooling at the first EOS; the ids
                       hold larger ids before it, so the argmax rule would pick another row),
                       padded with 0 like bigG.

Head size 64 everywhere (the GPU flash kernel's). Vocabulary 512 rather than CLIP's 49408 to keep
the embedding tables small; ids stay below it. Weights: seeded normal values at 1/sqrt(fan_in),
layer-norm scales and shifts and all biases perturbed, then rounded to float16 and stored as
float16 (the model runs on the same values in float32). Names carry the `text_model.` prefix of
transformers 4 saves (the SDXL repository's files); transformers 5 saves CLIPTextModel without it
and loads both, so the script checks that the saved folder loads back to the same outputs.

Reference files (celframe verify text_encoder / text_encoder_2): `in.input_ids` (int64 [2, 77]) ->
`out.hidden_states.<k>` (k = 0 the embeddings, k = L the last layer before final_layer_norm; SDXL
takes k = L - 1, transformers' hidden_states[-2]), `out.last_hidden_state` (after
final_layer_norm), `out.pooler_output` (CLIPTextModel) or `out.text_embeds` (WithProjection).

Single-file names (text_encoders_tiny.single_file.json): how an SDXL single-file checkpoint names
each tensor (`conditioner.embedders.0.transformer.` + the HF names for CLIP-L; OpenCLIP names under
`conditioner.embedders.1.model.` for bigG, q/k/v fused into in_proj_weight/bias, text_projection
transposed), as a recipe the tests follow to build the file; the recipe is checked here by running
diffusers' own converters (convert_ldm_clip_checkpoint, convert_open_clip_checkpoint) on the file
it describes and comparing with the HF state dicts.

Run: /path/to/python tools/make_text_encoder_fixtures.py   (needs torch, transformers, diffusers,
safetensors)
"""
import json
import pathlib

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures"
TOKENS = 77
VOCAB = 512
L_PREFIX = "conditioner.embedders.0.transformer."
G_PREFIX = "conditioner.embedders.1.model."

CONFIGS = {
    "text_encoder_tiny": (
        CLIPTextModel,
        dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=1,
             max_position_embeddings=TOKENS, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=64,
             bos_token_id=0, eos_token_id=2, pad_token_id=1),
    ),
    "text_encoder_2_tiny": (
        CLIPTextModelWithProjection,
        dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
             max_position_embeddings=TOKENS, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=96,
             bos_token_id=508, eos_token_id=509, pad_token_id=1),
    ),
}


def seeded_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                v = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            elif name.endswith("bias") or "layer_norm" in name:
                v = 0.1 * torch.randn(p.shape, generator=g)
            elif "embedding" in name:
                v = (0.5 if "token" in name else 0.2) * torch.randn(p.shape, generator=g)
            else:
                v = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
            p.copy_(v.half().float())


def input_ids(name):
    """Two rows: a short prompt padded as the encoder pads, and a full 75-token one."""
    g = torch.Generator().manual_seed(7)
    if name == "text_encoder_tiny":  # CLIP-L: BOS 510, EOS 511 (the largest id), pad with EOS
        bos, eos, pad, top = 510, 511, 511, 510
    else:  # bigG: BOS 508, EOS 509, pad 0; ids 510/511 sit before the EOS
        bos, eos, pad, top = 508, 509, 0, 508
    rows = []
    for n in (12, 75):
        body = torch.randint(1, top, (n,), generator=g).tolist()
        if name == "text_encoder_2_tiny":
            body[3], body[5] = 510, 511
        ids = [bos] + body + [eos]
        rows.append(ids + [pad] * (TOKENS - len(ids)))
    return torch.tensor(rows, dtype=torch.int64)


def outputs(model, ids):
    with torch.no_grad():
        o = model(input_ids=ids, output_hidden_states=True)
    out = {f"out.hidden_states.{k}": h for k, h in enumerate(o.hidden_states)}
    out["out.last_hidden_state"] = o.last_hidden_state
    if isinstance(model, CLIPTextModelWithProjection):
        out["out.text_embeds"] = o.text_embeds
    else:
        out["out.pooler_output"] = o.pooler_output
    return {k: v.contiguous() for k, v in out.items()}


def hub_state_dict(model):
    """Names as the SDXL repository's files have them (transformers 4: `text_model.` prefix)."""
    sd = model.state_dict()
    if isinstance(model, CLIPTextModelWithProjection):
        return {k: v.half().contiguous() for k, v in sd.items()}
    return {f"text_model.{k}": v.half().contiguous() for k, v in sd.items()}


def open_clip_recipe(hf, layers):
    """OpenCLIP single-file key -> (op, HF names) for the bigG-role model (diffusers' single_file_utils.py convert_open_clip_checkpoint)."""
    r = {
        "token_embedding.weight": ("copy", ["text_model.embeddings.token_embedding.weight"]),
        "positional_embedding": ("copy", ["text_model.embeddings.position_embedding.weight"]),
        "ln_final.weight": ("copy", ["text_model.final_layer_norm.weight"]),
        "ln_final.bias": ("copy", ["text_model.final_layer_norm.bias"]),
        "text_projection": ("transpose", ["text_projection.weight"]),
    }
    for n in range(layers):
        hf_l, oc = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for p in ("weight", "bias"):
            r[f"{oc}attn.in_proj_{p}"] = ("concat_rows", [f"{hf_l}self_attn.{x}_proj.{p}" for x in "qkv"])
            r[f"{oc}attn.out_proj.{p}"] = ("copy", [f"{hf_l}self_attn.out_proj.{p}"])
            r[f"{oc}ln_1.{p}"] = ("copy", [f"{hf_l}layer_norm1.{p}"])
            r[f"{oc}ln_2.{p}"] = ("copy", [f"{hf_l}layer_norm2.{p}"])
            r[f"{oc}mlp.c_fc.{p}"] = ("copy", [f"{hf_l}mlp.fc1.{p}"])
            r[f"{oc}mlp.c_proj.{p}"] = ("copy", [f"{hf_l}mlp.fc2.{p}"])
    assert sorted(n for _, names in r.values() for n in names) == sorted(hf), "recipe covers every tensor once"
    return {G_PREFIX + k: v for k, v in r.items()}


def build(recipe, sd):
    out = {}
    for key, (op, names) in recipe.items():
        ts = [sd[n] for n in names]
        out[key] = {"copy": lambda: ts[0], "transpose": lambda: ts[0].T, "concat_rows": lambda: torch.cat(ts)}[op]()
    return {k: v.contiguous() for k, v in out.items()}


def main():
    recipes = {}
    for seed, (name, (cls, cfg)) in enumerate(CONFIGS.items()):
        model = cls(CLIPTextConfig(**cfg)).eval()
        seeded_weights(model, 1000 + seed)
        folder = ROOT / name
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        hub = hub_state_dict(model)
        save_file(hub, str(folder / "model.safetensors"), metadata={"format": "pt"})
        ids = input_ids(name)
        ref = outputs(model, ids)
        # The hub-named folder loads back into transformers 5 with the same outputs.
        again = outputs(cls.from_pretrained(folder).eval(), ids)
        assert all(torch.equal(ref[k], again[k]) for k in ref), f"{name}: reload differs"
        save_file({"in.input_ids": ids, **ref}, str(ROOT / f"{name}.reference.safetensors"))
        full = {k: v for k, v in hub.items()}
        if cls is CLIPTextModel:
            recipe = {L_PREFIX + k: ("copy", [k]) for k in full}
            single = build(recipe, full)
            converted = convert_ldm_clip_checkpoint(single, remove_prefix=L_PREFIX)
        else:
            recipe = open_clip_recipe(full, cfg["num_hidden_layers"])
            single = build(recipe, full)
            converted = convert_open_clip_checkpoint(model, single, prefix=G_PREFIX)
        assert sorted(converted) == sorted(full), f"{name}: converter names differ"
        assert all(torch.equal(converted[k], full[k]) for k in full), f"{name}: converter values differ"
        recipes[name] = {k: {"op": op, "from": names} for k, (op, names) in recipe.items()}
        print(f"{name}: {sum(v.numel() for v in hub.values())} parameters, outputs {sorted(ref)}")
    doc = ("single-file key -> how to build it from the diffusers folder's tensors (names with the text_model. "
           "prefix); checked by diffusers' convert_ldm_clip_checkpoint / convert_open_clip_checkpoint")
    (ROOT / "text_encoders_tiny.single_file.json").write_text(json.dumps({"doc": doc, **recipes}, indent=1) + "\n")


if __name__ == "__main__":
    main()
