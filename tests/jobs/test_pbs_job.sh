#!/usr/bin/env bash
# jobs/train.pbs for real, on this machine: Open MPI's mpirun starts two real fastllm ranks on the
# "node" of a PBS_NODEFILE that lists localhost twice; fake qsub/qstat (tests/jobs/fake_bin) log
# what the template asks of PBS. The job's own timer sends USR1 SAVE_MARGIN seconds before the
# walltime: every rank saves and the job submits itself again (RESUBMIT=1, opt-in); the resubmitted
# job, given nothing
# but the file the first one wrote, resumes from that checkpoint; TERM stops it without
# resubmitting.
#   tests/jobs/test_pbs_job.sh FASTLLM_BINARY MPIRUN [PYTHON]
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
fastllm=$(realpath "${1:?usage: test_pbs_job.sh FASTLLM_BINARY MPIRUN [PYTHON]}")
mpirun=${2:?usage: test_pbs_job.sh FASTLLM_BINARY MPIRUN [PYTHON]}
python=${3:-python3}
# shellcheck source=tests/jobs/job_test_lib.sh
source "$root/tests/jobs/job_test_lib.sh"

printf 'localhost\nlocalhost\n' >"$work/nodefile"
pbs_env=(env "PATH=$root/tests/jobs/fake_bin:$PATH" "FAKE_LOG_DIR=$FAKE_LOG_DIR" PBS_JOBID=55.fake
  PBS_JOBNAME=test "PBS_NODEFILE=$work/nodefile" "PBS_O_WORKDIR=$work")
save=$work/run

# 1. Walltime 10 min 10 s, SAVE_MARGIN 600 s: the timer fires about 10 s after the start, time for
# fastllm to start (it installs its signal handler once the model is loaded) on a busy machine.
setsid "${pbs_env[@]}" CONFIG="$config" SAVE_DIR="$save" FASTLLM_BIN="$fastllm" GPUS_PER_NODE=2 \
  RESUBMIT=1 THREADS_PER_RANK=1 FAKE_WALLTIME=00:10:10 SAVE_MARGIN=600 MPIRUN="$mpirun" \
  MPIRUN_ARGS="--oversubscribe --allow-run-as-root" \
  bash "$root/jobs/train.pbs" >"$work/job1.log" 2>&1 &
job=$!
started_jobs+=("$job")
wait_for_iterations "$save" 1 "$job" "$work/job1.log"
wait_for_exit "$job" "$work/job1.log"
expect "1: job exits 0" 0 "$?"
first=$(checkpoint_iteration "$save")
expect_true "1: a checkpoint before the end (iteration $first)" \
  "((first >= 1 && first < 100000))"
log1=$(cat "$work/job1.log")
contains "1: timer from the qstat walltime" "USR1 from a timer in" "$log1"
contains "1: fastllm saved on the signal" "saving and stopping at iteration $first" "$log1"
contains "1: stopped by USR1, resubmitted" \
  "after SIGUSR1; newest checkpoint: iteration $first; requeue" \
  "$log1"
expect "1: resubmitted once" \
  "-N test -v FASTLLM_JOB_ENV=$save/job.env -W depend=afterany:55.fake $root/jobs/train.pbs" \
  "$(cat "$FAKE_LOG_DIR/qsub.log")"
contains "1: the settings file counts the restart" "FASTLLM_RESTART=1" "$(cat "$save/job.env")"

# 2. The resubmitted job gets only FASTLLM_JOB_ENV (qsub -v); TERM stops it without resubmitting.
setsid "${pbs_env[@]}" FASTLLM_JOB_ENV="$save/job.env" WALLTIME=10:00:00 \
  bash "$root/jobs/train.pbs" >"$work/job2.log" 2>&1 &
job=$!
started_jobs+=("$job")
wait_for_iterations "$save" $((first + 3)) "$job" "$work/job2.log"
kill -TERM "$job"
wait_for_exit "$job" "$work/job2.log"
expect "2: job exits 0" 0 "$?"
second=$(checkpoint_iteration "$save")
log2=$(cat "$work/job2.log")
contains "2: settings from the first job" "restart 1 of at most 50" "$log2"
contains "2: resumed from the first checkpoint" \
  "resumed from $save/$(printf 'checkpoint-%08d.h5' "$first") at iteration $first" "$log2"
expect_true "2: a later checkpoint (iteration $second)" "((second > first + 2))"
contains "2: TERM stops" "after SIGTERM; newest checkpoint: iteration $second; stopped" "$log2"
expect "2: not resubmitted again" 1 "$(wc -l <"$FAKE_LOG_DIR/qsub.log")"
# The job ran in its own session (setsid): its 10 h timer, ranks and launcher must all be gone.
expect "2: nothing of the job left running" "" "$(pgrep -a -s "$job" -r R,S,D)"

finish
