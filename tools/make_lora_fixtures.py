#!/usr/bin/env python3
"""Writes the LoRA fixtures under tests/fixtures: small LoRA files for the tiny fixture models
(tests/fixtures/unet_a, text_encoder_tiny, text_encoder_2_tiny) and, for each test case, reference
files made by diffusers: `StableDiffusionXLPipeline.load_lora_weights` on the same files, then
`set_adapters` with the case's weights and `fuse_lora`, then the component's forward on the inputs
of the models' own reference files (unet_a.reference.safetensors, text_encoder*_tiny.reference.
safetensors), float32 on the CPU.

LoRA files (rank 4, random factors rounded to float16 and stored as float16, as most downloaded
LoRAs are):
  lora_kohya_sgm       kohya keys with SGM paths (`lora_unet_input_blocks_4_1_...`) on every Linear
                       of every transformer, `.alpha` 2 (scale 1/2)
  lora_kohya_diffusers kohya keys with diffusers paths (`lora_unet_down_blocks_1_...`, the
                       LCM-LoRA's spelling) on the LCM-LoRA's module kinds: attention projections,
                       feed-forward, proj_in/out, ResNet conv1/conv2/conv_shortcut/time_emb_proj,
                       sampler convs; `.alpha` 8 (scale 2)
  lora_locon_sgm       LoCon: kohya SGM keys on ResNet 3x3 convs (`in_layers_2`, `out_layers_3`),
                       1x1 `skip_connection`, `emb_layers_1`, the downsampler `op` and upsampler
                       `conv` (3x3 down, 1x1 up); `.alpha` 1
  lora_peft            diffusers/PEFT keys (`unet.<path>.lora_A.weight`) on attention projections,
                       saved by `save_lora_weights` with the PEFT config in the safetensors metadata
                       (`lora_adapter_metadata`: r 4, lora_alpha 8, no .alpha keys)
  lora_te_kohya        kohya `lora_te1_` / `lora_te2_` keys on every q/k/v/out_proj, fc1, fc2 of both
                       text encoders, and a few `lora_unet_` keys; `.alpha` 2

Reference cases (tests/lora_cpu.rs names them):
  lora_kohya_sgm.unet            lora_kohya_sgm at 0.8
  lora_kohya_diffusers.unet      lora_kohya_diffusers at 1.0
  lora_locon_sgm.unet            lora_locon_sgm at 1.0
  lora_peft.unet                 lora_peft at 1.0
  lora_two.unet                  lora_kohya_sgm at 0.7 + lora_peft at -0.5
  lora_te_kohya.text_encoder     lora_te_kohya at 1.0 (and .text_encoder_2)

LyCORIS files, whose references come from the formats' maths in this script (`lycoris`), not from
diffusers, which loads none of them into an SDXL UNet: lora_loha (x1.0), lora_lokr (x0.6),
lora_full (`diff` / `diff_b`, x1.0).

DoRA and motion LoRAs (own random generators, so the files above do not change):
  lora_dora_peft       PEFT DoRA (`use_dora`, `lora_magnitude_vector`) on to_q, to_v, ff.net.2 and
                       ResNet conv1, saved by `save_lora_weights` with the config in the metadata
  lora_dora_peft.unet  lora_dora_peft at 0.7, by diffusers (load_lora_weights, fuse_lora)
  lora_dora_two.unet   lora_dora_peft at 0.7, then lora_peft at -0.5, by diffusers
  lora_dora_kohya      kohya / LyCORIS DoRA (`dora_scale`, both norm axes, Linears and convs) at
                       0.8; reference from LyCORIS' maths here (`kohya_dora`), as diffusers 0.42
                       drops `dora_scale` keys for SDXL
  lora_motion          an AnimateDiff motion LoRA for tests/fixtures/motion_a in the converted
                       diffusers format (`unet....motion_modules...processor.to_q_lora.down.weight`)
  lora_motion.motion_unet
                       AnimateDiffSDXLPipeline (unet_a + motion_a) with lora_kohya_sgm at 0.8 and
                       lora_motion at 0.7, fused; 1 video x 4 frames at 8x8

Run: python3 tools/make_lora_fixtures.py   (needs torch, diffusers, peft, transformers, safetensors)
"""
import pathlib
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from dump_unet_reference import run  # noqa: E402
from make_unet_fixtures import CONFIGS, RESNET_LDM, ldm_modules  # noqa: E402

