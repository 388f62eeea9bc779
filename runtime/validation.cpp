#include "validation.h"

#include "buffers.h"      // halide_type_of
#include "halide_call.h"  // fail

#include <algorithm>
#include <array>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace hbn::internal {
namespace {

const char *dtype_name(DType dtype) {
    return dtype == DType::Float16 ? "Float16" : "Float32";
}

bool valid_dtype(DType dtype) {
    return dtype == DType::Float16 || dtype == DType::Float32;
}

int64_t element_bytes(DType dtype) {
    return halide_type_of(dtype).bytes();
}

std::string shape_string(const std::vector<int64_t> &shape) {
    std::ostringstream out;
    out << '[';
    for (size_t i = 0; i < shape.size(); i++) {
        out << (i ? ", " : "") << shape[i];
    }
    out << ']';
    return out.str();
}

const char *memory_name(Memory memory) {
    switch (memory) {
    case Memory::Host: return "host";
    case Memory::OpenCL: return "OpenCL";
    case Memory::CUDA: return "CUDA";
    }
    return "unknown";
}

// The product of non-negative extents, or int64's maximum where it would
// overflow. An extent of 0 makes it 0 whatever the others: emptiness decides
// before size.
int64_t saturating_product(std::vector<int64_t>::const_iterator begin,
                           std::vector<int64_t>::const_iterator end) {
    int64_t product = 1;
    bool saturated = false;
    for (auto it = begin; it != end; ++it) {
        if (*it == 0) {
            return 0;
        }
        saturated = saturated || __builtin_mul_overflow(product, *it, &product);
    }
    return saturated ? std::numeric_limits<int64_t>::max() : product;
}

int64_t element_count(const Tensor &t) {
    return saturating_product(t.shape.begin(), t.shape.end());
}

// Extents, element count and bytes, data pointer and its alignment. A count
// that saturates is one no memory can hold.
void check_dims_and_data(const Tensor &t, const char *name) {
    for (int64_t extent : t.shape) {
        if (extent < 0) {
            fail(ErrorKind::ValueError, std::string(name) + " has a negative dimension: shape " +
                                            shape_string(t.shape));
        }
    }
    const int64_t count = element_count(t);
    if (count == 0) {
        return;
    }
    if (count > std::numeric_limits<int64_t>::max() / element_bytes(t.dtype)) {
        fail(ErrorKind::ValueError, std::string(name) + " shape " + shape_string(t.shape) +
                                        " has more bytes than a 64-bit address space holds");
    }
    if (t.data == nullptr) {
        fail(ErrorKind::ValueError, std::string(name) + ".data is null but its shape " +
                                        shape_string(t.shape) + " is not empty");
    }
    // Host data is read and written as whole elements.
    if (t.memory == Memory::Host && reinterpret_cast<uintptr_t>(t.data) % element_bytes(t.dtype) != 0) {
        fail(ErrorKind::ValueError, std::string(name) + ".data is not aligned to its " +
                                        std::to_string(element_bytes(t.dtype)) + "-byte " +
                                        dtype_name(t.dtype) + " elements");
    }
}

// Device memory is for the data tensors only: the per-channel ones are read
// and committed by the host.
void check_memory(const Tensor &t, const char *name, bool device_allowed) {
    if (t.memory != Memory::Host && t.memory != Memory::OpenCL && t.memory != Memory::CUDA) {
        fail(ErrorKind::ValueError, std::string(name) + ".memory is not a known Memory");
    }
    if (!device_allowed && t.memory != Memory::Host) {
        fail(ErrorKind::ValueError, std::string(name) + " is " + memory_name(t.memory) +
                                        " memory; per-channel tensors must be host memory");
    }
}

void check_channel_vector(const Tensor &t, const char *name, int64_t channels) {
    if (t.shape.size() != 1 || t.shape[0] != channels) {
        fail(ErrorKind::ValueError, std::string(name) + " must have shape [" +
                                        std::to_string(channels) + "] (C of input_x), got " +
                                        shape_string(t.shape));
    }
    check_dims_and_data(t, name);
    check_memory(t, name, false);
}

void check_saved_statistic(const Tensor &t, const char *name, int64_t channels) {
    if (t.dtype != DType::Float32) {
        fail(ErrorKind::TypeError, std::string(name) + " dtype must be Float32");
    }
    check_channel_vector(t, name, channels);
}

// input_x's view, from a shape whose element count is known to fit. An empty
// tensor is viewed as such whatever its other extents.
DataView view_of(const Tensor &x, Layout layout) {
    const auto &s = x.shape;
    DataView v;
    const bool channels_first = layout == Layout::NCHW;
    v.channels = channels_first ? s[1] : s.back();
    if (element_count(x) == 0) {
        // Saturating: only whether it is 0, 1 or more matters.
        std::vector<int64_t> others = s;
        others.erase(others.begin() + (channels_first ? 1 : s.size() - 1));
        v.outer = saturating_product(others.begin(), others.end());
        return v;
    }
    if (channels_first) {
        v.outer = s[0];
        v.inner = saturating_product(s.begin() + 2, s.end());
    } else {
        v.outer = saturating_product(s.begin(), s.end() - 1);
    }
    // With no spatial extent, channels are the dense axis: (N, C) is NHWC.
    v.nchw = channels_first && v.inner > 1;
    if (!v.nchw) {
        v.outer *= v.inner;
        v.inner = 1;
    }
    constexpr int64_t int32_max = std::numeric_limits<int32_t>::max();
    const int64_t largest_stride = v.nchw ? v.inner * v.channels : v.channels;
    if (v.inner > int32_max || v.outer > int32_max || largest_stride > int32_max) {
        fail(ErrorKind::ValueError, "input_x shape " + shape_string(s) +
                                        " needs an extent or stride beyond 2^31 - 1 elements");
    }
    return v;
}

// Aliasing. A tensor that hbn writes may share no byte with another
// argument, with one exception: output may be input_x itself (the same data,
// shape and dtype), which normalizes in place. Tensors that are only read
// may share memory freely (weight == bias; running_mean == running_var in
// inference). Host memory is compared by address range; a device tensor only
// by its handle, since sub-buffers of one allocation cannot be told apart.
struct Role {
    const Tensor *tensor = nullptr;
    const char *name = nullptr;
    bool written = false;
    uintptr_t begin = 0, end = 0;  // host bytes; a device tensor's handle in begin

