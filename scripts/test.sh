#!/usr/bin/env bash
# Builds hbn with its tests and runs them all (ctest arguments may follow,
# e.g. scripts/test.sh -L numerics), then the same for each checked-in
# schedule source under the best x86 variant (scripts/test_schedules.sh;
# HBN_TEST_SCHEDULES=0 skips it), then under the sanitizers and the fuzzer
# (scripts/test_sanitize.sh; HBN_TEST_SANITIZE=0 skips it), then on aarch64
# under qemu (scripts/test_arm.sh, given the same arguments; HBN_TEST_ARM=0
# skips it). HBN_TEST_LARGE=1 adds the test of tensors beyond 2^31 elements.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh test
# The Python package for Debian's python3 (another python3 may come first on PATH).
cmake -S . -B build/test -G Ninja -DCMAKE_BUILD_TYPE=Release -DHBN_PYTHON=ON \
      -DPython3_EXECUTABLE=/usr/bin/python3
cmake --build build/test
# The `large` test (tensors of more than 2^31 elements: ~9 GiB, minutes)
# only with HBN_TEST_LARGE=1.
large=(-LE large)
[[ ${HBN_TEST_LARGE:-0} != 1 ]] || large=()
ctest --test-dir build/test --output-on-failure -j "$(nproc)" "${large[@]}" "$@"
if [[ "${HBN_TEST_SCHEDULES:-}" != 0 ]]; then
    scripts/test_schedules.sh "$@"
fi
if [[ "${HBN_TEST_SANITIZE:-1}" != 0 ]]; then
    scripts/test_sanitize.sh "$@"
fi
if [[ "${HBN_TEST_ARM:-1}" != 0 ]]; then
    scripts/test_arm.sh "$@"
fi
