// The dtypes under test, and what the tests need to know of each.
#pragma once

#include <hbn/batch_norm.h>

#include <string>
#include <vector>

namespace hbn_test {

inline const std::vector<hbn::DType> all_dtypes{hbn::DType::Float32, hbn::DType::Float16, hbn::DType::BFloat16};

// For test names ("32", "16", "b16") and messages ("float32", ...).
inline std::string dtype_tag(hbn::DType dtype) {
    switch (dtype) {
    case hbn::DType::Float16: return "16";
    case hbn::DType::BFloat16: return "b16";
    default: return "32";
    }
}
inline std::string dtype_label(hbn::DType dtype) {
    switch (dtype) {
    case hbn::DType::Float16: return "float16";
    case hbn::DType::BFloat16: return "bfloat16";
    default: return "float32";
    }
}

constexpr double unit_roundoff32 = 0x1p-24;  // float32's

// One rounding to `dtype`, relative, with a factor 2 to spare: the unit
// roundoff is 2^-24 for float32, 2^-11 for float16 and 2^-8 for bfloat16 (a
// value computed in float32 may land on the other side of a 16-bit tie).
inline double storage_rounding(hbn::DType dtype) {
    switch (dtype) {
    case hbn::DType::Float16: return 0x1p-10;
    case hbn::DType::BFloat16: return 0x1p-7;
    default: return 2 * unit_roundoff32;
    }
}

// Where relative bounds end: the spacing of float16's denormals, 2^-24.
// float32's and bfloat16's (2^-149, 2^-133) lie below anything the tests
// compute.
inline double denormal_spacing(hbn::DType dtype) {
    return dtype == hbn::DType::Float16 ? 0x1p-24 : 0;
}

}  // namespace hbn_test
