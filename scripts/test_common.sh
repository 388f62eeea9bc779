# Sourced by the test scripts.

# best_x86_target prints the best of hbn's
# default x86 targets (cmake/hbn_pipelines.cmake) that this CPU runs, by the
# features Halide's avx512_skylake and avx2 variants need. A build of that one
# target generates a third of the code of the default three.
best_x86_target() {
    local flags
    flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    has() { for f; do [[ $flags == *" $f "* ]] || return 1; done; }
    if has avx512f avx512cd avx512bw avx512dq avx512vl avx2 fma f16c; then
        echo x86-64-linux-sse41-avx-f16c-fma-avx2-avx512-avx512_skylake
    elif has avx avx2 fma f16c; then
        echo x86-64-linux-sse41-avx-f16c-fma-avx2
    else
        echo x86-64-linux-sse41
    fi
}

# Builds, if need be, the Halide generators of build/test (the test command's
# native build), and sets generators_arg to the CMake argument that makes
# another native build import them rather than compile its own: the
# generator is the same whatever the schedule source, backends, x86 targets
# or sanitizers, and compiling it (every checked-in schedule included) takes
# minutes on 2 cores.
shared_generators() {
    if [[ ! -f build/test/CMakeCache.txt ]]; then
        cmake -S . -B build/test -G Ninja -DCMAKE_BUILD_TYPE=Release
    fi
    cmake --build build/test --target hbn_generators
    generators_arg=-Dhbn-halide_generators_DIR=$PWD/build/test/cmake
}
