#!/usr/bin/env bash
# On the GPU machine after tools/gpu_run.sh's setup: Nsight Compute on one launch of a kernel inside
# one benchmark entry of bench_ops (issue rate, warp stall reasons, occupancy, DRAM and L2
# throughput, instruction mix).
#   bash tools/ncu_bench.sh [KERNEL_REGEX [BENCH_FILTER]]
# Defaults: the group norm at its headline shape. For the fused GEGLU projection's mainloop:
#   bash tools/ncu_bench.sh geglu_linear_sm90 "linear_geglu f16 M18432 K1280 D5120 fused"
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -n 1)
kernel=${1:-group_norm}
CELFRAME_BENCH_FILTER="${2:-group_norm_silu f16 N32 C320 H72 W128}" "$ncu" --kernel-name "regex:$kernel" --launch-skip 5 --launch-count 1 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
  --section LaunchStats --section SchedulerStats --section InstructionStats --section SourceCounters \
  dist/gpu/bench_ops 2>&1 | grep -v '^BENCH'
