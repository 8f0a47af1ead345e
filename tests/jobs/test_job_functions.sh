#!/usr/bin/env bash
# The decisions of jobs/common.sh (when a job is finished, requeued, stopped or failed; which
# --train_iters it trains to) and the GPU each rank picks in jobs/fastllm_rank.sh, checked against
# cases written out by hand.
#   tests/jobs/test_job_functions.sh
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=jobs/common.sh
source "$root/jobs/common.sh"

# shellcheck source=tests/support/checks.sh
source "$root/tests/support/checks.sh"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Newest complete checkpoint: temporary files of an interrupted save and other names do not count.
expect "latest of a missing folder" -1 "$(fastllm_latest_iteration "$work/missing")"
mkdir "$work/empty"
expect "latest of an empty folder" -1 "$(fastllm_latest_iteration "$work/empty")"
mkdir "$work/partial"
touch "$work/partial/checkpoint-00000010.h5" "$work/partial/checkpoint-00000200.h5" \
  "$work/partial/checkpoint-00000300.h5.tmp" "$work/partial/checkpoint-latest.h5" \
  "$work/partial/metrics.jsonl"
mkdir "$work/partial/checkpoint-00000900.h5"
expect "latest skips .tmp, folders and other names" 200 \
  "$(fastllm_latest_iteration "$work/partial")"
mkdir "$work/final"
touch "$work/final/checkpoint-00000800.h5" "$work/final/checkpoint-00001000.h5"
expect "latest of a finished run" 1000 "$(fastllm_latest_iteration "$work/final")"
mkdir "$work/wide"
touch "$work/wide/checkpoint-00000999.h5" "$work/wide/checkpoint-123456789.h5"
expect "latest past 8 digits" 123456789 "$(fastllm_latest_iteration "$work/wide")"

# fastllm_next_action SAVE_DIR TRAIN_ITERS RC SIGNAL RESTARTS MAX_RESTARTS
expect "final checkpoint after USR1 is done" "done" \
  "$(fastllm_next_action "$work/final" 1000 0 USR1 0 5)"
expect "final checkpoint without a signal is done" "done" \
  "$(fastllm_next_action "$work/final" 1000 0 "" 0 5)"
expect "a checkpoint beyond --train_iters is done" "done" \
  "$(fastllm_next_action "$work/final" 900 0 "" 0 5)"
expect "USR1 before the end requeues" requeue \
  "$(fastllm_next_action "$work/partial" 1000 0 USR1 0 5)"
expect "USR1 with a crashed save still requeues" requeue \
  "$(fastllm_next_action "$work/partial" 1000 137 USR1 4 5)"
expect "USR1 with no checkpoint at all requeues" requeue \
  "$(fastllm_next_action "$work/empty" 1000 0 USR1 0 5)"
expect "USR1 after MAX_RESTARTS requeues gives up" give_up \
  "$(fastllm_next_action "$work/partial" 1000 0 USR1 5 5)"
expect "PREEMPT (a TERM found to be a preemption) requeues" requeue \
  "$(fastllm_next_action "$work/partial" 1000 0 PREEMPT 0 5)"
expect "PREEMPT after MAX_RESTARTS requeues gives up" give_up \
  "$(fastllm_next_action "$work/partial" 1000 0 PREEMPT 5 5)"
expect "PREEMPT of a finished run is done" "done" \
  "$(fastllm_next_action "$work/final" 1000 0 PREEMPT 0 5)"
expect "TERM (cancel) stops" stopped \
  "$(fastllm_next_action "$work/partial" 1000 0 TERM 0 5)"
expect "TERM with a failed exit stops" stopped \
  "$(fastllm_next_action "$work/partial" 1000 143 TERM 0 5)"
expect "exit 0 before the end without a signal stops" stopped \
  "$(fastllm_next_action "$work/partial" 1000 0 "" 0 5)"
expect "a failure without a signal fails" failed \
  "$(fastllm_next_action "$work/partial" 1000 2 "" 0 5)"
expect "a failure on a fresh folder fails" failed \
  "$(fastllm_next_action "$work/missing" 1000 1 "" 0 5)"

