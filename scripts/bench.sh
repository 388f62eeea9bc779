#!/usr/bin/env bash
# Builds the benchmarks and runs them: hbn's forward (batch_norm) and backward
# (batch_norm_backward), each in inference and training mode, against a copy
# of the same bytes, oneDNN and libtorch, and the fused epilogues (ReLU, add
# and ReLU) against hbn unfused and oneDNN's fused flags. Writes
# bench/results/latest.{json,md,png}. Then times synchronized batch norm over
# two MPI processes (bench/sync_overhead.cpp) and appends its table to
# latest.md (HBN_BENCH_SYNC=0 skips it), and the cost of a call from Python
# against the same call from C++ (bench/python_overhead.py; HBN_BENCH_PYTHON=0
# skips it). Extra arguments go to the benchmark binary, e.g.
#   scripts/bench.sh --benchmark_filter=mid
#   scripts/bench.sh --benchmark_filter=BM/backward_
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh bench

cmake -S . -B build/bench -G Ninja -DCMAKE_BUILD_TYPE=Release -DHBN_BUILD_TESTS=OFF \
      -DHBN_BUILD_BENCH=ON -DHBN_PYTHON=ON -DPython3_EXECUTABLE=/usr/bin/python3
cmake --build build/bench --target hbn_bench hbn_sync_overhead hbn_python -j "$(nproc)"

mkdir -p bench/results
# OpenMP threads (oneDNN, libtorch) sleep when idle instead of spinning: on a
# VM whose vCPUs share cores, spinning threads stall each other (a 2x2 call
# then takes milliseconds) and steal time from whatever runs next.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
# Which hbn was measured: the commit, and whether the sources outside bench/
# and scripts/ had uncommitted changes.
source_rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git status --porcelain -- . ':!bench' ':!scripts' 2>/dev/null)" ]]; then
    source_rev+="+uncommitted"
fi
build/bench/bench/hbn_bench --benchmark_out=bench/results/latest.json \
                            --benchmark_out_format=json \
                            --benchmark_context=hbn_source="$source_rev" "$@"
# Debian's python3, which has python3-matplotlib (not one from PATH, e.g. pyenv).
/usr/bin/python3 bench/report.py bench/results/latest.json

# SyncBN overhead: the mid batch split across two processes, each call timed
# without and with all_reduce. HL_NUM_THREADS=1 gives each process one thread:
# Halide's thread pool otherwise starts one per core in every process, and on
# this 2-core machine 4 threads would share 2 cores, so the table would time
# their contention rather than the kernels and the all-reduces.
# --oversubscribe lets 2 processes run where there are fewer cores; Open MPI
# refuses to run as root without --allow-run-as-root.
if [[ ${HBN_BENCH_SYNC:-1} != 0 ]]; then
    mpirun_flags=(-np 2 --oversubscribe -x HL_NUM_THREADS=1)
    [[ $(id -u) -ne 0 ]] || mpirun_flags+=(--allow-run-as-root)
    sync_table=$(mpirun "${mpirun_flags[@]}" build/bench/bench/hbn_sync_overhead)
    printf '\n%s\n' "$sync_table" | tee -a bench/results/latest.md
else
    echo "SyncBN overhead skipped (HBN_BENCH_SYNC=0)"
fi

# Python's overhead: the 2x2 and mid-size calls from Python (NumPy arrays and
# PyTorch tensors) against the C++ benchmark of the same calls, in one run.
if [[ ${HBN_BENCH_PYTHON:-1} != 0 ]]; then
    python_table=$(PYTHONPATH=build/bench/python HBN_DEVICE=cpu \
                   /usr/bin/python3 bench/python_overhead.py build/bench/bench/hbn_bench)
    printf '\n%s\n' "$python_table" | tee -a bench/results/latest.md
else
    echo "Python overhead skipped (HBN_BENCH_PYTHON=0)"
fi
