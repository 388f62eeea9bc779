#!/usr/bin/env bash
# The sanitizer and fuzz jobs of the test command (scripts/test.sh runs this;
# HBN_TEST_SANITIZE=0 skips it). Both builds use Debian's clang 14; the
# runtime and the tests are instrumented, the Halide kernels are not (Halide
# compiles them).
#  - build/asan: AddressSanitizer + UndefinedBehaviorSanitizer, CPU and
#    OpenCL backends. The whole suite under the CPU's best x86 variant (the
#    avx512-prefixed tests, which refuse no feature): every runtime path
#    (validation, views, the streamed outputs, error routing) runs there, and
#    the other variants differ only in kernel code, which ASan does not see.
#    The backend tests, with OpenCL on PoCL (the GPU call, device memory, a
#    failing kernel build). Then the libFuzzer target for HBN_FUZZ_SECONDS
#    (60), with the same sanitizers.
#  - build/tsan: ThreadSanitizer over the threading tests, where calls run
#    concurrently, large outputs among them (hbn's own code on Halide's pool).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh sanitize
configure() {  # build dir, sanitizers, extra CMake arguments
    local dir=$1 sanitize=$2
    shift 2
    CC=clang-14 CXX=clang++-14 cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DHBN_SANITIZE="$sanitize" "$@"
    cmake --build "$dir"
}
configure build/asan address,undefined "-DHBN_BACKENDS=cpu;opencl" -DHBN_BUILD_FUZZER=ON \
    -DHBN_FUZZ_SECONDS="${HBN_FUZZ_SECONDS:-60}"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# The CPU suites with HBN_DEVICE=cpu: Device::Auto's probe would load PoCL and
# LLVM, whose alternate signal stack on a test's worker thread ASan cannot
# unmap when the thread ends. The backend tests set their own environment.
HBN_DEVICE=cpu ctest --test-dir build/asan --output-on-failure -j "$(nproc)" -R '^(avx512|runtime|fuzz)\.' "$@"
ctest --test-dir build/asan --output-on-failure -j "$(nproc)" -R '^backend\.' "$@"

configure build/tsan thread -DHBN_BACKENDS=cpu
HBN_DEVICE=cpu TSAN_OPTIONS="halt_on_error=1:suppressions=$PWD/tests/sanitizers/tsan.supp" \
    ctest --test-dir build/tsan --output-on-failure -j "$(nproc)" \
    -R '^avx512\.' -L threading "$@"
