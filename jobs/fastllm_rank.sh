#!/usr/bin/env bash
# Starts one fastllm rank on the GPU of its node-local rank, then becomes the command it is given:
#   fastllm_rank.sh /path/to/fastllm train --flag=value ...
# The launcher (srun, mpirun) starts one copy per rank. The node-local rank comes from the MPI
# launcher (OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID) before SLURM_LOCALID, because mpirun
# inside a SLURM allocation leaves the batch step's SLURM_LOCALID (0) in every rank's environment.
# When the scheduler already made several GPUs visible the rank takes the one at its position in
# that list; a single visible GPU (srun --gpus-per-task=1, --gpu-bind) is the rank's own already.
set -euo pipefail

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
exec "$@"
