# Sourced by the test scripts: best_x86_target prints the best of hbn's
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