# --train_iters: the command line wins over the YAML file, the last flag wins.
printf 'batch_size: 8\ntrain_iters: 250  # steps\n' >"$work/run.yaml"
printf 'train_iters: "0300"\n' >"$work/quoted.yaml"
printf 'lr: 1e-4\n' >"$work/none.yaml"
expect "train_iters from --flag=value" 40 "$(fastllm_train_iters "" --lr=1 --train_iters=40)"
expect "train_iters from --flag value" 41 "$(fastllm_train_iters "" --train_iters 41 --lr 1)"
expect "train_iters last flag wins" 43 "$(fastllm_train_iters "" --train_iters=42 --train_iters=43)"
expect "train_iters from the YAML file" 250 "$(fastllm_train_iters "$work/run.yaml")"
expect "train_iters quoted in YAML" 300 "$(fastllm_train_iters "$work/quoted.yaml")"
expect "train_iters flag over YAML" 7 "$(fastllm_train_iters "$work/run.yaml" --train_iters=7)"
fastllm_train_iters "$work/none.yaml" --lr=1 >/dev/null
expect "train_iters missing is an error" 1 "$?"
fastllm_train_iters "" --train_iters=ten >/dev/null
expect "train_iters not a number is an error" 1 "$?"

expect "walltime HH:MM:SS" 86400 "$(fastllm_hms_to_seconds 24:00:00)"
expect "walltime MM:SS" 90 "$(fastllm_hms_to_seconds 1:30)"
expect "walltime SS" 45 "$(fastllm_hms_to_seconds 45)"
expect "walltime leading zeros" 3723 "$(fastllm_hms_to_seconds 01:02:03)"
fastllm_hms_to_seconds 1:2:3:4 >/dev/null
expect "walltime with four fields is an error" 1 "$?"
fastllm_hms_to_seconds 1h >/dev/null
expect "walltime with a unit is an error" 1 "$?"

# The template owns --load/--save/--config.
message=$( (fastllm_check_args --lr=1 --save=/x) 2>&1)
expect "FASTLLM_ARGS --save is rejected" 2 "$( (fastllm_check_args --save=/x) 2>/dev/null; echo $?)"
expect "the rejection names the flag" 1 "$(grep -c -- "--save" <<<"$message")"
expect "FASTLLM_ARGS --load is rejected" 2 "$( (fastllm_check_args --load /x) 2>/dev/null; echo $?)"
expect "FASTLLM_ARGS --config is rejected" 2 \
  "$( (fastllm_check_args --config=a.yaml) 2>/dev/null; echo $?)"
expect "other flags pass" 0 "$( (fastllm_check_args --lr=1 --saved=2) 2>/dev/null; echo $?)"

# Site set-up: sourced into this shell with unset variables allowed; missing or failing: exit 2.
# shellcheck disable=SC2016  # the site file reads an unset variable when sourced
printf 'export SITE_MARK=sourced\nSITE_OTHER=${SITE_NEVER_SET}x\n' >"$work/site.sh"
(
  set -u
  fastllm_site_setup "$work/site.sh"
  echo "$FASTLLM_SITE_SETUP_USED|$SITE_MARK|$SITE_OTHER|$(printenv SITE_MARK)"
  [[ $- == *u* ]] && echo "set -u restored"
) >"$work/site.out" 2>&1
expect "site set-up sourced, exports kept" "$work/site.sh|sourced|x|sourced" \
  "$(head -n 1 "$work/site.out")"
expect "set -u is back after the site set-up" "set -u restored" "$(sed -n 2p "$work/site.out")"
expect "no site set-up" none "$(fastllm_site_setup ""; echo "$FASTLLM_SITE_SETUP_USED")"
expect "a missing site set-up is an error" 2 \
  "$( (fastllm_site_setup "$work/absent.sh") 2>/dev/null; echo $?)"
printf 'true\nfalse\n' >"$work/failing.sh"
message=$( (fastllm_site_setup "$work/failing.sh") 2>&1)
expect "a failing site set-up is an error" 2 "$( (fastllm_site_setup "$work/failing.sh") \
  2>/dev/null; echo $?)"
expect "the failure names the file" 1 "$(grep -c "failing.sh failed with status 1" <<<"$message")"

