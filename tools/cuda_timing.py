"""CUDA-event timing shared by the GPU-machine peer scripts (unet_gpu.py, vae_gpu.py,
text_encoder_gpu.py): at least `warmup` untimed calls and at least WARM_S seconds of them, then the
median of `runs` timed ones, in ms."""
import time

import torch

# Diffusers' b2 1024x1024 UNet timed 92-131 ms a forward in some device calls after 3 warm-up
# calls, ~62 in others: the warm-up runs for a while, so a slow start is not what gets timed.
WARM_S = 2.0


def cuda_ms(f, warmup, runs):
    t0 = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - t0 < WARM_S:
        f()
        torch.cuda.synchronize()
        done += 1
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        f()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
