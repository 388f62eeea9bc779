// Halide buffers over the caller's memory: the data tensors in the
// pipelines' (inner, c, n) or (c, m) view, and per-channel tensors as float32.
#pragma once

#include "HalideRuntime.h"
#include "float16.h"
#include "hbn/batch_norm.h"
#include "validation.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace hbn::internal {

// Every kernel takes float16 data as its bits (see generators/float16_conversions.h).
inline halide_type_t halide_type_of(DType dtype) {
    if (dtype == DType::Float16) {
        return {halide_type_uint, 16, 1};
    }
    return {halide_type_float, 32, 1};
}

struct HalideBuffer {
    halide_buffer_t buffer{};
    std::array<halide_dimension_t, 3> dims{};

    // A data tensor; device memory is attached by GpuCall.
    HalideBuffer(const Tensor &t, const DataView &v) {
        if (t.memory == Memory::Host) {
            buffer.host = static_cast<uint8_t *>(t.data);
        }
        buffer.type = halide_type_of(t.dtype);
        const auto c = static_cast<int32_t>(v.channels);
        if (v.nchw) {
            const auto inner = static_cast<int32_t>(v.inner);
            dims[0] = {0, inner, 1, 0};
            dims[1] = {0, c, inner, 0};
            dims[2] = {0, static_cast<int32_t>(v.outer), inner * c, 0};
            buffer.dimensions = 3;
        } else {
            dims[0] = {0, c, 1, 0};
            dims[1] = {0, static_cast<int32_t>(v.outer), c, 0};
            buffer.dimensions = 2;
        }
    }

    // A per-channel vector of float32 or double.
    template<typename T>
    HalideBuffer(T *data, int64_t channels) {
        buffer.host = reinterpret_cast<uint8_t *>(data);
        buffer.type = ::halide_type_of<T>();
        dims[0] = {0, static_cast<int32_t>(channels), 1, 0};
        buffer.dimensions = 1;
    }

    HalideBuffer() = default;

    // The dimension array lives inside this object, so point at it here
    // rather than at construction: copies stay valid.
    halide_buffer_t *get() {
        buffer.dim = dims.data();
        return &buffer;
    }
};

// The largest |value| of `values`, NaN if one is.
template<typename T>
double largest_magnitude(const T *values, int64_t count) {
    double largest = 0;
    for (int64_t i = 0; i < count; i++) {
        const double magnitude = std::abs(static_cast<double>(values[i]));
        if (std::isnan(magnitude)) {
            return magnitude;
        }
        largest = std::max(largest, magnitude);
    }
    return largest;
}

// A per-channel parameter as float32: the caller's memory when it already is,
// a converted copy when it is float16.
class ChannelFloats {
public:
    ChannelFloats(const Tensor &t, int64_t channels) {
        if (t.dtype == DType::Float32) {
            data_ = static_cast<float *>(t.data);
        } else {
            const auto *half = static_cast<const float16 *>(t.data);
            copy_.assign(half, half + channels);
            data_ = copy_.data();
        }
        buffer_ = HalideBuffer(data_, channels);
        channels_ = channels;
    }
    float operator[](int64_t c) const { return data_[c]; }
    double largest_magnitude() const { return hbn::internal::largest_magnitude(data_, channels_); }
    halide_buffer_t *buffer() { return buffer_.get(); }

private:
    std::vector<float> copy_;
    float *data_ = nullptr;
    int64_t channels_ = 0;
    HalideBuffer buffer_;
};

// Whether a per-channel factor is finite in float32; NaN is not.
inline bool fits_float(double value) {
    return std::abs(value) <= std::numeric_limits<float>::max();
}

// Writes `value` into element c of a per-channel tensor, in its dtype.
inline void store_channel(const Tensor &t, int64_t c, double value) {
    if (t.dtype == DType::Float32) {
        static_cast<float *>(t.data)[c] = static_cast<float>(value);
    } else {
        static_cast<float16 *>(t.data)[c] = static_cast<float16>(value);
    }
}

}  // namespace hbn::internal
