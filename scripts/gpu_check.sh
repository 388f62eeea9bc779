#!/usr/bin/env bash
# The GPU check: hbn's whole CUDA test suite and a benchmark of every CUDA
# kernel against PyTorch's cuDNN batch norm and a device-to-device copy, on a
# machine with one NVIDIA GPU that has no network, no Halide and no Debian
# packages (only the CUDA driver, bash, coreutils and Python 3 with PyTorch).
# Two parts:
#
#   bash scripts/gpu_check.sh build
#       Here (Debian 12, no GPU needed). Builds build/gpu (CPU + CUDA
#       backends, one AVX2 x86 variant, libstdc++ and libgcc linked
#       statically, so the executables need only glibc >= 2.35: Ubuntu 22.04
#       or later), copies the seven test executables and hbn_gpu_bench into
#       build/gpu/bundle/ (stripped; it must stay under 64 MiB, the most the
#       device tool carries), and prints the GLIBC version they need and the
#       command for the device tool.
#
#   bash scripts/gpu_check.sh run
#       On the GPU machine, from the repository root, with build/gpu/bundle
#       carried there. Through the device tool:
#           run(command="bash scripts/gpu_check.sh run",
#               carry=["build/gpu/bundle"], timeout_s=540)
#       Runs each test executable with HBN_DEVICE=cuda (all at once, each
#       under `timeout`; exit 77 is a skip, whose reason is printed), then
#       hbn_gpu_bench (CSV) and `python3 bench/gpu_peer.py` on its CSV (the
#       cuDNN peer, one markdown table), and prints a summary. Where the
#       driver has libcuda.so.1 but no libcuda.so (the name Halide's runtime
#       opens), it puts a link to it on LD_LIBRARY_PATH first. Everything
#       lands under ${OUT:-build/gpu/out}: tests/<name>.log, bench.csv,
#       bench.log, table.md, summary.txt. Exits 1 if a test or a benchmark
#       case failed (or timed out), 0 otherwise, including when CUDA is not
#       usable and everything skipped (a dry run: run it here after `build`).
#
# Budget: the run part fits in 8 minutes (480 s) of wall time, leaving the
# rest of a 15-minute device lease for the machine's start: the tests get
# 270 s in all (they run in parallel; each executable is killed at 270 s),
# the benchmark at most 120 s (it stops starting cases at 100 s), and the
# cuDNN peer what is left of 470 s (it stops starting cases 15 s before).
# GPU_CHECK_TEST_SECONDS, GPU_CHECK_BENCH_SECONDS and GPU_CHECK_SECONDS
# change these; GPU_CHECK_JOBS (default 7) how many test executables run at
# once; GPU_CHECK_BENCH_ARGS adds arguments to hbn_gpu_bench (e.g.
# "--scale 0.25"); GPU_CHECK_BUNDLE runs another bundle.
set -uo pipefail
cd "$(dirname "$0")/.."

tests=(semantics numerics validation threading backward sync sliced)
bundle="${GPU_CHECK_BUNDLE:-build/gpu/bundle}"
max_bundle_bytes=$((64 * 1024 * 1024))

# Text helpers for the run part, in bash alone (the GPU machine promises
# bash, coreutils and python3, nothing more).
# first_match REGEX FILE: the first line of FILE that matches.
first_match() {
    local line
    while IFS= read -r line || [[ -n $line ]]; do
        if [[ $line =~ $1 ]]; then
            printf '%s\n' "$line"
            return 0
        fi
    done < "$2"
    return 1
}
# all_matches REGEX FILE: every line of FILE that matches.
all_matches() {
    local line
    while IFS= read -r line || [[ -n $line ]]; do
        [[ $line =~ $1 ]] && printf '%s\n' "$line"
    done < "$2"
    return 0
}

