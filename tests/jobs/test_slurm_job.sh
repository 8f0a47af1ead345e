#!/usr/bin/env bash
# jobs/train.slurm for real, on this machine: fake srun/scancel/scontrol/squeue (tests/jobs/fake_bin)
# start two real fastllm ranks with mpiexec and log what the template asks of SLURM. Follows one run
# through its life: USR1 to the batch script (what --signal=B:USR1@... does) makes every rank save
# and the job requeue itself; the requeued job resumes from that checkpoint; TERM after a cancel
# stops it without a requeue; a finished run launches nothing; a run reaching --train_iters is done;
# a failing run is not requeued; a TERM while the job still runs (a preemption) saves and requeues.
# And the example configs of jobs/ use only flags `fastllm train` knows.
#   tests/jobs/test_slurm_job.sh FASTLLM_BINARY MPIEXEC [PYTHON]
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
fastllm=$(realpath "${1:?usage: test_slurm_job.sh FASTLLM_BINARY MPIEXEC [PYTHON]}")
mpiexec=${2:?usage: test_slurm_job.sh FASTLLM_BINARY MPIEXEC [PYTHON]}
python=${3:-python3}
# shellcheck source=tests/jobs/job_test_lib.sh
source "$root/tests/jobs/job_test_lib.sh"

export FAKE_MPIEXEC=$mpiexec
job_env=(env "PATH=$root/tests/jobs/fake_bin:$PATH" "FAKE_LOG_DIR=$FAKE_LOG_DIR"
  "FAKE_MPIEXEC=$mpiexec" SLURM_JOB_ID=4242 SLURM_JOB_NAME=test SLURM_NNODES=1
  SLURM_NTASKS_PER_NODE=2 SLURM_CPUS_PER_TASK=1 "SLURM_SUBMIT_DIR=$work" "CONFIG=$config"
  "FASTLLM_BIN=$fastllm" SRUN_ARGS=--mpi=pmix)
save=$work/run

