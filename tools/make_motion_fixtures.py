#!/usr/bin/env python3
"""Writes the motion-UNet fixtures under tests/fixtures, run by diffusers on the CPU in float32:

  motion_a/                 a tiny diffusers MotionAdapter (config.json + safetensors) whose widths
                            match tests/fixtures/unet_a (32, 64, 64): 2 motion modules per down
                            block, 3 per up block, a mid-block module, heads (4, 8, 8) (head dims
                            8, 8, 8), transformer depth (2, 1, 1), 32 positions.
  motion_a.original_names.json
                            the original AnimateDiff key of every tensor but the mid block's
                            (`down_blocks.N.motion_modules.M.temporal_transformer...`, with
                            `attention_blocks.{0,1}.pos_encoder.pe`), checked by diffusers'
                            `convert_animatediff_checkpoint_to_diffusers`; the tests build the
                            original-format file from the diffusers weights and this list (a stored
                            copy would double the fixtures' size). The SDXL module has no mid block,
                            so this file has none either.
  motion_a.f{1,16,24}.reference.safetensors
                            UNetMotionModel.from_unet2d(unet_a, motion_a) on 2 videos x 1 frame,
                            1 x 16 and 1 x 24 frames at a 12x20 latent (12 is an odd multiple of 4).
  motion_a.nomid.f16.reference.safetensors
                            the same without the mid-block module (the original-names file's model).
  motion_a.gn_frames.f16.reference.safetensors
                            the 16-frame reference with every UNet group norm across the frames
                            (AnimateDiff-Evolved's default; the motion modules' norms always are).
  motion_a.residuals.reference.safetensors
                            2 videos x 3 frames at 8x8 with ControlNet-style residuals, one per skip
                            connection ([videos * frames, C, h, w]) plus the mid block.

Reference format (`celframe verify motion_unet`), diffusers' UNetMotionModel.forward arguments:
in.sample [videos, channels, frames, height, width], in.timestep [videos], in.encoder_hidden_states
[videos * frames, tokens, width], in.added_cond_kwargs.text_embeds [videos, pooled],
in.added_cond_kwargs.time_ids [videos, 6], optionally in.down_block_additional_residuals.<k> and
in.mid_block_additional_residual -> out.sample [videos, channels, frames, height, width].

Pitfall (diffusers 0.42): UNetMotionModel.from_unet2d does not copy SDXL's add_embedding (it stays
random): copied here, then every non-motion tensor is checked equal to the UNet's.

Weights: diffusers' init with a seeded generator, norm scales/shifts and biases perturbed, proj_out
given noise (AnimateDiff zero-initialises it), all rounded to float16 and stored as float16.

Run: /path/to/python tools/make_motion_fixtures.py   (needs torch, diffusers, safetensors)

Full-size references (the same format) for `celframe verify motion_unet` on the GPU machine:

    python3 tools/make_motion_fixtures.py --unet path/to/sdxl/unet --adapter path/to/motion_adapter \
        --out motion_ref.safetensors [--videos 1 --frames 16 --height 128 --width 128 --tokens 77] \
        [--dtype float16 --device cuda] [--residuals] [--group-norm-across-frames] [--random-sdxl-adapter]

`--adapter` is a diffusers MotionAdapter folder; with `--random-sdxl-adapter` a MotionAdapter with
AnimateDiff-SDXL's configuration (mm_sdxl_v10_beta: widths 320/640/1280, 2 modules per down block,
8 heads, one transformer block, 32 positions, no mid block) and seeded random weights is written
there first.
"""
import argparse
import json
import pathlib

import torch
from safetensors.torch import load_file, save_file

from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures"
TOKENS = 10
ADAPTER = dict(
    block_out_channels=(32, 64, 64),
    motion_layers_per_block=2,
    motion_transformer_layers_per_block=(2, 1, 1),
    motion_mid_block_layers_per_block=1,
    motion_transformer_layers_per_mid_block=1,
    motion_num_attention_heads=(4, 8, 8),
    motion_norm_num_groups=32,
    motion_max_seq_length=32,
    use_motion_mid_block=True,
)
HALF_INPUTS = {"in.sample", "in.encoder_hidden_states", "in.added_cond_kwargs.text_embeds"}
RESIDUALS = ("in.down_block_additional_residuals.", "in.mid_block_additional_residual")


def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(p + 0.1 * noise)
            elif "norm" in name:
                p.copy_(1.0 + 0.25 * noise)
            elif "proj_out" in name:
                p.copy_(p + 0.03 * noise)
            else:
                p.copy_(p + 0.02 * noise)
            p.copy_(p.half().float())


