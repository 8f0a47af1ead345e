# shellcheck shell=bash
# Example site set-up for jobs/train.slurm and jobs/train.pbs: copy it to jobs/site.sh (sourced by
# default when it exists) or point FASTLLM_SITE_SETUP at your copy. The templates source it in the
# batch shell before anything else, DRY_RUN=1 included, with `set -u` lifted; a non-zero status of
# its last command stops the job. Under PBS, mpirun forwards PATH, LD_LIBRARY_PATH, VIRTUAL_ENV and
# every NCCL_*, UCX_*, FI_* and CUDA_* variable it exports to the other nodes; srun passes on the
# whole environment. Everything below is an example: keep what your site needs.

# The toolchain fastllm was built with (fastllm --version prints the versions it was built against).
if command -v module >/dev/null; then
  module load cuda/13.0 openmpi/4.1 hdf5/1.14-mpi
fi

# A Python environment for the tools next to fastllm (benchmarks/scaling, tokenizers).
if [[ -f $HOME/venvs/fastllm/bin/activate ]]; then
  # shellcheck source=/dev/null
  source "$HOME/venvs/fastllm/bin/activate"
fi

# NCCL on this fabric: the InfiniBand adapters and the interface for NCCL's own bootstrap. Values
# set here win over the templates' defaults (NCCL_DEBUG=WARN, NCCL_IB_TIMEOUT=22).
export NCCL_IB_HCA=mlx5
export NCCL_SOCKET_IFNAME=ib0
