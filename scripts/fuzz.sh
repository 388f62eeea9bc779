#!/usr/bin/env bash
# Runs the libFuzzer target (tests/fuzz/batch_norm_fuzzer.cpp) for longer than
# CI does, under ASan + UBSan, keeping its corpus in build/asan/fuzz-corpus:
#   scripts/fuzz.sh [seconds]   (default 600; extra arguments go to libFuzzer)
# A finding stops the run and is written to build/asan/fuzz-crash-*; rerun it
# with build/asan/tests/hbn_batch_norm_fuzzer <that file>.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
shift || true
scripts/install_deps.sh sanitize
CC=clang-14 CXX=clang++-14 cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DHBN_BACKENDS=cpu -DHBN_SANITIZE=address,undefined -DHBN_BUILD_FUZZER=ON
cmake --build build/asan --target hbn_batch_norm_fuzzer
mkdir -p build/asan/fuzz-corpus
HBN_DEVICE=cpu ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    build/asan/tests/hbn_batch_norm_fuzzer -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix=build/asan/fuzz- "$@" build/asan/fuzz-corpus
