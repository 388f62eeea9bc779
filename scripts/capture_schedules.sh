#!/usr/bin/env bash
# Captures the checked-in schedules of Halide 14's autoschedulers: runs each
# plugin on every library hbn builds (build/capture/hbn_pipelines.txt) and
# writes autoschedules/<source>/x86-64/<library>.schedule.h, with the tails
# made GuardWithIf (scripts/schedule_file.py). Run it after changing an
# algorithm; the schedule tests fail until then.
#   scripts/capture_schedules.sh [adams2019] [li2018] [mullapudi2016]   (default: all three)
# The machine model is machine_params=<cores>,<llc>,40: this machine's cores
# (1 for the serial libraries) and HBN_SCHEDULE_LLC_BYTES, default 32 MiB,
# where reads slow down on the 2-core VM hbn is tuned on (one thread reads
# ~25 GB/s up to 32 MiB, ~9 GB/s from 64 MiB); it reports a 480 MB L3 that no
# access pattern sees. HBN_SCHEDULE_TARGET (default: hbn's best x86 variant)
# is the target the autoschedulers see; the schedule serves every variant.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh tune

sources=("${@:-adams2019 li2018 mullapudi2016}")
read -r -a sources <<< "${sources[*]}"
target=${HBN_SCHEDULE_TARGET:-x86-64-linux-sse41-avx-f16c-fma-avx2-avx512-avx512_skylake}
llc=${HBN_SCHEDULE_LLC_BYTES:-33554432}
plugins=/usr/lib/$(gcc -dumpmachine)/halide14
build=build/capture

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DHBN_BUILD_TESTS=OFF \
      -DHBN_SCHEDULE_FILES=OFF >/dev/null
cmake --build "$build" --target hbn_generators
declare -A scheduler=([adams2019]=Adams2019 [li2018]=Li2018 [mullapudi2016]=Mullapudi2016)

# raw_schedule <source> <library> <generator> <params...>: the plugin's output.
raw_schedule() {
    local source=$1 library=$2 generator=$3 cores=$(nproc)
    shift 3
    [[ " $* " == *" parallel=false "* ]] && cores=1
    mkdir -p "$build/raw/$source"
    "$build/hbn_generators" -g "$generator" -f "$library" -o "$build/raw/$source" -e schedule \
        target="$target" auto_schedule=true machine_params="$cores,$llc,40" "$@" \
        -p "$plugins/libautoschedule_$source.so" -s "${scheduler[$source]}" >/dev/null 2>&1
}

while read -r library generator params; do
    read -r -a params <<< "$params"
    serial=()
    [[ " ${params[*]} " == *" parallel=false "* ]] && serial=(--serial)
    # Adams2019's schedule names each stage's index, which Li2018's lacks.
    raw_schedule adams2019 "$library" "$generator" "${params[@]}"
    for source in "${sources[@]}"; do
        [[ -n "${scheduler[$source]:-}" ]] || { echo "unknown source '$source'" >&2; exit 2; }
        [[ $source == adams2019 ]] || raw_schedule "$source" "$library" "$generator" "${params[@]}"
        out=autoschedules/$source/x86-64/$library.schedule.h
        mkdir -p "$(dirname "$out")"
        /usr/bin/python3 scripts/schedule_file.py "$build/raw/$source/$library.schedule.h" "$out" \
            --stages "$build/raw/adams2019/$library.schedule.h" "${serial[@]}"
        echo "captured $out"
    done
done < "$build/hbn_pipelines.txt"
