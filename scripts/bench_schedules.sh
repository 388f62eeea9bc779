#!/usr/bin/env bash
# Benchmarks hbn under each schedule source: builds the benchmarks with
# -DHBN_SCHEDULE=<source> in build/bench-<source>, runs hbn's cases (by default
# the mid size, 5 repetitions, median) and writes
# bench/results/schedules/<source>.json and the table bench/results/schedules.md
# (time per source, and its ratio to the manual schedule's).
#   scripts/bench_schedules.sh [benchmark arguments]
# e.g. scripts/bench_schedules.sh --benchmark_filter='/hbn/' (every size).
# HBN_BENCH_SCHEDULES picks the sources (default: all five).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh bench
read -r -a sources <<< "${HBN_BENCH_SCHEDULES:-manual adams2019 li2018 mullapudi2016 tuned}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"  # see scripts/bench.sh
source_rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

mkdir -p bench/results/schedules
results=()
for source in "${sources[@]}"; do
    dir=build/bench-$source
    echo "== HBN_SCHEDULE=$source ($dir)"
    cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DHBN_BUILD_TESTS=OFF \
          -DHBN_BUILD_BENCH=ON -DHBN_SCHEDULE="$source" >/dev/null
    cmake --build "$dir" --target hbn_bench -j "$(nproc)"
    "$dir/bench/hbn_bench" --benchmark_filter='/mid/hbn/' --benchmark_repetitions=5 \
        --benchmark_report_aggregates_only=true \
        --benchmark_out="bench/results/schedules/$source.json" --benchmark_out_format=json \
        --benchmark_context=hbn_source="$source_rev" --benchmark_context=hbn_schedule="$source" "$@"
    results+=("bench/results/schedules/$source.json")
done
/usr/bin/python3 bench/report.py --schedules "${results[@]}" --md bench/results/schedules.md
