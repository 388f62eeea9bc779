#!/usr/bin/env bash
# Builds hbn and runs the demo: MindSpore's documented example in both modes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh demo
cmake -S . -B build/demo -G Ninja -DCMAKE_BUILD_TYPE=Release -DHBN_BUILD_TESTS=OFF
cmake --build build/demo --target hbn_demo
build/demo/hbn_demo
