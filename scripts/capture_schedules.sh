#!/usr/bin/env bash
# Captures the checked-in schedules of Halide 14's autoschedulers: runs each
# plugin on every CPU library hbn builds (build/capture/hbn_pipelines.txt),
# and Li2018 also on the OpenCL and CUDA ones, and writes
# autoschedules/<source>/<class>/<library>.schedule.h (class: x86-64,
# opencl, cuda), with the tails
# made GuardWithIf (scripts/schedule_file.py). Run it after changing an
# algorithm; the schedule tests fail until then.
#   scripts/capture_schedules.sh [adams2019] [li2018] [mullapudi2016]   (default: all three)
# The machine model is machine_params=<cores>,<llc>,40: this machine's cores
# (1 for the serial libraries) and HBN_SCHEDULE_LLC_BYTES, default 32 MiB,
# where reads slow down on the 2-core VM hbn is tuned on (one thread reads
# ~25 GB/s up to 32 MiB, ~9 GB/s from 64 MiB); it reports a 480 MB L3 that no
# access pattern sees. HBN_SCHEDULE_TARGET (default: hbn's best x86 variant)
# is the target the autoschedulers see; the schedule serves every variant.
# HBN_CAPTURE_LIBRARIES, a bash regular expression, captures only the
# libraries whose names match (e.g. '_grad_input_' after adding that
# pipeline): the autoschedulers' output differs between machines and runs,
# so recapturing what did not change only churns the checked-in files.
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

# Li2018, the one that schedules for GPUs, also gets the GPU libraries (the
# targets of hbn's defaults). Where its OpenCL schedule adds up the double
# statistics with atomics, it is not checked in and the library keeps its
# manual schedule: Halide 14 writes 64-bit atomics as atomic_cmpxchg on
# longs, which OpenCL C (PoCL) rejects as ambiguous.
declare -A gpu_target=([opencl]=x86-64-linux-opencl-cl_doubles
                       [cuda]=x86-64-linux-cuda-cuda_capability_80)

# raw_schedule <source> <library> <generator> <target> <params...>: the
# plugin's output.
raw_schedule() {
    local source=$1 library=$2 generator=$3 target=$4 cores=$(nproc)
    shift 4
    [[ " $* " == *" parallel=false "* ]] && cores=1
    mkdir -p "$build/raw/$source"
    "$build/hbn_generators" -g "$generator" -f "$library" -o "$build/raw/$source" -e schedule \
        target="$target" auto_schedule=true machine_params="$cores,$llc,40" "$@" \
        -p "$plugins/libautoschedule_$source.so" -s "${scheduler[$source]}" >/dev/null 2>&1
}

# checked_in <source> <class> <library> <stages library> [--serial]: the
# plugin's output made a checked-in schedule.
checked_in() {
    local out=autoschedules/$1/$2/$3.schedule.h
    mkdir -p "$(dirname "$out")"
    /usr/bin/python3 scripts/schedule_file.py "$build/raw/$1/$3.schedule.h" "$out" \
        --stages "$build/raw/adams2019/$4.schedule.h" "${@:5}"
    echo "captured $out"
}

while read -r library generator params; do
    [[ $library =~ ${HBN_CAPTURE_LIBRARIES:-.} ]] || continue
    read -r -a params <<< "$params"
    serial=()
    [[ " ${params[*]} " == *" parallel=false "* ]] && serial=(--serial)
    # Adams2019's schedule names each stage's index, which Li2018's lacks.
    raw_schedule adams2019 "$library" "$generator" "$target" "${params[@]}"
    for source in "${sources[@]}"; do
        [[ -n "${scheduler[$source]:-}" ]] || { echo "unknown source '$source'" >&2; exit 2; }
        [[ $source == adams2019 ]] || raw_schedule "$source" "$library" "$generator" "$target" "${params[@]}"
        checked_in "$source" x86-64 "$library" "$library" "${serial[@]}"
        if [[ $source == li2018 && $library == *_parallel ]]; then
            for backend in "${!gpu_target[@]}"; do
                gpu_library=${library%_parallel}_$backend
                rm -f "autoschedules/li2018/$backend/$gpu_library.schedule.h"
                # The stage indices come from Adams2019 on the GPU target,
                # where a pipeline's algorithm may differ from the CPU's.
                if raw_schedule li2018 "$gpu_library" "$generator" "${gpu_target[$backend]}" \
                       "${params[@]}" &&
                   raw_schedule adams2019 "$gpu_library" "$generator" "${gpu_target[$backend]}" \
                       "${params[@]}" &&
                   ! { [[ $backend == opencl ]] &&
                       grep -q '\.atomic()' "$build/raw/li2018/$gpu_library.schedule.h"; }; then
                    checked_in li2018 "$backend" "$gpu_library" "$gpu_library"
                else
                    echo "no li2018 schedule for $gpu_library: it keeps the manual one"
                fi
            done
        fi
    done
done < "$build/hbn_pipelines.txt"
