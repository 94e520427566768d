#!/usr/bin/env python3
"""The full-size end-to-end render benchmark (issue 16, workload W1), on the GPU machine
(tools/render_gpu.sh runs the steps in order, each its own process so no two hold the GPU at once).

  prepare    The models at SDXL's real shapes with seeded random weights, made where missing by the
             other GPU scripts' functions in the folders they use (so a gpu_run.sh loop writes each
             once): the UNet and motion adapter (WORK/sdxl_unet, WORK/motion_adapter), both text
             encoders (TEXT_WORK/text_encoder*), the VAE (VAE_WORK/sdxl_vae, the fp16-fix config),
             two SDXL ControlNets of one architecture and different seeds (OpenPose:
             WORK/sdxl_controlnet as tools/controlnet_gpu.py writes it; Depth:
             WORK/sdxl_controlnet_depth), the seed's LoRAs (tools/lora_gpu.py: style_a1..3 of ranks
             32/64/128 with text-encoder parts, and the LCM-LoRA-shaped lcm). Then, in WORK/render:
             CLIP tokenizer folders for diffusers (built from assets/bpe_simple_vocab_16e6.txt.gz),
             depth hints (a smooth gradient with a moving blob, 1024x576: depth.png and five in
             depth_keyframes/), and the two render configs (JSON):
               w1.json         one 16-frame 1024x576 clip, LCM 4 steps, CFG 1.5 (batches of 2
                               videos), OpenPose (builtin:pose, one pose) at scale 1 + Depth
                               (depth.png) at 0.6, interpolation "hold" with one keyframe each so
                               every frame is controlled at every step, 3 LoRAs (0.8, 0.25, 0.7) +
                               LCM (1.0) merged, f16 on CUDA, PNG frames + mp4;
               keyframes.json  the same with the seed's keyframe control: five poses and five depth
                               hints at 0, 0.25, 0.5, 0.75, 1 of the clip, interpolation "keyframes"
                               (the nets run on those frames only);
               w1_warm.json, keyframes_warm.json  the same two with a second clip (seed + 1): its
                               time is a clip rendered after a whole render in the same process,
                               as the diffusers peer times its render after an untimed one;
               w1_warm_png.json, keyframes_warm_png.json  the warm two without the mp4, the
                               peer's writing where the machine has no mp4 writer for it;
               union.json      W1 with OpenPose + Depth as two conditions of one full-size
                               ControlNet Union (WORK/sdxl_controlnet_union, random weights, as
                               tools/controlnet_gpu.py --union writes it): one Union forward per
                               window instead of two ControlNets (full size only);
               batch20.json    the throughput manifest (issue 18): 20 clips of W1 with their own
                               prompts and seeds, in two LoRA sets (the seed's set, and the same
                               with the first style LoRA at 0.6) interleaved in the file, so the
                               batch's grouping by LoRA set is exercised (full size only).
  celframe   Runs `CELFRAME render CONFIG $RENDER_ARGS` (output.replace on, so a second run renders again),
             times the whole command, echoes its lines and prints a RENDER line (the clip fields
             are the last clip's: the second of a *_warm workload, its first's in first_clip_s).
  throughput Runs `CELFRAME render batch20.json` while `nvidia-smi` samples the GPU's utilisation
             (the fraction of each 100 ms in which a kernel ran) and prints a THROUGHPUT line:
             clips per hour over the whole command (loading included) and over the rendering
             (from the first step's progress line, after loading and the first LoRA merge), and
             the mean utilisation over each (the rendering's is the issue's "GPU busy" fraction).
  fp8        The quality cost of FP8 beside its speed: W1 (PNG frames only) with three clips of
             seeds 0, 1, 2, rendered with the config's fp8 off, on and all (fp8_{mode}.json, one
             process each); FP8 lines give each mode's warm clip time and each seed's final frames'
             relative L2 distance from the fp8-off frames (values in [0, 1]).
  small-card W1 in f16 (the fp8 step's off config) rendered with the whole device, then again with
             SMALL_CARD_GIB (23.5) GiB of it free, what a 24 GB card (23.99 GiB, less the driver's
             share) leaves a process: this process holds the rest through torch meanwhile. A
             SMALLCARD line gives both exit codes, peaks and least free device memory (nvidia-smi
             every 100 ms) and the frames' relative L2 distance.
  diffusers  The peer: diffusers fp16 eager on CUDA with the same weights, LoRAs and W1 settings.
             diffusers 0.42 has no SDXL AnimateDiff ControlNet pipeline, so the loop is
             AnimateDiffSDXLPipeline's written out (as tools/make_pipeline_fixtures.py's
             controlnet_loop) with both ControlNets run each step on the CFG batch with the frames
             folded in ([2F, 4, h, w]), their residuals summed (what diffusers' MultiControlNetModel
             does) and added to the motion UNet's skips. LoRAs: load_lora_weights + set_adapters +
             fuse_lora on a StableDiffusionXLPipeline of the plain UNet, then the motion UNet is
             built from the fused UNet (make_motion_fixtures.motion_unet: from_unet2d plus the
             add_embedding diffusers 0.42 leaves random). One whole untimed render warms up (cuDNN
             algorithm search, allocator), then one timed render with torch.cuda.synchronize
             around text encoding, the 4 denoising steps, VAE decode (+ conversion to 8-bit PIL
             images) and writing (PNG with PIL; mp4 with diffusers' export_to_video where imageio
             is installed, else ffmpeg from PATH as celframe calls it, else none: the RENDER line
             says which).

RENDER lines (tools/report.py tabulates them): side, workload, run, total_s (celframe: the whole
command, model loading included; diffusers: text + denoise + decode + write, loading apart in
load_s), text_s, denoise_s, decode_s + write_s (celframe overlaps them: decode_write_s), frames,
frames_per_s (frames / clip time without loading), peak_gib (GPU memory: celframe's arenas,
diffusers' max_memory_allocated), mp4_by.

--tiny: the same steps on the CPU with the tiny fixture models (tests/fixtures/pipeline_tiny,
vae_tiny, text_encoder*_tiny; one ControlNet used for both roles, two small LoRAs written for the
tiny UNet), 64x64, 5 frames, float32: proves the configs, the parsing and the diffusers loop run.
"""
import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
# The seed's prompt without A1111 emphasis (diffusers reads parentheses as text), the same on both sides.
PROMPT = ("masterpiece, anime, beautiful detailed eyes, cel shading, clean lines, 1 girl, blue hair, "
          "dynamic lighting, action pose, dramatic composition")
