"""CUDA-event timing shared by the GPU-machine peer scripts (unet_gpu.py, vae_gpu.py,
text_encoder_gpu.py): `warmup` untimed calls, then the median of `runs` timed ones, in ms."""
import torch


def cuda_ms(f, warmup, runs):
    for _ in range(warmup):
        f()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        f()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
