#!/usr/bin/env bash
# Autotunes one library's schedule on this machine and checks the best one in
# as the `tuned` schedule source (autoschedules/tuned/x86-64/<library>.schedule.h,
# with a report <library>.md next to it). Build with -DHBN_SCHEDULE=tuned to use it.
#   scripts/autotune.sh <library> [--batches N] [--batch-size N] [--minutes M]
#                       [--weights FILE] [--fresh]
# <library> is one of build/tune/hbn_pipelines.txt, e.g.
# hbn_batch_norm_training_float32_nhwc_parallel.
#
# It is Halide's autotune_loop.sh (/usr/src/halide14) on Debian's layout and
# this machine's cores: each batch compiles random schedules from Adams2019
# guided by its cost model (sample 0: beam search), `nproc` at a time,
# benchmarks them one by one with RunGen at the estimated size (32x64x56x56),
# and retrains the cost model on every sample so far (retrain_cost_model).
# The manual schedule is benchmarked the same way. State lives in
# build/tune/<library>/: rerunning resumes (finished samples are kept),
# --fresh starts over. It stops starting batches after --minutes (default 12;
# the default 6 batches of 16 take under 6 minutes on the 2-core VM).
# The starting weights are Halide v14's baseline (Debian ships none):
# ../shared/halide14/adams2019_baseline.weights, or --weights FILE.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "autotune: $*" >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || die "usage: $0 <library> [--batches N] [--batch-size N] [--minutes M] [--weights FILE] [--fresh]"
library=$1
shift
batches=6 batch_size=16 minutes=12 fresh=0
weights=../shared/halide14/adams2019_baseline.weights
while (($#)); do
    case $1 in
        --batches) batches=$2; shift 2 ;;
        --batch-size) batch_size=$2; shift 2 ;;
        --minutes) minutes=$2; shift 2 ;;
        --weights) weights=$2; shift 2 ;;
        --fresh) fresh=1; shift ;;
        *) die "unknown option '$1'" ;;
    esac
done
[[ -f $weights ]] || die "no starting weights at '$weights' (pass --weights FILE)"
weights=$(realpath "$weights")
scripts/install_deps.sh tune

cores=$(nproc)
tools=/usr/lib/$(gcc -dumpmachine)/halide14
target=${HBN_SCHEDULE_TARGET:-x86-64-linux-sse41-avx-f16c-fma-avx2-avx512-avx512_skylake}
llc=${HBN_SCHEDULE_LLC_BYTES:-33554432}
build=build/tune
work=$build/$library
schedule_key=tuned/x86-64/$library
out=autoschedules/$schedule_key

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DHBN_BUILD_TESTS=OFF >/dev/null
cmake --build "$build" --target hbn_generators >/dev/null
line=$(grep "^$library " "$build/hbn_pipelines.txt") ||
    die "unknown library '$library'; one of: $(cut -d' ' -f1 "$build/hbn_pipelines.txt" | tr '\n' ' ')"
read -r _ generator params <<< "$line"
read -r -a params <<< "$params"
tuning_cores=$cores
[[ " ${params[*]} " == *" parallel=false "* ]] && tuning_cores=1

((fresh)) && rm -rf "$work"
mkdir -p "$work"
[[ -f $work/updated.weights ]] || cp "$weights" "$work/updated.weights"
# RunGen's driver, compiled once; each sample only links against it.
rungen=$build/RunGenMain.o
[[ -f $rungen ]] || c++ -std=c++17 -O2 -I/usr/include/halide14 -I/usr/src/halide14 \
    -DHALIDE_NO_PNG -DHALIDE_NO_JPEG -c /usr/src/halide14/RunGenMain.cpp -o "$rungen"

