#!/usr/bin/env python3
"""Reads BENCH / PEER / GPUCHECK lines (from tools/gpu_run.sh's log) and prints markdown tables:
our time next to PyTorch's best variant from the same run, the ratio, and bandwidth or TFLOP/s;
RENDER lines (tools/render_gpu.py: whole renders, celframe and the diffusers peer) as a table; and
FP8 lines (`celframe bench --fp8`, render_gpu.py fp8: speed beside the outputs' distance)."""
import json
import sys


def host_bound(peer):
    """A note where the peer's host spent 90% or more of the GPU's time launching a call (`host_ms`,
    tools/cuda_timing.py): its time is then the host's launch rate, and the ratio says as much
    about the machine's CPU as about either side's kernels."""
    host = peer.get("host_ms")
    return f"; host-bound, host {host:.1f} ms" if host is not None and host >= 0.9 * peer["ms"] else ""


bench, peers, checks, device, copy, renders, throughputs, fp8 = [], {}, [], {}, None, [], [], []
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("BENCH "):
        bench.append(json.loads(line[6:]))
    elif line.startswith("PEER "):
        p = json.loads(line[5:])
        if p["key"] == "copy 1GiB":
            copy = p
        else:
            peers.setdefault(p["key"], []).append(p)
    elif line.startswith("BENCHDEVICE "):
        device = json.loads(line[12:])
    elif line.startswith("GPUCHECK "):
        checks.append(line[9:].strip())
    elif line.startswith("RENDER "):
        renders.append(json.loads(line[7:]))
    elif line.startswith("THROUGHPUT "):
        throughputs.append(json.loads(line[11:]))
    elif line.startswith("FP8 "):
        fp8.append(json.loads(line[4:]))

print(f"\nDevice: {device.get('name', '?')}, {device.get('sms', '?')} SMs, L2 {device.get('l2_mb', '?')} MB"
      + (f"; copy bandwidth {copy['gbps']} GB/s (read+write)" if copy else ""))
print(f"\nGPU op checks vs CPU twins: {len(checks)} passed lines")
for c in checks:
    print("  " + c)
print("\n| entry | celframe ms | GB/s | TFLOP/s | PyTorch ms (variant) | speed-up |")
print("|---|---|---|---|---|---|")
for b in bench:
    if b["name"].endswith("_sweep"):
        continue
    # The best peer variant, and for whole models every variant (eager and torch.compile). A model's
    # forward with the text k/v computed beforehand, or with FP8 linears, stands beside the peer's
    # forward (which computes them, in f16).
    key = b["key"]
    for suffix in (" text k/v cached", " fp8 on", " fp8 all"):
        key = key.removesuffix(suffix)
    ps = sorted(peers.get(key, []), key=lambda p: p["ms"])
    shown = ps if b["name"] == "unet" else ps[:1]
    for p in shown or [None]:
        peer_txt = f"{p['ms']:.4f} ({p['variant']}{host_bound(p)})" if p else "-"
        ratio = f"{p['ms'] / b['ms']:.2f}x" if p else "-"
        print(f"| {b['key']} | {b['ms']:.4f} | {b['gbps'] or '-'} | {b['tflops'] or '-'} | {peer_txt} | {ratio} |")
if fp8:
    print("\n| FP8 | linears in FP8 | ms | without FP8 ms | speed-up | outputs' rel L2 from the plain ones |")
    print("|---|---|---|---|---|---|")
    for f in fp8:
        if "key" in f:  # celframe bench --fp8
            how = f"scales per {f['scales']}" + (", bias+residual in the epilogue" if f.get("fused_epilogue") else "")
            print(f"| {f['key']} | {f['twins']} ({how}) | {f['ms']:.3f} | {f['plain_ms']:.3f} | "
                  f"{f['plain_ms'] / f['ms']:.3f}x | {f['rel_l2']:.2e} |")
        else:  # render_gpu.py fp8: W1 frames per seed
            errors = ", ".join(f"{e:.2e}" for e in f.get("frames_rel_l2", []))
            print(f"| W1 fp8 {f['mode']} (exit {f['exit']}) | - | clip {f.get('clip_s')} s | - | - | {errors or '-'} |")
sweep = [b for b in bench if b["name"] == "group_norm_sweep"]
if sweep:
    print("\nGroup-norm work-layout sweep (f16 +SiLU):")
    for b in sweep:
        print(f"  {b['key'].removeprefix('sweep group_norm_silu f16 ')}: {b['ms']:.4f} ms, {b['gbps']} GB/s")
for b in bench:
    if b["name"] == "temporal_sweep":
        print(f"  temporal attention 32x320x72x128 f16, {b['key'].split()[-1]}: {b['ms']:.4f} ms, {b['gbps']} GB/s")
if renders:
    # celframe's time of the clip excludes loading the models, as the peer's render time does; its
    # decode and write overlap, so they are one column.
    print("\n| render | workload | run | whole command s | load s | render s | text s | denoise s | decode + write s "
          "| frames/s | peak GPU GiB | mp4 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in renders:
        peer = r["side"] == "diffusers"
        render_s = r.get("total_s") if peer else r.get("clip_s")
        decode_write = round(r["decode_s"] + r["write_s"], 3) if peer else r.get("decode_write_s")
        cells = [r["side"], r["workload"], r["run"], "-" if peer else r.get("total_s"), r.get("load_s"), render_s,
                 r.get("text_s"), r.get("denoise_s"), decode_write, r.get("frames_per_s"), r.get("peak_gib"),
                 r.get("mp4_by")]
        print("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
if throughputs:
    print("\n| batch | clips done | whole command s | clips/hour (whole) | rendering s | clips/hour (rendering) "
          "| GPU busy (rendering) | GPU busy (whole) |")
    print("|---|---|---|---|---|---|---|---|")
    for t in throughputs:
        cells = [t["workload"], f"{t['done']}/{t['clips']}", t["total_s"], t["clips_per_hour_total"], t["render_s"],
                 t["clips_per_hour_render"], t["gpu_busy_render"], t["gpu_busy_whole"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")
