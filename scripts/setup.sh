#!/usr/bin/env bash
# Installs every Debian package fastllm's build, tests and demo need. Idempotent; silent when
# everything is already there.
set -euo pipefail

packages=(
  cmake ninja-build g++ pkg-config git
  libopenblas-openmp-dev
  libopenmpi-dev openmpi-bin
  libhdf5-openmpi-dev hdf5-tools
  nlohmann-json3-dev libyaml-cpp-dev
  libsentencepiece-dev sentencepiece
  libgtest-dev libbenchmark-dev
  gnuplot-nox shellcheck clang-format
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