# build_sample <dir> <generator args...>: the library and its RunGen binary.
build_sample() {
    local dir=$1
    shift
    mkdir -p "$dir"
    "$build/hbn_generators" -g "$generator" -f sample -o "$dir" target="$target" \
        "${params[@]}" "$@" >"$dir/compile_log.txt" 2>&1 &&
    c++ -std=c++17 -I/usr/include/halide14 "$rungen" "$dir/sample.registration.cpp" \
        "$dir/sample.a" -o "$dir/bench" -ldl -lpthread >>"$dir/compile_log.txt" 2>&1 ||
        echo "  compiling $dir failed (see $dir/compile_log.txt)"
}

# bench_sample <dir> [<file>]: seconds per call at the estimated size, in
# <file> (default <dir>/time).
bench_sample() {
    local dir=$1 time=${2:-$1/time}
    [[ -x $dir/bench ]] || { echo inf >"$time"; return; }
    HL_NUM_THREADS=$cores timeout 120 "$dir/bench" --estimate_all --benchmarks=all \
        --benchmark_min_time=0.5 >"$dir/bench.txt" 2>&1 &&
        awk '/best case of/ { print $8 }' "$dir/bench.txt" >"$time" || echo inf >"$time"
}

ms() { awk -v s="$1" 'BEGIN { if (s == "inf") print "failed"; else printf "%.3f ms", s * 1e3 }'; }
best_sample() {  # the fastest benchmarked sample: "<seconds> <dir>"
    for t in "$work"/batch_*/*/time; do
        [[ -e $t ]] && echo "$(cat "$t") $(dirname "$t")"
    done | grep -v '^inf' | sort -g | head -n1
}

if [[ ! -f $work/manual/time ]]; then
    echo "Manual schedule: compiling and benchmarking"
    build_sample "$work/manual" -e static_library,c_header,registration
    bench_sample "$work/manual"
fi
manual=$(cat "$work/manual/time")
echo "Manual schedule: $(ms "$manual")"

start=$SECONDS
for ((batch = 1; batch <= batches; batch++)); do
    dir=$work/batch_$batch
    [[ -f $dir/retrained ]] && { echo "Batch $batch/$batches: done earlier"; continue; }
    if ((SECONDS - start > minutes * 60)); then
        echo "Stopping before batch $batch: past --minutes $minutes"
        break
    fi
    mkdir -p "$dir"
    cp "$work/updated.weights" "$dir/used.weights"
    echo -n "Batch $batch/$batches: compiling $batch_size samples "
    for ((sample = 0; sample < batch_size; sample++)); do
        [[ -x $dir/$sample/bench || -f $dir/$sample/time ]] && { echo -n "="; continue; }
        while (($(jobs -r | wc -l) >= cores)); do sleep 0.2; done
        # Sample 0 is the cost model's beam search; the others are random
        # probes biased by it (as in autotune_loop.sh).
        if ((sample == 0)); then dropout=100 beam=32; else dropout=1 beam=1; fi
        HL_SEED=$((batch * 10000 + sample)) HL_WEIGHTS_DIR=$work/updated.weights \
        HL_RANDOM_DROPOUT=$dropout HL_BEAM_SIZE=$beam \
            build_sample "$dir/$sample" -e static_library,c_header,registration,schedule,featurization \
                auto_schedule=true machine_params="$tuning_cores,$llc,40" \
                -p "$tools/libautoschedule_adams2019.so" -s Adams2019 &
        echo -n "."
    done
    wait
    echo " done"
    for ((sample = 0; sample < batch_size; sample++)); do
        s=$dir/$sample
        if [[ ! -f $s/time ]]; then
            sleep 1  # let the clocks settle after compiling
            bench_sample "$s"
            [[ $(cat "$s/time") == inf ]] ||
                "$tools/featurization_to_sample" "$s/sample.featurization" "$(cat "$s/time")" 0 \
                    "$((batch * 10000 + sample))" "$s/sample.sample" >/dev/null
        fi
        read -r best _ <<< "$(best_sample)"
        echo "  batch $batch sample $sample: $(ms "$(cat "$s/time")")  (best $(ms "$best"), manual $(ms "$manual"))"
    done
    echo "  retraining the cost model on $(find "$work" -name '*.sample' | wc -l) samples"
    find "$work" -name '*.sample' | "$tools/retrain_cost_model" --epochs="$batch_size" \
        --rates=0.0001 --num_cores="$cores" --initial_weights="$work/updated.weights" \
        --weights_out="$work/updated.weights" --best_benchmark="$dir/retrain_best.txt" \
        --best_schedule="$dir/retrain_best.schedule.h" >"$dir/retrain_log.txt" 2>&1
    touch "$dir/retrained"
done

read -r best best_dir <<< "$(best_sample)"
[[ -n ${best_dir:-} ]] || die "no sample ran; see $work/batch_*/*/compile_log.txt"
mkdir -p "$(dirname "$out")"
/usr/bin/python3 scripts/schedule_file.py "$best_dir/sample.schedule.h" "$out.schedule.h"
echo "Wrote $out.schedule.h (from $best_dir)"

# The checked-in schedule as the build applies it (GuardWithIf tails):
# reconfiguring picks the new file up.
cmake -S . -B "$build" >/dev/null
cmake --build "$build" --target hbn_generators >/dev/null
rm -rf "$work/checked_in"
build_sample "$work/checked_in" -e static_library,c_header,registration schedule="$schedule_key"
# Final comparison in interleaved rounds, so that the machine's drift hits
# all three alike: the median of 3.
declare -A final=([manual]="$work/manual" [best]="$best_dir" [checked_in]="$work/checked_in")
for round in 1 2 3; do
    for name in manual best checked_in; do
        bench_sample "${final[$name]}" "$work/final_${name}_$round"
    done
done
median() { cat "$work"/final_"$1"_* | sort -g | sed -n 2p; }
manual=$(median manual) best_final=$(median best) checked_in=$(median checked_in)
echo "Final (median of 3 interleaved): manual $(ms "$manual"), best as emitted $(ms "$best_final"), checked in $(ms "$checked_in")"
unique=$(grep -c '^Unique sample' "$(ls -d "$work"/batch_* | sort -V | tail -n1)/retrain_log.txt" || true)

{
    echo "# Tuning run: $library"
    echo
    echo "\`scripts/autotune.sh $library\`, $(date -u +%Y-%m-%dT%H:%M:%SZ), hbn $(git rev-parse --short HEAD)."
    echo "Adams2019 (Halide 14) on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $cores cores;"
    echo "target $target, machine_params=$tuning_cores,$llc,40. Times are RunGen's best of"
    echo "\`--benchmark_min_time=0.5\` at the estimated size (32x64x56x56), HL_NUM_THREADS=$cores."
    echo
    echo "| candidate | time |"
    echo "|---|---:|"
    for t in "$work"/batch_*/*/time; do
        c=${t#"$work"/}
        echo "| ${c%/time} | $(ms "$(cat "$t")") |"
    done | sort -V
    echo
    echo "- candidates tried: $(ls "$work"/batch_*/*/time | wc -l), of which distinct schedules:" \
         "$(md5sum "$work"/batch_*/*/sample.schedule.h | cut -d' ' -f1 | sort -u | wc -l)"
    echo "- best: ${best_dir#"$work"/}, $(ms "$best") in its batch"
    echo "- cost model: retrained on $unique distinct schedules (retrain_cost_model skips a"
    echo "  pipeline with fewer than 8, so below that the baseline weights guided every batch)"
    echo
    echo "Final comparison, median of 3 interleaved rounds:"
    echo
    echo "| schedule | time | / manual |"
    echo "|---|---:|---:|"
    for name in manual best checked_in; do
        t=$(median $name)
        echo "| ${name/checked_in/checked in (tails made GuardWithIf)} | $(ms "$t") | $(awk -v a="$t" -v b="$manual" 'BEGIN { printf "%.2f", a / b }') |"
    done
} >"$out.md"
echo "Wrote $out.md"
