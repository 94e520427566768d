#!/usr/bin/env python3
"""Writes tests/fixtures/pipeline_tiny/: tiny SDXL-family models and end-to-end references of
`celframe render` made by diffusers (CPU, float32) with injected noise.

Models (diffusers folders under pipeline_tiny/; weights seeded random, rounded to float16 and stored
as float16, run in float32):
  unet/            UNet2DConditionModel: levels (DownBlock2D, CrossAttnDownBlock2D), widths 32/32
                   (64 at level 1 doubles the folder), 1 layer per block, 1 transformer layer, 2 heads
                   of 16 (the mid block too), 32 norm groups, cross_attention_dim 192
                   (CLIP-L 64 + bigG 128), text_time with addition_time_embed_dim 32 and
                   projection_class_embeddings_input_dim 6 * 32 + 96 (bigG's projection).
  motion_adapter/  MotionAdapter on widths 32/32 (1 module per down block, 2 per up block, no mid
                   block as AnimateDiff-SDXL, 4 heads of 8 at level 0, 2 of 16 at level 1, 32
                   positions), proj_out given noise.
  controlnet/      ControlNetModel.from_unet(unet) with conditioning_embedding_out_channels (8, 16):
                   two stages, so the control image is 2x the latent, as the VAE's scale is 2. Every
                   tensor then perturbed (its encoder is not the UNet's copy) and the zero convs and the
                   embedding's conv_out given noise, so its residuals matter.
  tokenizer/, tokenizer_2/
                   a cut-down CLIP BPE vocabulary (see below); identical vocab.json and merges.txt,
                   tokenizer_2's config pads with "!" as SDXL's does.
Reused by relative path (not copied): ../text_encoder_tiny (CLIP-L role), ../text_encoder_2_tiny
(bigG role), ../vae_tiny (2 levels: latent = image / 2, scaling_factor 0.13025).

The vocabulary. The tiny text encoders have 512 token embeddings, so the real CLIP vocabulary (ids up
to 49407) cannot drive them. tokenizer/ holds 512 tokens built from CLIP's merge list
(assets/bpe_simple_vocab_16e6.txt.gz) in CLIP's order: the 256 byte symbols (CLIP's ids), the
"</w>" forms of printable ASCII other than capitals, the first CLIP merges whose two parts are in
the vocabulary (in rank order, up to the 512), with <|startoftext|> at id 508 and <|endoftext|> at
509 (text_encoder_2_tiny pools at the first 509; text_encoder_tiny's argmax pooling is unused by
SDXL). Load it as a model's own tokenizer folder (transformers' CLIPTokenizer.from_pretrained, the
crate's Tokenizer::from_dir). Each case JSON records the padded ids of both tokenizers.

Cases: <case>.json, <case>.noise.safetensors, <case>.reference.safetensors.
  lcm_video         AnimateDiffSDXLPipeline, LCMScheduler, 4 steps, guidance 1.5, 64x64, 8 frames,
                    empty negative (negative_prompt=None: force_zeros_for_empty_prompt gives zero
                    negative embeddings and pooled vector).
  euler_video       AnimateDiffSDXLPipeline, EulerDiscreteScheduler (timestep_spacing "trailing"),
                    3 steps, guidance 2.0, 80 wide x 64 high, 6 frames, a negative prompt.
  lcm_image         StableDiffusionXLPipeline (no motion modules), LCM 4 steps, guidance 1.5,
                    96 wide x 64 high.
  controlnet_video  diffusers 0.42.1 has no SDXL AnimateDiff ControlNet pipeline, so this script runs
                    AnimateDiffSDXLPipeline's loop itself (`controlnet_loop`, checked here to give
                    AnimateDiffSDXLPipeline's result exactly when the ControlNet is left out) with
                    StableDiffusionXLControlNetPipeline's ControlNet conventions: every step the
                    ControlNet sees the UNet's scaled latent_model_input with the frames folded into
                    the batch ([2, 4, F, h, w] -> [2F, 4, h, w], row = cfg_half * F + frame, as
                    AnimateDiffControlNetPipeline folds them), the prompt embeddings repeated per frame
                    (the UNet's encoder_hidden_states), text_embeds and time_ids repeated per frame,
                    the control image in [0, 1] NCHW repeated for the two CFG halves ([uncond, cond]),
                    conditioning_scale 0.8, guess_mode False, control start 0 / end 1; its residuals
                    go to the motion UNet as down_block_additional_residuals /
                    mid_block_additional_residual. LCM 4 steps, guidance 1.5, 64x64, 5 frames,
                    a negative prompt.
  free_init_video   AnimateDiffSDXLPipeline with enable_free_init(num_iters=3, use_fast_sampling=True,
                    butterworth order 4, spatial and temporal stop frequency 0.25): three passes of 1, 2
                    and 4 LCM steps, guidance 1.5, 64x64, 4 frames, a negative prompt. To keep it
                    small its noise file is float16 (values drawn in float32 and rounded to float16
                    before the pipeline sees them, so the file holds them exactly) and its reference
                    file holds the final latents only (the other cases check the decoding).

Noise file (<case>.noise.safetensors, all float32):
  latents   the N(0, 1) tensor passed as the pipeline's `latents=`: [1, 4, frames, h, w] for video,
            [1, 4, h, w] for the image (h, w = height / 2, width / 2). The pipeline multiplies it by
            the scheduler's init_noise_sigma (1 for LCM; recorded in the JSON) before the first step.
  step.<i>  LCM only: the fresh Gaussian noise of the scheduler's i-th draw (i = 0 .. steps - 2; the last
            step draws none), same layout as latents. Injected by replacing
            diffusers.schedulers.scheduling_lcm.randn_tensor. Euler with s_churn 0 uses no noise.
            With FreeInit these are the first pass's; pass k >= 1 draws free_init.<k>.step.<i>.
  free_init.<k>
            free_init_video only, k = 1 .. num_iters - 1: the fresh noise FreeInit mixes into pass k's
            initial latents (its high frequencies), same layout as latents. Injected by replacing
            diffusers.pipelines.free_init_utils.randn_tensor (FreeInitMixin._apply_free_init's draw).
  control   controlnet_video only: [frames, H, W, 3] in [0, 1], a white stick figure on black
            moving across the frames; whole 8-bit levels, so PNGs of it give the same tensor.
Reference file (<case>.reference.safetensors, float32):
  frames                  output_type="np": [frames, H, W, 3] in [0, 1] ([1, H, W, 3] for the image)
  latents                 the denoised latents before the VAE (captured by callback_on_step_end on
                          the last step), the layout of the noise file's latents
  prompt_embeds           [1, 77, 192] and negative_prompt_embeds (hidden_states[-2] of CLIP-L then
                          bigG, concatenated), pooled_prompt_embeds and negative_pooled_prompt_embeds
                          [1, 96], from the pipeline's encode_prompt
The case JSON lists every setting: prompt, negative (and whether its embeddings are zeros), sizes,
frames, steps, guidance, the scheduler class, its full config, timesteps and init_noise_sigma, the
time ids (original_size, crops_coords_top_left, target_size), the ControlNet scale, the model
folders relative to pipeline_tiny/, the token ids.

The models are random, so the UNet's noise prediction is unrelated to the noise and the final
latents come out with a standard deviation near 17 rather than 1; the decoded frames still use the
whole range (about 2% of values clipped at 0 or 1) and differ from frame to frame.

How a test reproduces a case: load the models named in the JSON, tokenize prompt and negative with
pipeline_tiny/tokenizer, set the sampler from the JSON, take the initial latents from `latents`
(times init_noise_sigma) and the i-th fresh scheduler noise from `step.<i>`, run the steps with CFG
ε = ε_uncond + guidance (ε_cond − ε_uncond), compare the final latents with `latents` and the
decoded frames with `frames`.

free_init_filters.json: diffusers' FreeInit filter (FreeInitMixin._get_free_init_freq_filter, its
fftshift-ed layout [frames][h][w] row-major, float32 values) for several methods, orders, stop
frequencies and odd and even sides ("filters"), and its frequency mixing
(FreeInitMixin._apply_freq_filter) of two random [1, C, F, h, w] tensors ("mixing": x, noise and
mixed as flat [C][F][h][w] lists).

Run: /path/to/python tools/make_pipeline_fixtures.py [CASE ...]   (needs torch, diffusers,
transformers, safetensors, numpy). With case names (or "free_init_filters"), only those files are
written, from the models and tokenizers already in pipeline_tiny/.
"""
import gzip
import json
import pathlib
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_controlnet_fixtures import randomize_own  # noqa: E402
from make_motion_fixtures import motion_unet  # noqa: E402
from make_motion_fixtures import randomize as randomize_motion  # noqa: E402
from make_unet_fixtures import randomize  # noqa: E402

