#!/usr/bin/env bash
# Builds hbn with each checked-in schedule source in place of the manual
# schedules (-DHBN_SCHEDULE=<source>, in build/schedule-<source>) and runs the
# tests there: all but the `package` label, under the CPU's best x86 variant
# only (-R '^avx512\.'), and for li2018, whose GPU schedules are checked in
# too, on OpenCL and through ptxas as well. ctest arguments may follow; a
# later -R replaces that filter.
# Each build compiles that one x86 variant only (the best of
# HBN_X86_TARGETS that this CPU runs), a third of the code generation; the
# Variant test, about dispatch between variants, is left out. Set
# HBN_SCHEDULE_X86_TARGETS to a list of targets to build more, e.g. all
# three for -R '^sse41\.'.
# HBN_TEST_SCHEDULES picks the sources (default: all four; scripts/test.sh
# runs this script unless it is 0).
# Every source is built and tested even if one fails; the script fails if any
# did.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh test
jobs=$(nproc)
read -r -a schedules <<< "${HBN_TEST_SCHEDULES:-adams2019 li2018 mullapudi2016 tuned}"

source scripts/test_common.sh
shared_generators
x86_targets=${HBN_SCHEDULE_X86_TARGETS:-$(best_x86_target)}

failed=()
for schedule in "${schedules[@]}"; do
    dir=build/schedule-$schedule
    echo "== HBN_SCHEDULE=$schedule ($dir)"
    # Other sources leave the GPU libraries their manual schedules.
    backends=cpu
    tests='^avx512\.'
    if [[ $schedule == li2018 ]]; then
        backends="cpu;opencl;cuda"
        tests='^(avx512|opencl)\.|^cuda\.ptxas'
    fi
    if ! cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DHBN_SCHEDULE="$schedule" \
               -DHBN_BACKENDS="$backends" -DHBN_X86_TARGETS="$x86_targets" "$generators_arg" ||
       ! cmake --build "$dir" -j "$jobs"; then
        failed+=("$schedule (build)")
        continue
    fi
    if ! ctest --test-dir "$dir" --output-on-failure -j "$jobs" -LE package -R "$tests" -E 'Variant\.' "$@"; then
        failed+=("$schedule (tests)")
    fi
done

if ((${#failed[@]})); then
    echo "Failed schedules: ${failed[*]}" >&2
    exit 1
fi
echo "Every schedule source passed."
