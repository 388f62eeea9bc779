// Halide buffers over the caller's memory: the data tensors in the
// pipelines' (inner, c, n) or (c, m) view, and per-channel tensors as float32.
#pragma once

#include "HalideRuntime.h"
#include "dtypes.h"
#include "hbn/batch_norm.h"
#include "partition.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace hbn::internal {

struct HalideBuffer {
    halide_buffer_t buffer{};
    std::array<halide_dimension_t, 3> dims{};

    // A slice of a data tensor; device memory is attached by GpuCall.
    HalideBuffer(const Tensor &t, const Slice &s) : HalideBuffer(halide_type_of(t.dtype), s) {
        if (t.memory == Memory::Host) {
            buffer.host = static_cast<uint8_t *>(t.data) + s.offset * buffer.type.bytes();
        }
    }

    // A slice's shape, with no memory yet.
    HalideBuffer(halide_type_t type, const Slice &s) {
        buffer.type = type;
        dims = s.dims;
        buffer.dimensions = s.dimensions;
    }

    // A per-channel vector of float32 or double, from its element 0.
    template<typename T>
    HalideBuffer(T *data, int64_t channels) {
        buffer.host = reinterpret_cast<uint8_t *>(const_cast<std::remove_const_t<T> *>(data));
        buffer.type = ::halide_type_of<std::remove_const_t<T>>();
        dims[0] = {0, static_cast<int32_t>(channels), 1, 0};
        buffer.dimensions = 1;
    }

    // The channels of slice `s` of a per-channel vector over every channel.
    template<typename T>
    HalideBuffer(T *data, const Slice &s) : HalideBuffer(data + s.first_channel, s.channels) {}

    HalideBuffer() = default;

    // The dimension array lives inside this object, so point at it here
    // rather than at construction: copies stay valid.
    halide_buffer_t *get() {
        buffer.dim = dims.data();
        return &buffer;
    }
};

// The output of a call whose data output is not wanted: the statistics-only
// passes, and a skipped grad_input. On the CPU it has no rows (the kernels
// still reduce all of their input: a reduction's extent is the input's). A
// GPU backend would allocate it on the device, where a zero size is an
// error, so there it is one row, in host scratch. (An output with no host
// and no device memory would be a bounds query.)
class UnwantedOutput {
public:
    UnwantedOutput(Device device, DType dtype, const Slice &s) {
        const int last = s.dimensions - 1;
        int64_t row_elements = 1;
        for (int i = 0; i < last; i++) {
            row_elements *= s.dims[i].extent;
        }
        scratch_.resize(device == Device::CPU ? 1 : row_elements * halide_type_of(dtype).bytes());
        buffer_ = HalideBuffer(halide_type_of(dtype), s);
        buffer_.buffer.host = scratch_.data();
        buffer_.dims[last].extent = device == Device::CPU ? 0 : 1;
    }
    halide_buffer_t *get() { return buffer_.get(); }

private:
    std::vector<uint8_t> scratch_;
    HalideBuffer buffer_;
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
// a converted copy otherwise.
class ChannelFloats {
public:
    ChannelFloats(const Tensor &t, int64_t channels) {
        if (t.dtype == DType::Float32) {
            data_ = static_cast<const float *>(t.data);
        } else {
            copy_.resize(channels);
            for (int64_t c = 0; c < channels; c++) {
                copy_[c] = load_channel_value(t.dtype, t.data, c);
            }
            data_ = copy_.data();
        }
        channels_ = channels;
    }
    float operator[](int64_t c) const { return data_[c]; }
    const float *data() const { return data_; }
    double largest_magnitude() const { return hbn::internal::largest_magnitude(data_, channels_); }

private:
    std::vector<float> copy_;
    const float *data_ = nullptr;
    int64_t channels_ = 0;
};

// Whether a per-channel factor is finite in float32; NaN is not.
inline bool fits_float(double value) {
    return std::abs(value) <= std::numeric_limits<float>::max();
}

// Writes `value` into element c of a per-channel tensor, in its dtype.
inline void store_channel(const Tensor &t, int64_t c, double value) {
    store_channel_value(t.dtype, t.data, c, value);
}

}  // namespace hbn::internal