from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures"
RANK = 4


def pipeline():
    """The tiny SDXL pipeline, float32, without tokenizers (the references feed ids directly)."""
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(ROOT / "vae_tiny"),
        text_encoder=CLIPTextModel.from_pretrained(ROOT / "text_encoder_tiny"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(ROOT / "text_encoder_2_tiny"),
        tokenizer=None,
        tokenizer_2=None,
        unet=UNet2DConditionModel.from_pretrained(ROOT / "unet_a"),
        scheduler=EulerDiscreteScheduler(),
    )


def factors(out_shape, in_shape, g, rank=RANK, std=0.2):
    """Random down [rank, *in_shape] and up [out, rank, *1s], rounded to float16."""
    down = std * torch.randn((rank, *in_shape), generator=g)
    up = std * torch.randn((out_shape[0], rank, *[1] * (len(in_shape) - 1)), generator=g)
    return down.half(), up.half()


def lora_factors(weight, g):
    """Factors for a Linear [out, in] or a convolution [out, in, kh, kw] weight."""
    return factors(weight.shape, weight.shape[1:], g)


def sgm_module(name, modules=None):
    """The SGM path of a diffusers UNet module (tools/make_unet_fixtures.py's independent table;
    `modules` = ldm_modules(config), the tiny UNet "a"'s by default)."""
    modules = modules or ldm_modules(CONFIGS["a"])
    prefix = max((m for m in modules if name == m or name.startswith(m + ".")), key=len)
    rest = name[len(prefix) + 1:]
    if not rest:
        return modules[prefix]
    if ".resnets." in prefix:
        head, tail = (rest.split(".", 1) + [""])[:2]
        rest = RESNET_LDM[head] + ("." + tail if tail else "")
    return modules[prefix] + "." + rest


def kohya_file(weights, selected, path_of, prefix, alpha, g, factors_of=lora_factors):
    """kohya keys for the weights whose module names `selected` accepts."""
    out = {}
    for name, w in weights.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or w.ndim not in (2, 4) or not selected(module):
            continue
        key = prefix + path_of(module).replace(".", "_")
        down, up = factors_of(w, g)
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(float(alpha)).half()
    return out


TRANSFORMER_LINEARS = ("proj_in", "proj_out", ".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2")
LCM_KINDS = TRANSFORMER_LINEARS + (".conv1", ".conv2", ".conv_shortcut", ".time_emb_proj", "samplers.0.conv")
LOCON_KINDS = (".conv1", ".conv2", ".conv_shortcut", ".time_emb_proj", "samplers.0.conv")


def ends_with_any(kinds):
    return lambda module: any(module.endswith(k) for k in kinds)


def unet_reference(unet, inputs, path):
    with torch.no_grad():
        out = run(unet, inputs, None)
    tensors = {f"in.{k}": v.contiguous() for k, v in inputs.items()}
    tensors["out.sample"] = out.contiguous()
    save_file(tensors, str(path), metadata={"generator": "tools/make_lora_fixtures.py"})


def text_reference(model, ids, path):
    """Inputs, the penultimate hidden state SDXL reads, and the pooled / projected output."""
    with torch.no_grad():
        o = model(input_ids=ids, output_hidden_states=True)
    tensors = {"in.input_ids": ids, f"out.hidden_states.{len(o.hidden_states) - 2}": o.hidden_states[-2].contiguous()}
    tensors["out.last_hidden_state"] = o.last_hidden_state.contiguous()
    if isinstance(model, CLIPTextModelWithProjection):
        tensors["out.text_embeds"] = o.text_embeds.contiguous()
    else:
        tensors["out.pooler_output"] = o.pooler_output.contiguous()
    save_file(tensors, str(path), metadata={"generator": "tools/make_lora_fixtures.py"})


def fused(loras):
    """A fresh pipeline with `loras` [(file, weight)] loaded, weighted and fused."""
    pipe = pipeline()
    names = []
    for i, (file, _) in enumerate(loras):
        pipe.load_lora_weights(str(ROOT / f"{file}.safetensors"), adapter_name=f"l{i}")
        names.append(f"l{i}")
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    return pipe


def rand(shape, g):
    return (0.2 * torch.randn(shape, generator=g)).half()