NEGATIVE = ("bad anatomy, extra limbs, extra fingers, blurry, watermark, text, low detail, inconsistent lighting, "
            "distorted face")
# The seed's set as tools/lora_gpu.sh benches it: (file stem, weight, role).
LORAS = [("style_a1", 0.8, "style"), ("style_a2", 0.25, "style"), ("style_a3", 0.7, "character"), ("lcm", 1.0, "lcm")]
KEYFRAMES = [0.0, 0.25, 0.5, 0.75, 1.0]
STEPS, CFG, FPS, SEED = 4, 1.5, 10, 0


class Setup:
    """Paths, sizes and numeric settings of the full-size run or of the tiny CPU one."""

    def __init__(self, args):
        self.tiny = args.tiny
        self.dir = os.path.join(args.work, "render")
        if args.tiny:
            tiny = os.path.join(FIXTURES, "pipeline_tiny")
            self.unet, self.motion = os.path.join(tiny, "unet"), os.path.join(tiny, "motion_adapter")
            self.vae = os.path.join(FIXTURES, "vae_tiny")
            self.text_encoders = [os.path.join(FIXTURES, "text_encoder_tiny"),
                                  os.path.join(FIXTURES, "text_encoder_2_tiny")]
            self.tokenizers = [os.path.join(tiny, "tokenizer"), os.path.join(tiny, "tokenizer_2")]
            self.controlnets = [os.path.join(tiny, "controlnet")] * 2
            self.loras = [(os.path.join(self.dir, f"tiny_{stem}.safetensors"), w, role) for stem, w, role in
                          [("style", 0.8, "style"), ("lcm", 1.0, "lcm")]]
            self.width, self.height, self.frames = 64, 64, 5
            self.device, self.dtype, self.dtype_name = "cpu", torch.float32, "f32"
        else:
            self.unet, self.motion = os.path.join(args.work, "sdxl_unet"), os.path.join(args.work, "motion_adapter")
            self.vae = os.path.join(args.vae_work, "sdxl_vae")
            self.text_encoders = [os.path.join(args.text_work, n) for n in ("text_encoder", "text_encoder_2")]
            self.tokenizers = [os.path.join(self.dir, n) for n in ("tokenizer", "tokenizer_2")]
            self.controlnets = [os.path.join(args.work, n) for n in ("sdxl_controlnet", "sdxl_controlnet_depth")]
            self.union = os.path.join(args.work, "sdxl_controlnet_union")
            self.loras = [(os.path.join(args.work, f"{stem}.safetensors"), w, role) for stem, w, role in LORAS]
            self.width, self.height, self.frames = 1024, 576, 16
            self.device, self.dtype, self.dtype_name = "cuda", torch.float16, "f16"
        self.depth = os.path.join(self.dir, "depth.png")
        self.depth_keyframes = os.path.join(self.dir, "depth_keyframes")

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# prepare