import diffusers.pipelines.free_init_utils as free_init_utils  # noqa: E402
import diffusers.schedulers.scheduling_lcm as scheduling_lcm  # noqa: E402
from diffusers.pipelines.free_init_utils import FreeInitMixin  # noqa: E402
from diffusers import (  # noqa: E402
    AnimateDiffSDXLPipeline,
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    LCMScheduler,
    MotionAdapter,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests/fixtures"
OUT = FIXTURES / "pipeline_tiny"
VOCAB_SIZE = 512
BOS_ID, EOS_ID = 508, 509

UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=[32, 32],
    layers_per_block=1,
    transformer_layers_per_block=1,
    attention_head_dim=[1, 2],  # head COUNTS (diffusers' misnomer): 2 heads of 16 where attention is
    cross_attention_dim=64 + 128,
    norm_num_groups=32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=6 * 32 + 96,
)
ADAPTER = dict(
    block_out_channels=(32, 32),
    motion_layers_per_block=1,
    motion_transformer_layers_per_block=1,
    motion_num_attention_heads=(4, 2),
    motion_norm_num_groups=32,
    motion_max_seq_length=32,
    use_motion_mid_block=False,
)
CONTROL_EMBEDDING = (8, 16)
# The scheduler config of stabilityai/stable-diffusion-xl-base-1.0 (scheduler/scheduler_config.json).
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
    clip_sample=False,
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
)