    Role() = default;
    // `count`: the tensor's elements, known from validation.
    Role(const Tensor &t, int64_t count, const char *name_, bool written_)
        : tensor(&t), name(name_), written(written_) {
        begin = reinterpret_cast<uintptr_t>(t.data);
        end = t.memory == Memory::Host ? begin + count * element_bytes(t.dtype) : begin;
    }
    bool overlaps(const Role &other) const {
        if (tensor->memory != other.tensor->memory) {
            return false;
        }
        if (tensor->memory != Memory::Host) {
            return begin == other.begin;
        }
        return begin < other.end && other.begin < end;
    }
};

void check_aliasing(const ForwardArguments &args, bool training, int64_t data_count, int64_t channels) {
    std::array<Role, 8> roles = {Role(args.input_x, data_count, "input_x", false),
                                 Role(args.output, data_count, "output", true),
                                 Role(args.running_mean, channels, "running_mean", training),
                                 Role(args.running_var, channels, "running_var", training),
                                 Role(args.weight, channels, "weight", false),
                                 Role(args.bias, channels, "bias", false)};
    size_t count = 6;
    if (args.saved_mean != nullptr) {
        roles[count++] = Role(*args.saved_mean, channels, "saved_mean", true);
        roles[count++] = Role(*args.saved_inv_std, channels, "saved_inv_std", true);
    }
    for (size_t i = 0; i < count; i++) {
        for (size_t j = i + 1; j < count; j++) {
            const Role &a = roles[i], &b = roles[j];
            const bool in_place = a.tensor == &args.input_x && b.tensor == &args.output && a.begin == b.begin;
            if ((a.written || b.written) && !in_place && a.overlaps(b)) {
                const Role &written = a.written ? a : b;
                fail(ErrorKind::ValueError,
                     std::string(a.name) + " and " + b.name + " overlap in memory, but hbn writes " +
                         written.name + " (only output may be input_x itself, for in place)");
            }
        }
    }
}

}  // namespace

