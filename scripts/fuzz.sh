#!/usr/bin/env bash
# Runs the libFuzzer target (tests/fuzz/batch_norm_fuzzer.cpp) under ASan +
# UBSan for longer than CI does, keeping its corpus in build/asan/fuzz-corpus
# so that each run starts where the last one stopped:
#   scripts/fuzz.sh [seconds]   (default 600; extra arguments go to libFuzzer,
#                                e.g. -fork=2 to use both cores)
# A finding stops the run; its input is build/asan/fuzz-findings/crash-*
# (or timeout-*, leak-*), and build/asan/tests/hbn_batch_norm_fuzzer <file>
# replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
shift || true
scripts/install_deps.sh sanitize
# The configuration of scripts/test_sanitize.sh, so neither rebuilds the other's.
CC=clang-14 CXX=clang++-14 cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DHBN_BACKENDS=cpu;opencl" -DHBN_SANITIZE=address,undefined -DHBN_BUILD_FUZZER=ON
cmake --build build/asan --target hbn_batch_norm_fuzzer
mkdir -p build/asan/fuzz-corpus build/asan/fuzz-findings
symbolizer=external_symbolizer_path=/usr/lib/llvm-14/bin/llvm-symbolizer  # as in scripts/test_sanitize.sh
ASAN_OPTIONS=$symbolizer:detect_leaks=1 UBSAN_OPTIONS=$symbolizer:print_stacktrace=1:halt_on_error=1 \
    build/asan/tests/hbn_batch_norm_fuzzer -max_total_time="$seconds" -timeout=20 -print_final_stats=1 \
    -artifact_prefix=build/asan/fuzz-findings/ "$@" build/asan/fuzz-corpus
