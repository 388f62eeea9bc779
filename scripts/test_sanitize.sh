#!/usr/bin/env bash
# The sanitizer and fuzz jobs of the test command (scripts/test.sh runs this;
# HBN_TEST_SANITIZE=0 skips it). ctest arguments may follow. Both builds use
# Debian's clang 14; the runtime and the tests are instrumented, the Halide
# kernels are not (Halide compiles them).
#  - build/asan, AddressSanitizer + UndefinedBehaviorSanitizer, CPU and
#    OpenCL backends: the semantics, numerics, validation, backward, sync,
#    sliced and threading tests
#    under the CPU's best x86 variant (the avx512-prefixed ones, which refuse
#    no CPU feature, so every x86-64 machine runs them) with HBN_DEVICE=cpu,
#    the runtime.* tests, the backend.* tests (OpenCL on PoCL), and the
#    libFuzzer target for HBN_FUZZ_SECONDS (60). The other variants run the
#    same runtime code and differ only in kernel code, which ASan does not
#    see. HBN_DEVICE=cpu because Auto's probe would load PoCL's LLVM, whose
#    alternate signal stack on a test's worker thread ASan cannot unmap when
#    the thread ends.
#  - build/tsan, ThreadSanitizer, CPU backend: the threading and sync tests
#    under that variant, where calls run concurrently (sync's fake processes
#    are threads) and large outputs stream from Halide's thread pool.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh sanitize
jobs=$(nproc)
source scripts/test_common.sh
shared_generators
# Only the best x86 variant is built: ASan and TSan see the runtime, which
# every variant shares, not the kernels. The generators are build/test's.
configure() {  # build dir, sanitizers, extra CMake arguments
    local dir=$1 sanitize=$2
    shift 2
    CC=clang-14 CXX=clang++-14 cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DHBN_SANITIZE="$sanitize" -DHBN_X86_TARGETS="$(best_x86_target)" "$generators_arg" "$@"
    cmake --build "$dir" -j "$jobs"
}

# llvm-14's symbolizer: Debian's unversioned llvm-symbolizer (package llvm)
# may be missing, and without one TSan cannot match its suppressions.
symbolizer=external_symbolizer_path=/usr/lib/llvm-14/bin/llvm-symbolizer

# scripts/fuzz.sh configures build/asan the same way, so neither rebuilds it.
configure build/asan address,undefined "-DHBN_BACKENDS=cpu;opencl" -DHBN_MPI=OFF -DHBN_BUILD_FUZZER=ON \
    -DHBN_FUZZ_SECONDS="${HBN_FUZZ_SECONDS:-60}"
export ASAN_OPTIONS=$symbolizer:detect_leaks=1:check_initialization_order=1:strict_init_order=1
export UBSAN_OPTIONS=$symbolizer:print_stacktrace=1:halt_on_error=1
HBN_DEVICE=cpu ctest --test-dir build/asan --output-on-failure -j "$jobs" -R '^(avx512|runtime|fuzz)\.' -E 'Variant\.' "$@"
# The backend tests set HBN_DEVICE themselves, per run; they run OpenCL on
# PoCL (device memory, a failing kernel build).
ctest --test-dir build/asan --output-on-failure -j "$jobs" -R '^backend\.' "$@"

configure build/tsan thread -DHBN_BACKENDS=cpu -DHBN_MPI=OFF
HBN_DEVICE=cpu TSAN_OPTIONS="$symbolizer:halt_on_error=1:suppressions=$PWD/tests/sanitizers/tsan.supp" \
    ctest --test-dir build/tsan --output-on-failure -j "$jobs" -R '^avx512\.' -E 'Variant\.' -L 'threading|sync' "$@"
