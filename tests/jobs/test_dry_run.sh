#!/usr/bin/env bash
# Dry runs (DRY_RUN=1) of jobs/train.slurm and jobs/train.pbs under made-up SLURM and PBS
# environments: the printed launch line has the rank count of the allocation, the --load/--save
# pair and the flags given, and the signal and requeue set-up is the one documented in
# jobs/README.md.
# Nothing is launched: srun, qsub and friends are fakes that log any call, and no log may appear.
#   tests/jobs/test_dry_run.sh
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)

# shellcheck source=tests/support/checks.sh
source "$root/tests/support/checks.sh"
# The words of the "launch:" line, read back as the shell would.
launch_words() {
  local line
  line=$(sed -n 's/^fastllm job: launch: //p' <<<"$1")
  eval "LAUNCH=($line)"
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export FAKE_LOG_DIR=$work/log
mkdir -p "$FAKE_LOG_DIR"
printf 'train_iters: 5000\nbatch_size: 512\n' >"$work/run.yaml"
base_env=(env -i "PATH=$root/tests/jobs/fake_bin:/usr/bin:/bin" "HOME=$work" DRY_RUN=1
  "FAKE_LOG_DIR=$FAKE_LOG_DIR")

# ---- SLURM: 2 nodes x 8 GPUs, 12 CPUs per task ----
save=$work/runs/slurm
out=$("${base_env[@]}" SLURM_JOB_ID=4242 SLURM_JOB_NAME=demo SLURM_NNODES=2 SLURM_GPUS_ON_NODE=8 \
  SLURM_CPUS_PER_TASK=12 SLURM_SUBMIT_DIR="$work" CONFIG="$work/run.yaml" SAVE_DIR="$save" \
  FASTLLM_ARGS="--tensor_parallel=2 --lr 1e-4" bash "$root/jobs/train.slurm" 2>&1)
expect "slurm dry run exits 0" 0 "$?"
launch_words "$out"
expect "slurm launcher" srun "${LAUNCH[0]}"
contains "slurm rank count" " --ntasks=16 " " ${LAUNCH[*]} "
contains "slurm ranks per node" " --ntasks-per-node=8 " " ${LAUNCH[*]} "
contains "slurm cpus per task" " --cpus-per-task=12 " " ${LAUNCH[*]} "
contains "slurm per-rank wrapper then fastllm train" \
  "$root/jobs/fastllm_rank.sh $root/build/src/fastllm train --config=$work/run.yaml" "${LAUNCH[*]}"
contains "slurm flags, then --load and --save on the save folder" \
  "--tensor_parallel=2 --lr 1e-4 --load=$save --save=$save" "${LAUNCH[*]}"
expect "slurm --load/--save are the last words" "--load=$save --save=$save" \
  "${LAUNCH[*]: -2}"
contains "slurm warning signal from the header" "--signal=B:USR1@600" "$out"
contains "slurm signal forwarded to every rank" "scancel --signal=USR1 4242" "$out"
contains "slurm requeue command and condition" \
  "scontrol requeue 4242 when stopped by USR1 before iteration 5000" "$out"
contains "slurm OpenMP threads" "OMP_NUM_THREADS=12" "$out"
contains "slurm NCCL defaults" "NCCL_DEBUG=WARN" "$out"
contains "slurm nothing to resume yet" "newest checkpoint: iteration -1" "$out"
contains "slurm preemption requeues" \
  "preemption: a TERM while squeue shows the job RUNNING saves and requeues (scontrol requeue 4242)" \
  "$out"
contains "slurm no site set-up by default" "site setup: none" "$out"
contains "slurm srun leaves the binding to numactl" " --cpu-bind=none " " ${LAUNCH[*]} "
contains "slurm NUMA binding next to the GPU" \
  "binding: GPU of the node-local rank; CPUs and memory: numactl --cpunodebind/--preferred" "$out"

# The site set-up: sourced before the rest (its NCCL_DEBUG wins over the default, a variable it
# reads unset is no error), named in the output; CPU_BIND=none leaves srun's binding alone.
# shellcheck disable=SC2016  # expanded when the template sources the file
printf 'export NCCL_DEBUG=INFO NCCL_SOCKET_IFNAME=ib7\nSITE_UNSET_READ=${NOT_SET_ANYWHERE:-}${NOR_THIS}\n' \
  >"$work/site.sh"
out=$("${base_env[@]}" SLURM_JOB_ID=5 SLURM_NNODES=1 SLURM_GPUS_ON_NODE=4 \
  SLURM_SUBMIT_DIR="$work" CONFIG="$work/run.yaml" SAVE_DIR="$save" CPU_BIND=none \
  FASTLLM_SITE_SETUP="$work/site.sh" REQUEUE_ON_PREEMPT=0 bash "$root/jobs/train.slurm" 2>&1)
expect "slurm dry run with a site set-up exits 0" 0 "$?"
contains "slurm site set-up sourced" "site setup: $work/site.sh" "$out"
contains "slurm site set-up wins over the defaults" "NCCL_DEBUG=INFO" "$out"
contains "slurm no preemption requeue when off" "TERM stops without a requeue" "$out"
contains "slurm CPU_BIND=none" "CPUs: srun's default (CPU_BIND=none)" "$out"
launch_words "$out"
expect "slurm CPU_BIND=none: no --cpu-bind" "" "$(grep -o -- "--cpu-bind[^ ]*" <<<"${LAUNCH[*]}")"
# jobs/site.sh of the checkout is the default.
mkdir -p "$work/home/jobs"
cp "$root/jobs/common.sh" "$root/jobs/fastllm_rank.sh" "$work/home/jobs/"
printf 'export NCCL_DEBUG=TRACE\n' >"$work/home/jobs/site.sh"
out=$("${base_env[@]}" SLURM_JOB_ID=5 SLURM_NNODES=1 SLURM_SUBMIT_DIR="$work" \
  FASTLLM_HOME="$work/home" CONFIG="$work/run.yaml" SAVE_DIR="$save" \
  bash "$root/jobs/train.slurm" 2>&1)
contains "slurm jobs/site.sh by default" "site setup: $work/home/jobs/site.sh" "$out"
contains "slurm jobs/site.sh sourced" "NCCL_DEBUG=TRACE" "$out"
out=$("${base_env[@]}" SLURM_JOB_ID=5 SLURM_NNODES=1 SLURM_SUBMIT_DIR="$work" \
  CONFIG="$work/run.yaml" FASTLLM_SITE_SETUP="$work/absent.sh" bash "$root/jobs/train.slurm" 2>&1)
expect "slurm missing site set-up" 2 "$?"
contains "slurm names the missing site set-up" "FASTLLM_SITE_SETUP=$work/absent.sh: file not found" \
  "$out"
printf 'return 3\n' >"$work/failing.sh"
out=$("${base_env[@]}" SLURM_JOB_ID=5 SLURM_NNODES=1 SLURM_SUBMIT_DIR="$work" \
  CONFIG="$work/run.yaml" FASTLLM_SITE_SETUP="$work/failing.sh" bash "$root/jobs/train.slurm" 2>&1)
expect "slurm failing site set-up" 2 "$?"
contains "slurm names the failing site set-up" "failing.sh failed with status 3" "$out"
out=$("${base_env[@]}" SLURM_JOB_ID=5 SLURM_NNODES=1 SLURM_SUBMIT_DIR="$work" \
  CONFIG="$work/run.yaml" CPU_BIND=sockets bash "$root/jobs/train.slurm" 2>&1)
expect "slurm rejects an unknown CPU_BIND" 2 "$?"
contains "slurm names the CPU_BIND" "CPU_BIND=sockets: expected numa or none" "$out"

# ranks per node from --ntasks-per-node ("4(x3)" form), train_iters from the flags over the YAML
out=$("${base_env[@]}" SLURM_JOB_ID=7 SLURM_NNODES=3 SLURM_NTASKS_PER_NODE="4(x3)" \
  SLURM_GPUS_ON_NODE=8 SLURM_SUBMIT_DIR="$work" CONFIG="$work/run.yaml" SAVE_DIR="$save" \
  FASTLLM_ARGS="--train_iters=77" bash "$root/jobs/train.slurm" 2>&1)
launch_words "$out"
contains "slurm --ntasks-per-node wins over the GPU count" " --ntasks=12 --ntasks-per-node=4 " \
  " ${LAUNCH[*]} "
contains "slurm train_iters flag over the YAML" "before iteration 77" "$out"
contains "slurm one thread without --cpus-per-task" "OMP_NUM_THREADS=1" "$out"

# a resumed run shows where it resumes from
mkdir -p "$save"
touch "$save/checkpoint-00001200.h5"
out=$("${base_env[@]}" SLURM_JOB_ID=9 SLURM_NNODES=1 SLURM_GPUS_ON_NODE=4 SLURM_RESTART_COUNT=3 \
  SLURM_SUBMIT_DIR="$work" CONFIG="$work/run.yaml" SAVE_DIR="$save" \
  bash "$root/jobs/train.slurm" 2>&1)
contains "slurm newest checkpoint" "newest checkpoint: iteration 1200" "$out"
contains "slurm restart count" "restart 3 of at most 50" "$out"
launch_words "$out"
contains "slurm one node" " --nodes=1 --ntasks=4 " " ${LAUNCH[*]} "

# errors: flags the template owns, no --train_iters
out=$("${base_env[@]}" SLURM_JOB_ID=9 SLURM_NNODES=1 SLURM_SUBMIT_DIR="$work" \
  FASTLLM_ARGS="--train_iters=5 --save=/elsewhere" bash "$root/jobs/train.slurm" 2>&1)
expect "slurm rejects --save in FASTLLM_ARGS" 2 "$?"
contains "slurm names the rejected flag" "FASTLLM_ARGS sets --save" "$out"
out=$("${base_env[@]}" SLURM_JOB_ID=9 SLURM_NNODES=1 SLURM_SUBMIT_DIR="$work" \
  FASTLLM_ARGS="--lr=1" bash "$root/jobs/train.slurm" 2>&1)
expect "slurm needs --train_iters" 2 "$?"
contains "slurm says --train_iters is missing" "--train_iters is set neither" "$out"
out=$("${base_env[@]}" SLURM_JOB_ID=9 SLURM_NNODES=1 SLURM_SUBMIT_DIR="$work" \
  CONFIG="$work/absent.yaml" bash "$root/jobs/train.slurm" 2>&1)
expect "slurm missing CONFIG" 2 "$?"
contains "slurm names the missing CONFIG" "absent.yaml: file not found" "$out"

# ---- PBS: 3 nodes x 4 GPUs (PBS_NODEFILE: one line per MPI slot), 32 CPUs per node ----
for host in node-a node-b node-c; do
  for _ in 1 2 3 4; do echo "$host"; done
done >"$work/nodefile"
save=$work/runs/pbs
out=$("${base_env[@]}" PBS_JOBID=99.server PBS_JOBNAME=demo PBS_NODEFILE="$work/nodefile" \
  PBS_O_WORKDIR="$work" NCPUS=32 GPUS_PER_NODE=4 SAVE_MARGIN=900 FAKE_WALLTIME=02:00:00 \
  CONFIG="$work/run.yaml" SAVE_DIR="$save" FASTLLM_ARGS="--pipeline_parallel=3" RESUBMIT=1 \
  FASTLLM_SITE_SETUP="$work/site.sh" bash "$root/jobs/train.pbs" 2>&1)
expect "pbs dry run exits 0" 0 "$?"
launch_words "$out"
expect "pbs launcher" mpirun "${LAUNCH[0]}"
contains "pbs rank count" " -np 12 " " ${LAUNCH[*]} "
contains "pbs hosts with their slots" " --host node-a:4,node-b:4,node-c:4 " " ${LAUNCH[*]} "
contains "pbs ranks per node" " --map-by ppr:4:node " " ${LAUNCH[*]} "
contains "pbs environment forwarded" " -x OMP_NUM_THREADS -x NCCL_DEBUG " " ${LAUNCH[*]} "
contains "pbs per-rank wrapper then fastllm train" \
  "$root/jobs/fastllm_rank.sh $root/build/src/fastllm train --config=$work/run.yaml" "${LAUNCH[*]}"
expect "pbs --load/--save are the last words" "--load=$save --save=$save" "${LAUNCH[*]: -2}"
contains "pbs flags given" "--pipeline_parallel=3 --load=" "${LAUNCH[*]}"
# walltime 2 h from qstat -f, minus 900 s, minus the second or so the script has run
if [[ $out =~ timer\ in\ ([0-9]+)\ s ]] &&
  ((BASH_REMATCH[1] <= 6300 && BASH_REMATCH[1] > 6280)); then
  echo "ok   pbs save timer from qstat walltime (${BASH_REMATCH[1]} s)"
else
  echo "FAIL pbs save timer from qstat walltime: no 'timer in 6281..6300 s' in:"
  echo "$out"
  failures=$((failures + 1))
fi
contains "pbs signal forwarded through mpirun" "kill -USR1 <mpirun>" "$out"
contains "pbs resubmission" "qsub -W depend=afterany:99.server $root/jobs/train.pbs" "$out"
contains "pbs resubmission condition" "when stopped by USR1 before iteration 5000" "$out"
contains "pbs OpenMP threads: NCPUS / GPUs" "OMP_NUM_THREADS=8" "$out"
contains "pbs site set-up sourced" "site setup: $work/site.sh" "$out"
contains "pbs site NCCL settings forwarded to the other nodes" " -x NCCL_SOCKET_IFNAME " \
  " ${LAUNCH[*]} "
contains "pbs binding choice forwarded" " -x FASTLLM_CPU_BIND " " ${LAUNCH[*]} "
contains "pbs mpirun leaves the binding to numactl" " --bind-to none " " ${LAUNCH[*]} "
contains "pbs NUMA binding next to the GPU" \
  "binding: GPU of the node-local rank; CPUs and memory: numactl --cpunodebind/--preferred" "$out"

out=$("${base_env[@]}" PBS_JOBID=99.server PBS_NODEFILE="$work/nodefile" PBS_O_WORKDIR="$work" \
  GPUS_PER_NODE=4 WALLTIME=00:05:00 CONFIG="$work/run.yaml" SAVE_DIR="$save" \
  MPIRUN_ARGS="--oversubscribe --mca btl self,tcp" bash "$root/jobs/train.pbs" 2>&1)
contains "pbs no timer when the walltime is shorter than the margin" "signals: no timer" "$out"
contains "pbs resubmission off by default" "resubmit: off (RESUBMIT=0); the next job of a chain" \
  "$out"
launch_words "$out"
contains "pbs extra mpirun options before the command" \
  "--oversubscribe --mca btl self,tcp $root/jobs/fastllm_rank.sh" "${LAUNCH[*]}"

out=$("${base_env[@]}" PBS_JOBID=99.server PBS_NODEFILE="$work/absent" PBS_O_WORKDIR="$work" \
  CONFIG="$work/run.yaml" bash "$root/jobs/train.pbs" 2>&1)
expect "pbs needs PBS_NODEFILE" 2 "$?"
contains "pbs names PBS_NODEFILE" "PBS_NODEFILE=" "$out"
out=$("${base_env[@]}" PBS_JOBID=99.server PBS_NODEFILE="$work/nodefile" PBS_O_WORKDIR="$work" \
  WALLTIME=2h CONFIG="$work/run.yaml" bash "$root/jobs/train.pbs" 2>&1)
expect "pbs rejects a bad WALLTIME" 2 "$?"

# The headers ask the schedulers for what the scripts rely on.
slurm_header=$(grep '^#SBATCH' "$root/jobs/train.slurm")
contains "slurm header: warning signal to the batch shell" "#SBATCH --signal=B:USR1@" \
  "$slurm_header"
contains "slurm header: requeueable" "#SBATCH --requeue" "$slurm_header"
contains "slurm header: log appended across requeues" "#SBATCH --open-mode=append" "$slurm_header"
pbs_header=$(grep '^#PBS' "$root/jobs/train.pbs")
contains "pbs header: walltime" "#PBS -l walltime=" "$pbs_header"

expect "dry runs launch nothing" "" "$(ls "$FAKE_LOG_DIR")"

# A chain of PBS jobs submitted from the login node, each after the one before succeeded.
chain_log=$work/chain-log
mkdir -p "$chain_log"
ids=$(env "PATH=$root/tests/jobs/fake_bin:$PATH" FAKE_LOG_DIR="$chain_log" \
  bash "$root/jobs/pbs_chain.sh" 3 -v CONFIG=run.yaml 2>&1)
expect "pbs chain exits 0" 0 "$?"
expect "pbs chain prints the job ids" "1001.fake-server 1001.fake-server 1001.fake-server" \
  "$(tr '\n' ' ' <<<"$ids" | sed 's/ $//')"
expect "pbs chain: first job without, then each after the one before" \
  "-v CONFIG=run.yaml $root/jobs/train.pbs|-v CONFIG=run.yaml -W depend=afterok:1001.fake-server $root/jobs/train.pbs|-v CONFIG=run.yaml -W depend=afterok:1001.fake-server $root/jobs/train.pbs" \
  "$(paste -s -d '|' "$chain_log/qsub.log")"
bash "$root/jobs/pbs_chain.sh" 0 >/dev/null 2>&1
expect "pbs chain needs a count" 2 "$?"

if ((failures > 0)); then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all checks passed"