def motion_unet(unet, adapter):
    """UNetMotionModel.from_unet2d with the add_embedding it forgets, checked tensor by tensor."""
    model = UNetMotionModel.from_unet2d(unet, adapter).eval()
    if unet.add_embedding is not None:
        model.add_embedding.load_state_dict(unet.add_embedding.state_dict())
    ours, theirs, motion = model.state_dict(), unet.state_dict(), adapter.state_dict()
    spatial = {k for k in ours if ".motion_modules." not in k}
    assert spatial == set(theirs), spatial ^ set(theirs)
    for k in spatial:
        assert torch.equal(ours[k], theirs[k]), k
    for k, v in motion.items():
        assert torch.equal(ours[k], v), k
    return model


class unet_group_norms_across_frames:
    """AnimateDiff-Evolved's default for v1-type motion modules (ComfyUI-AnimateDiff-Evolved
    `animatediff/sampling.py`, `groupnorm_mm_factory`): every GroupNorm of the UNet takes its
    statistics over [videos, C, frames, H, W] instead of per frame. The motion modules' own norms
    already do."""

    def __init__(self, model, frames):
        self.norms = [m for name, m in model.named_modules()
                      if isinstance(m, torch.nn.GroupNorm) and ".motion_modules." not in name]
        self.frames = frames

    def __enter__(self):
        f = self.frames

        def across(m, x):
            b = x.shape[0] // f
            v = x.reshape(b, f, *x.shape[1:]).transpose(1, 2)
            y = torch.nn.functional.group_norm(v, m.num_groups, m.weight, m.bias, m.eps)
            return y.transpose(1, 2).reshape(x.shape)

        for m in self.norms:
            m.forward = across.__get__(m)
        return self

    def __exit__(self, *exc):
        for m in self.norms:
            del m.forward


def run(model, inputs, residuals=None):
    added = {k.split(".", 1)[1]: v for k, v in inputs.items() if k.startswith("added_cond_kwargs.")}
    kwargs = {k: v for k, v in inputs.items() if not k.startswith("added_cond_kwargs.")}
    if residuals is not None:
        kwargs["down_block_additional_residuals"] = residuals[0]
        kwargs["mid_block_additional_residual"] = residuals[1]
    with torch.no_grad():
        return model(**kwargs, added_cond_kwargs=added, return_dict=False)[0]


def random_inputs(model, videos, frames, h, w, g, tokens=TOKENS):
    cfg = model.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    px = [8 * h, 8 * w]
    ids = [px + [0, 0] + px if b % 2 == 0 else [px[0] + 64, px[1] - 64, 16, 32] + px for b in range(videos)]
    return {
        "sample": torch.randn(videos, cfg.in_channels, frames, h, w, generator=g).half().float(),
        "timestep": {1: torch.tensor([411.0]), 2: torch.tensor([17.0, 743.5])}.get(videos, torch.linspace(999.0, 1.0, videos)),
        "encoder_hidden_states": torch.randn(videos * frames, tokens, cfg.cross_attention_dim, generator=g)
        .half()
        .float(),
        "added_cond_kwargs.text_embeds": torch.randn(videos, pooled, generator=g).half().float(),
        "added_cond_kwargs.time_ids": torch.tensor(ids, dtype=torch.float32),
    }


def random_residuals(model, inputs, g):
    """ControlNet-style residuals shaped like the skip connections ([videos * frames, C, h, w]),
    found by hooking one forward."""
    shapes, mid = [], []
    hooks = [model.conv_in.register_forward_hook(lambda m, i, o: shapes.append(o.shape))]
    for block in model.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, i, o: shapes.extend(r.shape for r in o[1])))
    hooks.append(model.mid_block.register_forward_hook(lambda m, i, o: mid.append(o.shape)))
    run(model, inputs)
    for h in hooks:
        h.remove()
    down = [(0.5 * torch.randn(s, generator=g)).half().float() for s in shapes]
    return down, (0.5 * torch.randn(mid[0], generator=g)).half().float()


def save_reference(path, model, inputs, residuals=None):
    tensors = {f"in.{k}": v for k, v in inputs.items()}
    if residuals is not None:
        for k, r in enumerate(residuals[0]):
            tensors[f"{RESIDUALS[0]}{k}"] = r
        tensors[RESIDUALS[1]] = residuals[1]
    out = run(model, inputs, residuals)
    tensors["out.sample"] = out
    stored = {
        # float32 inputs hold float16 values (exact as float16); a run in float16 / bfloat16 stores its own
        k: (v.half() if v.dtype == torch.float32 and (k in HALF_INPUTS or k.startswith(RESIDUALS))
            else v if v.dtype in (torch.float16, torch.bfloat16) else v.float()).contiguous().cpu()
        for k, v in tensors.items()
    }
    save_file(stored, str(path), metadata={"generator": "tools/make_motion_fixtures.py", "torch": torch.__version__})
    return out


