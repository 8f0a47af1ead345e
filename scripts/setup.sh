#!/usr/bin/env bash
# Installs every Debian package fastllm's build, tests and demo need. Idempotent; silent when
# everything is already there.
set -euo pipefail

packages=(
  cmake ninja-build g++ pkg-config git ccache
  libopenblas-openmp-dev
  libopenmpi-dev openmpi-bin
  libhdf5-openmpi-dev hdf5-tools
  nlohmann-json3-dev libyaml-cpp-dev
  libsentencepiece-dev sentencepiece
  libgtest-dev libbenchmark-dev
  gnuplot-nox shellcheck clang-format
  clang-14 libclang-rt-14-dev libomp-14-dev
  python3 python3-numpy jargon
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# cudnn-frontend (header-only C++ API of cuDNN's fused attention) for the CUDA backend: the
# headers of PyPI's wheel, unpacked into the git-ignored build-deps/ where CMake looks
# (FASTLLM_CUDNN_FRONTEND_DIR). Only where cuDNN is installed; nothing Python is needed at run time.
cudnn_frontend_version=1.32.0
cudnn_frontend_dir="$(cd "$(dirname "$0")/.." && pwd)/build-deps/cudnn_frontend"
have_cudnn=0
for header in /usr/local/cuda/include/cudnn.h /usr/include/cudnn.h /usr/include/x86_64-linux-gnu/cudnn.h; do
  if [ -e "$header" ]; then have_cudnn=1; fi
done
if [ "$have_cudnn" = 1 ] &&
  [ "$(cat "$cudnn_frontend_dir/VERSION" 2>/dev/null)" != "$cudnn_frontend_version" ]; then
  echo "setup: fetching cudnn-frontend $cudnn_frontend_version headers into $cudnn_frontend_dir"
  wheel_dir="$(mktemp -d)"
  trap 'rm -rf "$wheel_dir"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
    --python-version 3.11 --dest "$wheel_dir" "nvidia-cudnn-frontend==$cudnn_frontend_version"
  rm -rf "$cudnn_frontend_dir"
  mkdir -p "$cudnn_frontend_dir"
  python3 -m zipfile -e "$wheel_dir"/nvidia_cudnn_frontend-*.whl "$wheel_dir/wheel"
  mv "$wheel_dir/wheel/include" "$cudnn_frontend_dir/include"
  echo "$cudnn_frontend_version" >"$cudnn_frontend_dir/VERSION"
fi

# transformers and PyTorch for the tests labelled hf (tests/hf, tests/support/hf_reference.py),
# only on request: FASTLLM_HF=1, or FASTLLM_TEST_LABELS naming hf. A virtual environment in the
# git-ignored build-deps/, pinned to the versions the fixtures were made with (about 5 GB: PyPI's
# torch brings its CUDA libraries).
if [ "${FASTLLM_HF:-0}" = 1 ] || [[ ",${FASTLLM_TEST_LABELS:-}," == *,hf,* ]]; then
  hf_venv="$(cd "$(dirname "$0")/.." && pwd)/build-deps/hf-venv"
  hf_packages=(torch==2.11.0 transformers==5.17.0 sentencepiece safetensors protobuf)
  if [ "$(cat "$hf_venv/REQUIREMENTS" 2>/dev/null)" != "${hf_packages[*]}" ]; then
    echo "setup: installing ${hf_packages[*]} into $hf_venv"
    rm -rf "$hf_venv"
    python3 -m venv "$hf_venv"
    "$hf_venv/bin/pip" install -q "${hf_packages[@]}"
    echo "${hf_packages[*]}" >"$hf_venv/REQUIREMENTS"
  fi
fi