CASES = {
    "lcm_video": dict(
        pipeline="AnimateDiffSDXLPipeline", sampler="lcm", steps=4, guidance=1.5, width=64, height=64, frames=8,
        prompt="a girl with long hair walking in the rain, anime style", negative=None),
    "euler_video": dict(
        pipeline="AnimateDiffSDXLPipeline", sampler="euler", steps=3, guidance=2.0, width=80, height=64, frames=6,
        prompt="a red train crossing a bridge at sunset, city lights in the distance",
        negative="low quality, blurry, text"),
    "lcm_image": dict(
        pipeline="StableDiffusionXLPipeline", sampler="lcm", steps=4, guidance=1.5, width=96, height=64, frames=1,
        prompt="the sea under a starry night sky, painting", negative=None),
    "controlnet_video": dict(
        pipeline="AnimateDiffSDXLPipeline + ControlNetModel (controlnet_loop)", sampler="lcm", steps=4,
        guidance=1.5, width=64, height=64, frames=5, controlnet_scale=0.8,
        prompt="a dancer on a stage, spotlight, anime screencap", negative="bad anatomy, extra arms"),
    "free_init_video": dict(
        pipeline="AnimateDiffSDXLPipeline + enable_free_init", sampler="lcm", steps=4, guidance=1.5, width=64,
        height=64, frames=4, prompt="a cat jumping over a fence, anime style", negative="blurry, low quality",
        free_init=dict(num_iters=3, use_fast_sampling=True, method="butterworth", order=4,
                       spatial_stop_frequency=0.25, temporal_stop_frequency=0.25)),
}