def original_names(state):
    """The original AnimateDiff key of each diffusers adapter key (guoyww/AnimateDiff
    `animatediff/models/motion_module.py` module names: temporal_transformer, attention_blocks,
    norms, ff_norm, pos_encoder), written out here and checked by diffusers' converter."""
    names = {}
    for k in state:
        if k.startswith("mid_block."):
            continue
        head, rest = k.split(".motion_modules.", 1)
        m, rest = rest.split(".", 1)
        for a, b in ((".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1."),
                     (".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm.")):
            rest = rest.replace(a, b)
        if rest.endswith(".pos_embed.pe"):
            continue
        names[f"{head}.motion_modules.{m}.temporal_transformer.{rest}"] = k
    # One pos_encoder.pe per attention block, as the original module stores them.
    for k in list(names.values()):
        if k.endswith(".attn1.to_q.weight"):
            block = [o for o, d in names.items() if d == k][0].rsplit(".attention_blocks.0.", 1)[0]
            for a in (0, 1):
                names[f"{block}.attention_blocks.{a}.pos_encoder.pe"] = k.rsplit(".attn1.", 1)[0] + ".pos_embed.pe"
    return names


SDXL_ADAPTER = dict(
    block_out_channels=(320, 640, 1280),
    motion_layers_per_block=2,
    motion_transformer_layers_per_block=1,
    motion_num_attention_heads=8,
    motion_norm_num_groups=32,
    motion_max_seq_length=32,
    use_motion_mid_block=False,
)


def dump(args):
    """One reference at the requested size (see the module doc)."""
    dtype = getattr(torch, args.dtype)
    if args.random_sdxl_adapter:
        torch.manual_seed(args.seed)
        adapter = MotionAdapter(**SDXL_ADAPTER).eval()
        randomize(adapter, args.seed + 1)
        adapter.save_pretrained(args.adapter, safe_serialization=True)
        print(f"wrote a random AnimateDiff-SDXL MotionAdapter to {args.adapter}")
    unet = UNet2DConditionModel.from_pretrained(args.unet, torch_dtype=torch.float32).eval()
    adapter = MotionAdapter.from_pretrained(args.adapter, torch_dtype=torch.float32).eval()
    model = motion_unet(unet, adapter).to(device=args.device, dtype=dtype)
    g = torch.Generator().manual_seed(args.seed + 2)
    inputs = random_inputs(model, args.videos, args.frames, args.height, args.width, g, args.tokens)
    residuals = random_residuals(model, to(inputs, args.device, dtype), g) if args.residuals else None
    inputs = to(inputs, args.device, dtype)
    if residuals is not None:
        residuals = ([r.to(args.device, dtype) for r in residuals[0]], residuals[1].to(args.device, dtype))
    if args.group_norm_across_frames:
        with unet_group_norms_across_frames(model, args.frames):
            out = save_reference(args.out, model, inputs, residuals)
    else:
        out = save_reference(args.out, model, inputs, residuals)
    print(f"wrote {args.out}: out.sample {list(out.shape)} std {out.float().std():.3f}")


