#!/usr/bin/env bash
# Starts one fastllm rank on the GPU of its node-local rank, then becomes the command it is given:
#   fastllm_rank.sh /path/to/fastllm train --flag=value ...
# The launcher (srun, mpirun) starts one copy per rank. The node-local rank comes from the MPI
# launcher (OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID) before SLURM_LOCALID, because mpirun
# inside a SLURM allocation leaves the batch step's SLURM_LOCALID (0) in every rank's environment.
# When the scheduler already made several GPUs visible the rank takes the one at its position in
# that list; a single visible GPU (srun --gpus-per-task=1, --gpu-bind) is the rank's own already.
# With FASTLLM_CPU_BIND=numa (the templates' default) the rank's CPUs and memory are then bound to
# the NUMA node of its GPU with numactl; where numactl, nvidia-smi or the node are missing it runs
# unbound and node-local rank 0 says so once.
set -euo pipefail
# nvidia-smi numbers GPUs in PCI order; CUDA, unless told so, fastest first.
export CUDA_DEVICE_ORDER=${CUDA_DEVICE_ORDER:-PCI_BUS_ID}

local_rank=${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-${SLURM_LOCALID:-0}}}
if [[ ! $local_rank =~ ^[0-9]+$ ]]; then
  echo "fastllm_rank.sh: node-local rank '$local_rank' is not a number" >&2
  exit 2
fi

if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
  if ((${#visible[@]} > 1)); then
    CUDA_VISIBLE_DEVICES=${visible[local_rank % ${#visible[@]}]}
  fi
else
  CUDA_VISIBLE_DEVICES=$local_rank
fi
export CUDA_VISIBLE_DEVICES

if (($# == 0)); then
  echo "usage: fastllm_rank.sh COMMAND [ARG...]" >&2
  exit 2
fi

# The NUMA node of GPU $1 (an index or UUID as CUDA_VISIBLE_DEVICES holds it), from its PCI address
# in sysfs; fails when there is none (one socket: -1) or it cannot be found.
gpu_numa_node() {
  local bus node
  command -v nvidia-smi >/dev/null || return 1
  bus=$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader -i "$1" 2>/dev/null | head -n 1)
  # nvidia-smi writes the domain with 8 digits (00000000:18:00.0), sysfs with 4, in lower case.
  bus=${bus,,}
  ((${#bus} >= 12)) || return 1
  node=$(cat "${FASTLLM_SYSFS:-/sys}/bus/pci/devices/${bus: -12}/numa_node" 2>/dev/null) ||
    return 1
  [[ $node =~ ^[0-9]+$ ]] || return 1
  echo "$node"
}

bind=()
if [[ ${FASTLLM_CPU_BIND:-none} == numa ]]; then
  reason=""
  if ! command -v numactl >/dev/null; then
    reason="numactl not found"
  elif ! node=$(gpu_numa_node "$CUDA_VISIBLE_DEVICES"); then
    reason="no NUMA node found for GPU $CUDA_VISIBLE_DEVICES (nvidia-smi missing, or one socket)"
  elif ! numactl "--cpunodebind=$node" "--preferred=$node" true 2>/dev/null; then
    reason="numactl cannot bind to node $node here (outside the job's CPU set?)"
  else
    bind=(numactl "--cpunodebind=$node" "--preferred=$node")
  fi
  if [[ -n $reason ]] && ((local_rank == 0)); then
    echo "fastllm_rank.sh: ranks run without CPU/NUMA binding: $reason" >&2
  fi
fi
exec "${bind[@]}" "$@"
