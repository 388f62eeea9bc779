#!/usr/bin/env bash
# Builds hbn with its tests and runs them all (ctest arguments may follow,
# e.g. scripts/test.sh -L numerics).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh test
cmake -S . -B build/test -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build/test
ctest --test-dir build/test --output-on-failure -j "$(nproc)" "$@"
