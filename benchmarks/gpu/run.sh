#!/usr/bin/env bash
# fastllm's GPU run in one device call (../shared/GPU.md, benchmarks/gpu/NOTES.md).
#
#   bash benchmarks/gpu/run.sh --prepare   here, on the development machine: builds the sm_90
#                                          binaries and fills .gpu/ (git-ignored, at most 60 MiB)
#   bash benchmarks/gpu/run.sh             on the GPU machine, from the repository root, with
#                                          .gpu carried along; results under $OUT
#   bash benchmarks/gpu/run.sh --budgets   the stages' time budgets and their sum
#   bash benchmarks/gpu/run.sh --check-out DIR   does DIR fit what comes back from a device call
#
# The device command runs the stages of FASTLLM_GPU_STAGES (default: smoke tests probe throughput
# peer), each under its own time budget and all under one deadline (FASTLLM_GPU_DEADLINE, 560 s)
# that keeps the whole call inside the device's 600 s. Each result is printed as it arrives; the
# summary table comes last. $OUT receives summary.txt, results.jsonl and logs.tar.gz: 3 of the 8
# files a call may bring back.
#
# Exit codes of the device command: 0 every stage ran and passed; 1 a stage failed or ran out of
# time (the summary says which); 2 bad usage; 3 $OUT breaks the device's limits on what comes back;
# 4 no GPU here (nvidia-smi is missing or lists none): the command belongs on the GPU machine;
# 5 .gpu/ is missing or its binaries cannot start and no in-place build could replace them.
# --prepare exits 0, or 1 with the reason (build error, folder over 60 MiB, ../shared missing).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 2
here=benchmarks/gpu
gpu_dir=${FASTLLM_GPU_DIR:-$root/.gpu}
readonly prepared_limit_mib=60
# The binaries the run needs (all built by --prepare).
readonly targets=(fastllm step_throughput cuda_test_ops cuda_test_allocator cuda_test_model
  cuda_test_nccl)
readonly probe_fixtures=(dev-mistral dev-mixtral dev-tied-nowindow)
# -dev packages the in-place build needs that the GPU machine lacks (Debian 12's, unpacked with
# dpkg -x into a prefix of the run): yaml-cpp, OpenBLAS's headers, SentencePiece's pkg-config file.
readonly fallback_debs=(libyaml-cpp-dev libyaml-cpp0.7 libopenblas-openmp-dev libsentencepiece-dev
  libsentencepiece0)

# Stage budgets in seconds; the deadline caps their sum with what is left at each stage's start.
declare -A budget=([smoke]=30 [build]=300 [tests]=120 [probe]=45 [throughput]=210 [peer]=140)
deadline=${FASTLLM_GPU_DEADLINE:-560}
# Left for packing the logs and the table after the last stage.
readonly reserve=10

die() {
  echo "run.sh: $1" >&2
  exit "${2:-1}"
}

# The build inputs, hashed: --prepare records it so that the device run can tell stale binaries.
source_hash() {
  find CMakeLists.txt src kernels io tests benchmarks -type f \
    \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name CMakeLists.txt \) \
    2>/dev/null | LC_ALL=C sort | xargs cat | sha1sum | cut -c1-12
}