def bytes_to_unicode():
    """GPT-2's byte -> printable character table in CLIP's vocabulary order (openai/CLIP
    `clip/simple_tokenizer.py`): printable Latin-1 bytes map to themselves, the rest to 256 + n."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizers():
    """tokenizer/ and tokenizer_2/ with the 512-token vocabulary of the module doc."""
    lines = gzip.open(REPO / "assets/bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
    clip_merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols[:94] if not s.isupper()]
    known = set(vocab)
    merges = []
    ordinary = VOCAB_SIZE - 2
    for left, right in clip_merges:
        if len(vocab) == ordinary:
            break
        if left in known and right in known and left + right not in known:
            merges.append((left, right))
            vocab.append(left + right)
            known.add(left + right)
    vocab = vocab[:BOS_ID] + ["<|startoftext|>", "<|endoftext|>"] + vocab[BOS_ID:]
    assert len(vocab) == VOCAB_SIZE == len(set(vocab)) and vocab.index("!") == 0
    ids = {t: i for i, t in enumerate(vocab)}
    for folder, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        path = OUT / folder
        path.mkdir(parents=True, exist_ok=True)
        (path / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False) + "\n", encoding="utf-8")
        (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
                  "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(OUT / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(OUT / "tokenizer_2")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS_ID, EOS_ID, EOS_ID)
    assert tokenizer_2.pad_token_id == 0
    print(f"tokenizers: {len(vocab)} tokens, {len(merges)} merges")
    return tokenizer, tokenizer_2


def store_half(model, folder):
    """Saves `model` with float16 weights (its values were rounded to float16) and returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = {k: v.half() for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    return sum(v.numel() for v in state.values())


def make_models():
    torch.manual_seed(20261203)
    unet = UNet2DConditionModel(**UNET).eval()
    randomize(unet, 20261204)
    n = store_half(unet, OUT / "unet")
    print(f"unet: {n} params")

    torch.manual_seed(20261205)
    adapter = MotionAdapter(**ADAPTER).eval()
    randomize_motion(adapter, 20261206)
    n = store_half(adapter, OUT / "motion_adapter")
    print(f"motion_adapter: {n} params")

    unet = UNet2DConditionModel.from_pretrained(OUT / "unet", torch_dtype=torch.float32).eval()
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONTROL_EMBEDDING).eval()
    randomize(cn, 20261207)
    randomize_own(cn, 20261208)
    n = store_half(cn, OUT / "controlnet")
    print(f"controlnet: {n} params")


def load_components():
    unet = UNet2DConditionModel.from_pretrained(OUT / "unet", torch_dtype=torch.float32).eval()
    adapter = MotionAdapter.from_pretrained(OUT / "motion_adapter", torch_dtype=torch.float32).eval()
    return dict(
        unet=unet,
        adapter=adapter,
        # from_unet2d alone leaves SDXL's add_embedding random in diffusers 0.42: motion_unet copies it.
        motion_unet=motion_unet(unet, adapter),
        controlnet=ControlNetModel.from_pretrained(OUT / "controlnet", torch_dtype=torch.float32).eval(),
        vae=AutoencoderKL.from_pretrained(FIXTURES / "vae_tiny", torch_dtype=torch.float32).eval(),
        text_encoder=CLIPTextModel.from_pretrained(FIXTURES / "text_encoder_tiny", torch_dtype=torch.float32).eval(),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
            FIXTURES / "text_encoder_2_tiny", torch_dtype=torch.float32).eval(),
    )


def make_scheduler(sampler):
    if sampler == "lcm":
        return LCMScheduler.from_config(SDXL_SCHEDULER)
    return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER, timestep_spacing="trailing")