# ---------------------------------------------------------------- build --
build() {
    set -e
    scripts/install_deps.sh test
    local targets=() t
    for t in "${tests[@]}"; do targets+=("hbn_${t}_test"); done
    targets+=(hbn_gpu_bench)
    # Static libstdc++ and libgcc free the executables from the device's C++
    # runtime. Debian 12's libstdc++.a then needs glibc 2.36 for one symbol,
    # arc4random (its std::random_device, which every static link pulls in
    # and hbn never calls), while PyTorch hosts commonly run Ubuntu 22.04
    # (glibc 2.35). So every executable here gets an arc4random of its own,
    # from getrandom (glibc 2.25); the next highest need is libgcc's
    # _dl_find_object (2.35). The Halide generators are build/test's
    # (scripts/test_common.sh), so the flags reach only what is bundled.
    mkdir -p build/gpu
    printf '%s\n' '/* scripts/gpu_check.sh: arc4random for libstdc++.a, on glibc before 2.36. */' \
        '#include <stdint.h>' '#include <sys/random.h>' \
        'uint32_t arc4random(void) {' \
        '    uint32_t value;' \
        '    while (getrandom(&value, sizeof value, 0) != (ssize_t)sizeof value) {' \
        '    }' \
        '    return value;' \
        '}' > build/gpu/arc4random_shim.c
    "${CC:-gcc}" -O2 -fPIC -c build/gpu/arc4random_shim.c -o build/gpu/arc4random_shim.o
    # One x86 variant (AVX2: the GPU hosts have it) keeps the binaries small.
    source scripts/test_common.sh
    shared_generators
    cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DHBN_BACKENDS="cpu;cuda" -DHBN_MPI=OFF \
          -DHBN_BUILD_BENCH=OFF -DHBN_X86_TARGETS=x86-64-linux-sse41-avx-f16c-fma-avx2 "$generators_arg" \
          "-DCMAKE_EXE_LINKER_FLAGS=-static-libstdc++ -static-libgcc $PWD/build/gpu/arc4random_shim.o"
    cmake --build build/gpu --target "${targets[@]}" -j "$(nproc)"

    rm -rf "$bundle"
    mkdir -p "$bundle"
    local exe path
    for exe in "${targets[@]}"; do
        path=$(find build/gpu -path '*/CMakeFiles' -prune -o -type f -name "$exe" -perm -u+x -print | head -n 1)
        if [[ -z $path ]]; then
            echo "gpu_check: $exe was not built" >&2
            exit 1
        fi
        cp "$path" "$bundle/$exe"
        strip --strip-unneeded "$bundle/$exe"
    done

    # Only the C library's own libraries may be needed at run time.
    local needed unexpected=""
    needed=$(objdump -p "$bundle"/* | awk '/NEEDED/ {print $2}' | sort -u)
    for lib in $needed; do
        case $lib in
            libc.so.6 | libm.so.6 | libdl.so.2 | libpthread.so.0 | librt.so.1 | ld-linux-x86-64.so.2) ;;
            *) unexpected+=" $lib" ;;
        esac
    done
    if [[ -n $unexpected ]]; then
        echo "gpu_check: the bundle needs shared libraries the GPU machine may lack:$unexpected" >&2
        exit 1
    fi
    local glibc
    glibc=$(objdump -T "$bundle"/* | grep -o 'GLIBC_[0-9][0-9.]*' | sort -uV | tail -n 1)
    echo "${glibc#GLIBC_}" > "$bundle/GLIBC_REQUIRED"
    {
        echo "source: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(
            [[ -n "$(git status --porcelain -- . ':!build*' 2>/dev/null)" ]] && echo +uncommitted)"
        echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(gcc -dumpfullversion 2>/dev/null || true)"
    } > "$bundle/BUILD_INFO"

    local bytes
    bytes=$(du -cb "$bundle"/* | tail -n 1 | cut -f 1)
    ls -l "$bundle"
    printf 'bundle: %s, %d bytes (%.1f MiB, limit 64 MiB); needs glibc >= %s\n' "$bundle" "$bytes" \
           "$(awk "BEGIN {print $bytes / 1048576}")" "${glibc#GLIBC_}"
    if ((bytes >= max_bundle_bytes)); then
        echo "gpu_check: the bundle is over 64 MiB, more than the device tool carries" >&2
        exit 1
    fi
    cat <<EOF

Now, on the GPU machine (device tool), one command of at most 8 minutes:
  run(command="bash scripts/gpu_check.sh run", carry=["$bundle"], timeout_s=540)
Its results come back under \$OUT: summary.txt, table.md, bench.csv, tests/*.log.
Dry run here (CUDA skips): bash scripts/gpu_check.sh run
EOF
}

# ------------------------------------------------------------------ run --
run() {
    local started=$SECONDS
    local total=${GPU_CHECK_SECONDS:-470}
    local test_seconds=${GPU_CHECK_TEST_SECONDS:-270}
    local bench_seconds=${GPU_CHECK_BENCH_SECONDS:-120}
    local jobs=${GPU_CHECK_JOBS:-${#tests[@]}}
    local out="${OUT:-build/gpu/out}"
    if [[ ! -d $bundle ]]; then
        echo "gpu_check: no $bundle: run 'bash scripts/gpu_check.sh build' first, and carry $bundle" >&2
        exit 2
    fi
    mkdir -p "$out/tests" || exit 1
    local summary="$out/summary.txt"
    : > "$summary"
    note() { echo "$*" | tee -a "$summary"; }
    local info cpu flags
    info=$(tr '\n' ';' < "$bundle/BUILD_INFO" 2> /dev/null)
    note "gpu_check: bundle ${info%;}"
    cpu=$(first_match '^model name' /proc/cpuinfo)
    note "host: $(uname -srm); ${cpu#*: }; $(nproc) CPUs"

    # The bundle's kernels are AVX2 only.
    flags=$(first_match '^flags' /proc/cpuinfo)
    if [[ "$flags " != *" avx2 "* ]]; then
        note "WARNING: this CPU lacks AVX2, which the bundle's CPU kernels (and hbn's host code) use"
    fi
    # glibc: the bundle needs at least the one it was linked against.
    if [[ -f $bundle/GLIBC_REQUIRED ]]; then
        local need have
        need=$(cat "$bundle/GLIBC_REQUIRED")
        have=$(python3 -c 'import os; print(os.confstr("CS_GNU_LIBC_VERSION").split()[-1])' 2>/dev/null || echo unknown)
        if [[ $have != unknown ]] && [[ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n 1)" != "$need" ]]; then
            note "WARNING: this machine has glibc $have; the bundle needs $need (the executables will not start)"
        else
            note "glibc: $have (the bundle needs $need)"
        fi
    fi
    # Halide's runtime and hbn's probe open "libcuda.so", which a machine
    # with only the driver may lack (it has libcuda.so.1): point a private
    # libcuda.so at the driver's.
    local shim
    shim=$(mktemp -d)
    trap 'rm -rf "$shim"' EXIT
    local cuda_note
    cuda_note=$(python3 - "$shim" <<'PY' 2>&1
import ctypes, os, sys
try:
    ctypes.CDLL("libcuda.so")
    print("libcuda.so: found")
    sys.exit(0)
except OSError:
    pass
try:
    ctypes.CDLL("libcuda.so.1")
except OSError as e:
    print("libcuda.so: missing, and so is libcuda.so.1 (%s)" % e)
    sys.exit(0)
path = None
with open("/proc/self/maps") as maps:
    for line in maps:
        if "/libcuda.so.1" in line or "/libcuda.so." in line:
            path = line.split()[-1]
            break
if path is None:
    print("libcuda.so: missing; libcuda.so.1 loads but its path was not found")
    sys.exit(0)
os.makedirs(sys.argv[1], exist_ok=True)
link = os.path.join(sys.argv[1], "libcuda.so")
if os.path.lexists(link):
    os.remove(link)
os.symlink(path, link)
print("libcuda.so: missing; linked %s -> %s (on LD_LIBRARY_PATH)" % (link, path))
PY
)
    note "$cuda_note"
    if [[ -L $shim/libcuda.so ]]; then
        export LD_LIBRARY_PATH="$shim${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    if command -v nvidia-smi > /dev/null; then
        note "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2> /dev/null | head -n 1)"
    fi

    # ---- the CUDA test suite: every executable, HBN_DEVICE=cuda ----
    note ""
    note "== CUDA test suite (HBN_DEVICE=cuda; ${test_seconds}s limit per executable, $jobs at once) =="
    local t exe running=0
    for t in "${tests[@]}"; do
        exe="$bundle/hbn_${t}_test"
        if [[ ! -x $exe ]]; then
            echo "missing: $exe" > "$out/tests/$t.log"
            echo 127 > "$out/tests/$t.rc"
            continue
        fi
        (
            start=$SECONDS
            HBN_DEVICE=cuda timeout -k 10 "$test_seconds" "$exe" --gtest_brief=1 > "$out/tests/$t.log" 2>&1
            echo $? > "$out/tests/$t.rc"
            echo $((SECONDS - start)) > "$out/tests/$t.seconds"
        ) &
        running=$((running + 1))
        if ((running >= jobs)); then
            wait -n 2> /dev/null || wait
            running=$((running - 1))
        fi
    done
    wait

    local passed=0 failed=0 skipped=0 rc seconds detail
    for t in "${tests[@]}"; do
        rc=$(cat "$out/tests/$t.rc" 2> /dev/null || echo 1)
        seconds=$(cat "$out/tests/$t.seconds" 2> /dev/null || echo "?")
        # gtest's closing lines: "[==========] 90 tests from 12 test suites ran.",
        # "[  PASSED  ] 87 tests." and "[  SKIPPED ] 1 test, listed below:"
        # (--gtest_brief prints no count of the failed ones).
        detail=""
        local line ran="" ok=0 skip=0
        while IFS= read -r line; do
            if [[ $line =~ ^\[==========\]\ ([0-9]+)\ tests?\ from ]]; then
                ran=${BASH_REMATCH[1]}
            elif [[ $line =~ ^\[\ +PASSED\ +\]\ ([0-9]+)\ test ]]; then
                ok=${BASH_REMATCH[1]}
            elif [[ $line =~ ^\[\ +SKIPPED\ +\]\ ([0-9]+)\ test ]]; then
                skip=${BASH_REMATCH[1]}
            fi
        done < <(all_matches '^\[(==========| +PASSED +| +SKIPPED +)\] [0-9]+ test' "$out/tests/$t.log" 2> /dev/null)
        if [[ -n $ran ]]; then
            detail="$ran tests: $ok passed, $((ran - ok - skip)) failed, $skip skipped"
        fi
        case $rc in
            0)
                passed=$((passed + 1))
                note "PASSED   hbn_${t}_test (${seconds}s) ${detail:+($detail)}"
                ;;
            77)
                skipped=$((skipped + 1))
                note "SKIPPED  hbn_${t}_test: $(first_match '^SKIPPED' "$out/tests/$t.log" || tail -n 1 "$out/tests/$t.log")"
                ;;
            124 | 137)
                failed=$((failed + 1))
                note "FAILED   hbn_${t}_test: timed out after ${test_seconds}s ${detail:+($detail)}"
                ;;
            *)
                failed=$((failed + 1))
                note "FAILED   hbn_${t}_test: exit $rc (${seconds}s) ${detail:+($detail)}"
                local failures
                failures=$(all_matches '^\[  FAILED  \] [A-Za-z_]' "$out/tests/$t.log" | sort -u)
                # No failed test named (a crash, a loader error): the log's end.
                [[ -n $failures ]] || failures=$(tail -n 5 "$out/tests/$t.log")
                head -n 20 <<< "$failures" | while IFS= read -r line; do note "           ${line:0:200}"; done
                ;;
        esac
    done
    note "suite: $passed passed, $failed failed, $skipped skipped (executables; logs in $out/tests/)"

    # ---- the benchmark, then the cuDNN peer ----
    local left=$((total - (SECONDS - started)))
    local bench_limit=$((left - 60 < bench_seconds ? left - 60 : bench_seconds))
    ((bench_limit < 20)) && bench_limit=20
    note ""
    note "== benchmark (hbn_gpu_bench, ${bench_limit}s limit) =="
    local bench_rc=0
    # shellcheck disable=SC2086
    timeout -k 5 "$bench_limit" "$bundle/hbn_gpu_bench" --budget $((bench_limit - 20 > 10 ? bench_limit - 20 : 10)) \
        ${GPU_CHECK_BENCH_ARGS:-} > "$out/bench.csv" 2> "$out/bench.log" || bench_rc=$?
    case $bench_rc in
        0) note "benchmark: done ($(all_matches ',ok$' "$out/bench.csv" | wc -l) cases ok)" ;;
        77) note "benchmark: $(head -n 1 "$out/bench.csv")" ;;
        124 | 137) note "benchmark: timed out after ${bench_limit}s; the table has the cases measured" ;;
        *) note "benchmark: exit $bench_rc: $(all_matches ',error: ' "$out/bench.csv" | wc -l) cases failed; $(tail -n 3 "$out/bench.log" | tr '\n' ' ')" ;;
    esac

    left=$((total - (SECONDS - started)))
    local peer_limit=$((left > 30 ? left : 30))
    local peer_rc=0
    if [[ $bench_rc == 77 ]]; then
        : > "$out/table.md"
    else
        note ""
        note "== hbn against cuDNN (bench/gpu_peer.py, ${peer_limit}s limit) =="
        timeout -k 5 "$peer_limit" python3 bench/gpu_peer.py "$out/bench.csv" --budget $((peer_limit - 15 > 5 ? peer_limit - 15 : 5)) \
            > "$out/table.md" 2> "$out/peer.log" || peer_rc=$?
        if [[ $peer_rc != 0 ]]; then
            note "peer: exit $peer_rc: $(tail -n 3 "$out/peer.log" | tr '\n' ' ')"
        fi
        tee -a "$summary" < "$out/table.md"
    fi

    note ""
    note "gpu_check: $passed passed, $failed failed, $skipped skipped; benchmark exit $bench_rc; $((SECONDS - started))s"
    if ((failed > 0)) || [[ $bench_rc != 0 && $bench_rc != 77 ]]; then
        exit 1
    fi
    exit 0
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    *)
        echo "usage: bash scripts/gpu_check.sh build|run  (see the comment at the top of this script)" >&2
        exit 2
        ;;
esac
