#!/usr/bin/env bash
# benchmarks/gpu/run.sh without a GPU and without CUDA: the no-GPU exit, the limits on what comes
# back from a device call, the stage budgets against the 600 s call, --prepare's folder, and whole
# device runs on stand-in binaries (tests/gpu_run/fake_bin: nvidia-smi, fastllm, step_throughput,
# a GPU test) with the fixtures' reference passes as probe results.
#   tests/gpu_run/test_gpu_run.sh SHARED   (SHARED: the folder with fixtures/ and anchors/)
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
shared=${1:-$root/../shared}
run=$root/benchmarks/gpu/run.sh
fakes=$root/tests/gpu_run/fake_bin

# shellcheck source=tests/support/checks.sh
source "$root/tests/support/checks.sh"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export FAKE_LOG=$work/fake.log

# ---- no GPU: exit code 4, a message that says so, nothing written ----
err=$(OUT=$work/nogpu FASTLLM_GPU_NVIDIA_SMI=$work/no-such-nvidia-smi bash "$run" 2>&1 >/dev/null)
expect "no GPU: exit code" 4 $?
contains "no GPU: message" "no GPU found" "$err"
contains "no GPU: points to --prepare" "--prepare" "$err"
expect "no GPU: nothing in OUT" 0 "$(find "$work/nogpu" -type f 2>/dev/null | wc -l)"

# ---- bad usage ----
bash "$run" --bogus >/dev/null 2>&1
expect "unknown argument: exit code" 2 $?
FASTLLM_GPU_STAGES="tests warp" FASTLLM_GPU_NVIDIA_SMI=$fakes/nvidia-smi OUT=$work/bad \
  bash "$run" >/dev/null 2>&1
expect "unknown stage: exit code" 2 $?

# ---- the stage budgets fit one 600 s call with room for the start ----
budgets=$(bash "$run" --budgets)
sum=$(awk '$1 == "sum" {print $2}' <<<"$budgets")
expect_true "budgets sum under 560 s ($sum)" "[ ${sum:-999} -lt 560 ]"
expect_true "every stage has a budget" "[ $(grep -cE '^(smoke|tests|probe|throughput|peer) [0-9]+$' <<<"$budgets") -eq 5 ]"

# ---- what comes back from a device call ----
mkdir -p "$work/o1/a/b"
touch "$work/o1/summary.txt" "$work/o1/a/b/deep.log"
bash "$run" --check-out "$work/o1" >/dev/null 2>&1
expect "check-out: 2 files, two folders down fit" 0 $?
mkdir -p "$work/o2"
for i in 1 2 3 4 5 6 7 8 9; do touch "$work/o2/f$i"; done
msg=$(bash "$run" --check-out "$work/o2" 2>&1)
expect "check-out: 9 files refused" 1 $?
contains "check-out: names the count" "9 files" "$msg"
mkdir -p "$work/o3/a/b/c"
touch "$work/o3/a/b/c/too-deep" "$work/o3/bad name"
truncate -s 17M "$work/o3/big.bin"
msg=$(bash "$run" --check-out "$work/o3" 2>&1)
expect "check-out: deep, oddly named and big files refused" 1 $?
contains "check-out: too deep" "a/b/c/too-deep" "$msg"
contains "check-out: bad name" "'bad name'" "$msg"
contains "check-out: too big" "big.bin is 17 MiB" "$msg"

# ---- --prepare on stand-in binaries (no CUDA build, no download) ----
gpu=$work/gpu
xz_bin=$(command -v xz)
out=$(FASTLLM_GPU_DIR=$gpu FASTLLM_SHARED=$shared FASTLLM_GPU_DEBS=0 \
  FASTLLM_GPU_BINARIES="$fakes/fastllm $fakes/step_throughput $fakes/cuda_test_ops $xz_bin" \
  bash "$run" --prepare 2>&1)
expect "prepare: exit code" 0 $?
contains "prepare: prints the next command" 'carry [".gpu"]' "$out"
for f in payload.tar.xz MANIFEST anchors/hf_baseline.py anchors/hf-pytorch-h200-compiled.json \
  fixtures/dev-mistral/reference.safetensors fixtures/dev-mistral/model.safetensors.index.json \
  fixtures/dev-mixtral/model.safetensors fixtures/dev-tied-nowindow/config.json; do
  expect_true "prepare: $f" "[ -f '$gpu/$f' ]"