def make_pipeline(case, parts, tokenizers):
    common = dict(vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
                  tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], scheduler=make_scheduler(case["sampler"]))
    if case["frames"] == 1:
        pipe = StableDiffusionXLPipeline(unet=parts["unet"], add_watermarker=False, **common)
    else:
        pipe = AnimateDiffSDXLPipeline(unet=parts["motion_unet"], motion_adapter=parts["adapter"], **common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class injected_lcm_noise:
    """Makes LCMScheduler.step draw the given tensors, in order, instead of random ones."""

    def __init__(self, noise):
        self.noise = list(noise)

    def __enter__(self):
        self.saved = scheduling_lcm.randn_tensor

        def draw(shape, **kwargs):
            assert self.noise, "the scheduler drew more noise than was prepared"
            n = self.noise.pop(0)
            assert tuple(shape) == tuple(n.shape), (shape, n.shape)
            return n.clone()

        scheduling_lcm.randn_tensor = draw
        return self

    def __exit__(self, *exc):
        scheduling_lcm.randn_tensor = self.saved
        if exc[0] is None:
            assert not self.noise, "prepared noise was left unused"


class injected_free_init_noise:
    """Makes FreeInitMixin._apply_free_init draw the given tensors, in order, as its fresh noise."""

    def __init__(self, noise):
        self.noise = list(noise)

    def __enter__(self):
        self.saved = free_init_utils.randn_tensor

        def draw(shape, **kwargs):
            assert self.noise, "FreeInit drew more noise than was prepared"
            n = self.noise.pop(0)
            assert tuple(shape) == tuple(n.shape), (shape, n.shape)
            return n.clone()

        free_init_utils.randn_tensor = draw
        return self

    def __exit__(self, *exc):
        free_init_utils.randn_tensor = self.saved
        if exc[0] is None:
            assert not self.noise, "prepared FreeInit noise was left unused"


def free_init_steps(case):
    """The steps of each FreeInit pass (FreeInitMixin._apply_free_init's coarse-to-fine rule)."""
    f = case["free_init"]
    if not f["use_fast_sampling"]:
        return [case["steps"]] * f["num_iters"]
    return [max(1, int(case["steps"] / f["num_iters"] * (k + 1))) for k in range(f["num_iters"])]


def stick_figure(frames, height, width):
    """[frames, H, W, 3] in [0, 1]: a white stick figure walking left to right on black, its arms and
    legs swinging (1-pixel soft edges, so values between 0 and 1 occur too, all multiples of 1/255)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    out = np.zeros((frames, height, width, 3), np.float32)
    for f in range(frames):
        cx = width * (0.3 + 0.4 * f / max(frames - 1, 1))
        swing = 0.35 * np.sin(2 * np.pi * f / frames)
        s = height / 64.0
        head, neck, hip = (cx, 12 * s), (cx, 18 * s), (cx, 36 * s)
        limbs = [(neck, hip)]
        for side in (-1, 1):
            a = side * swing
            limbs.append((neck, (cx + 12 * s * np.sin(0.8 * side + a), 18 * s + 12 * s * np.cos(0.8 * side + a))))
            limbs.append((hip, (cx + 16 * s * np.sin(0.35 * side - a), 36 * s + 16 * s * np.cos(0.35 * side - a))))
        dist = np.abs(np.hypot(xx - head[0], yy - head[1]) - 5 * s)
        for (x0, y0), (x1, y1) in limbs:
            dx, dy = x1 - x0, y1 - y0
            t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy), 0, 1)
            dist = np.minimum(dist, np.hypot(xx - x0 - t * dx, yy - y0 - t * dy))
        out[f] = np.clip(2.0 - dist, 0, 1)[..., None]
    # Whole 8-bit levels, so a PNG of it reads back (/ 255, as diffusers' image processor does) exactly.
    return np.round(out * 255) / 255


@torch.no_grad()
def controlnet_loop(pipe, controlnet, case, latents, control, scale):
    """AnimateDiffSDXLPipeline.__call__'s steps (no FreeInit, IP-Adapter or guidance rescale) with the
    ControlNet residuals of the module doc; `controlnet=None` leaves them out. Returns the final
    latents [1, 4, F, h, w]."""
    frames, guidance = case["frames"], case["guidance"]
    prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=case["prompt"], device="cpu", num_videos_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=case["negative"])
    size = (case["height"], case["width"])
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=prompt_embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    context = torch.cat([negative_embeds, prompt_embeds]).repeat_interleave(frames, dim=0)
    text_embeds = torch.cat([negative_pooled, pooled])
    time_ids = torch.cat([time_ids, time_ids])
    pipe.scheduler.set_timesteps(case["steps"], device="cpu")
    latents = latents * pipe.scheduler.init_noise_sigma
    if controlnet is not None:
        cond_image = torch.from_numpy(control).permute(0, 3, 1, 2)
        cond_image = torch.cat([cond_image, cond_image])
        control_added = {"text_embeds": text_embeds.repeat_interleave(frames, dim=0),
                         "time_ids": time_ids.repeat_interleave(frames, dim=0)}
    for t in pipe.scheduler.timesteps:
        model_input = pipe.scheduler.scale_model_input(torch.cat([latents, latents]), t)
        residuals = {}
        if controlnet is not None:
            # [2, 4, F, h, w] -> [2F, 4, h, w], frame fastest
            folded = model_input.transpose(1, 2).reshape(-1, model_input.shape[1], *model_input.shape[-2:])
            down, mid = controlnet(folded, t, encoder_hidden_states=context, controlnet_cond=cond_image,
                                   conditioning_scale=scale, guess_mode=False, added_cond_kwargs=control_added,
                                   return_dict=False)
            residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        eps = pipe.unet(model_input, t, encoder_hidden_states=context,
                        added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                        return_dict=False, **residuals)[0]
        eps_uncond, eps_cond = eps.chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = pipe.scheduler.step(eps, t, latents, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode(pipe, latents):
    """The pipeline's own decoding of final latents to output_type="np" frames [frames, H, W, 3]."""
    if latents.dim() == 5:
        return pipe.video_processor.postprocess_video(video=pipe.decode_latents(latents), output_type="np")[0]
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np")


def jsonable(value):
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def run_case(name, case, parts, tokenizers, seed):
    pipe = make_pipeline(case, parts, tokenizers)
    video = case["frames"] > 1
    g = torch.Generator().manual_seed(seed)
    h, w = case["height"] // pipe.vae_scale_factor, case["width"] // pipe.vae_scale_factor
    shape = (1, 4, case["frames"], h, w) if video else (1, 4, h, w)
    # float16 noise files hold what the pipeline saw exactly.
    half = "free_init" in case
    randn = (lambda: torch.randn(shape, generator=g).half().float()) if half else (
        lambda: torch.randn(shape, generator=g))
    latents = randn()
    passes = free_init_steps(case) if "free_init" in case else [case["steps"]]
    lcm = case["sampler"] == "lcm"
    draws = case["steps"] - 1 if lcm else 0
    step_noise, fresh_noise, noise = [], [], {"latents": latents}
    for k, steps in enumerate(passes):
        if k > 0:
            fresh_noise.append(randn())
            noise[f"free_init.{k}"] = fresh_noise[-1]
        for i in range(steps - 1 if lcm else 0):
            step_noise.append(randn())
            noise[f"step.{i}" if k == 0 else f"free_init.{k}.step.{i}"] = step_noise[-1]

    with torch.no_grad():
        embeds = pipe.encode_prompt(prompt=case["prompt"], device="cpu", do_classifier_free_guidance=True,
                                    negative_prompt=case["negative"],
                                    **({"num_videos_per_prompt": 1} if video else {"num_images_per_prompt": 1}))
    reference = dict(zip(["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                          "negative_pooled_prompt_embeds"], embeds))

    final = {}

    def keep_last(p, i, t, kwargs):
        if i == case["steps"] - 1:
            final["latents"] = kwargs["latents"].clone()
        return {}

    size = (case["height"], case["width"])
    kwargs = dict(prompt=case["prompt"], negative_prompt=case["negative"], height=case["height"],
                  width=case["width"], num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                  latents=latents.clone(), output_type="np", callback_on_step_end=keep_last)
    if "controlnet_scale" in case:
        control = stick_figure(case["frames"], case["height"], case["width"])
        noise["control"] = torch.from_numpy(control)
        # The loop without the ControlNet must be the pipeline itself.
        with injected_lcm_noise(step_noise), torch.no_grad():
            plain = pipe(**kwargs, num_frames=case["frames"]).frames
        with injected_lcm_noise(step_noise):
            mine = controlnet_loop(pipe, None, case, latents, None, 0.0)
        assert torch.equal(mine, final["latents"]), (mine - final["latents"]).abs().max()
        with injected_lcm_noise(step_noise):
            latents_out = controlnet_loop(pipe, parts["controlnet"], case, latents, control, case["controlnet_scale"])
        frames = decode(pipe, latents_out)
        change = np.linalg.norm(frames - plain[0]) / np.linalg.norm(plain[0])
        print(f"  {name}: the ControlNet changes the frames by {change:.3f} (relative L2)")
        final["latents"] = latents_out
    else:
        if "free_init" in case:
            pipe.enable_free_init(**case["free_init"])
        with injected_lcm_noise(step_noise), injected_free_init_noise(fresh_noise), torch.no_grad():
            out = pipe(**kwargs, **({"num_frames": case["frames"]} if video else {}))
        frames = out.frames[0] if video else out.images
        assert np.array_equal(frames, decode(pipe, final["latents"])), "the kept latents are not what was decoded"
    reference["frames"] = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
    reference["latents"] = final["latents"]

    pipe.scheduler.set_timesteps(case["steps"], device="cpu")
    ids = {}
    for key, text in (("prompt", case["prompt"]), ("negative", case["negative"] or "")):
        padded = dict(padding="max_length", max_length=77, truncation=True)
        ids[key] = {"tokenizer": tokenizers[0](text, **padded)["input_ids"],
                    "tokenizer_2": tokenizers[1](text, **padded)["input_ids"]}
    description = {
        "case": name,
        "generator": "tools/make_pipeline_fixtures.py",
        "diffusers_pipeline": case["pipeline"],
        "models": {"unet": "unet", "motion_adapter": "motion_adapter" if video else None,
                   "controlnet": "controlnet" if "controlnet_scale" in case else None,
                   "vae": "../vae_tiny", "text_encoder": "../text_encoder_tiny",
                   "text_encoder_2": "../text_encoder_2_tiny", "tokenizer": "tokenizer", "tokenizer_2": "tokenizer_2"},
        "prompt": case["prompt"],
        "negative": case["negative"] or "",
        "negative_embeds": "zeros" if case["negative"] is None else "encoded",
        "width": case["width"],
        "height": case["height"],
        "frames": case["frames"],
        "latent_shape": list(shape),
        "vae_scale_factor": pipe.vae_scale_factor,
        "vae_scaling_factor": pipe.vae.config.scaling_factor,
        "sampler": case["sampler"],
        "steps": case["steps"],
        "guidance": case["guidance"],
        "guidance_rescale": 0.0,
        "scheduler_class": type(pipe.scheduler).__name__,
        "scheduler_config": {k: jsonable(v) for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
        "timesteps": jsonable(pipe.scheduler.timesteps),
        "sigmas": jsonable(pipe.scheduler.sigmas) if case["sampler"] == "euler" else None,
        "init_noise_sigma": float(pipe.scheduler.init_noise_sigma),
        "step_noise_draws": draws,
        "original_size": list(size),
        "crops_coords_top_left": [0, 0],
        "target_size": list(size),
        "add_time_ids": list(size) + [0, 0] + list(size),
        "controlnet_scale": case.get("controlnet_scale"),
        "controlnet_guess_mode": False if "controlnet_scale" in case else None,
        "controlnet_start_end": [0.0, 1.0] if "controlnet_scale" in case else None,
        "token_ids": ids,
    }
    if "free_init" in case:
        f = case["free_init"]
        # The settings under celframe's names ([video.free_init]) and the steps of each pass.
        description["free_init"] = {"iterations": f["num_iters"], "method": f["method"], "order": f["order"],
                                    "spatial_stop_frequency": f["spatial_stop_frequency"],
                                    "temporal_stop_frequency": f["temporal_stop_frequency"],
                                    "use_fast_sampling": f["use_fast_sampling"]}
        description["free_init_steps"] = passes
        description["step_noise_draws"] = sum(s - 1 for s in passes)
    meta = {"generator": "tools/make_pipeline_fixtures.py", "torch": torch.__version__}
    if half:
        reference = {"latents": reference["latents"]}
    for kind, tensors in (("noise", noise), ("reference", reference)):
        dtype = torch.float16 if half and kind == "noise" else torch.float32
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(OUT / f"{name}.{kind}.safetensors"),
                  metadata=meta)
    (OUT / f"{name}.json").write_text(json.dumps(description, indent=1) + "\n")
    print(f"  {name}: frames {list(frames.shape)} mean {frames.mean():.3f} std {frames.std():.3f}, "
          f"latents {list(final['latents'].shape)} std {final['latents'].std():.3f}")


FILTER_CASES = [
    # method, order, spatial, temporal stop frequency, (frames, h, w)
    ("butterworth", 4, 0.25, 0.25, (8, 6, 10)),
    ("butterworth", 2, 0.4, 0.1, (5, 7, 6)),
    ("gaussian", 4, 0.25, 0.25, (7, 8, 5)),
    ("gaussian", 4, 0.6, 0.3, (16, 4, 6)),
    ("ideal", 4, 0.25, 0.25, (6, 9, 8)),
    ("ideal", 4, 0.5, 0.7, (3, 6, 7)),
    ("butterworth", 4, 0.0, 0.25, (4, 4, 4)),
    ("butterworth", 4, 0.25, 1.0, (1, 6, 8)),
]
MIXING_CASES = [
    ("butterworth", 4, 0.25, 0.25, (6, 4, 8), 2),
    ("gaussian", 4, 0.3, 0.5, (5, 7, 6), 1),
    ("ideal", 4, 0.5, 0.7, (3, 5, 4), 2),
]


def write_free_init_filters():
    """free_init_filters.json of the module doc, from FreeInitMixin's own functions."""
    mixin = FreeInitMixin()
    g = torch.Generator().manual_seed(20261220)

    def values(t):
        # Each float32 as its shortest decimal, which reads back to the same float32.
        return [float(str(v)) for v in t.flatten().numpy()]

    def settings(method, order, spatial, temporal, dims):
        return {"method": method, "order": order, "spatial_stop_frequency": spatial,
                "temporal_stop_frequency": temporal, "dims": list(dims)}

    def mask(method, order, spatial, temporal, shape):
        return mixin._get_free_init_freq_filter(shape, "cpu", method, order, spatial, temporal)

    filters = []
    for method, order, spatial, temporal, dims in FILTER_CASES:
        m = mask(method, order, spatial, temporal, (1, 1, *dims))
        filters.append({**settings(method, order, spatial, temporal, dims), "mask": values(m)})
    mixing = []
    for method, order, spatial, temporal, dims, channels in MIXING_CASES:
        shape = (1, channels, *dims)
        x, noise = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g)
        mixed = mixin._apply_freq_filter(x, noise, mask(method, order, spatial, temporal, shape))
        mixing.append({**settings(method, order, spatial, temporal, dims), "channels": channels,
                       "x": values(x), "noise": values(noise),
                       "mixed": values(mixed)})
    text = json.dumps({"generator": "tools/make_pipeline_fixtures.py", "torch": torch.__version__,
                       "filters": filters, "mixing": mixing})
    (OUT / "free_init_filters.json").write_text(text + "\n")
    print(f"free_init_filters.json: {len(filters)} filters, {len(mixing)} mixes")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    wanted = sys.argv[1:]
    unknown = [w for w in wanted if w not in CASES and w != "free_init_filters"]
    assert not unknown, f"unknown cases {unknown}; cases: {', '.join(CASES)}, free_init_filters"
    if wanted:
        tokenizers = (CLIPTokenizer.from_pretrained(OUT / "tokenizer"), CLIPTokenizer.from_pretrained(OUT / "tokenizer_2"))
    else:
        tokenizers = write_tokenizers()
        make_models()
    if not wanted or "free_init_filters" in wanted:
        write_free_init_filters()
    parts = load_components()
    for i, (name, case) in enumerate(CASES.items()):
        if not wanted or name in wanted:
            run_case(name, case, parts, tokenizers, 20261210 + i)
    files = sorted(p for p in OUT.rglob("*") if p.is_file())
    for p in files:
        print(f"  {p.relative_to(OUT)}: {p.stat().st_size / 1e6:.3f} MB")
    print(f"pipeline_tiny: {sum(p.stat().st_size for p in files) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