def make_full_weights(s, args):
    """Every model and LoRA the full run reads, made where missing (GPU where the makers allow)."""
    import controlnet_gpu
    import lora_gpu
    import motion_gpu
    import text_encoder_gpu
    import unet_gpu
    import vae_gpu

    t0 = time.time()
    unet_gpu.make_weights(s.unet)
    motion_gpu.make_adapter(s.motion)
    text_encoder_gpu.make_weights(args.text_work)
    vae_gpu.make_weights(s.vae)
    controlnet_gpu.make_weights(s.controlnets[0])
    controlnet_gpu.make_weights(s.controlnets[1], seed=5)
    controlnet_gpu.make_weights(s.union, seed=11, union=True)
    if not all(os.path.exists(path) for path, _, _ in s.loras):
        from safetensors.torch import load_file

        unet_sd = load_file(os.path.join(s.unet, "diffusion_pytorch_model.safetensors"))
        lora_gpu.write_loras(args.work, unet_sd, lora_gpu.text_state_dicts(args.text_work))
    print(f"weights ready in {time.time() - t0:.1f} s", flush=True)


def make_tiny_loras(s):
    """A style LoRA (transformer linears, and both text encoders' as the seed's style files have)
    and an LCM-LoRA-shaped one (no text encoder) for the tiny models; kohya names with diffusers
    module paths, as tools/lora_gpu.py's lcm file."""
    from lora_gpu import TEXT_LINEARS
    from make_lora_fixtures import LCM_KINDS, TRANSFORMER_LINEARS, ends_with_any, kohya_file
    from safetensors.torch import load_file, save_file

    unet_sd = load_file(os.path.join(s.unet, "diffusion_pytorch_model.safetensors"))
    g = torch.Generator().manual_seed(21)
    style = kohya_file(unet_sd, ends_with_any(TRANSFORMER_LINEARS), lambda m: m, "lora_unet_", 2, g)
    for folder, prefix in zip(s.text_encoders, ("lora_te1_", "lora_te2_")):
        text_sd = load_file(os.path.join(folder, "model.safetensors"))
        text_sd = {f"text_model.{k.removeprefix('text_model.')}": v for k, v in text_sd.items()}
        style.update(kohya_file(text_sd, ends_with_any(TEXT_LINEARS), lambda m: m, prefix, 2, g))
    lcm = kohya_file(unet_sd, ends_with_any(LCM_KINDS), lambda m: m, "lora_unet_", 2, g)
    for (path, _, _), sd in zip(s.loras, (style, lcm)):
        save_file({k: v.contiguous() for k, v in sd.items()}, path)


