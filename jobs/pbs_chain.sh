#!/usr/bin/env bash
# Submits a chain of COUNT jobs/train.pbs jobs from the login node, each starting once the one
# before has ended with status 0 (qsub -W depend=afterok): every job resumes from the newest
# checkpoint in SAVE_DIR, saves before its walltime and ends; a job that finds the run finished
# launches nothing. A failed or deleted job (qdel) ends the chain: PBS drops the jobs that depend
# on it. For sites that forbid qsub on compute nodes, where RESUBMIT=1 cannot work.
#   bash jobs/pbs_chain.sh COUNT [qsub option...]
#   bash jobs/pbs_chain.sh 5 -v CONFIG=jobs/mistral_7b.yaml,SAVE_DIR=experiments/mistral
# Prints the job ids, one a line. QSUB names the qsub to run (default: qsub).
set -euo pipefail

if (($# < 1)) || [[ ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: pbs_chain.sh COUNT [qsub option...]   (COUNT >= 1 jobs)" >&2
  exit 2
fi
count=$1
shift
template=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/train.pbs
previous=""
for ((i = 1; i <= count; i++)); do
  dependency=()
  if [[ -n $previous ]]; then
    dependency=(-W "depend=afterok:$previous")
  fi
  previous=$("${QSUB:-qsub}" "$@" "${dependency[@]}" "$template")
  if [[ -z $previous ]]; then
    echo "pbs_chain.sh: qsub printed no job id for job $i of $count" >&2
    exit 1
  fi
  echo "$previous"
done
