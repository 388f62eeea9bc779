#!/usr/bin/env bash
# Cross-builds hbn and its tests for aarch64 Linux and runs them all under
# qemu-aarch64 (ctest arguments may follow, e.g. scripts/test_arm.sh -L numerics).
#   build/arm-host: a native build of the generators, which emit the aarch64 kernels
#   build/arm:      the cross build (cmake/toolchains/aarch64-linux-gnu.cmake)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh arm
jobs=$(nproc)

cmake -S . -B build/arm-host -G Ninja -DCMAKE_BUILD_TYPE=Release -DHBN_BUILD_TESTS=OFF
cmake --build build/arm-host --target hbn_generators -j "$jobs"

cmake -S . -B build/arm -G Ninja -DCMAKE_BUILD_TYPE=Release \
      --toolchain "$PWD/cmake/toolchains/aarch64-linux-gnu.cmake" \
      -Dhbn-halide_generators_DIR="$PWD/build/arm-host/cmake"
cmake --build build/arm -j "$jobs"
ctest --test-dir build/arm --output-on-failure -j "$jobs" "$@"
