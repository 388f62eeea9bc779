#!/usr/bin/env bash
# Installs the Debian 12 packages hbn needs that this machine lacks.
#   scripts/install_deps.sh [demo|test|arm|sanitize|bench|tune]   (default: test)
# arm: the test packages plus the aarch64 cross compiler and qemu-aarch64
# (scripts/test_arm.sh builds GoogleTest from googletest's sources, and the
# generators in the native build/test).
# sanitize: the test packages plus clang 14 and its sanitizer and libFuzzer
# runtimes (scripts/test_sanitize.sh, scripts/fuzz.sh).
set -euo pipefail

# ocl-icd-opencl-dev: the OpenCL headers the build needs and the libOpenCL.so
# that Halide's runtime opens; pocl-opencl-icd: an OpenCL device on the CPU,
# on which the tests run the OpenCL backend; python3: the PTX test; llvm-14
# (which Halide's package also pulls in): llvm-as, for the float16 conversions;
# libopenmpi-dev and openmpi-bin: the hbn::mpi component and mpirun, which
# runs its tests and example; python3-dev, python3-pybind11, libdlpack-dev,
# python3-numpy: the Python package (HBN_PYTHON), and python3-torch and
# python3-pytest its tests.
packages=(cmake ninja-build gcc g++ libhalide14-0-dev llvm-14 ocl-icd-opencl-dev libopenmpi-dev openmpi-bin)
case "${1:-test}" in
    demo) ;;
    test) packages+=(libgtest-dev pocl-opencl-icd python3 python3-dev python3-pybind11 libdlpack-dev
                     python3-numpy python3-torch python3-pytest) ;;
    arm) packages+=(libgtest-dev googletest python3 g++-aarch64-linux-gnu qemu-user) ;;
    sanitize) packages+=(libgtest-dev clang-14 libclang-rt-14-dev) ;;
    bench) packages+=(libbenchmark-dev libdnnl-dev libtorch-dev python3-matplotlib python3-dev
                      python3-pybind11 libdlpack-dev python3-numpy python3-torch) ;;
    tune) packages+=(python3) ;;
    *) echo "usage: $0 [demo|test|arm|sanitize|bench|tune]" >&2; exit 2 ;;
esac

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    echo "Installing: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