# Variables mpirun forwards: the job's own, PATH, and the exported NCCL_*/UCX_* of a site set-up,
# each once; unexported and unrelated ones stay.
forward=$(
  # shellcheck disable=SC2046  # one name per word
  unset LD_LIBRARY_PATH VIRTUAL_ENV $(compgen -e | grep -E '^(NCCL|UCX|FI|CUDA)_')
  export NCCL_SOCKET_IFNAME=ib0 UCX_TLS=rc NCCL_DEBUG=INFO OTHER_SETTING=1
  # shellcheck disable=SC2034  # set but not exported: must not be forwarded
  NCCL_NOT_EXPORTED=1
  fastllm_export_env 4 numa
  fastllm_forward_names | tr '\n' ' '
)
expect "forwarded names" \
  "OMP_NUM_THREADS NCCL_DEBUG NCCL_IB_TIMEOUT FASTLLM_CPU_BIND PATH NCCL_SOCKET_IFNAME UCX_TLS " \
  "$forward"
expect "CPU_BIND other than numa or none is an error" 2 \
  "$( (fastllm_export_env 4 cores) 2>/dev/null; echo $?)"

fastllm_split_args "  --a=1   --b  2 "
expect "FASTLLM_ARGS split on whitespace" "3:--a=1|--b|2" \
  "${#FASTLLM_ARGV[@]}:$(IFS='|'; echo "${FASTLLM_ARGV[*]}")"
fastllm_split_args ""
expect "empty FASTLLM_ARGS" 0 "${#FASTLLM_ARGV[@]}"

fastllm_train_command /j /bin/fastllm /c.yaml /s --lr=1
expect "per-rank command" \
  "/j/fastllm_rank.sh /bin/fastllm train --config=/c.yaml --lr=1 --load=/s --save=/s" \
  "${FASTLLM_COMMAND[*]}"
fastllm_train_command /j /bin/fastllm "" /s
expect "per-rank command without a config" \
  "/j/fastllm_rank.sh /bin/fastllm train --load=/s --save=/s" \
  "${FASTLLM_COMMAND[*]}"

# The quoted launch line reads back as the same words.
words=(srun "--ntasks=4" "a b" "it's" "x,y" "\$HOME")
read_back=()
eval "read_back=($(fastllm_quote "${words[@]}"))"
expect "quoted line reads back" "$(printf '<%s>' "${words[@]}")" \
  "$(printf '<%s>' "${read_back[@]}")"
expect "plain words stay unquoted" "srun --ntasks=4 --host=a:8,b:8" \
  "$(fastllm_quote srun --ntasks=4 --host=a:8,b:8)"

# GPU of each rank: the MPI launcher's local rank first, a position in a visible list, or as is.
rank_gpu() {
  env -u OMPI_COMM_WORLD_LOCAL_RANK -u MPI_LOCALRANKID -u SLURM_LOCALID -u CUDA_VISIBLE_DEVICES \
    "$@" "$root/jobs/fastllm_rank.sh" printenv CUDA_VISIBLE_DEVICES
}
expect "SLURM_LOCALID picks the GPU" 3 "$(rank_gpu SLURM_LOCALID=3)"
expect "Open MPI local rank picks the GPU" 5 "$(rank_gpu OMPI_COMM_WORLD_LOCAL_RANK=5)"
expect "Open MPI local rank wins over the batch step's SLURM_LOCALID" 2 \
  "$(rank_gpu SLURM_LOCALID=0 OMPI_COMM_WORLD_LOCAL_RANK=2)"
expect "position in the visible list" 6 \
  "$(rank_gpu OMPI_COMM_WORLD_LOCAL_RANK=2 CUDA_VISIBLE_DEVICES=4,5,6,7)"
expect "a single visible GPU is kept" 5 "$(rank_gpu SLURM_LOCALID=3 CUDA_VISIBLE_DEVICES=5)"
expect "no local rank means GPU 0" 0 "$(rank_gpu)"
rank_gpu SLURM_LOCALID=x >/dev/null 2>&1
expect "a bad local rank is an error" 2 "$?"
# NUMA binding: fake nvidia-smi puts GPU N at 00000000:1N:00.0; the sysfs tree below says which
# node each address is on; fake numactl logs its options and runs the command.
sysfs=$work/sys
for gpu in 0 1 2 3; do
  mkdir -p "$sysfs/bus/pci/devices/0000:1$gpu:00.0"
  echo $((gpu / 2)) >"$sysfs/bus/pci/devices/0000:1$gpu:00.0/numa_node"
