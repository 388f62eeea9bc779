#include "validation.h"

#include "dtypes.h"
#include "halide_call.h"  // fail
#include "partition.h"    // needs_slices

#include <algorithm>
#include <array>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace hbn::internal {
namespace {

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
    int64_t bytes;
    if (__builtin_mul_overflow(count, element_bytes(t.dtype), &bytes)) {
        fail(ErrorKind::ValueError, std::string(name) + " shape " + shape_string(t.shape) +
                                        " has more bytes than a 64-bit address space holds");
    }
    if (t.data == nullptr) {
        fail(ErrorKind::ValueError, std::string(name) + ".data is null but its shape " +
                                        shape_string(t.shape) + " is not empty");
    }
    // Host data is read and written as whole elements (whose sizes are
    // powers of two).
    if (t.memory == Memory::Host && (reinterpret_cast<uintptr_t>(t.data) & (element_bytes(t.dtype) - 1)) != 0) {
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
    // Host memory is processed in slices; a device handle cannot be offset
    // (an OpenCL cl_mem).
    if (x.memory != Memory::Host && needs_slices(v)) {
        fail(ErrorKind::ValueError, "input_x shape " + shape_string(s) + " needs an extent or stride beyond 2^30 elements, "
                                        "which hbn processes in slices of host memory only, but input_x is " +
                                        memory_name(x.memory) + " memory");
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
    const Tensor *tensor;
    const char *name;
    bool written;
    uintptr_t begin, end;  // host bytes; a device tensor's handle in begin

    Role() = default;  // uninitialized: Roles holds 12, and a call reads only those it added
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

// A call's tensors (at most 12), without a heap allocation per call.
struct Roles {
    std::array<Role, 12> items;
    size_t count = 0;
    void add(const Role &role) { items[count++] = role; }
};

// A pair of tensors that may be the same memory: the call works in place,
// `target` (written) over `source` (read).
struct InPlace {
    const Tensor *source, *target;
};

// Fails if a tensor hbn writes overlaps another argument among `roles`,
// unless the two are one of the call's in-place pairs with the same data.
void check_aliasing(const Roles &roles, std::initializer_list<InPlace> in_place_pairs, const char *in_place_rule) {
    for (size_t i = 0; i < roles.count; i++) {
        for (size_t j = i + 1; j < roles.count; j++) {
            const Role &a = roles.items[i], &b = roles.items[j];
            if (!(a.written || b.written) || !a.overlaps(b)) {
                continue;
            }
            bool in_place = false;
            for (const InPlace &pair : in_place_pairs) {
                in_place = in_place || (((a.tensor == pair.source && b.tensor == pair.target) ||
                                         (a.tensor == pair.target && b.tensor == pair.source)) &&
                                        a.begin == b.begin);
            }
            if (!in_place) {
                const Role &written = a.written ? a : b;
                fail(ErrorKind::ValueError, std::string(a.name) + " and " + b.name +
                                                " overlap in memory, but hbn writes " + written.name + " (" +
                                                in_place_rule + ")");
            }
        }
    }
}

void check_options(const BatchNormOptions &options) {
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
    if (options.activation != Activation::None && options.activation != Activation::ReLU) {
        fail(ErrorKind::ValueError, "options.activation is not None or ReLU");
    }
}

// "Float16, Float32 or BFloat16": every DType's name.
std::string dtype_names() {
    std::string names;
    for (size_t i = 0; i < dtype_infos.size(); i++) {
        names += (i == 0 ? "" : i + 1 == dtype_infos.size() ? " or " : ", ");
        names += dtype_infos[i].name;
    }
    return names;
}

void check_dtype(const Tensor &t, const char *name) {
    if (!valid_dtype(t.dtype)) {
        fail(ErrorKind::TypeError, std::string(name) + " dtype must be " + dtype_names());
    }
}

// A tensor whose dtype must be `reference`'s.
void check_same_dtype(const Tensor &t, const char *name, const Tensor &reference, const char *reference_name) {
    check_dtype(t, name);
    if (t.dtype != reference.dtype) {
        fail(ErrorKind::TypeError, std::string(name) + " dtype " + dtype_name(t.dtype) + " differs from " +
                                       reference_name + " dtype " + dtype_name(reference.dtype));
    }
}

// The data tensor that the others are checked against.
void check_data(const Tensor &t, const char *name) {
    check_dtype(t, name);
    if (t.shape.size() < 2) {
        fail(ErrorKind::ValueError, std::string(name) + " must have rank >= 2, got shape " + shape_string(t.shape));
    }
    check_memory(t, name, true);
    check_dims_and_data(t, name);
}

// A data tensor of `reference`'s dtype and shape, in the same place.
void check_data_like(const Tensor &t, const char *name, const Tensor &reference, const char *reference_name) {
    check_same_dtype(t, name, reference, reference_name);
    check_memory(t, name, true);
    if (t.shape != reference.shape) {
        fail(ErrorKind::ValueError, std::string(name) + " shape " + shape_string(t.shape) + " differs from " +
                                        reference_name + " shape " + shape_string(reference.shape));
    }
    check_dims_and_data(t, name);
    if (t.memory != reference.memory) {
        fail(ErrorKind::ValueError, std::string(name) + " is " + memory_name(t.memory) + " memory but " +
                                        reference_name + " is " + memory_name(reference.memory) +
                                        " memory; they must live in the same place");
    }
}

void check_values_per_channel(const Tensor &x, const DataView &view) {
    if (view.values_per_channel() < 2) {
        fail(ErrorKind::ValueError,
             "training needs more than one value per channel to form a variance, but input_x shape " +
                 shape_string(x.shape) + " has " + std::to_string(view.values_per_channel()));
    }
}

// A statistic the mode needs, which a default Tensor{} would leave out.
void check_present(const Tensor &t, const char *name, bool training) {
    if (!given(t)) {
        fail(ErrorKind::ValueError, std::string("the backward in ") + (training ? "training" : "inference") +
                                        " mode needs " + name + ", but it is a default Tensor{} (rank 0)");
    }
}

}  // namespace

void check_global_values_per_channel(double count) {
    if (count < 2) {
        fail(ErrorKind::ValueError,
             "training needs more than one value per channel to form a variance, but the processes of "
             "options.all_reduce hold " +
                 std::to_string(static_cast<int64_t>(count)) + " together");
    }
}

DataView validate_forward(const ForwardArguments &args, const BatchNormOptions &options, bool training) {
    const Tensor &x = args.input_x;
    check_options(options);
    check_data(x, "input_x");
    check_data_like(args.output, "output", x, "input_x");
    const std::array<std::pair<const Tensor *, const char *>, 4> params = {{
        {&args.running_mean, "running_mean"},
        {&args.running_var, "running_var"},
        {&args.weight, "weight"},
        {&args.bias, "bias"},
    }};
    for (const auto &[param, name] : params) {
        check_same_dtype(*param, name, args.running_mean, "running_mean");
    }
    const DataView view = view_of(x, options.layout);
    for (const auto &[param, name] : params) {
        check_channel_vector(*param, name, view.channels);
    }
    if (args.saved_mean != nullptr) {
        check_saved_statistic(*args.saved_mean, "saved_mean", view.channels);
        check_saved_statistic(*args.saved_inv_std, "saved_inv_std", view.channels);
    }
    const Tensor &residual = options.residual;
    if (given(residual)) {
        check_data_like(residual, "options.residual", x, "input_x");
    }
    if (training && !options.all_reduce) {
        check_values_per_channel(x, view);
    }

    const int64_t data_count = element_count(x), channels = view.channels;
    Roles roles;
    roles.add(Role(x, data_count, "input_x", false));
    roles.add(Role(args.output, data_count, "output", true));
    if (given(residual)) {
        roles.add(Role(residual, data_count, "options.residual", false));
    }
    roles.add(Role(args.running_mean, channels, "running_mean", training));
    roles.add(Role(args.running_var, channels, "running_var", training));
    roles.add(Role(args.weight, channels, "weight", false));
    roles.add(Role(args.bias, channels, "bias", false));
    if (args.saved_mean != nullptr) {
        roles.add(Role(*args.saved_mean, channels, "saved_mean", true));
        roles.add(Role(*args.saved_inv_std, channels, "saved_inv_std", true));
    }
    check_aliasing(roles, {{&x, &args.output}, {&residual, &args.output}},
                   "only output may be input_x or options.residual itself, for in place");
    return view;
}

DataView validate_backward(const BackwardArguments &args, const BatchNormOptions &options) {
    const Tensor &dy = args.grad_output, &x = args.input_x;
    const bool training = options.training;
    check_options(options);
    check_data(dy, "grad_output");
    check_data_like(x, "input_x", dy, "grad_output");
    if (given(args.grad_input)) {
        check_data_like(args.grad_input, "grad_input", x, "input_x");
    }
    const bool relu = options.activation == Activation::ReLU;
    const Tensor &forward_output = options.forward_output, &grad_residual = options.grad_residual;
    if (relu && !given(forward_output)) {
        fail(ErrorKind::ValueError, "options.activation is ReLU, so the backward needs options.forward_output (the "
                                    "forward's output, whose sign masks grad_output), but it is a default Tensor{} "
                                    "(rank 0)");
    }
    if (relu) {
        check_data_like(forward_output, "options.forward_output", x, "input_x");
    }
    if (given(grad_residual)) {
        check_data_like(grad_residual, "options.grad_residual", x, "input_x");
    }
    check_dtype(args.weight, "weight");
    const Tensor &mean = training ? args.saved_mean : args.running_mean;
    const Tensor &spread = training ? args.saved_inv_std : args.running_var;
    const char *mean_name = training ? "saved_mean" : "running_mean";
    const char *spread_name = training ? "saved_inv_std" : "running_var";
    check_present(mean, mean_name, training);
    check_present(spread, spread_name, training);
    if (!training) {
        check_same_dtype(mean, mean_name, args.weight, "weight");
        check_same_dtype(spread, spread_name, args.weight, "weight");
    }
    const std::array<std::pair<const Tensor *, const char *>, 2> channel_gradients = {{
        {&args.grad_weight, "grad_weight"},
        {&args.grad_bias, "grad_bias"},
    }};
    for (const auto &[gradient, name] : channel_gradients) {
        if (given(*gradient)) {
            check_same_dtype(*gradient, name, args.weight, "weight");
        }
    }

    const DataView view = view_of(x, options.layout);
    const int64_t data_count = element_count(x), channels = view.channels;
    check_channel_vector(args.weight, "weight", channels);
    if (training) {
        check_saved_statistic(mean, mean_name, channels);
        check_saved_statistic(spread, spread_name, channels);
        if (!options.all_reduce) {
            check_values_per_channel(x, view);
        }
    } else {
        check_channel_vector(mean, mean_name, channels);
        check_channel_vector(spread, spread_name, channels);
    }
    Roles roles;
    roles.add(Role(dy, data_count, "grad_output", false));
    roles.add(Role(x, data_count, "input_x", false));
    roles.add(Role(args.weight, channels, "weight", false));
    roles.add(Role(mean, channels, mean_name, false));
    roles.add(Role(spread, channels, spread_name, false));
    if (given(args.grad_input)) {
        roles.add(Role(args.grad_input, data_count, "grad_input", true));
    }
    if (relu) {
        roles.add(Role(forward_output, data_count, "options.forward_output", false));
    }
    if (given(grad_residual)) {
        roles.add(Role(grad_residual, data_count, "options.grad_residual", true));
    }
    for (const auto &[gradient, name] : channel_gradients) {
        if (given(*gradient)) {
            check_channel_vector(*gradient, name, channels);
            roles.add(Role(*gradient, channels, name, true));
        }
    }
    // grad_residual's pass reads grad_output, so grad_input may not be
    // written over it then; grad_residual itself may (the mask is idempotent).
    if (given(grad_residual)) {
        check_aliasing(roles, {{&dy, &grad_residual}},
                       "with options.grad_residual, only options.grad_residual may be grad_output itself, for in place");
    } else {
        check_aliasing(roles, {{&dy, &args.grad_input}}, "only grad_input may be grad_output itself, for in place");
    }
    return view;
}

}  // namespace hbn::internal