def write_clip_tokenizer(folder, pad_token):
    """vocab.json + merges.txt of CLIP's BPE (49408 tokens in CLIP's order: byte symbols, the same
    + "</w>", one per merge, the two specials; openai/CLIP `clip/simple_tokenizer.py`) for
    transformers' CLIPTokenizer; tokenizer_2 of SDXL pads with "!"."""
    from make_pipeline_fixtures import bytes_to_unicode

    lines = gzip.open(os.path.join(REPO, "assets", "bpe_simple_vocab_16e6.txt.gz")).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    symbols = bytes_to_unicode()
    vocab = symbols + [t + "</w>" for t in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == len(set(vocab)) == 49408
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def depth_hint(width, height, position):
    """A smooth depth-like map: a vertical gradient (near at the bottom) with a bright blob whose
    centre moves across at `position` in [0, 1]; 8-bit RGB."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy, r = width * (0.25 + 0.5 * position), height * 0.55, 0.3 * height
    value = 0.2 + 0.4 * y / height + 0.4 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    gray = np.round(255 * np.clip(value, 0, 1)).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))


def union_config(s):
    """W1 with its two nets' hints as two conditions of one ControlNet Union."""
    config = render_config(s, "union", False)
    conditions = [{k: v for k, v in c.items() if k != "path"} for c in config["controlnets"]]
    config["controlnets"] = [{"path": s.union, "conditions": conditions}]
    return config


def render_config(s, name, keyframes):
    controlnets = [
        {"path": s.controlnets[0], "kind": "openpose", "scale": 1.0, "images": "builtin:pose"},
        {"path": s.controlnets[1], "kind": "depth", "scale": 0.6},
    ]
    if keyframes:
        controlnets[1]["images"] = s.depth_keyframes
        for c in controlnets:
            c.update(keyframes=KEYFRAMES, interpolation="keyframes")
    else:
        controlnets[1]["images"] = s.depth
        for c in controlnets:
            c.update(keyframes=[0.0], interpolation="hold")
    models = {"unet": s.unet, "motion_adapter": s.motion, "vae": s.vae, "text_encoder": s.text_encoders[0],
              "text_encoder_2": s.text_encoders[1]}
    if s.tiny:  # the tiny text encoders have a vocabulary of their own
        models["tokenizer"] = s.tokenizers[0]
    return {
        "seed": SEED, "dtype": s.dtype_name, "device": s.device, "models": models,
        "loras": [{"path": p, "weight": w, "role": role} for p, w, role in s.loras],
        "controlnets": controlnets,
        "sampler": {"name": "lcm", "steps": STEPS, "cfg": CFG},
        "video": {"width": s.width, "height": s.height, "fps": FPS, "frames": s.frames},
        "output": {"root": os.path.join(s.dir, f"out_{name}"), "mp4": "auto", "png_frames": True, "replace": True},
        "clips": [{"prompt": PROMPT, "negative": NEGATIVE}],
    }


def warm_config(s, name, keyframes):
    """`render_config` with a second clip (seed + 1) rendered after the first in the same process."""
    config = render_config(s, name, keyframes)
    config["clips"].append({"prompt": PROMPT, "negative": NEGATIVE, "seed": SEED + 1})
    return config


def png_only_config(s, name, keyframes):
    """`warm_config` without the mp4: the same writing as the diffusers peer where it has no mp4 writer
    (no imageio, no ffmpeg on the machine), for a like-for-like clip time. The random weights' frames
    are noise-like, which OpenH264 codes ~5x slower than flat cel frames (0.30 against 0.06 s for
    16 frames of 1024x576 on 2 cores), so the mp4 is a larger part of W1 than of a real render."""
    config = warm_config(s, name, keyframes)
    config["output"]["mp4"] = "off"
    return config


def batch_config(s, clips):
    """The throughput manifest: W1's settings with `clips` clips of their own prompts and seeds in two
    LoRA sets, interleaved in the file (the renderer groups clips by set)."""
    config = render_config(s, "batch20", False)
    other = [dict(l) for l in config["loras"]]
    other[0]["weight"] = 0.6
    actions = ["running", "waving", "dancing", "jumping", "turning around"]
    config["clips"] = [
        {"id": f"clip-{i:02}", "prompt": f"{PROMPT}, {actions[i % len(actions)]}", "negative": NEGATIVE,
         "seed": 1000 + i, **({"loras": other} if i % 2 else {})}
        for i in range(clips)]
    return config


def prepare(s, args):
    os.makedirs(s.dir, exist_ok=True)
    if s.tiny:
        make_tiny_loras(s)
    else:
        make_full_weights(s, args)
        for folder, pad in zip(s.tokenizers, ("<|endoftext|>", "!")):
            write_clip_tokenizer(folder, pad)
    depth_hint(s.width, s.height, 0.5).save(s.depth)
    os.makedirs(s.depth_keyframes, exist_ok=True)
    for i, position in enumerate(KEYFRAMES):
        depth_hint(s.width, s.height, position).save(os.path.join(s.depth_keyframes, f"{i:02}.png"))
    for name, keyframes in (("w1", False), ("keyframes", True)):
        for stem, config in ((name, render_config(s, name, keyframes)),
                             (f"{name}_warm", warm_config(s, f"{name}_warm", keyframes)),
                             (f"{name}_warm_png", png_only_config(s, f"{name}_warm_png", keyframes))):
            path = os.path.join(s.dir, f"{stem}.json")
            with open(path, "w") as f:
                json.dump(config, f, indent=1)
            print(f"wrote {path}", flush=True)
    if not s.tiny:  # the tiny fixtures hold no Union that fits the tiny UNet
        for name, config in (("union", union_config(s)), ("batch20", batch_config(s, 20))):
            path = os.path.join(s.dir, f"{name}.json")
            with open(path, "w") as f:
                json.dump(config, f, indent=1)
            print(f"wrote {path}", flush=True)


# ---------------------------------------------------------------------------------------------
# celframe

NUMBER = r"([\d.]+)"
SUMMARY = {
    "load_s": re.compile(rf"^loaded the models .* in {NUMBER} s"),
    "clip": re.compile(rf"^clip (\d{{3}}): (\d+) frames in {NUMBER} s \({NUMBER} frames/s\): text {NUMBER} s, "
                       rf"denoise {NUMBER} s, decode \+ write {NUMBER} s(?:; .* by (\S+))?"),
    "peak": re.compile(rf"^peak GPU memory: {NUMBER} GiB \(weights {NUMBER} GiB \+ LoRA base copies {NUMBER} GiB "
                       rf"\+ the largest of activations {NUMBER} GiB, the LoRA merge's {NUMBER} GiB of factors"),
}


def parse_summary(lines):
    """The renderer's closing summary lines as RENDER fields: the clip fields of the last clip, and
    with several clips, `clips` and the first clip's time (`first_clip_s`)."""
    out, clip_times = {}, []
    for line in lines:
        if m := SUMMARY["load_s"].match(line):
            out["load_s"] = float(m[1])
        elif m := SUMMARY["clip"].match(line):
            clip_times.append(float(m[3]))
            out.update(frames=int(m[2]), clip_s=float(m[3]), frames_per_s=float(m[4]), text_s=float(m[5]),
                       denoise_s=float(m[6]), decode_write_s=float(m[7]), mp4_by=m[8])
        elif m := SUMMARY["peak"].match(line):
            out.update(peak_gib=float(m[1]), weights_gib=float(m[2]), lora_copies_gib=float(m[3]),
                       activations_gib=float(m[4]), lora_factors_gib=float(m[5]))
    if len(clip_times) > 1:
        out.update(clips=len(clip_times), first_clip_s=clip_times[0])
    return out


# The celframe workloads (`--workload`, each a config `prepare` writes) and their names in RENDER lines.
WORKLOADS = {"w1": "W1", "keyframes": "W1 keyframes", "union": "W1 union", "w1_warm": "W1 warm",
             "keyframes_warm": "W1 keyframes warm", "w1_warm_png": "W1 warm, PNG frames only",
             "keyframes_warm_png": "W1 keyframes warm, PNG frames only"}


def run_celframe(s, args):
    config = os.path.join(s.dir, f"{args.workload}.json")
    t0 = time.perf_counter()
    # RENDER_ARGS: more `celframe render` arguments, e.g. --timings for the per-kernel table.
    extra = os.environ.get("RENDER_ARGS", "").split()
    proc = subprocess.Popen([args.celframe, "render", config, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.strip())
    code = proc.wait()
    total = time.perf_counter() - t0
    record = {"side": "celframe", "workload": WORKLOADS[args.workload], "run": args.run, "exit": code,
              "total_s": round(total, 3), **parse_summary(lines)}
    print("RENDER " + json.dumps(record), flush=True)
    # A renderer whose summary lines changed must not pass for a run without numbers.
    missing = {"load_s", "clip_s", "denoise_s"} | ({"peak_gib"} if s.device == "cuda" else set())
    missing -= record.keys()
    if code == 0 and missing:
        print(f"celframe render printed no {sorted(missing)}: tools/render_gpu.py's SUMMARY patterns are stale")
        return 1
    return code


# FP8: W1 over FP8_SEEDS clips of their own seeds with the config's fp8 at each of FP8_MODES.
FP8_MODES, FP8_SEEDS = ("off", "on", "all"), 3


def fp8_config(s, mode):
    """W1 with PNG frames only (`png_only_config`), one clip per seed, the linears in FP8 per `mode`
    (in f16: FP8 quantizes 16-bit weights; the tiny run's float32 too)."""
    config = png_only_config(s, f"fp8_{mode}", False)
    config["clips"] = [{"prompt": PROMPT, "negative": NEGATIVE, "seed": SEED + i} for i in range(FP8_SEEDS)]
    config["fp8"] = mode
    if config["dtype"] == "f32":
        config["dtype"] = "f16"
    return config


def clip_frames(root, clip):
    """The PNG frames of clip number `clip` (1-based) under an outputs tree, as float arrays in [0, 1]."""
    folder = os.path.join(root, "video", f"clip_{clip:03}", "frames")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    return np.stack([np.asarray(Image.open(os.path.join(folder, n)), dtype=np.float64) / 255 for n in names])


def frames_rel_l2(root, reference_root):
    """Per clip 1..FP8_SEEDS, the relative L2 distance of its frames under `root` from those under
    `reference_root`."""
    errors = []
    for clip in range(1, FP8_SEEDS + 1):
        a, b = clip_frames(root, clip), clip_frames(reference_root, clip)
        errors.append(float(np.sqrt(((a - b) ** 2).sum() / max((b ** 2).sum(), 1e-30))))
    return errors


def run_fp8(s, args):
    """The quality cost of FP8 beside its speed: W1 rendered with fp8 off, on and all (one process
    each, FP8_SEEDS clips); per mode the warm clip time and each seed's final frames' relative L2
    distance from the fp8-off frames (FP8 JSON lines)."""
    roots, status = {}, 0
    for mode in FP8_MODES:
        config = fp8_config(s, mode)
        path = os.path.join(s.dir, f"fp8_{mode}.json")
        with open(path, "w") as f:
            json.dump(config, f, indent=1)
        roots[mode] = config["output"]["root"]
        proc = subprocess.run([args.celframe, "render", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace")
        lines = [l.strip() for l in proc.stdout.splitlines()]
        print("\n".join(l for l in lines if l.startswith(("loaded the models", "dropped the 16-bit", "peak GPU")) or " frames in " in l),
              flush=True)
        summary = parse_summary(lines)
        record = {"mode": mode, "exit": proc.returncode, "clip_s": summary.get("clip_s"),
                  "denoise_s": summary.get("denoise_s"), "peak_gib": summary.get("peak_gib")}
        if proc.returncode == 0 and mode != "off":
            errors = frames_rel_l2(roots[mode], roots["off"])
            record.update(frames_rel_l2=[round(e, 5) for e in errors], mean_rel_l2=round(sum(errors) / len(errors), 5))
        status |= proc.returncode != 0
        print("FP8 " + json.dumps(record), flush=True)
    return int(status)


# small-card: the device memory a 24 GB card leaves one process (GiB).
SMALL_CARD_GIB = 23.5


def run_small_card(s, args):
    """W1 in f16 (`fp8_config` off: FP8_SEEDS clips, PNG frames) rendered with the whole device, then
    again with only SMALL_CARD_GIB of it free (this process holds the rest through torch): a
    SMALLCARD JSON line with both exit codes and peaks and the frames' relative L2 distance."""
    import torch
    roots, record = {}, {}
    for side in ("whole", "small"):
        if side == "small":
            free = torch.cuda.mem_get_info()[0]
            leave = int(SMALL_CARD_GIB * 2 ** 30)
            if free <= leave:
                print(f"small-card: {free / 2 ** 30:.2f} GiB free, not more than {SMALL_CARD_GIB}", flush=True)
                return 1
            held = torch.empty(free - leave, dtype=torch.uint8, device="cuda")
            record["free_gib"] = round(torch.cuda.mem_get_info()[0] / 2 ** 30, 2)
        config = fp8_config(s, "off")
        config["output"]["root"] = roots[side] = os.path.join(s.dir, f"out_small_card_{side}")
        path = os.path.join(s.dir, f"small_card_{side}.json")
        with open(path, "w") as f:
            json.dump(config, f, indent=1)
        # The device's free memory every 100 ms while celframe runs: the least is its margin.
        sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits",
                                    "-lms", "100"], stdout=subprocess.PIPE, text=True)
        proc = subprocess.run([args.celframe, "render", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace")
        sampler.terminate()
        free_mib = [int(l) for l in sampler.communicate()[0].split() if l.isdigit()]
        record[f"{side}_least_free_gib"] = round(min(free_mib) / 1024, 2) if free_mib else None
        lines = [l.strip() for l in proc.stdout.splitlines()]
        print("\n".join(l for l in lines if l.startswith(("loaded the models", "peak GPU")) or " frames in " in l
                        or proc.returncode != 0), flush=True)
        summary = parse_summary(lines)
        record.update({f"{side}_exit": proc.returncode, f"{side}_peak_gib": summary.get("peak_gib"),
                       f"{side}_clip_s": summary.get("clip_s")})
        if proc.returncode != 0:
            break
    else:
        record["frames_rel_l2"] = [float(f"{e:.3g}") for e in frames_rel_l2(roots["small"], roots["whole"])]
    print("SMALLCARD " + json.dumps(record), flush=True)
    return int(any(v for k, v in record.items() if k.endswith("_exit")))


def run_throughput(s, args):
    """The 20-clip manifest with nvidia-smi sampling utilisation every 100 ms."""
    config = os.path.join(s.dir, "batch20.json")
    sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                "-lms", "100"], stdout=subprocess.PIPE, text=True)
    samples = []  # (seconds since start, percent)
    t0 = time.perf_counter()

    def read_samples():
        for line in sampler.stdout:
            if line.strip().isdigit():
                samples.append((time.perf_counter() - t0, int(line)))

    import threading
    reader = threading.Thread(target=read_samples, daemon=True)
    reader.start()
    # RENDER_ARGS: more `celframe render` arguments, e.g. --timings for the per-kernel table.
    extra = os.environ.get("RENDER_ARGS", "").split()
    proc = subprocess.Popen([args.celframe, "render", config, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    render_start = None  # the first step line: loading and the first LoRA merge are done
    for line in proc.stdout:
        print(line, end="", flush=True)
        if render_start is None and re.match(r"^clip \d+: frames", line):
            render_start = time.perf_counter() - t0
    code = proc.wait()
    total = time.perf_counter() - t0
    sampler.terminate()
    sampler.wait()
    reader.join(timeout=2)
    report = os.path.join(s.dir, "out_batch20", "configs", "run_report.json")
    with open(report) as f:
        run = json.load(f)
    clips_done = run.get("done", 0)
    start = render_start if render_start is not None else 0.0
    render_s = total - start
    mean = lambda xs: round(sum(xs) / max(len(xs), 1) / 100, 3)
    record = {"workload": "batch20", "exit": code, "clips": len(run.get("clips", [])), "done": clips_done,
              "total_s": round(total, 2), "render_s": round(render_s, 2),
              "clips_per_hour_total": round(3600 * clips_done / total, 1),
              "clips_per_hour_render": round(3600 * clips_done / max(render_s, 1e-9), 1),
              "gpu_busy_render": mean([p for t, p in samples if t >= start]),
              "gpu_busy_whole": mean([p for _, p in samples]), "gpu_samples": len(samples)}
    print("THROUGHPUT " + json.dumps(record), flush=True)
    return code


# ---------------------------------------------------------------------------------------------
# diffusers


def load_peer(s):
    """The AnimateDiff-SDXL pipeline (LoRAs fused) and the two ControlNets."""
    from diffusers import (AnimateDiffSDXLPipeline, AutoencoderKL, ControlNetModel, LCMScheduler, MotionAdapter,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from make_motion_fixtures import motion_unet
    from make_pipeline_fixtures import SDXL_SCHEDULER
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def load(cls, path):
        return cls.from_pretrained(path, torch_dtype=s.dtype).to(s.device).eval()

    parts = dict(
        vae=load(AutoencoderKL, s.vae),
        text_encoder=load(CLIPTextModel, s.text_encoders[0]),
        text_encoder_2=load(CLIPTextModelWithProjection, s.text_encoders[1]),
        tokenizer=CLIPTokenizer.from_pretrained(s.tokenizers[0]),
        tokenizer_2=CLIPTokenizer.from_pretrained(s.tokenizers[1]),
        scheduler=LCMScheduler.from_config(SDXL_SCHEDULER),
    )
    still = StableDiffusionXLPipeline(unet=load(UNet2DConditionModel, s.unet), add_watermarker=False, **parts)
    names = []
    for i, (path, _, _) in enumerate(s.loras):
        names.append(f"lora{i}")
        still.load_lora_weights(path, adapter_name=names[-1])
    still.set_adapters(names, adapter_weights=[w for _, w, _ in s.loras])
    still.fuse_lora(adapter_names=names, lora_scale=1.0)
    still.unload_lora_weights()  # the fused weights stay
    adapter = load(MotionAdapter, s.motion)
    with torch.device(s.device):  # from_unet2d builds the model where the weights are
        unet = motion_unet(still.unet, adapter)
    del still
    pipe = AnimateDiffSDXLPipeline(unet=unet, motion_adapter=adapter, **parts)
    pipe.set_progress_bar_config(disable=True)
    nets = [load(ControlNetModel, path) for path in s.controlnets]
    return pipe, nets


def control_images(s):
    """W1's hints in [0, 1] NCHW, each repeated for the CFG batch's 2F rows: a stick figure
    (tools/make_pipeline_fixtures.py; celframe draws its own builtin pose) and the depth hint."""
    from make_pipeline_fixtures import stick_figure

    pose = torch.from_numpy(stick_figure(1, s.height, s.width))
    depth = torch.from_numpy(np.asarray(Image.open(s.depth).convert("RGB"), dtype=np.float32) / 255)[None]
    rows = 2 * s.frames
    return [(img.permute(0, 3, 1, 2).repeat(rows, 1, 1, 1).to(s.device, s.dtype), scale)
            for img, scale in ((pose, 1.0), (depth, 0.6))]


@torch.no_grad()
def denoise(s, pipe, nets, controls, embeds):
    prompt_embeds, negative_embeds, pooled, negative_pooled = embeds
    size = (s.height, s.width)
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=prompt_embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    time_ids = torch.cat([time_ids, time_ids]).to(s.device)
    context = torch.cat([negative_embeds, prompt_embeds]).repeat_interleave(s.frames, dim=0)
    text_embeds = torch.cat([negative_pooled, pooled])
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    control_added = {k: v.repeat_interleave(s.frames, dim=0) for k, v in added.items()}
    generator = torch.Generator(s.device).manual_seed(SEED)
    h, w = s.height // pipe.vae_scale_factor, s.width // pipe.vae_scale_factor
    channels = pipe.unet.config.in_channels
    pipe.scheduler.set_timesteps(STEPS, device=s.device)
    latents = torch.randn((1, channels, s.frames, h, w), generator=generator, device=s.device, dtype=s.dtype)
    latents = latents * pipe.scheduler.init_noise_sigma
    for t in pipe.scheduler.timesteps:
        model_input = pipe.scheduler.scale_model_input(torch.cat([latents, latents]), t)
        folded = model_input.transpose(1, 2).reshape(-1, channels, h, w)  # [2F, C, h, w], frame fastest
        down, mid = None, None
        for net, (image, scale) in zip(nets, controls):
            d, m = net(folded, t, encoder_hidden_states=context, controlnet_cond=image, conditioning_scale=scale,
                       guess_mode=False, added_cond_kwargs=control_added, return_dict=False)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        eps = pipe.unet(model_input, t, encoder_hidden_states=context, added_cond_kwargs=added,
                        down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]
        eps_uncond, eps_cond = eps.chunk(2)
        eps = eps_uncond + CFG * (eps_cond - eps_uncond)
        latents = pipe.scheduler.step(eps, t, latents, generator=generator, return_dict=False)[0]
    return latents


def write_mp4(frames, path):
    """diffusers' export_to_video where imageio is installed, else ffmpeg from PATH with celframe's
    settings (libx264 medium, crf 18, yuv420p); returns what wrote it, or None."""
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
        from diffusers.utils import export_to_video

        export_to_video(frames, path, fps=FPS)
        return "export_to_video"
    except ImportError:
        pass
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return None
    w, h = frames[0].size
    cmd = [ffmpeg, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(FPS),
           "-i", "-", "-c:v", "libx264", "-preset", "medium", "-crf", "18", "-pix_fmt", "yuv420p", path]
    subprocess.run(cmd, input=b"".join(f.tobytes() for f in frames), check=True)
    return "ffmpeg"


def render_once(s, pipe, nets, controls, out_dir):
    times = {}
    s.sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        embeds = pipe.encode_prompt(prompt=PROMPT, device=s.device, num_videos_per_prompt=1,
                                    do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
    s.sync()
    t1 = time.perf_counter()
    latents = denoise(s, pipe, nets, controls, embeds)
    s.sync()
    t2 = time.perf_counter()
    with torch.no_grad():
        frames = pipe.video_processor.postprocess_video(video=pipe.decode_latents(latents), output_type="pil")[0]
    s.sync()
    t3 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    for i, frame in enumerate(frames):
        frame.save(os.path.join(out_dir, f"{i:06}.png"))
    mp4_by = write_mp4(frames, os.path.join(out_dir, "clip.mp4"))
    t4 = time.perf_counter()
    times.update(text_s=t1 - t0, denoise_s=t2 - t1, decode_s=t3 - t2, write_s=t4 - t3, total_s=t4 - t0)
    return {k: round(v, 3) for k, v in times.items()}, len(frames), mp4_by


def run_diffusers(s):
    import diffusers

    t0 = time.perf_counter()
    pipe, nets = load_peer(s)
    controls = control_images(s)
    s.sync()
    load_s = time.perf_counter() - t0
    out_dir = os.path.join(s.dir, "out_diffusers")
    render_once(s, pipe, nets, controls, out_dir)  # warm-up, untimed
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, frames, mp4_by = render_once(s, pipe, nets, controls, out_dir)
    record = {"side": "diffusers", "workload": "W1", "run": 1, "version": diffusers.__version__,
              "warmup": "one whole untimed render", "load_s": round(load_s, 3), **times, "frames": frames,
              "frames_per_s": round(frames / times["total_s"], 3), "mp4_by": mp4_by}
    if s.device == "cuda":
        record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("RENDER " + json.dumps(record), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["prepare", "celframe", "throughput", "fp8", "small-card", "diffusers"])
    p.add_argument("--work", required=True, help="UNet, motion adapter, ControlNets, LoRAs; render/ goes here")
    p.add_argument("--text-work", help="the text encoders' folder (tools/lora_gpu.sh's TEXT_WORK)")
    p.add_argument("--vae-work", help="the VAE's folder (tools/vae_gpu.sh's WORK)")
    p.add_argument("--tiny", action="store_true", help="the tiny fixture models on the CPU (no GPU needed)")
    p.add_argument("--celframe", default="dist/gpu/celframe", help="the celframe binary (step celframe)")
    p.add_argument("--workload", choices=list(WORKLOADS), default="w1", help="step celframe: which config")
    p.add_argument("--run", type=int, default=1, help="step celframe: the run's number in the RENDER line")
    args = p.parse_args()
    if not args.tiny and not (args.text_work and args.vae_work):
        p.error("--text-work and --vae-work are needed without --tiny")
    s = Setup(args)
    if args.step == "prepare":
        prepare(s, args)
    elif args.step == "celframe":
        sys.exit(run_celframe(s, args))
    elif args.step == "throughput":
        sys.exit(run_throughput(s, args))
    elif args.step == "fp8":
        sys.exit(run_fp8(s, args))
    elif args.step == "small-card":
        sys.exit(run_small_card(s, args))
    else:
        run_diffusers(s)


if __name__ == "__main__":
    main()
