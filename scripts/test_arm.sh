#!/usr/bin/env bash
# Cross-builds hbn and its tests for aarch64 Linux and runs them all under
# qemu-aarch64 (ctest arguments may follow, e.g. scripts/test_arm.sh -L numerics).
#   build/test: the native build, whose generators emit the aarch64 kernels
#               (scripts/test_common.sh builds them if need be)
#   build/arm:  the cross build (cmake/toolchains/aarch64-linux-gnu.cmake)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh arm
jobs=$(nproc)

source scripts/test_common.sh
shared_generators

cmake -S . -B build/arm -G Ninja -DCMAKE_BUILD_TYPE=Release \
      --toolchain "$PWD/cmake/toolchains/aarch64-linux-gnu.cmake" "$generators_arg"
cmake --build build/arm -j "$jobs"
ctest --test-dir build/arm --output-on-failure -j "$jobs" "$@"
