# shellcheck shell=bash
# The FASTLLM_* variables set here are read by the templates that source this file.
# shellcheck disable=SC2034
# Functions shared by the SLURM and PBS templates (train.slurm, train.pbs). Sourced, never run.
# Every function is free of scheduler calls so that tests/jobs can exercise it on any machine.

# fastllm_die MESSAGE: one line on stderr naming the template, then exit 2 (a setup error).
fastllm_die() {
  echo "fastllm job: $*" >&2
  exit 2
}

# fastllm_split_args TEXT: FASTLLM_ARGS as words (whitespace separated, no quoting), into the array
# FASTLLM_ARGV.
fastllm_split_args() {
  FASTLLM_ARGV=()
  if [[ -n $1 ]]; then
    read -r -a FASTLLM_ARGV <<<"$1"
  fi
}

# fastllm_check_args ARG...: the template owns --load, --save and --config (resuming depends on
# them), so FASTLLM_ARGS may not set them.
fastllm_check_args() {
  local arg
  for arg in "$@"; do
    case $arg in
      --load | --load=* | --save | --save=* | --config | --config=*)
        fastllm_die "FASTLLM_ARGS sets ${arg%%=*}; set SAVE_DIR (checkpoints are saved to and" \
          "resumed from it) or CONFIG instead"
        ;;
    esac
  done
}

# fastllm_train_iters CONFIG ARG...: prints --train_iters as fastllm will see it (the command line
# wins over the YAML file); returns 1 when neither sets it.
fastllm_train_iters() {
  local config=$1 value="" i
  shift
  local args=("$@")
  for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
      --train_iters=*) value=${args[i]#--train_iters=} ;;
      --train_iters) value=${args[i + 1]:-} ;;
    esac
  done
  if [[ -z $value && -n $config && -r $config ]]; then
    value=$(sed -n -E 's/^train_iters:[[:space:]]*"?([0-9]+)"?[[:space:]]*(#.*)?$/\1/p' "$config" |
      tail -n 1)
  fi
  [[ $value =~ ^[0-9]+$ ]] || return 1
  echo "$((10#$value))"
}

