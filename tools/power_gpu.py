#!/usr/bin/env python3
"""Power draw and SM clock of the UNet forward at 32 images 1024x576, ours beside diffusers eager.

On the GPU machine, from the repo root (tools/gpu_steps.sh's `power` step runs it), after the UNet
weights exist in WORK/sdxl_unet (tools/unet_gpu.py writes them when missing): nvidia-smi samples
power and SM clock every 100 ms while each side runs its forwards back to back, diffusers (fp16,
eager, 20 timed forwards after 3 warm-ups) in this process and `celframe bench unet` in another.
The samples within 80% of a side's highest draw count as its busy ones (loading, warm-up and
idle gaps fall below). One POWER line per side: median watts and SM MHz over the busy samples,
the forward's median ms and the energy of one forward (watts x ms), so a kernel change can be
judged by the energy it saves as well as the time: a forward at the card's power limit (700 W on
an H100 SXM) is as fast as its energy per forward allows.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from cuda_timing import cuda_ms  # noqa: E402
from dump_unet_reference import random_inputs, run  # noqa: E402
from unet_gpu import make_weights  # noqa: E402

KEY = "unet f16 b32 576x1024"


def sampled(work):
    """Runs `work()` while nvidia-smi samples every 100 ms; returns (its result, [(watts, MHz)])."""
    with tempfile.NamedTemporaryFile("w+", suffix=".csv") as log:
        sampler = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=power.draw,clocks.sm", "--format=csv,noheader,nounits", "-lms", "100"],
            stdout=log,
        )
        try:
            result = work()
        finally:
            sampler.terminate()
            sampler.wait()
        log.seek(0)
        samples = []
        for line in log:
            fields = [f.strip() for f in line.split(",")]
            if len(fields) == 2:
                try:
                    samples.append((float(fields[0]), float(fields[1])))
                except ValueError:
                    pass  # "[N/A]" on a device that does not report it
    return result, samples


def report(side, ms, samples):
    if not samples:
        print(f"POWER {json.dumps({'side': side, 'key': KEY, 'error': 'nvidia-smi gave no samples'})}", flush=True)
        return False
    top = max(w for w, _ in samples)
    busy = [(w, mhz) for w, mhz in samples if w >= 0.8 * top]
    watts = statistics.median(w for w, _ in busy)
    line = {
        "side": side,
        "key": KEY,
        "ms": round(ms, 3),
        "samples": len(samples),
        "busy_samples": len(busy),
        "watts_median": round(watts, 1),
        "watts_max": round(top, 1),
        "sm_mhz_median": statistics.median(m for _, m in busy),
        "sm_mhz_min": min(m for _, m in busy),
        "joules_per_forward": round(watts * ms / 1000, 2),
    }
    print("POWER " + json.dumps(line), flush=True)
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--bin", default="dist/gpu", help="folder of the celframe binary")
    args = p.parse_args()
    from diffusers import UNet2DConditionModel

    folder = os.path.join(args.work, "sdxl_unet")
    make_weights(folder)
    ok = True

    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float16).to("cuda").eval()
    inputs = random_inputs(unet, 32, 72, 128, 77, torch.Generator().manual_seed(1), torch.float16)
    cuda_ms(lambda: run(unet, inputs), 3, 1)
    ms, samples = sampled(lambda: cuda_ms(lambda: run(unet, inputs), 0, 20))
    ok &= report("diffusers eager", ms, samples)
    del unet
    torch.cuda.empty_cache()

    bench = [os.path.join(args.bin, "celframe"), "bench", "unet", "--weights", folder]
    bench += ["--batch", "32", "--height", "72", "--width", "128", "--runs", "20"]
    proc, samples = sampled(lambda: subprocess.run(bench, capture_output=True, text=True))
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    found = re.search(r'BENCH (\{.*"key":"' + re.escape(KEY) + r'".*\})', proc.stdout)
    if proc.returncode != 0 or not found:
        print(f"power_gpu: `{' '.join(bench)}` exited {proc.returncode} without a BENCH line for {KEY}", flush=True)
        return 1
    ok &= report("celframe", json.loads(found.group(1))["ms"], samples)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