done
expect "prepare: no trajectories (unused)" 0 "$(find "$gpu" -name 'trajectory*' | wc -l)"
expect_true "prepare: under 60 MiB" "[ $(du -sm "$gpu" | cut -f1) -le 60 ]"
manifest=$(cat "$gpu/MANIFEST")
contains "prepare: glibc left to the device" "device libc.so.6" "$manifest"
contains "prepare: other libraries carried for a device that lacks them" "if-missing liblzma.so.5" \
  "$manifest"
contains "prepare: payload holds the binaries" "bin/step_throughput" \
  "$(tar -tJf "$gpu/payload.tar.xz")"
contains "prepare: payload holds the libraries" "lib-missing/liblzma.so.5" \
  "$(tar -tJf "$gpu/payload.tar.xz")"

# ---- a whole device run on the stand-ins: every stage, one failing configuration ----
device_env=(env "FASTLLM_GPU_DIR=$gpu" "FASTLLM_GPU_NVIDIA_SMI=$fakes/nvidia-smi"
  FASTLLM_GPU_PEER=recorded)
: >"$FAKE_LOG"
out=$("${device_env[@]}" OUT="$work/out1" FAKE_FAILING_MODEL=mixtral-8e \
  FASTLLM_GPU_FLAGS="--attention_kernel=own --no_such_flag=1" bash "$run" 2>&1)
expect "run: a failing configuration gives exit code 1" 1 $?
expect "run: three files come back" "logs.tar.gz results.jsonl summary.txt" \
  "$(cd "$work/out1" && find . -type f | sed 's|^\./||' | sort | tr '\n' ' ' | sed 's/ $//')"
bash "$run" --check-out "$work/out1" >/dev/null 2>&1
expect "run: OUT within the limits" 0 $?
contains "run: card named" "device: NVIDIA H200" "$out"
contains "run: the GPU test ran" "tests: cuda_test_ops passed 3 tests" "$out"
expect "run: six probes within tolerance" 6 "$(grep -c '^\[.*probe .* ok ' "$work/out1/summary.txt")"
contains "run: results printed as they arrive" "mistral-0.85b fastllm bf16 recompute=none attention=own: 81,920 tokens/s" "$out"
contains "run: the failure named" "FAIL throughput mixtral-8e recompute=none: mixtral-8e error: out of memory" "$out"
contains "run: an unknown flag dropped, not fatal" "step_throughput has no --no_such_flag: dropped" "$out"
contains "run: flags passed on" "--model=mistral-7b --recompute=full --attention_kernel=own" \
  "$(cat "$FAKE_LOG")"
table=$(sed -n '/done in/,$p' "$work/out1/summary.txt")
contains "run: table last" "fastllm tok/s" "$table"
contains "run: table names the card" "card: NVIDIA H200" "$table"
contains "run: ratio to the recorded peer" "amp (recorded)" "$table"
contains "run: profile column" "30/50/2/10" "$table"
expect "run: logs packed" "logs/cuda_test_ops.log" \
  "$(tar -tzf "$work/out1/logs.tar.gz" | grep -m1 cuda_test_ops)"

# ---- all configurations pass: exit code 0 ----
"${device_env[@]}" OUT="$work/out2" FASTLLM_GPU_STAGES="smoke throughput" bash "$run" >/dev/null 2>&1
expect "run: all passing gives exit code 0" 0 $?

# ---- the deadline cuts a stage that runs long and skips what no longer fits ----
start=$SECONDS
out=$("${device_env[@]}" OUT="$work/out3" FAKE_TEST_SLEEP=60 FASTLLM_GPU_DEADLINE=16 \
  bash "$run" 2>&1)
expect "deadline: exit code 1" 1 $?
expect_true "deadline: over within it ($((SECONDS - start)) s)" "[ $((SECONDS - start)) -le 16 ]"
contains "deadline: the long test cut" "cuda_test_ops out of time" "$out"
contains "deadline: later stages skipped with a reason" "budget is spent" "$out"
expect "deadline: three files come back" 3 "$(find "$work/out3" -type f | wc -l)"

exit $((failures > 0))
