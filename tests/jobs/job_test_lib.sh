# shellcheck shell=bash
# Shared by the tests that run the job templates for real (test_slurm_job.sh, test_pbs_job.sh):
# a scratch folder, a tiny synthetic dataset and model config, the waits, and the checks of
# tests/support/checks.sh. Expects $root, $python and $fastllm to be set by the sourcing test.
# Variables set here are read by the tests that source this file, and the other way round.
# shellcheck disable=SC2034,SC2154

# shellcheck source=tests/support/checks.sh
source "$root/tests/support/checks.sh"
work=$(mktemp -d)
# Jobs run under setsid, each its own process group: whatever a failed check leaves running (ranks,
# a timer) goes with its group.
started_jobs=()
cleanup() {
  local job
  for job in "${started_jobs[@]}"; do
    kill -KILL -- "-$job" 2>/dev/null
  done
  rm -rf "$work"
}
trap cleanup EXIT
FAKE_LOG_DIR=$work/log
mkdir -p "$FAKE_LOG_DIR"
export FAKE_LOG_DIR
# Two ranks share the test machine's cores.
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

"$python" "$root/benchmarks/scaling/synthetic_dataset.py" "$work/data" --documents 300 \
  --mean_tokens 96 --vocab_size 256 --seed 3 >/dev/null || {
  echo "FAIL could not write the synthetic dataset with $python"
  exit 1
}
# Far more iterations than the tests let run: every run ends by a signal, or by a smaller
# --train_iters on the command line.
config=$work/run.yaml
cat >"$config" <<EOF
load_pretrained_weights: 0
num_layers: 2
hidden_size: 64
num_attention_heads: 4
head_groups: 2
ffn_hidden_size: 128
vocab_size: 256
sequence_length: 64
batch_size: 4
micro_batch_size: 1
log_interval: 1
train_iters: 100000
data_path: $work/data
EOF

# The iteration of the newest checkpoint-NNNNNNNN.h5 in DIR, or -1 (parsed here, independently of
# jobs/common.sh).
checkpoint_iteration() {
  local newest
  newest=$(find "$1" -maxdepth 1 -name 'checkpoint-*.h5' -printf '%f\n' 2>/dev/null |
    sort | tail -n 1)
  if [[ -z $newest ]]; then
    echo -1
  else
    newest=${newest#checkpoint-}
    echo "$((10#${newest%.h5}))"
  fi
}

# wait_for_iterations SAVE_DIR N JOB_PID LOG: until metrics.jsonl records iteration N or later.
# Aborts the test if the job ends first or nothing happens for two minutes; the job was started
# with setsid, so its process group (the launcher and the ranks too) is killed then.
wait_for_iterations() {
  local metrics=$1/metrics.jsonl target=$2 job=$3 log=$4 latest deadline=$((SECONDS + 120))
  while ((SECONDS < deadline)); do
    latest=$(grep -o '"iteration":[0-9]*' "$metrics" 2>/dev/null | tail -n 1 | cut -d: -f2)
    if ((${latest:-0} >= target)); then
      return 0
    fi
    if ! kill -0 "$job" 2>/dev/null; then
      echo "FAIL the job ended before iteration $target:"
      cat "$log"
      exit 1
    fi
    sleep 0.2
  done
  echo "FAIL iteration $target not reached in 120 s:"
  cat "$log"
  kill -KILL -- "-$job" 2>/dev/null
  exit 1
}

# wait_for_exit JOB_PID LOG: the job's exit status once it ends (after a signal it has a step, a
# save and the launcher's shutdown to go); aborts the test, killing the job's process group, if it
# is still running after two minutes.
wait_for_exit() {
  local job=$1 log=$2 deadline=$((SECONDS + 120))
  while kill -0 "$job" 2>/dev/null && ((SECONDS < deadline)); do
    sleep 0.2
  done
  if kill -0 "$job" 2>/dev/null; then
    echo "FAIL the job did not stop within two minutes of the signal:"
    cat "$log"
    kill -KILL -- "-$job" 2>/dev/null
    exit 1
  fi
  wait "$job"
}

finish() {
  if ((failures > 0)); then
    echo "$failures check(s) failed"
    exit 1
  fi
  echo "all checks passed"
}