# ---------------------------------------------------------------------------------------------
# What comes back from a device call: at most 8 files, 16 MiB each, 64 MiB together, at most two
# folders down, names of letters, digits, '.', '_' and '-'.
check_out() {
  local dir=$1 bad=0 files total=0 f size rel
  [ -d "$dir" ] || die "--check-out: $dir is not a folder" 2
  files=$(find "$dir" -type f | wc -l)
  if [ "$files" -gt 8 ]; then
    echo "OUT limits: $files files in $dir, at most 8 come back" >&2
    bad=1
  fi
  while IFS= read -r -d '' f; do
    rel=${f#"$dir"/}
    size=$(stat -c %s "$f")
    total=$((total + size))
    if [ "$size" -gt $((16 << 20)) ]; then
      echo "OUT limits: $rel is $((size >> 20)) MiB, at most 16 MiB a file" >&2
      bad=1
    fi
    if [[ ! $rel =~ ^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+){0,2}$ ]]; then
      echo "OUT limits: '$rel' is more than two folders down or has a name outside [A-Za-z0-9._-]" >&2
      bad=1
    fi
  done < <(find "$dir" -mindepth 1 \( -type f -o -type l \) -print0)
  if [ "$total" -gt $((64 << 20)) ]; then
    echo "OUT limits: $((total >> 20)) MiB in all, at most 64 MiB" >&2
    bad=1
  fi
  return $bad
}

print_budgets() {
  local sum=0 s
  for s in smoke tests probe throughput peer; do
    echo "$s ${budget[$s]}"
    sum=$((sum + budget[$s]))
  done
  echo "sum $sum (deadline $deadline, in-place build when needed: ${budget[build]}, taken from the later stages)"
}

# ---------------------------------------------------------------------------------------------
# --prepare: the folder that frees the device run from what the GPU machine lacks.

# Shared libraries the device has by its own install and which must be its own: glibc, the CUDA
# libraries (CUDA 13.0, cuDNN 9.14, NCCL 2.28 there), and Open MPI with what it loads (libmpi must
# match the device's launcher and plugins; 4.1.4 here and 4.1.6 there share the ABI of
# libmpi.so.40).
is_device_lib() {
  case $1 in
    linux-vdso* | ld-linux* | libc.so* | libm.so* | libdl.so* | libpthread.so* | librt.so* | \
      libresolv.so* | libutil.so*) return 0 ;;
    libcuda.so* | libcudart* | libcublas* | libcudnn* | libnccl* | libnvrtc* | libnvJitLink* | \
      libcufft* | libcurand* | libcusparse* | libcusolver* | libnvToolsExt*) return 0 ;;
  esac
  [[ " $mpi_closure " == *" $1 "* ]]
}

# Carried and always used: what the device lacks (yaml-cpp, parallel HDF5, which needs libmpi,
# and the OpenMP build of OpenBLAS, whose headers the device lacks and whose threads share the
# program's OpenMP pool) or has in another version than the binaries were linked with
# (SentencePiece 0.1.97 here, 0.2 there).
is_always_lib() {
  case $1 in
    libyaml-cpp* | libhdf5_openmpi* | libhdf5_hl* | libopenblas* | libsentencepiece*) return 0 ;;
  esac
  return 1
}

