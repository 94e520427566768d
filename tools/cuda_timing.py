"""CUDA-event timing shared by the GPU-machine peer scripts (unet_gpu.py, vae_gpu.py,
text_encoder_gpu.py): `warmup` untimed calls, then the median of `runs` timed ones, in ms."""
import time

import torch


def cuda_ms(f, warmup, runs):
    return cuda_and_host_ms(f, warmup, runs)[0]


def cuda_and_host_ms(f, warmup, runs):
    """As cuda_ms, with the median time the host spent in each call (its launches, from an empty
    queue): where it nears the CUDA-event time, the host's launch rate binds the call, not the GPU."""
    for _ in range(warmup):
        f()
    times, host = [], []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        f()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], sorted(host)[len(host) // 2]