DataView validate_forward(const ForwardArguments &args, const BatchNormOptions &options, bool training) {
    const Tensor &x = args.input_x, &output = args.output;
    // NaN fails both comparisons, as it must.
    if (!(options.eps > 0 && options.eps <= 1)) {
        fail(ErrorKind::ValueError, "options.eps must be in (0, 1], got " + std::to_string(options.eps));
    }
    if (!(options.momentum >= 0 && options.momentum <= 1)) {
        fail(ErrorKind::ValueError,
             "options.momentum must be in [0, 1], got " + std::to_string(options.momentum));
    }
    if (options.layout != Layout::NCHW && options.layout != Layout::NHWC) {
        fail(ErrorKind::ValueError, "options.layout is not NCHW or NHWC");
    }
    if (options.device != Device::Auto && options.device != Device::CPU &&
        options.device != Device::OpenCL && options.device != Device::CUDA) {
        fail(ErrorKind::ValueError, "options.device is not a known Device");
    }

    if (!valid_dtype(x.dtype)) {
        fail(ErrorKind::TypeError, "input_x dtype must be Float16 or Float32");
    }
    if (!valid_dtype(output.dtype)) {
        fail(ErrorKind::TypeError, "output dtype must be Float16 or Float32");
    }
    if (output.dtype != x.dtype) {
        fail(ErrorKind::TypeError, std::string("output dtype ") + dtype_name(output.dtype) +
                                       " differs from input_x dtype " + dtype_name(x.dtype));
    }
    const std::array<std::pair<const Tensor *, const char *>, 4> params = {{
        {&args.running_mean, "running_mean"},
        {&args.running_var, "running_var"},
        {&args.weight, "weight"},
        {&args.bias, "bias"},
    }};
    for (const auto &[param, name] : params) {
        if (!valid_dtype(param->dtype)) {
            fail(ErrorKind::TypeError, std::string(name) + " dtype must be Float16 or Float32");
        }
        if (param->dtype != args.running_mean.dtype) {
            fail(ErrorKind::TypeError, std::string(name) + " dtype " + dtype_name(param->dtype) +
                                           " differs from running_mean dtype " +
                                           dtype_name(args.running_mean.dtype));
        }
    }

    if (x.shape.size() < 2) {
        fail(ErrorKind::ValueError, "input_x must have rank >= 2, got shape " + shape_string(x.shape));
    }
    check_memory(x, "input_x", true);
    check_memory(output, "output", true);
    check_dims_and_data(x, "input_x");
    if (output.shape != x.shape) {
        fail(ErrorKind::ValueError, "output shape " + shape_string(output.shape) +
                                        " differs from input_x shape " + shape_string(x.shape));
    }
    check_dims_and_data(output, "output");
    if (output.memory != x.memory) {
        fail(ErrorKind::ValueError, std::string("output is ") + memory_name(output.memory) +
                                        " memory but input_x is " + memory_name(x.memory) +
                                        " memory; they must live in the same place");
    }
    const DataView view = view_of(x, options.layout);
    for (const auto &[param, name] : params) {
        check_channel_vector(*param, name, view.channels);
    }
    if (args.saved_mean != nullptr) {
        check_saved_statistic(*args.saved_mean, "saved_mean", view.channels);
        check_saved_statistic(*args.saved_inv_std, "saved_inv_std", view.channels);
    }
    if (training && view.values_per_channel() < 2) {
        fail(ErrorKind::ValueError,
             "training needs more than one value per channel to form a variance, but input_x shape " +
                 shape_string(x.shape) + " has " + std::to_string(view.values_per_channel()));
    }
    check_aliasing(args, training, element_count(x), view.channels);
    return view;
}

}  // namespace hbn::internal