def lycoris(unet, unet_sd, inputs, g):
    """LoHa, LoKr and full-diff files with references from the formats' maths here (diffusers loads
    none of them into an SDXL UNet): ΔW per LyCORIS
    `lycoris/functional/{loha,lokr}.py` (`diff_weight`), computed in float64 from the stored factors
    and added to the float32 weights, W + strength · α/r · ΔW, then the UNet runs on those weights."""
    f64 = lambda t: t.double()  # noqa: E731
    files, deltas = {"lora_loha": {}, "lora_lokr": {}, "lora_full": {}}, {}

    def add(case, name, delta, scale):
        deltas.setdefault(case, []).append((name, delta, scale))

    # LoHa (kohya SGM keys), rank 4, alpha 2: (w1_a w1_b) * (w2_a w2_b) reshaped to W.
    for name in ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                 "mid_block.attentions.0.transformer_blocks.1.attn2.to_v.weight",
                 "up_blocks.1.attentions.0.proj_out.weight", "down_blocks.1.resnets.0.conv1.weight"):
        w = unet_sd[name]
        key = "lora_unet_" + sgm_module(name.removesuffix(".weight")).replace(".", "_")
        out, cols = w.shape[0], w[0].numel()
        f = {k: rand(s, g) for k, s in (("hada_w1_a", (out, RANK)), ("hada_w1_b", (RANK, cols)),
                                        ("hada_w2_a", (out, RANK)), ("hada_w2_b", (RANK, cols)))}
        files["lora_loha"].update({f"{key}.{k}": v for k, v in f.items()})
        files["lora_loha"][f"{key}.alpha"] = torch.tensor(2.0).half()
        d = (f64(f["hada_w1_a"]) @ f64(f["hada_w1_b"])) * (f64(f["hada_w2_a"]) @ f64(f["hada_w2_b"]))
        add("lora_loha", name, d.reshape(w.shape), 2.0 / RANK)

    # LoKr (kohya keys with diffusers paths), alpha 2: kron(W1, W2), W1 acting as [a, b, 1, 1];
    # alpha / r only where a factor is a product (r from w2_b, else w1_b), else 1.
    lokr = [
        # name, W1 (full shape or (a, r, b)), W2 (full shape or (c, r, n))
        ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight", (8, 4), (64, 4, 16)),
        ("up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", (8, 2, 4), (8, 8)),
        ("down_blocks.2.resnets.0.conv2.weight", (4, 4), (16, 16, 3, 3)),
    ]
    for name, s1, s2 in lokr:
        w = unet_sd[name]
        key = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
        sd, rank = files["lora_lokr"], None
        if len(s1) == 3:
            a, r, b = s1
            sd[f"{key}.lokr_w1_a"], sd[f"{key}.lokr_w1_b"] = rand((a, r), g), rand((r, b), g)
            w1, rank = f64(sd[f"{key}.lokr_w1_a"]) @ f64(sd[f"{key}.lokr_w1_b"]), r
        else:
            sd[f"{key}.lokr_w1"] = rand(s1, g)
            w1 = f64(sd[f"{key}.lokr_w1"])
        if len(s2) == 3 and w.ndim == 2:
            c, r, n = s2
            sd[f"{key}.lokr_w2_a"], sd[f"{key}.lokr_w2_b"] = rand((c, r), g), rand((r, n), g)
            w2, rank = f64(sd[f"{key}.lokr_w2_a"]) @ f64(sd[f"{key}.lokr_w2_b"]), r
        else:
            sd[f"{key}.lokr_w2"] = rand(s2, g)
            w2 = f64(sd[f"{key}.lokr_w2"])
        sd[f"{key}.alpha"] = torch.tensor(2.0).half()
        if w.ndim == 4:
            w1 = w1[:, :, None, None]
        d = torch.kron(w1, w2)
        assert d.shape == w.shape, (name, d.shape, w.shape)
        add("lora_lokr", name, d, 2.0 / rank if rank else 1.0)

    # Full diff (kohya SGM keys): W + diff, b + diff_b.
    for name in ("down_blocks.1.attentions.1.proj_in", "conv_out"):
        key = "lora_unet_" + sgm_module(name).replace(".", "_")
        for p, suffix in (("weight", "diff"), ("bias", "diff_b")):
            t = rand(unet_sd[f"{name}.{p}"].shape, g)
            files["lora_full"][f"{key}.{suffix}"] = t
            add("lora_full", f"{name}.{p}", f64(t), 1.0)

    strengths = {"lora_loha": 1.0, "lora_lokr": 0.6, "lora_full": 1.0}
    plain = run(unet, inputs, None)
    for case, sd in files.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(ROOT / f"{case}.safetensors"))
        merged = dict(unet_sd)
        for name, d, scale in deltas[case]:
            merged[name] = (unet_sd[name].double() + strengths[case] * scale * d).float()
        model = UNet2DConditionModel.from_pretrained(ROOT / "unet_a")
        model.load_state_dict(merged)
        unet_reference(model, inputs, ROOT / f"{case}.unet.reference.safetensors")
        moved = (run(model, inputs, None) - plain).norm() / plain.norm()
        print(f"{case} x{strengths[case]}: the deltas move out.sample by {moved:.3f} (relative L2)")


