#!/usr/bin/env bash
# On the GPU machine after tools/gpu_run.sh's setup: Nsight Compute on one group-norm launch of the
# headline benchmark shape (issue rate, stalls, occupancy, DRAM and L2 throughput).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -n 1)
CELFRAME_BENCH_FILTER="${1:-group_norm_silu f16 N32 C320 H72 W128}" "$ncu" --kernel-name regex:group_norm --launch-skip 5 --launch-count 1 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
  --section LaunchStats --section SchedulerStats --section InstructionStats dist/gpu/bench_ops 2>&1 | grep -v '^BENCH'