done
echo -1 >"$sysfs/bus/pci/devices/0000:13:00.0/numa_node"
bind_log=$work/bind
mkdir -p "$bind_log"
bound_rank() {
  rm -f "$bind_log/numactl.log"
  env -u OMPI_COMM_WORLD_LOCAL_RANK -u MPI_LOCALRANKID -u SLURM_LOCALID -u CUDA_VISIBLE_DEVICES \
    "PATH=$root/tests/jobs/fake_bin:$PATH" "FASTLLM_SYSFS=$sysfs" "FAKE_LOG_DIR=$bind_log" "$@" \
    "$root/jobs/fastllm_rank.sh" printenv CUDA_VISIBLE_DEVICES
}
expect "numa: the rank still gets its GPU" 2 \
  "$(bound_rank FASTLLM_CPU_BIND=numa OMPI_COMM_WORLD_LOCAL_RANK=2 2>/dev/null)"
expect "numa: bound to the GPU's node" "--cpunodebind=1 --preferred=1 printenv" \
  "$(tail -n 1 "$bind_log/numactl.log")"
bound_rank FASTLLM_CPU_BIND=numa OMPI_COMM_WORLD_LOCAL_RANK=1 >/dev/null 2>&1
expect "numa: GPU 1 on node 0" "--cpunodebind=0 --preferred=0 printenv" \
  "$(tail -n 1 "$bind_log/numactl.log")"
bound_rank FASTLLM_CPU_BIND=numa OMPI_COMM_WORLD_LOCAL_RANK=1 CUDA_VISIBLE_DEVICES=0,2 \
  >/dev/null 2>&1
expect "numa: the node of the GPU picked from the visible list" \
  "--cpunodebind=1 --preferred=1 printenv" "$(tail -n 1 "$bind_log/numactl.log")"
expect "numa: PCI order for CUDA as for nvidia-smi" PCI_BUS_ID \
  "$(env -u CUDA_DEVICE_ORDER "$root/jobs/fastllm_rank.sh" printenv CUDA_DEVICE_ORDER)"
message=$(bound_rank FASTLLM_CPU_BIND=numa SLURM_LOCALID=3 2>&1 >/dev/null)
expect "numa: a GPU without a node runs unbound" "" "$(cat "$bind_log/numactl.log" 2>/dev/null)"
expect "numa: local rank 3 says nothing" "" "$message"
message=$(bound_rank FASTLLM_CPU_BIND=numa CUDA_VISIBLE_DEVICES=3 2>&1 >/dev/null)
expect "numa: local rank 0 says why it is unbound" 1 "$(grep -c "no NUMA node found for GPU 3" \
  <<<"$message")"
bound_rank FASTLLM_CPU_BIND=none OMPI_COMM_WORLD_LOCAL_RANK=2 >/dev/null 2>&1
expect "none: no numactl" "" "$(cat "$bind_log/numactl.log" 2>/dev/null)"
# Without numactl on the PATH (a folder holding only what the wrapper needs besides it).
mkdir -p "$work/bin"
for tool in bash head cat printenv nvidia-smi; do
  ln -sf "$(PATH=$root/tests/jobs/fake_bin:$PATH command -v "$tool")" "$work/bin/$tool"
done
message=$(env -i "PATH=$work/bin" "FASTLLM_SYSFS=$sysfs" FASTLLM_CPU_BIND=numa \
  "$root/jobs/fastllm_rank.sh" printenv CUDA_VISIBLE_DEVICES 2>&1)
expect "numa without numactl: runs unbound and says so" \
  "fastllm_rank.sh: ranks run without CPU/NUMA binding: numactl not found|0" \
  "$(tr '\n' '|' <<<"$message" | sed 's/|$//')"

# shellcheck disable=SC2016  # the inner bash expands $1 and $2
expect "the wrapper passes arguments and exit status" "a b|3" \
  "$("$root/jobs/fastllm_rank.sh" bash -c 'printf "%s %s" "$1" "$2"; exit 3' - a b; echo "|$?")"

if ((failures > 0)); then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all checks passed"
