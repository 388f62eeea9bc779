// The data types the pipelines are built for (the generator parameter
// data_type), and how each is stored and converted: float32 as itself;
// float16 and bfloat16 as their bits (uint16) on every backend, computed in
// float32. Halide 14's own bfloat16 rounding turns a signaling NaN into
// infinity and 0x7fffffff into -0, and OpenCL C has no name for the type.
#pragma once

#include "Halide.h"
#include "float16_conversions.h"

#include <map>
#include <string>

namespace hbn_generators {

using namespace Halide;

enum class DataType { Float32, Float16, BFloat16 };

inline const std::map<std::string, DataType> data_type_names = {
    {"float32", DataType::Float32},
    {"float16", DataType::Float16},
    {"bfloat16", DataType::BFloat16},
};

inline Type storage_type(DataType type) {
    return type == DataType::Float32 ? Float(32) : UInt(16);
}

// bfloat16 is the upper half of a float32, so widening is exact.
inline Expr bfloat16_bits_to_float32(const Expr &bits) {
    return reinterpret(Float(32), cast<uint32_t>(bits) << 16);
}

// The nearest bfloat16, ties to even: add just under half of the dropped
// 16 bits' range, plus the kept part's last bit, and truncate. A carry out
// of the mantissa correctly reaches the next binade or infinity. NaN keeps
// its upper bits with the quiet bit set (rounding could make it infinity).
inline Expr float32_to_bfloat16_bits(const Expr &value) {
    const Expr bits = reinterpret(UInt(32), value);
    const Expr rounded = (bits + (0x7fff + ((bits >> 16) & 1))) >> 16;
    const Expr is_nan = (bits & 0x7fffffff) > 0x7f800000;
    return cast<uint16_t>(select(is_nan, (bits >> 16) | 0x40, rounded));
}

// A stored value of `type` as float32, and a float32 value as stored.
inline Expr load_as_float32(DataType type, const Expr &stored, const Target &target) {
    switch (type) {
    case DataType::Float16: return float16_bits_to_float32(stored, target);
    case DataType::BFloat16: return bfloat16_bits_to_float32(stored);
    default: return cast<float>(stored);
    }
}
inline Expr store_from_float32(DataType type, const Expr &value, const Target &target) {
    switch (type) {
    case DataType::Float16: return float32_to_float16_bits(value, target);
    case DataType::BFloat16: return float32_to_bfloat16_bits(value);
    default: return cast<float>(value);
    }
}

}  // namespace hbn_generators