def to(inputs, device, dtype):
    """Inputs on `device`, floats in `dtype` except the timestep and time ids (float32, as
    diffusers computes their sinusoids)."""
    keep = ("timestep", "added_cond_kwargs.time_ids")
    return {k: v.to(device) if k in keep else v.to(device, dtype) for k, v in inputs.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unet", help="full-size mode: a diffusers UNet folder")
    p.add_argument("--adapter", help="a diffusers MotionAdapter folder")
    p.add_argument("--out", help="the reference file to write")
    p.add_argument("--videos", type=int, default=1)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--height", type=int, default=128, help="latent height (image height / 8)")
    p.add_argument("--width", type=int, default=128, help="latent width (image width / 8)")
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--residuals", action="store_true", help="also feed random ControlNet-style residuals")
    p.add_argument("--group-norm-across-frames", action="store_true",
                   help="every UNet group norm across the frames (AnimateDiff-Evolved's default)")
    p.add_argument("--random-sdxl-adapter", action="store_true",
                   help="first write a random AnimateDiff-SDXL MotionAdapter to --adapter")
    args = p.parse_args()
    if args.unet or args.adapter or args.out:
        if not (args.unet and args.adapter and args.out):
            p.error("full-size mode needs --unet, --adapter and --out")
        return dump(args)
    make_fixtures()


def make_fixtures():
    unet = UNet2DConditionModel.from_pretrained(ROOT / "unet_a", torch_dtype=torch.float32).eval()
    torch.manual_seed(20261202)
    adapter = MotionAdapter(**ADAPTER).eval()
    randomize(adapter, 20261203)
    folder = ROOT / "motion_a"
    folder.mkdir(parents=True, exist_ok=True)
    adapter.save_pretrained(folder, safe_serialization=True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = {k: v.half() for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    adapter = MotionAdapter.from_pretrained(folder, torch_dtype=torch.float32).eval()
    print(f"motion_a: {sum(v.numel() for v in state.values())} params, {len(state)} tensors")
    pe = [k for k in state if k.endswith("pos_embed.pe")]
    print(f"  {len(pe)} pos_embed.pe buffers stored, e.g. {pe[0]} {list(state[pe[0]].shape)}")

    # The original names, checked by diffusers' own converter (which drops pos_encoder).
    names = original_names(state)
    original = {o: state[d] for o, d in names.items()}
    back = convert_animatediff_checkpoint_to_diffusers(original)
    want = {k: v for k, v in state.items() if not k.startswith("mid_block.") and not k.endswith("pos_embed.pe")}
    assert set(back) == set(want), set(back) ^ set(want)
    for k in want:
        assert torch.equal(back[k], want[k]), k
    path = ROOT / "motion_a.original_names.json"
    path.write_text(json.dumps({"original_to_diffusers": dict(sorted(names.items()))}, indent=1) + "\n")
    print(f"  original names: {len(names)}, checked by convert_animatediff_checkpoint_to_diffusers")

    model = motion_unet(unet, adapter)
    g = torch.Generator().manual_seed(20261204)
    for videos, frames, (h, w) in ((2, 1, (12, 20)), (1, 16, (12, 20)), (1, 24, (12, 20))):
        inputs = random_inputs(model, videos, frames, h, w, g)
        out = save_reference(ROOT / f"motion_a.f{frames}.reference.safetensors", model, inputs)
        # How much the motion modules move the output: the UNet alone on the frames as images.
        per_frame = dict(inputs)
        per_frame["sample"] = inputs["sample"].permute(0, 2, 1, 3, 4).reshape(videos * frames, -1, h, w)
        for k in ("timestep", "added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"):
            per_frame[k] = inputs[k].repeat_interleave(frames, dim=0)
        with torch.no_grad():
            alone = unet(per_frame["sample"], per_frame["timestep"], per_frame["encoder_hidden_states"],
                         added_cond_kwargs={"text_embeds": per_frame["added_cond_kwargs.text_embeds"],
                                            "time_ids": per_frame["added_cond_kwargs.time_ids"]}).sample
        flat = out.permute(0, 2, 1, 3, 4).reshape(alone.shape)
        change = (flat - alone).norm() / alone.norm()
        print(f"  f{frames}: out {list(out.shape)} std {out.std():.3f}; relative change by the motion modules {change:.3f}")
        if frames == 16:
            nomid_adapter = MotionAdapter(**{**ADAPTER, "use_motion_mid_block": False}).eval()
            nomid_adapter.load_state_dict({k: v for k, v in adapter.state_dict().items()
                                           if not k.startswith("mid_block.")})
            nomid = motion_unet(unet, nomid_adapter)
            out2 = save_reference(ROOT / "motion_a.nomid.f16.reference.safetensors", nomid, inputs)
            print(f"  nomid f16: relative change by the mid module {(out - out2).norm() / out2.norm():.3f}")
            with unet_group_norms_across_frames(model, frames):
                out3 = save_reference(ROOT / "motion_a.gn_frames.f16.reference.safetensors", model, inputs)
            print(f"  gn_frames f16: relative change by the UNet group norms across frames {(out3 - out).norm() / out.norm():.3f}")

    inputs = random_inputs(model, 2, 3, 8, 8, g)
    residuals = random_residuals(model, inputs, g)
    out = save_reference(ROOT / "motion_a.residuals.reference.safetensors", model, inputs, residuals)
    print(f"  residuals: {len(residuals[0])} down + mid, out {list(out.shape)}")

    files = sorted(p for p in ROOT.rglob("*") if p.is_file() and p.relative_to(ROOT).parts[0].startswith("motion_"))
    for p in files:
        print(f"  {p.relative_to(ROOT)}: {p.stat().st_size / 1e6:.3f} MB")
    print(f"motion fixtures: {sum(p.stat().st_size for p in files) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