# fastllm_latest_iteration DIR: the iteration of the newest complete checkpoint in DIR
# (checkpoint-<iteration>.h5; fastllm writes to a temporary name and renames when complete), or -1.
fastllm_latest_iteration() {
  local dir=$1 latest=-1 file name iteration
  if [[ -d $dir ]]; then
    for file in "$dir"/checkpoint-*.h5; do
      [[ -f $file ]] || continue
      name=${file##*/}
      iteration=${name#checkpoint-}
      iteration=${iteration%.h5}
      [[ $iteration =~ ^[0-9]+$ ]] || continue
      iteration=$((10#$iteration))
      ((iteration > latest)) && latest=$iteration
    done
  fi
  echo "$latest"
}

# fastllm_next_action SAVE_DIR TRAIN_ITERS LAUNCHER_RC STOP_SIGNAL RESTARTS MAX_RESTARTS
# Decides what a job does once fastllm has exited; prints one word:
#   done      a checkpoint of iteration >= TRAIN_ITERS exists: training is finished
#   requeue   stopped by USR1 (the scheduler's warning before the time limit) or by PREEMPT (a TERM
#             the template found to be a preemption) before finishing
#   give_up   as requeue, but the job was already requeued MAX_RESTARTS times
#   stopped   stopped by TERM (cancelled, or killed at the limit), or fastllm exited 0 before the
#             last iteration without the job seeing a signal: nothing is resubmitted
#   failed    fastllm failed without a signal: requeueing would fail the same way
fastllm_next_action() {
  local save_dir=$1 train_iters=$2 rc=$3 stop_signal=$4 restarts=$5 max_restarts=$6
  if (($(fastllm_latest_iteration "$save_dir") >= train_iters)); then
    echo "done"
  elif [[ $stop_signal == USR1 || $stop_signal == PREEMPT ]]; then
    if ((restarts < max_restarts)); then echo requeue; else echo give_up; fi
  elif [[ $stop_signal == TERM || $rc -eq 0 ]]; then
    echo stopped
  else
    echo failed
  fi
}

# fastllm_hms_to_seconds [[HH:]MM:]SS: PBS walltime to seconds.
fastllm_hms_to_seconds() {
  local total=0 part
  local parts
  IFS=: read -r -a parts <<<"$1"
  ((${#parts[@]} >= 1 && ${#parts[@]} <= 3)) || return 1
  for part in "${parts[@]}"; do
    [[ $part =~ ^[0-9]+$ ]] || return 1
    total=$((total * 60 + 10#$part))
  done
  echo "$total"
}

# fastllm_site_setup FILE: sources the site's set-up (module load, a virtual environment, NCCL_*
# settings; see site.example.sh) into this shell before anything else is derived from the
# environment. FILE empty: nothing. Sets FASTLLM_SITE_SETUP_USED to the file sourced, or "none".
fastllm_site_setup() {
  local file=$1 rc=0
  FASTLLM_SITE_SETUP_USED=none
  if [[ -z $file ]]; then
    return 0
  fi
  [[ -f $file && -r $file ]] || fastllm_die "FASTLLM_SITE_SETUP=$file: file not found"
  # Module systems (Lmod, Environment Modules) read variables that may be unset.
  set +u
  # shellcheck source=/dev/null
  source "$file" || rc=$?
  set -u
  ((rc == 0)) || fastllm_die "FASTLLM_SITE_SETUP=$file failed with status $rc"
  FASTLLM_SITE_SETUP_USED=$file
}

# fastllm_export_env THREADS_PER_RANK CPU_BIND: the environment every rank runs with. Values already
# in the environment win, so a site's settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) are kept.
# CPU_BIND (numa or none) tells fastllm_rank.sh whether to bind each rank to its GPU's NUMA node.
fastllm_export_env() {
  [[ $2 == numa || $2 == none ]] || fastllm_die "CPU_BIND=$2: expected numa or none"
  export FASTLLM_CPU_BIND=$2
  export OMP_NUM_THREADS=$1
  # WARN prints NCCL's errors and version without flooding the log; INFO to debug the topology.
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # 4.096 us x 2^22 = 17 s before an InfiniBand transfer is retried: rides out fabric hiccups that
  # NCCL's shorter default (2^18 or 2^20 depending on the release) turns into a failed job.
  export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
}

# Names of the variables fastllm_export_env sets, for launchers that forward a list (mpirun -x).
FASTLLM_ENV_NAMES=(OMP_NUM_THREADS NCCL_DEBUG NCCL_IB_TIMEOUT FASTLLM_CPU_BIND)

# fastllm_forward_names: the exported variables a launcher that does not pass on the environment
# (mpirun to other nodes) must forward, one per line: fastllm_export_env's, PATH and
# LD_LIBRARY_PATH (what module load changes), a virtual environment, and every NCCL_*, UCX_*, FI_*
# and CUDA_* variable the site set-up or the user exported.
fastllm_forward_names() {
  local name
  local -A seen=()
  for name in "${FASTLLM_ENV_NAMES[@]}" PATH LD_LIBRARY_PATH VIRTUAL_ENV \
    $(compgen -e | grep -E '^(NCCL|UCX|FI|CUDA)_' | sort); do
    if [[ -z ${seen[$name]:-} && -n ${!name:-} ]]; then
      seen[$name]=1
      echo "$name"
    fi
  done
}

# fastllm_train_command JOBS_DIR FASTLLM_BIN CONFIG SAVE_DIR ARG...: the per-rank command, into the
# array FASTLLM_COMMAND. --load and --save both name SAVE_DIR: fastllm resumes from its newest
# complete checkpoint and starts fresh when it has none.
fastllm_train_command() {
  local jobs_dir=$1 bin=$2 config=$3 save_dir=$4
  shift 4
  FASTLLM_COMMAND=("$jobs_dir/fastllm_rank.sh" "$bin" train)
  if [[ -n $config ]]; then
    FASTLLM_COMMAND+=("--config=$config")
  fi
  FASTLLM_COMMAND+=("$@" "--load=$save_dir" "--save=$save_dir")
}

# fastllm_quote ARG...: the words as one line that a shell reads back as the same words; only words
# with characters special to the shell are quoted.
fastllm_quote() {
  local out="" word
  for word in "$@"; do
    if [[ ! $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      printf -v word '%q' "$word"
    fi
    out+="${out:+ }$word"
  done
  echo "$out"
}

FASTLLM_STOP_SIGNAL=""
FASTLLM_FORWARD=""
FASTLLM_SIGNALS_CAUGHT=0
FASTLLM_LAUNCHER_PID=""
FASTLLM_LAUNCHER_RC=0

# fastllm_on_signal NAME: records the first stop signal (a TERM at the time limit after the USR1
# warning does not undo the requeue decision) and calls the function named by FASTLLM_FORWARD to
# pass it on to the ranks.
fastllm_on_signal() {
  FASTLLM_SIGNALS_CAUGHT=$((FASTLLM_SIGNALS_CAUGHT + 1))
  if [[ -z $FASTLLM_STOP_SIGNAL ]]; then
    FASTLLM_STOP_SIGNAL=$1
  fi
  echo "fastllm job: caught SIG$1; asking every rank to save a checkpoint and stop" >&2
  "$FASTLLM_FORWARD" "$1"
}

# fastllm_trap_signals FORWARD: from now on USR1 and TERM reaching this shell are recorded in
# FASTLLM_STOP_SIGNAL and passed on to the ranks by the function named FORWARD, called with the
# signal's name.
fastllm_trap_signals() {
  FASTLLM_FORWARD=$1
  trap 'fastllm_on_signal USR1' USR1
  trap 'fastllm_on_signal TERM' TERM
}

# fastllm_supervise COMMAND...: runs COMMAND (the launcher) in the background so that this shell
# can handle the trapped signals while it runs (bash runs traps only between commands, and `wait`
# returns as soon as one arrives), then waits again until the launcher has really exited. Sets
# FASTLLM_LAUNCHER_RC. A stop signal caught before the launch means there is nothing to launch.
fastllm_supervise() {
  local rc=0 caught
  if [[ -z $FASTLLM_STOP_SIGNAL ]]; then
    "$@" &
    FASTLLM_LAUNCHER_PID=$!
    while true; do
      caught=$FASTLLM_SIGNALS_CAUGHT
      rc=0
      wait "$FASTLLM_LAUNCHER_PID" || rc=$?
      if ((FASTLLM_SIGNALS_CAUGHT != caught)) && kill -0 "$FASTLLM_LAUNCHER_PID" 2>/dev/null; then
        continue
      fi
      break
    done
  fi
  trap - USR1 TERM
  FASTLLM_LAUNCHER_RC=$rc
}
