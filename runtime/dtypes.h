// What the runtime knows of each DType: its name, how the kernels store it
// (float16 and bfloat16 as their bits, see generators/data_types.h), and
// conversions of per-channel values.
#pragma once

#include "HalideRuntime.h"
#include "bfloat16.h"
#include "float16.h"
#include "hbn/batch_norm.h"

#include <array>
#include <cstddef>
#include <cstdint>

namespace hbn::internal {

struct DTypeInfo {
    const char *name;
    halide_type_t storage;
};

// Indexed by DType.
inline constexpr std::array<DTypeInfo, 3> dtype_infos{{
    {"Float16", {halide_type_uint, 16, 1}},
    {"Float32", {halide_type_float, 32, 1}},
    {"BFloat16", {halide_type_uint, 16, 1}},
}};

constexpr std::size_t dtype_index(DType dtype) {
    return static_cast<std::size_t>(dtype);
}

inline bool valid_dtype(DType dtype) {
    return dtype_index(dtype) < dtype_infos.size();
}

// Call only with a valid dtype.
inline const char *dtype_name(DType dtype) {
    return dtype_infos[dtype_index(dtype)].name;
}
inline halide_type_t halide_type_of(DType dtype) {
    return dtype_infos[dtype_index(dtype)].storage;
}

// Element c of a per-channel tensor, and a value written into one (rounded
// once, to nearest even).
inline float load_channel_value(DType dtype, const void *data, int64_t c) {
    switch (dtype) {
    case DType::Float16: return static_cast<float>(static_cast<const float16 *>(data)[c]);
    case DType::BFloat16: return static_cast<float>(static_cast<const bfloat16 *>(data)[c]);
    default: return static_cast<const float *>(data)[c];
    }
}
inline void store_channel_value(DType dtype, void *data, int64_t c, double value) {
    switch (dtype) {
    case DType::Float16: static_cast<float16 *>(data)[c] = static_cast<float16>(value); break;
    case DType::BFloat16: static_cast<bfloat16 *>(data)[c] = bfloat16(value); break;
    default: static_cast<float *>(data)[c] = static_cast<float>(value); break;
    }
}

}  // namespace hbn::internal
