// float16 <-> float32 for the pipelines. float16 data travels as its bits
// (uint16) on every backend, and is converted here:
//  - CPU code for x86 with F16C, or AArch64: calls into LLVM bitcode linked
//    into the pipeline (float16_conversions.ll.in), which become the
//    hardware's conversion instructions. Halide 14 would emulate the casts in
//    integer code, which made float16 compute-bound.
//  - Otherwise (GPU kernels, x86 without F16C): arithmetic on the bits.
//    Halide's own float32_to_float16 gives a Float(16) value, which OpenCL C
//    cannot name without cl_half.
#pragma once

#include "Halide.h"

#include <cstdint>
#include <string>
#include <vector>

namespace hbn_generators {

using namespace Halide;

// float16_conversions.ll.in, assembled for each CPU architecture in the data
// layout of Halide's modules for it (cmake/hbn_bitcode.cmake).
extern const std::vector<uint8_t> float16_conversions_bitcode_x86_64;
extern const std::vector<uint8_t> float16_conversions_bitcode_arm_64;

inline bool converts_float16_in_hardware(const Target &target) {
    return !target.has_gpu_feature() &&
           (target.has_feature(Target::F16C) || target.arch == Target::ARM);
}

// Links the bitcode into the module built for `target`, where it is used.
inline void link_float16_conversions(GeneratorContext::ExternsMap &externs, const Target &target) {
    if (converts_float16_in_hardware(target)) {
        const std::string name = "hbn_float16_conversions";
        const auto &bitcode = target.arch == Target::ARM ? float16_conversions_bitcode_arm_64
                                                         : float16_conversions_bitcode_x86_64;
        externs.emplace(name, ExternalCode::bitcode_wrapper(target, bitcode, name));
    }
}

inline Expr float16_bits_to_float32(const Expr &bits, const Target &target) {
    if (converts_float16_in_hardware(target)) {
        return Internal::Call::make(Float(32), "hbn_float16_bits_to_float32", {bits},
                                    Internal::Call::PureExtern);
    }
    return Internal::float16_to_float32(bits);
}

// The nearest float16, ties to even; denormals, infinities and NaN included.
inline Expr float32_to_float16_bits(const Expr &value, const Target &target) {
    if (converts_float16_in_hardware(target)) {
        return Internal::Call::make(UInt(16), "hbn_float32_to_float16_bits", {value},
                                    Internal::Call::PureExtern);
    }
    const Expr bits = reinterpret(UInt(32), strict_float(value));
    const Expr sign = cast<uint16_t>((bits >> 16) & 0x8000);
    const Expr magnitude = bits & 0x7fffffff;
    // Below 2^-14 the result is denormal; adding 0.5 puts float16's denormal
    // step (2^-24) at the float's last mantissa bit, so the addition rounds.
    const Expr denormal = cast<uint16_t>(
        reinterpret(UInt(32), strict_float(reinterpret(Float(32), magnitude) + 0.5f)) - 0x3f000000);
    // Rebias the exponent and round the 13 dropped bits to nearest even;
    // a carry out of the mantissa correctly reaches infinity.
    const Expr odd = (magnitude >> 13) & 1;
    const Expr normal = cast<uint16_t>((magnitude - 0x38000000 + 0xfff + odd) >> 13);
    const Expr inf_or_nan = select(magnitude > 0x7f800000, cast<uint16_t>(0x7e00), cast<uint16_t>(0x7c00));
    return sign | select(magnitude >= 0x47800000, inf_or_nan,
                         magnitude < 0x38800000, denormal,
                         normal);
}

}  // namespace hbn_generators