def peft_dora(g):
    """A PEFT DoRA file (`use_dora`): LoRA layers with magnitude vectors added by peft on attention
    projections, ff.net.2 and ResNet conv1, factors randomised and each magnitude moved off its
    initial norm (at init, m = ||W + s BA||, which would make W'' = W + s BA), saved by diffusers
    with the PEFT config in the metadata."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = pipeline()
    config = LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False, use_dora=True,
                        target_modules=["to_q", "to_v", "ff.net.2", "conv1"])
    pipe.unet.add_adapter(config)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_magnitude_vector" in n:
                p.copy_((p * (1.0 + 0.3 * torch.randn(p.shape, generator=g))).half().float())
            elif "lora_" in n:
                p.copy_((0.2 * torch.randn(p.shape, generator=g)).half().float())
    layers = {k: v.half() for k, v in get_peft_model_state_dict(pipe.unet).items()}
    assert any("lora_magnitude_vector" in k for k in layers)
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusionXLPipeline.save_lora_weights(
        ROOT, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
        weight_name="lora_dora_peft.safetensors",
    )


def kohya_dora(unet_sd, unet, inputs, g):
    """kohya / LyCORIS DoRA (`dora_scale`, LyCORIS `dora_wd`) with kohya SGM keys, and a reference
    from the maths here (diffusers 0.42's SDXL `lora_state_dict` drops `dora_scale` keys with a
    warning and would merge a plain LoRA): LyCORIS `lycoris/functional/general.py`
    `_weight_decompose`: W1 = W + (alpha/r) up down, W'' = dora_scale * W1 / (||W1|| + eps32), the
    norm per output row for a dora_scale [out, 1, ...] (`wd_on_out`, LyCORIS' default) and per
    input column for [1, in, ...]; the strength w merges W + w (W'' - W) (ComfyUI
    `comfy/weight_adapter/base.py` `weight_decompose`). In float64 from the stored values."""
    sd, deltas = {}, []
    eps = torch.finfo(torch.float32).eps
    cases = (  # (diffusers weight, norm per output row?)
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight", True),
        ("mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj.weight", False),
        ("up_blocks.1.attentions.1.proj_in.weight", True),
        ("down_blocks.1.resnets.1.conv2.weight", True),
        ("up_blocks.0.resnets.2.conv1.weight", False),
    )
    strength = 0.8
    for name, on_out in cases:
        w = unet_sd[name]
        key = "lora_unet_" + sgm_module(name.removesuffix(".weight")).replace(".", "_")
        down, up = lora_factors(w, g)
        w1 = w.double() + 0.5 * (up.double().flatten(1) @ down.double().flatten(1)).reshape(w.shape)
        extra = [1] * (w.ndim - 2)
        if on_out:
            norm = w1.flatten(1).norm(dim=1).reshape(w.shape[0], 1, *extra)
        else:
            norm = w1.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, w.shape[1], *extra)
        scale = (norm.float() * (1.0 + 0.3 * torch.randn(norm.shape, generator=g))).half()
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                   f"{key}.alpha": torch.tensor(2.0).half(), f"{key}.dora_scale": scale})
        w2 = scale.double() * w1 / (norm + eps)
        deltas.append((name, strength * (w2 - w.double())))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(ROOT / "lora_dora_kohya.safetensors"))
    merged = dict(unet_sd)
    for name, d in deltas:
        merged[name] = (unet_sd[name].double() + d).float()
    model = UNet2DConditionModel.from_pretrained(ROOT / "unet_a")
    model.load_state_dict(merged)
    unet_reference(model, inputs, ROOT / "lora_dora_kohya.unet.reference.safetensors")
    plain = run(unet, inputs, None)
    moved = (run(model, inputs, None) - plain).norm() / plain.norm()
    print(f"lora_dora_kohya x{strength}: the DoRA modules move out.sample by {moved:.3f} (relative L2)")


def motion_lora(g):
    """An AnimateDiff motion LoRA for tests/fixtures/motion_a in the key format diffusers'
    `scripts/convert_animatediff_motion_lora_to_diffusers.py` writes and AnimateDiff pipelines'
    `load_lora_weights` read (`unet.<block>.motion_modules.<j>.transformer_blocks.<n>.attn{1,2}.
    processor.to_{q,k,v,out}_lora.{down,up}.weight`, no alpha: scale = strength), on every
    attention projection of every module, the mid block's too. The published MotionLoRAs are for
    SD1.5's modules; this one has the tiny SDXL-layout module's shapes."""
    from diffusers import MotionAdapter

    adapter = MotionAdapter.from_pretrained(ROOT / "motion_a")
    sd = {}
    for name, w in adapter.state_dict().items():
        for proj, saved in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out.0", "to_out")):
            if name.endswith(f".{proj}.weight"):
                attention = name.removesuffix(f".{proj}.weight")
                down, up = lora_factors(w, g)
                sd[f"unet.{attention}.processor.{saved}_lora.down.weight"] = down
                sd[f"unet.{attention}.processor.{saved}_lora.up.weight"] = up
    save_file(sd, str(ROOT / "lora_motion.safetensors"))
    return adapter


def motion_case(adapter, g):
    """The motion UNet (tests/fixtures/unet_a + motion_a, tools/make_motion_fixtures.py's
    `motion_unet`) in diffusers' AnimateDiffSDXLPipeline with lora_kohya_sgm (UNet, x0.8) and
    lora_motion (motion modules, x0.7) loaded, weighted and fused; reference on 1 video x 4 frames
    at 8x8."""
    from diffusers import AnimateDiffSDXLPipeline
    from make_motion_fixtures import motion_unet, random_inputs, save_reference

    unet = UNet2DConditionModel.from_pretrained(ROOT / "unet_a")
    base = motion_unet(unet, adapter)
    plain = {k: v.clone() for k, v in base.state_dict().items()}
    pipe = AnimateDiffSDXLPipeline(
        vae=AutoencoderKL.from_pretrained(ROOT / "vae_tiny"),
        text_encoder=CLIPTextModel.from_pretrained(ROOT / "text_encoder_tiny"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(ROOT / "text_encoder_2_tiny"),
        tokenizer=None, tokenizer_2=None, unet=base, motion_adapter=adapter, scheduler=EulerDiscreteScheduler(),
    )
    loras = [("lora_kohya_sgm", 0.8), ("lora_motion", 0.7)]
    for i, (file, _) in enumerate(loras):
        pipe.load_lora_weights(str(ROOT / f"{file}.safetensors"), adapter_name=f"l{i}")
    pipe.set_adapters([f"l{i}" for i in range(len(loras))], adapter_weights=[w for _, w in loras])
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    fused_sd = pipe.unet.state_dict()
    changed = [k for k in plain if not torch.equal(plain[k], fused_sd[k])]
    motion = sum(".motion_modules." in k for k in changed)
    print(f"lora_motion.motion_unet: {len(changed)} weights changed, {motion} of them in the motion modules")
    inputs = random_inputs(pipe.unet, 1, 4, 8, 8, g)
    out = save_reference(ROOT / "lora_motion.motion_unet.reference.safetensors", pipe.unet, inputs)
    base = motion_unet(UNet2DConditionModel.from_pretrained(ROOT / "unet_a"), adapter)
    from make_motion_fixtures import run as motion_run
    before = motion_run(base, inputs)
    print(f"lora_motion.motion_unet: the LoRAs move out.sample by {(out - before).norm() / before.norm():.3f}")


def main():
    g = torch.Generator().manual_seed(11)
    base = pipeline()
    unet_sd = base.unet.state_dict()

    files = {
        "lora_kohya_sgm": kohya_file(unet_sd, ends_with_any(TRANSFORMER_LINEARS), sgm_module, "lora_unet_", 2, g),
        "lora_kohya_diffusers": kohya_file(unet_sd, ends_with_any(LCM_KINDS), lambda m: m, "lora_unet_", 8, g),
        "lora_locon_sgm": kohya_file(unet_sd, ends_with_any(LOCON_KINDS), sgm_module, "lora_unet_", 1, g),
    }
    te = {}
    for model, prefix in ((base.text_encoder, "lora_te1_"), (base.text_encoder_2, "lora_te2_")):
        sd = {f"text_model.{k.removeprefix('text_model.')}": v for k, v in model.state_dict().items()}
        kinds = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
        te.update(kohya_file(sd, ends_with_any(kinds), lambda m: m, prefix, 2, g))
    te.update(kohya_file(unet_sd, lambda m: m.startswith("mid_block.attentions.0.transformer_blocks.0.attn1"),
                         sgm_module, "lora_unet_", 2, g))
    files["lora_te_kohya"] = te
    for name, sd in files.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(ROOT / f"{name}.safetensors"))

    # PEFT: LoRA layers added by peft, factors randomised, saved by diffusers with the config.
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    peft_pipe = pipeline()
    config = LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    peft_pipe.unet.add_adapter(config)
    with torch.no_grad():
        for n, p in peft_pipe.unet.named_parameters():
            if "lora_" in n:
                p.copy_((0.2 * torch.randn(p.shape, generator=g)).half().float())
    layers = {k: v.half() for k, v in get_peft_model_state_dict(peft_pipe.unet).items()}
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # a set: fix the order written
    StableDiffusionXLPipeline.save_lora_weights(
        ROOT, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
        weight_name="lora_peft.safetensors",
    )

    ref = load_file(str(ROOT / "unet_a.reference.safetensors"))
    inputs = {k.removeprefix("in."): v.float() for k, v in ref.items() if k.startswith("in.")}
    cases = {
        "lora_kohya_sgm": [("lora_kohya_sgm", 0.8)],
        "lora_kohya_diffusers": [("lora_kohya_diffusers", 1.0)],
        "lora_locon_sgm": [("lora_locon_sgm", 1.0)],
        "lora_peft": [("lora_peft", 1.0)],
        "lora_two": [("lora_kohya_sgm", 0.7), ("lora_peft", -0.5)],
    }
    plain = run(base.unet, inputs, None)
    for case, loras in cases.items():
        pipe = fused(loras)
        unet_reference(pipe.unet, inputs, ROOT / f"{case}.unet.reference.safetensors")
        moved = (run(pipe.unet, inputs, None) - plain).norm() / plain.norm()
        print(f"{case}: the LoRAs move out.sample by {moved:.3f} (relative L2)")

    pipe = fused([("lora_te_kohya", 1.0)])
    for folder, model in (("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)):
        ids = load_file(str(ROOT / f"{folder}_tiny.reference.safetensors"))["in.input_ids"]
        text_reference(model, ids, ROOT / f"lora_te_kohya.{folder}.reference.safetensors")
    lycoris(base.unet, unet_sd, inputs, g)

    # DoRA and motion LoRAs (own generators: the files above stay as they were).
    g2 = torch.Generator().manual_seed(12)
    peft_dora(g2)
    for case, loras in {
        "lora_dora_peft": [("lora_dora_peft", 0.7)],
        # DoRA first: PEFT's in-turn merge then equals the order-free rule (merge.rs `Dora`)
        "lora_dora_two": [("lora_dora_peft", 0.7), ("lora_peft", -0.5)],
    }.items():
        pipe = fused(loras)
        unet_reference(pipe.unet, inputs, ROOT / f"{case}.unet.reference.safetensors")
        moved = (run(pipe.unet, inputs, None) - plain).norm() / plain.norm()
        print(f"{case}: the LoRAs move out.sample by {moved:.3f} (relative L2)")
    kohya_dora(unet_sd, base.unet, inputs, g2)
    g3 = torch.Generator().manual_seed(13)
    motion_case(motion_lora(g3), g3)
    total = sum(p.stat().st_size for p in ROOT.glob("lora_*"))
    print(f"LoRA fixtures: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
