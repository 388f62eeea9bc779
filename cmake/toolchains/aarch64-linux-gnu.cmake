# Cross build for aarch64 Linux with Debian's g++-aarch64-linux-gnu; the tests
# run under qemu-aarch64 (Debian's qemu-user). See scripts/test_arm.sh.
#   cmake -S . -B build/arm --toolchain cmake/toolchains/aarch64-linux-gnu.cmake \
#         -Dhbn-halide_generators_DIR=<host build>/cmake
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

# The target's libraries and headers (libc6-dev-arm64-cross and friends).
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# Runs target executables (tests, gtest discovery) on the build machine.
set(CMAKE_CROSSCOMPILING_EMULATOR "qemu-aarch64;-L;/usr/aarch64-linux-gnu")