# 0. The example configs in jobs/ use only flags of `fastllm train`.
help=$("$fastllm" train --help)
for example in "$root"/jobs/*.yaml; do
  while read -r key; do
    contains "0: ${example##*/}: $key is a train flag" "  --$key (" "$help"
  done < <(sed -n -E 's/^([a-z_]+):.*/\1/p' "$example")
done

# 1. USR1 to the batch script: checkpoint, requeue.
setsid "${job_env[@]}" SAVE_DIR="$save" bash "$root/jobs/train.slurm" >"$work/job1.log" 2>&1 &
job=$!
started_jobs+=("$job")
wait_for_iterations "$save" 3 "$job" "$work/job1.log"
kill -USR1 "$job"
wait_for_exit "$job" "$work/job1.log"
expect "1: job exits 0" 0 "$?"
first=$(checkpoint_iteration "$save")
expect_true "1: a checkpoint before the end (iteration $first)" \
  "((first >= 3 && first < 100000))"
contains "1: srun ran 2 ranks" "--ntasks=2" "$(cat "$FAKE_LOG_DIR/srun.log")"
contains "1: the signal went to the job step" "--signal=USR1 4242" \
  "$(cat "$FAKE_LOG_DIR/scancel.log")"
expect "1: requeued once" "requeue 4242" "$(cat "$FAKE_LOG_DIR/scontrol.log")"
contains "1: fastllm saved on the signal" "saving and stopping at iteration $first" \
  "$(cat "$work/job1.log")"
contains "1: the job reports the decision" "; requeue" "$(cat "$work/job1.log")"

# 2. The requeued job resumes; TERM after a cancel (the fake squeue says COMPLETING) stops it without
# a requeue.
setsid "${job_env[@]}" SAVE_DIR="$save" SLURM_RESTART_COUNT=1 bash "$root/jobs/train.slurm" \
  >"$work/job2.log" 2>&1 &
job=$!
started_jobs+=("$job")
wait_for_iterations "$save" $((first + 3)) "$job" "$work/job2.log"
kill -TERM "$job"
wait_for_exit "$job" "$work/job2.log"
expect "2: job exits 0" 0 "$?"
second=$(checkpoint_iteration "$save")
contains "2: resumed from the first checkpoint" \
  "resumed from $save/$(printf 'checkpoint-%08d.h5' "$first") at iteration $first" \
  "$(cat "$work/job2.log")"
expect_true "2: a later checkpoint (iteration $second)" "((second > first + 2))"
contains "2: restart count shown" "restart 1 of at most 50" "$(cat "$work/job2.log")"
contains "2: TERM after a cancel stops" \
  "after SIGTERM (job state COMPLETING); newest checkpoint: iteration $second; stopped" \
  "$(cat "$work/job2.log")"
expect "2: not requeued again" 1 "$(wc -l <"$FAKE_LOG_DIR/scontrol.log")"

# 3. A save folder that already reached --train_iters launches nothing.
"${job_env[@]}" SAVE_DIR="$save" FASTLLM_ARGS="--train_iters=$second" \
  bash "$root/jobs/train.slurm" >"$work/job3.log" 2>&1
expect "3: job exits 0" 0 "$?"
contains "3: nothing to do" "already holds iteration $second" "$(cat "$work/job3.log")"
expect "3: srun not called" 2 "$(wc -l <"$FAKE_LOG_DIR/srun.log")"

# 4. A run that reaches --train_iters is done.
"${job_env[@]}" SAVE_DIR="$work/short" FASTLLM_ARGS="--train_iters=3" \
  bash "$root/jobs/train.slurm" >"$work/job4.log" 2>&1
expect "4: job exits 0" 0 "$?"
expect "4: final checkpoint" 3 "$(checkpoint_iteration "$work/short")"
contains "4: done" "exited with 0; newest checkpoint: iteration 3; done" "$(cat "$work/job4.log")"
expect "4: not requeued" 1 "$(wc -l <"$FAKE_LOG_DIR/scontrol.log")"

# 5. fastllm refusing its flags fails the job, which is not requeued.
"${job_env[@]}" SAVE_DIR="$work/bad" FASTLLM_ARGS="--train_iters=3 --batch_size=3" \
  bash "$root/jobs/train.slurm" >"$work/job5.log" 2>&1
rc=$?
expect_true "5: job fails (exit $rc)" "((rc != 0))"
contains "5: fastllm's message" "--batch_size=3 is not a multiple" "$(cat "$work/job5.log")"
contains "5: failed" "; failed" "$(cat "$work/job5.log")"
expect "5: not requeued" 1 "$(wc -l <"$FAKE_LOG_DIR/scontrol.log")"

# 6. A TERM while SLURM still shows the job RUNNING is a preemption's notice: checkpoint, requeue.
setsid "${job_env[@]}" SAVE_DIR="$save" SLURM_RESTART_COUNT=2 FAKE_JOB_STATE=RUNNING \
  bash "$root/jobs/train.slurm" >"$work/job6.log" 2>&1 &
job=$!
started_jobs+=("$job")
wait_for_iterations "$save" $((second + 2)) "$job" "$work/job6.log"
kill -TERM "$job"
wait_for_exit "$job" "$work/job6.log"
expect "6: job exits 0" 0 "$?"
third=$(checkpoint_iteration "$save")
expect_true "6: a checkpoint on the preemption (iteration $third)" "((third > second + 1))"
contains "6: the job state was asked for" "-j 4242 -o %T" "$(cat "$FAKE_LOG_DIR/squeue.log")"
contains "6: preempted, requeued" \
  "after SIGTERM (job state RUNNING); newest checkpoint: iteration $third; requeue" \
  "$(cat "$work/job6.log")"
expect "6: requeued" 2 "$(wc -l <"$FAKE_LOG_DIR/scontrol.log")"

finish
