#!/usr/bin/env python3
"""Converts an original AnimateDiff motion-module checkpoint (a pickled `.ckpt` / `.pt`, e.g.
mm_sdxl_v10_beta.ckpt) into one safetensors file with the same key names, which
`celframe verify motion_unet --motion FILE` (and every celframe command) loads. celframe never
unpickles: this script is the only place torch reads the pickle.

    python3 tools/convert_motion_ckpt.py mm_sdxl_v10_beta.ckpt mm_sdxl_v10_beta.safetensors

Keys stay as the original module names them (guoyww/AnimateDiff `animatediff/models/motion_module.py`):
`{down,up}_blocks.N.motion_modules.M.temporal_transformer.…`, `attention_blocks.{0,1}.pos_encoder.pe`
included; a `state_dict` wrapper and a `module.` prefix (checkpoints saved from DataParallel) are
removed. Tensors keep their dtype. Anything that is not a tensor is refused, as is a key outside
the motion modules, so a UNet or full-pipeline checkpoint is not passed off as a motion module.

The pickle is read with `torch.load(weights_only=True)`, which refuses arbitrary objects; a
checkpoint that needs full unpickling is refused rather than executed.
"""
import argparse
import re
import sys

import torch
from safetensors.torch import save_file

KEY = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.motion_modules\.\d+\.temporal_transformer\.")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="original AnimateDiff motion module (.ckpt / .pt)")
    p.add_argument("out", help="safetensors file to write")
    args = p.parse_args()

    state = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        sys.exit(f"{args.ckpt}: not a state dict (found {type(state).__name__})")
    tensors, problems = {}, []
    for key, value in state.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if not torch.is_tensor(value):
            problems.append(f"{key}: not a tensor ({type(value).__name__})")
        elif not KEY.match(name):
            problems.append(f"{key}: not a motion-module key")
        else:
            tensors[name] = value.detach().clone().contiguous()  # a copy: pickles may share storage
    if problems:
        listed = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        sys.exit(f"{args.ckpt}: {len(problems)} entries are not motion-module tensors:\n  {listed}{more}")
    if not tensors:
        sys.exit(f"{args.ckpt}: no motion-module tensors")
    save_file(tensors, args.out, metadata={"converted_from": args.ckpt, "generator": "tools/convert_motion_ckpt.py"})
    print(f"wrote {args.out}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values())} values")


if __name__ == "__main__":
    main()