prepare() {
  local shared=${FASTLLM_SHARED:-$root/../shared}
  local build=${FASTLLM_GPU_BUILD:-$root/build-gpurun}
  if [ ! -d "$shared/fixtures" ] || [ ! -f "$shared/anchors/hf_baseline.py" ]; then
    die "--prepare: $shared has no fixtures/ or anchors/hf_baseline.py (FASTLLM_SHARED names it)"
  fi
  # Hashed before the build, so that edits made while it runs count as changes.
  local built_from
  built_from=$(source_hash)
  local binaries=()
  if [ -n "${FASTLLM_GPU_BINARIES:-}" ]; then
    # Tests name stand-in binaries and skip the CUDA build.
    read -r -a binaries <<<"$FASTLLM_GPU_BINARIES"
  else
    if [ ! -f "$build/CMakeCache.txt" ]; then
      cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTLLM_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DFASTLLM_CUDA_ARCHITECTURES=90 -DFASTLLM_BENCHMARKS=OFF ||
        die "--prepare: configure failed in $build"
    fi
    grep -q '^FASTLLM_CUDA_ARCHITECTURES:STRING=90$' "$build/CMakeCache.txt" ||
      die "--prepare: $build is not configured for sm_90 (FASTLLM_CUDA_ARCHITECTURES=90)"
    echo "prepare: building ${targets[*]} in $build"
    cmake --build "$build" -j "${FASTLLM_GPU_JOBS:-2}" --target "${targets[@]}" ||
      die "--prepare: build failed in $build"
    binaries=("$build/src/fastllm" "$build/benchmarks/gpu/step_throughput")
    local t
    for t in "${targets[@]:2}"; do binaries+=("$build/tests/cuda/$t"); done
  fi

  local stage
  stage=$(mktemp -d "${TMPDIR:-/tmp}/fastllm-gpu-prepare.XXXXXX") || die "--prepare: mktemp"
  # shellcheck disable=SC2064  # the path is fixed now
  trap "rm -rf '$stage'" EXIT
  local new=$stage/gpu payload=$stage/payload
  mkdir -p "$new/fixtures" "$new/anchors" "$payload/bin" "$payload/lib" "$payload/lib-missing"

  local b
  for b in "${binaries[@]}"; do
    [ -x "$b" ] || die "--prepare: $b is missing"
    cp "$b" "$payload/bin/"
    # Symbols are of no use there; the CUDA machine code stays (its own ELF section).
    if [ "${FASTLLM_GPU_STRIP:-1}" = 1 ]; then strip "$payload/bin/$(basename "$b")" 2>/dev/null; fi
  done

  # The libraries the binaries load, by ldd, sorted into the two groups above and the rest, which
  # the device is expected to have (libstdc++, zlib, libcurl, ...) and which the run links in
  # only where its system lacks them.
  local libmpi
  libmpi=$(ldconfig -p | awk '$1 == "libmpi.so.40" {print $NF; exit}')
  # libmpi_cxx is not in it: a thin C++ layer over libmpi that a device build may lack; carried
  # for that case (the group below).
  mpi_closure="libmpi.so.40"
  if [ -n "$libmpi" ]; then
    mpi_closure+=" $(ldd "$libmpi" | awk '{print $1}' | tr '\n' ' ')"
  fi
  local name path manifest_libs=""
  while read -r name path; do
    if is_device_lib "$name"; then
      manifest_libs+="device $name"$'\n'
    elif is_always_lib "$name"; then
      cp -L "$path" "$payload/lib/$name"
      manifest_libs+="carried $name"$'\n'
    else
      cp -L "$path" "$payload/lib-missing/$name"
      manifest_libs+="if-missing $name"$'\n'
    fi
  done < <(for b in "${binaries[@]}"; do ldd "$b" 2>/dev/null; done |
    awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u -k1,1)
  echo "prepare: compressing $(du -sh "$payload" | cut -f1) of binaries and libraries"
  tar -C "$payload" -cf - bin lib lib-missing | xz -T2 -6 >"$new/payload.tar.xz" ||
    die "--prepare: packing the binaries failed"

  # Fixtures of the probe stage: the checkpoint and its reference pass, nothing else.
  local f
  for f in "${probe_fixtures[@]}"; do
    mkdir -p "$new/fixtures/$f"
    cp "$shared/fixtures/$f"/config.json "$shared/fixtures/$f"/model*.safetensors* \
      "$shared/fixtures/$f"/reference.safetensors "$new/fixtures/$f/" ||
      die "--prepare: fixture $f is incomplete in $shared/fixtures"
  done
  cp "$shared/anchors/hf_baseline.py" "$shared"/anchors/*.json "$new/anchors/"

  # The in-place build's fallback: Debian packages and the cudnn-frontend headers of setup.sh.
  if [ "${FASTLLM_GPU_DEBS:-1}" = 1 ]; then
    mkdir -p "$new/debs"
    (cd "$new/debs" && apt-get download "${fallback_debs[@]}" >/dev/null) ||
      die "--prepare: apt-get download ${fallback_debs[*]} failed (FASTLLM_GPU_DEBS=0 skips it)"
  fi
  if [ -d build-deps/cudnn_frontend/include ]; then
    mkdir -p "$new/cudnn_frontend"
    cp -r build-deps/cudnn_frontend/include "$new/cudnn_frontend/"
    cp build-deps/cudnn_frontend/VERSION "$new/cudnn_frontend/" 2>/dev/null
  fi

  {
    echo "prepared $(date -u +%FT%TZ) on $(uname -n), revision $(git describe --always --dirty 2>/dev/null || echo unknown)"
    echo "source_hash $built_from"
    for b in "${binaries[@]}"; do echo "binary $(basename "$b")"; done
    printf '%s' "$manifest_libs"
  } >"$new/MANIFEST"

  local mib
  mib=$(du -sm "$new" | cut -f1)
  if [ "$mib" -gt "$prepared_limit_mib" ]; then
    du -sh "$new"/* >&2
    die "--prepare: the folder would be $mib MiB, over its $prepared_limit_mib MiB (nothing written)"
  fi
  # The device call takes the working tree and the carried folder together, 64 MiB at most.
  local tree_kib
  tree_kib=$(git ls-files -co --exclude-standard -z 2>/dev/null |
    du -ck --files0-from=- 2>/dev/null | awk 'END {print $1 + 0}')
  if [ $((tree_kib + $(du -sk "$new" | cut -f1))) -gt $((64 << 10)) ]; then
    die "--prepare: the working tree ($((tree_kib >> 10)) MiB) and the folder ($mib MiB) exceed the 64 MiB a device call takes"
  fi
  rm -rf "$gpu_dir"
  mv "$new" "$gpu_dir" || die "--prepare: cannot write $gpu_dir"
  echo "prepare: $gpu_dir holds $(du -sh "$gpu_dir" | cut -f1) (limit $prepared_limit_mib MiB; the" \
    "working tree that travels with it: $((tree_kib >> 10)) MiB):"
  (cd "$gpu_dir" && find . -type f -not -path './cudnn_frontend/*' | LC_ALL=C sort |
    sed 's|^\./|  |')
  if [ -d "$gpu_dir/cudnn_frontend" ]; then
    echo "  cudnn_frontend/: $(find "$gpu_dir/cudnn_frontend" -type f | wc -l) header files"
  fi
  echo "next, on the GPU machine: the run tool with carry [\".gpu\"] and the command"
  echo "  bash benchmarks/gpu/run.sh"
}

# ---------------------------------------------------------------------------------------------
# The device run.

started=$SECONDS
elapsed() { echo $((SECONDS - started)); }
left() { echo $((deadline - reserve - (SECONDS - started))); }
# Seconds for a stage: its budget, or what is left before the deadline when that is less.
stage_time() {
  local l
  l=$(left)
  if [ "$l" -lt "${budget[$1]}" ]; then echo "$((l > 0 ? l : 0))"; else echo "${budget[$1]}"; fi
}
note() { echo "[$(elapsed)s] $*" | tee -a "$summary"; }
record() { echo "$1" >>"$results"; }
has_stage() { [[ " $stages " == *" $1 "* ]]; }
failed=0
fail() {
  failed=1
  note "FAIL $*"
}

finish() {
  local rc=$?
  [ -n "${scratch:-}" ] || return
  tar -C "$scratch" -czf "$out/logs.tar.gz" logs 2>/dev/null
  if ! check_out "$out"; then rc=3; fi
  rm -rf "$scratch"
  exit "$rc"
}

# Unpacks .gpu/payload.tar.xz and links the libraries this system lacks; sets bin.
unpack_prepared() {
  local p=$scratch/prepared lib so
  mkdir -p "$p" "$scratch/libs"
  if ! tar -C "$p" -xJf "$gpu_dir/payload.tar.xz" 2>"$logs/unpack.log"; then
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
      "$gpu_dir/payload.tar.xz" "$p" 2>>"$logs/unpack.log" || return 1
  fi
  for lib in "$p"/lib/*; do [ -e "$lib" ] && ln -s "$lib" "$scratch/libs/"; done
  local linked=()
  for lib in "$p"/lib-missing/*; do
    [ -e "$lib" ] || continue
    so=$(basename "$lib")
    if ! ldconfig -p 2>/dev/null | awk -v so="$so" '$1 == so {found = 1} END {exit !found}'; then
      ln -s "$lib" "$scratch/libs/"
      linked+=("$so")
    fi
  done
  [ ${#linked[@]} -eq 0 ] || note "libraries this system lacks, taken from .gpu: ${linked[*]}"
  export LD_LIBRARY_PATH=$scratch/libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  bin=$p/bin
}

# Libraries a binary still cannot find, on one line; empty when it loads.
missing_libs() {
  ldd "$1" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' '
}

# The in-place build, when the prepared binaries cannot run: the device's CUDA, MPI, serial HDF5,
# GoogleTest, nlohmann-json and OpenBLAS runtime, plus .gpu/debs unpacked into a prefix.
build_in_place() {
  local t=$1 prefix=$scratch/prefix build=$root/build-gpu deb pc cmake_args=()
  mkdir -p "$prefix"
  for deb in "$gpu_dir"/debs/*.deb; do [ -e "$deb" ] && dpkg -x "$deb" "$prefix"; done
  local multiarch=usr/lib/x86_64-linux-gnu
  if [ -d "$prefix/$multiarch/cmake/yaml-cpp" ]; then
    cmake_args+=("-Dyaml-cpp_DIR=$prefix/$multiarch/cmake/yaml-cpp")
  fi
  # OpenBLAS: the OpenMP build carried in the payload, else the device's own runtime library.
  local blas=$scratch/prepared/lib/libopenblas.so.0
  [ -e "$blas" ] || blas=$(ldconfig -p | awk '$1 == "libopenblas.so.0" {print $NF; exit}')
  if [ -n "$blas" ] && [ -d "$prefix/usr/include/x86_64-linux-gnu/openblas-openmp" ]; then
    cmake_args+=("-DCBLAS_INCLUDE_DIR=$prefix/usr/include/x86_64-linux-gnu/openblas-openmp"
      "-DOPENBLAS_LIBRARY=$blas")
  fi
  # NCCL where it is not next to CUDA: the Python environment's nvidia-nccl wheel.
  local nccl
  if [ ! -e /usr/local/cuda/include/nccl.h ] && [ ! -e /usr/include/nccl.h ]; then
    nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' \
      2>/dev/null)
    if [ -n "$nccl" ] && [ -e "$nccl/include/nccl.h" ]; then
      cmake_args+=("-DFASTLLM_NCCL_INCLUDE_DIR=$nccl/include"
        "-DFASTLLM_NCCL_LIBRARY=$(find "$nccl/lib" -name 'libnccl.so*' | head -1)")
    fi
  fi
  for pc in "$prefix/$multiarch"/pkgconfig/*.pc; do
    [ -e "$pc" ] && sed -i "s|^prefix=/usr|prefix=$prefix/usr|" "$pc"
  done
  if ! pkg-config --exists sentencepiece 2>/dev/null; then
    export PKG_CONFIG_PATH=$prefix/$multiarch/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
  fi
  export LD_LIBRARY_PATH=$prefix/$multiarch${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  if [ -d "$gpu_dir/cudnn_frontend" ] && [ ! -d build-deps/cudnn_frontend ]; then
    mkdir -p build-deps && cp -r "$gpu_dir/cudnn_frontend" build-deps/
  fi
  # shellcheck disable=SC2016  # expanded by the inner shell
  timeout "$t" bash -c '
    cmake -S . -B "$1" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTLLM_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DFASTLLM_CUDA_ARCHITECTURES=90 -DFASTLLM_BENCHMARKS=OFF \
      "${@:3}" && cmake --build "$1" -j "$(nproc)" --target $2' _ "$build" "${targets[*]}" \
    "${cmake_args[@]}" >"$logs/build.log" 2>&1 || return 1
  mkdir -p "$scratch/built"
  ln -sf "$build/src/fastllm" "$build/benchmarks/gpu/step_throughput" "$scratch/built/"
  for t in "${targets[@]:2}"; do ln -sf "$build/tests/cuda/$t" "$scratch/built/"; done
  bin=$scratch/built
}

stage_smoke() {
  local t b missing="" version
  t=$(stage_time smoke)
  if [ -f "$gpu_dir/MANIFEST" ]; then
    note "prepared: $(head -1 "$gpu_dir/MANIFEST")"
    if [ "$(awk '$1 == "source_hash" {print $2}' "$gpu_dir/MANIFEST")" != "$(source_hash)" ]; then
      note "WARNING the sources changed since --prepare: the binaries are those of the prepare"
    fi
  fi
  bin=""
  if [ -f "$gpu_dir/payload.tar.xz" ]; then
    unpack_prepared || note "unpacking $gpu_dir/payload.tar.xz failed (logs/unpack.log)"
  fi
  if [ -n "$bin" ]; then
    for b in "$bin"/*; do missing+=$(missing_libs "$b"); done
    if [ -n "$missing" ]; then
      note "the prepared binaries lack: $(echo "$missing" | tr ' ' '\n' | sort -u | tr '\n' ' ')"
      bin=""
    fi
  fi
  if [ -z "$bin" ]; then
    [ -d "$gpu_dir/debs" ] || die "no usable $gpu_dir (run 'bash $here/run.sh --prepare' on the development machine and carry .gpu) and no in-place build inputs" 5
    local bt
    bt=$(stage_time build)
    note "in-place build (budget ${bt}s)"
    build_in_place "$bt" || die "in-place build failed: $(tail -5 "$logs/build.log")" 5
    note "built in place"
  fi
  version=$(timeout "$t" "$bin/fastllm" version 2>&1)
  echo "$version" >"$logs/version.log"
  if [[ $version =~ backends:.*cuda ]]; then
    note "smoke: fastllm starts: $(echo "$version" | head -1)"
    record "{\"stage\": \"smoke\", \"ok\": true}"
  else
    fail "smoke: 'fastllm version' lists no cuda backend: $(echo "$version" | tail -2 | tr '\n' ' ')"
    record "{\"stage\": \"smoke\", \"ok\": false}"
  fi
}

stage_tests() {
  local end=$((SECONDS + $(stage_time tests))) t name rc log passed failures
  for t in "$bin"/cuda_test_*; do
    [ -x "$t" ] || continue
    name=$(basename "$t")
    log=$logs/$name.log
    if [ $((end - SECONDS)) -le 0 ]; then
      fail "$name not run: the tests stage's budget is spent"
      continue
    fi
    timeout $((end - SECONDS)) "$t" >"$log" 2>&1
    rc=$?
    passed=$(grep -oE '^\[  PASSED  \] [0-9]+' "$log" | grep -oE '[0-9]+$')
    failures=$(grep -E '^\[  FAILED  \] [A-Za-z]' "$log" | sed 's/^\[  FAILED  \] //' | sort -u |
      head -8 | tr '\n' ' ')
    if grep -q 'no CUDA device here' "$log"; then
      fail "tests: $name saw no CUDA device (its tests skipped)"
      rc=1
    elif [ "$rc" -eq 0 ]; then
      note "tests: $name passed ${passed:-?} tests"
    elif [ "$rc" -eq 124 ]; then
      fail "tests: $name out of time"
    else
      fail "tests: $name rc=$rc failed: ${failures:-$(tail -2 "$log" | tr '\n' ' ')}"
    fi
    record "{\"stage\": \"tests\", \"name\": \"$name\", \"rc\": $rc, \"passed\": ${passed:-0}}"
  done
}

stage_probe() {
  local end=$((SECONDS + $(stage_time probe))) fixture dtype tol dir result line rc
  for fixture in "${probe_fixtures[@]}"; do
    dir=$gpu_dir/fixtures/$fixture
    for dtype in fp32 bf16; do
      # fp32 computes with TF32 off (the CUDA backend never uses it for F32).
      if [ $dtype = fp32 ]; then tol=1e-5; else tol=2e-2; fi
      result=$scratch/probe-$fixture-$dtype.safetensors
      if [ $((end - SECONDS)) -le 0 ]; then
        fail "probe $fixture $dtype not run: the probe stage's budget is spent"
        continue
      fi
      if ! timeout $((end - SECONDS)) "$bin/fastllm" probe --backend=cuda --dtype=$dtype \
        --pretrained_checkpoint_path="$dir" --input="$dir/reference.safetensors" \
        --output="$result" >"$logs/probe-$fixture-$dtype.log" 2>&1; then
        fail "probe $fixture $dtype: fastllm failed: $(tail -2 "$logs/probe-$fixture-$dtype.log" | tr '\n' ' ')"
        record "{\"stage\": \"probe\", \"fixture\": \"$fixture\", \"dtype\": \"$dtype\", \"ok\": false}"
        continue
      fi
      line=$(python3 "$here/probe_check.py" --tolerance=$tol --fixture="$fixture" --dtype=$dtype \
        "$result" "$dir/reference.safetensors" 2>&1)
      rc=$?
      if [ $rc -eq 0 ]; then
        note "probe $fixture $dtype: $(echo "$line" | head -1)"
      else
        fail "probe $fixture $dtype: $(echo "$line" | head -1)"
      fi
      echo "$line" | grep '^{' >>"$results"
    done
  done
}

# fastllm flags given in FASTLLM_GPU_FLAGS (e.g. --attention_kernel=own) that the benchmark knows;
# one it does not know is dropped with a note rather than failing every configuration.
known_flags() {
  local help flag
  help=$("$bin/step_throughput" --help 2>&1)
  for flag in ${FASTLLM_GPU_FLAGS:-}; do
    if [[ $help == *"${flag%%=*}"* ]]; then
      echo "$flag"
    else
      note "step_throughput has no ${flag%%=*}: dropped" >&2
    fi
  done
}

stage_throughput() {
  local end=$((SECONDS + $(stage_time throughput))) run model recompute t line flags layers=()
  mapfile -t flags < <(known_flags)
  # 16 of Mistral-7B's 32 layers fit an 80 GB card with fp32 master weights and moments.
  if [ "${gpu_mib:-0}" -lt 100000 ]; then layers=(--layers=16); fi
  # model:recompute, in order; each gets its share of what is left of the stage.
  local runs
  read -r -a runs <<<"${FASTLLM_GPU_RUNS:-mistral-7b:full mistral-0.85b:none mixtral-8e:none}"
  local i=0
  for run in "${runs[@]}"; do
    model=${run%%:*}
    recompute=${run#*:}
    t=$(((end - SECONDS) / (${#runs[@]} - i)))
    i=$((i + 1))
    if [ "$t" -le 0 ]; then
      fail "throughput $model not run: the stage's budget is spent"
      continue
    fi
    timeout "$t" "$bin/step_throughput" --model="$model" --recompute="$recompute" "${layers[@]}" \
      "${flags[@]}" >"$logs/throughput-$model-$recompute.jsonl" \
      2>"$logs/throughput-$model-$recompute.err"
    local rc=$?
    line=$(grep '^{' "$logs/throughput-$model-$recompute.jsonl" | tail -1)
    if [[ $line == *tokens_per_s* ]]; then
      record "{\"stage\": \"throughput\", ${line#\{}"
      note "throughput: $(python3 "$here/report.py" line "$line")"
    else
      if [[ $line == *'"error"'* ]]; then line=$(python3 "$here/report.py" line "$line"); fi
      [ $rc -eq 124 ] && line="out of time after ${t}s"
      fail "throughput $model recompute=$recompute: ${line:-$(tail -2 "$logs/throughput-$model-$recompute.err" | tr '\n' ' ')}"
      record "{\"stage\": \"throughput\", \"model\": \"$model\", \"recompute\": \"$recompute\", \"error\": true}"
    fi
  done
}

stage_peer() {
  local t mode=${FASTLLM_GPU_PEER:-live} layers_7b=32
  if [ "$mode" = recorded ]; then
    note "peer: the recorded figures of .gpu/anchors only"
    return
  fi
  t=$(stage_time peer)
  if [ "${gpu_mib:-0}" -lt 100000 ]; then layers_7b=16; fi
  note "peer: Hugging Face transformers on this card (budget ${t}s), one JSON line per run"
  PYTHONUNBUFFERED=1 timeout "$t" python3 "$here/hf_peer.py" "$gpu_dir/anchors/hf_baseline.py" \
    --layers-7b=$layers_7b 2>"$logs/peer.err" | while IFS= read -r line; do
    case $line in
      '{'*)
        echo "$line" >>"$results"
        note "peer: $(python3 "$here/report.py" line "$line")"
        ;;
    esac
  done
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ]; then
    note "peer: budget spent; the runs not reached use the recorded figures"
  elif [ "$rc" -ne 0 ]; then
    note "peer: failed (rc=$rc): $(tail -2 "$logs/peer.err" | tr '\n' ' '); the table uses the recorded figures"
  fi
}

device_run() {
  out=${OUT:-$root/out/gpu}
  mkdir -p "$out" || die "cannot make $out" 2
  stages=${FASTLLM_GPU_STAGES:-smoke tests probe throughput peer}
  local s
  for s in $stages; do
    [[ " smoke tests probe throughput peer " == *" $s "* ]] ||
      die "FASTLLM_GPU_STAGES: unknown stage '$s' (smoke tests probe throughput peer)" 2
  done
  local smi=${FASTLLM_GPU_NVIDIA_SMI:-nvidia-smi} device
  device=$("$smi" --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null |
    head -1)
  if [ -z "$device" ]; then
    echo "run.sh: no GPU found ('$smi' is missing or lists no GPU). This command runs on the GPU" \
      "machine; here, run 'bash $here/run.sh --prepare' and see $here/NOTES.md. Exit code 4." >&2
    exit 4
  fi
  gpu_mib=$("$smi" --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | tr -d ' ')
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/fastllm-gpu-run.XXXXXX") || die "mktemp failed" 2
  logs=$scratch/logs
  mkdir -p "$logs"
  summary=$out/summary.txt
  results=$out/results.jsonl
  : >"$summary"
  : >"$results"
  trap finish EXIT
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  note "device: $device"
  record "{\"stage\": \"device\", \"name\": \"${device%%,*}\", \"memory_mib\": ${gpu_mib:-0}}"
  # The binaries are needed by every stage but the peer.
  if [ "$stages" != peer ]; then stage_smoke; fi
  for s in tests probe throughput peer; do
    if has_stage "$s"; then
      note "stage $s (budget $(stage_time "$s")s)"
      "stage_$s"
    fi
  done
  note "done in $(elapsed)s"
  python3 "$here/report.py" table "$results" "$gpu_dir/anchors" 2>&1 | tee -a "$summary"
  return $failed
}

case "${1:-}" in
  --prepare) prepare ;;
  --budgets) print_budgets ;;
  --check-out)
    [ $# -eq 2 ] || die "usage: run.sh --check-out DIR" 2
    check_out "$2" && echo "fits: $(find "$2" -type f | wc -l) files"
    ;;
  "") device_run ;;
  -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) die "unknown argument '$1' (--prepare, --budgets, --check-out DIR, --help, or none)" 2 ;;
esac
