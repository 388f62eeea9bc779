// libFuzzer target: bytes decode into calls of every public entry point of
// <hbn/batch_norm.h>, with shapes of zero, negative and huge extents, invalid
// enum values, extreme eps and momentum, null, misaligned and aliased data,
// and device memory kinds. The contract it asserts: a call returns or throws
// hbn::Error (anything else traps); a throw leaves the running statistics
// byte-for-byte unchanged; a shape whose element count overflows 64 bits is
// a ValueError. Every tensor ends at a PROT_NONE page, so that a kernel
// reading past it faults (ASan does not see into the generated kernels).
#include <fuzzer/FuzzedDataProvider.h>
#include <hbn/batch_norm.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

namespace {

constexpr int64_t max_elements = 1 << 14;  // real buffers only up to this size

// `bytes` of memory that end exactly at an inaccessible page.
class GuardedBuffer {
public:
    explicit GuardedBuffer(size_t bytes) {
        const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
        size_ = (bytes + page - 1) / page * page + page;
        void *region = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (region == MAP_FAILED) {
            std::abort();
        }
        region_ = static_cast<unsigned char *>(region);
        mprotect(region_ + size_ - page, page, PROT_NONE);
        data_ = region_ + size_ - page - bytes;
    }
    ~GuardedBuffer() { munmap(region_, size_); }
    GuardedBuffer(const GuardedBuffer &) = delete;
    GuardedBuffer &operator=(const GuardedBuffer &) = delete;
    unsigned char *data() const { return data_; }
    // The bytes readable from `p` on, where p points into this buffer's pages.
    size_t readable_from(const void *p) const {
        const auto *byte = static_cast<const unsigned char *>(p);
        const unsigned char *end = region_ + size_ - static_cast<size_t>(sysconf(_SC_PAGESIZE));
        return byte >= region_ && byte < end ? static_cast<size_t>(end - byte) : 0;
    }

private:
    unsigned char *region_ = nullptr, *data_ = nullptr;
    size_t size_ = 0;
};

// The exact element count, or -1 where it overflows int64 (or an extent is
// negative: hbn rejects that first).
int64_t element_count(const std::vector<int64_t> &shape) {
    int64_t count = 1;
    bool overflow = false;
    for (int64_t e : shape) {
        if (e < 0) {
            return -1;
        }
        if (e == 0) {
            return 0;
        }
        overflow = overflow || __builtin_mul_overflow(count, e, &count);
    }
    return overflow ? -1 : count;
}

int64_t element_bytes(hbn::DType dtype) {
    return dtype == hbn::DType::Float16 ? 2 : 4;
}

double special_double(FuzzedDataProvider &in) {
    const double specials[] = {0.0,
                               -0.0,
                               1e-5,
                               0.1,
                               0.5,
                               1.0,
                               1.0000001,
                               -1e-300,
                               5e-324,
                               1e-300,
                               1e-45,
                               std::numeric_limits<double>::quiet_NaN(),
                               std::numeric_limits<double>::infinity(),
                               -std::numeric_limits<double>::infinity(),
                               std::numeric_limits<double>::max()};
    const size_t pick = in.ConsumeIntegralInRange<size_t>(0, std::size(specials));
    return pick < std::size(specials) ? specials[pick] : in.ConsumeFloatingPoint<double>();
}

int64_t extent(FuzzedDataProvider &in) {
    const int64_t extents[] = {0, 1, 2, 3, 4, 5, 7, 9, 16, 33, -1, int64_t(1) << 31, int64_t(1) << 40,
                               3037000500, (int64_t(1) << 62) + 1, std::numeric_limits<int64_t>::max() - 2,
                               std::numeric_limits<int64_t>::max()};
    return extents[in.ConsumeIntegralInRange<size_t>(0, std::size(extents) - 1)];
}

// A tensor the fuzzer owns: its shape and dtype as given, and memory for as
// many elements as the shape holds, or (for a shape too large to back) a
// little memory behind a shape the call must reject or never read.
struct FuzzTensor {
    hbn::Tensor view;
    std::unique_ptr<GuardedBuffer> memory;
};

FuzzTensor make_tensor(FuzzedDataProvider &in, std::vector<int64_t> shape) {
    FuzzTensor t;
    t.view.shape = std::move(shape);
    t.view.dtype = static_cast<hbn::DType>(in.ConsumeIntegralInRange<int>(0, 9) == 0 ? 2 : in.ConsumeBool());
    const int memory = in.ConsumeIntegralInRange<int>(0, 19);
    t.view.memory = memory < 17 ? hbn::Memory::Host : static_cast<hbn::Memory>(memory - 16);
    const int64_t count = element_count(t.view.shape);
    const int64_t bytes = count >= 0 && count <= max_elements ? count * element_bytes(t.view.dtype) : 64;
    t.memory = std::make_unique<GuardedBuffer>(static_cast<size_t>(bytes));
    const std::vector<uint8_t> fill = in.ConsumeBytes<uint8_t>(static_cast<size_t>(bytes));
    if (!fill.empty()) {
        std::memcpy(t.memory->data(), fill.data(), fill.size());
    }
    switch (in.ConsumeIntegralInRange<int>(0, 15)) {
    case 0: t.view.data = nullptr; break;
    case 1: t.view.data = t.memory->data() - 1; break;  // misaligned: to be rejected unread
    default: t.view.data = t.memory->data(); break;
    }
    return t;
}

// Whether the call may run with these buffers: every shape either fits the
// memory behind it or cannot be valid (an element count beyond int64).
bool backed(const FuzzTensor &t) {
    const int64_t count = element_count(t.view.shape);
    return count < 0 ? true : count <= max_elements;
}

bool overflows(const FuzzTensor &t) {
    for (int64_t e : t.view.shape) {
        if (e < 0) {
            return false;  // a negative extent is the error then
        }
    }
    return element_count(t.view.shape) < 0;
}

void check_error_kind(const hbn::Error &e) {
    const auto kind = static_cast<int>(e.kind());
    if (kind < 0 || kind > 2 || std::strlen(e.what()) == 0) {
        __builtin_trap();
    }
}

void fuzz_batch_norm(FuzzedDataProvider &in, bool training_entry) {
    hbn::BatchNormOptions options;
    options.training = in.ConsumeBool();
    options.momentum = special_double(in);
    options.eps = special_double(in);
    options.layout = static_cast<hbn::Layout>(in.ConsumeIntegralInRange<int>(0, 8) == 0 ? 2 : in.ConsumeBool());
    const int device = in.ConsumeIntegralInRange<int>(0, 9);
    options.device = device < 6 ? hbn::Device::Auto : static_cast<hbn::Device>(device - 6);

    std::vector<int64_t> shape(in.ConsumeIntegralInRange<size_t>(0, 5));
    for (int64_t &e : shape) {
        e = extent(in);
    }
    const bool nhwc = options.layout == hbn::Layout::NHWC;
    const int64_t channels = shape.size() < 2 ? 1 : nhwc ? shape.back() : shape[1];
    std::vector<int64_t> channel_shape = {channels};
    switch (in.ConsumeIntegralInRange<int>(0, 9)) {
    case 0: channel_shape = {channels == std::numeric_limits<int64_t>::max() ? 0 : channels + 1}; break;
    case 1: channel_shape = {}; break;
    case 2: channel_shape = {1, channels}; break;
    default: break;
    }

    FuzzTensor x = make_tensor(in, shape);
    FuzzTensor output = make_tensor(in, in.ConsumeIntegralInRange<int>(0, 15) == 0 ? channel_shape : shape);
    FuzzTensor params[6];  // running_mean, running_var, weight, bias, saved_mean, saved_inv_std
    for (FuzzTensor &p : params) {
        p = make_tensor(in, channel_shape);
    }
    hbn::Tensor running_mean = params[0].view, running_var = params[1].view, weight = params[2].view,
                bias = params[3].view, saved_mean = params[4].view, saved_inv_std = params[5].view;
    hbn::Tensor input_x = x.view, out = output.view;
    switch (in.ConsumeIntegralInRange<int>(0, 15)) {  // aliasing
    case 0: running_var = running_mean; break;
    case 1: out = input_x; break;
    case 2:  // overlapping input_x, one element before it (integer arithmetic: data may be null)
        out.data = reinterpret_cast<void *>(reinterpret_cast<uintptr_t>(input_x.data) -
                                            static_cast<uintptr_t>(element_bytes(input_x.dtype)));
        break;
    case 3: running_var.data = out.data; break;
    case 4: saved_mean = running_mean; break;
    case 5: bias = weight; break;
    case 6: saved_inv_std = saved_mean; break;
    case 7: weight = running_var; break;
    default: break;
    }
    const FuzzTensor *owners[] = {&x, &output, &params[0], &params[1], &params[2], &params[3], &params[4], &params[5]};
    for (const FuzzTensor *t : owners) {
        if (!backed(*t)) {
            return;  // a large valid shape: it would need real memory
        }
    }

    // The running statistics' bytes (as far as the memory behind them goes),
    // to compare after a throw.
    const auto snapshot = [&](const hbn::Tensor &t) {
        const int64_t count = element_count(t.shape);
        size_t bytes = count > 0 && count <= max_elements ? count * element_bytes(t.dtype) : 0;
        size_t readable = 0;
        for (const FuzzTensor *owner : owners) {
            readable = std::max(readable, owner->memory->readable_from(t.data));
        }
        const auto *begin = static_cast<const unsigned char *>(t.data);
        return std::vector<unsigned char>(begin, begin + std::min(bytes, readable));
    };
    const auto mean_before = snapshot(running_mean), var_before = snapshot(running_var);
    const bool must_reject = overflows(x);
    try {
        if (training_entry) {
            hbn::batch_norm_training(input_x, running_mean, running_var, weight, bias, out, saved_mean,
                                     saved_inv_std, options);
        } else {
            hbn::batch_norm(input_x, running_mean, running_var, weight, bias, out, options);
        }
        if (must_reject && !(input_x.shape.size() < 2)) {
            __builtin_trap();  // an overflowing shape ran
        }
    } catch (const hbn::Error &e) {
        check_error_kind(e);
        if (snapshot(running_mean) != mean_before || snapshot(running_var) != var_before) {
            __builtin_trap();  // a failed call changed the running statistics
        }
    }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    // Device tensors here carry made-up handles, which no driver can check:
    // HL_GPU_DEVICE=-1 names no device, so every GPU backend is unusable and
    // a device call must fail cleanly. HBN_DEVICE=cpu keeps Auto off probes.
    setenv("HL_GPU_DEVICE", "-1", 1);
    setenv("HBN_DEVICE", "cpu", 1);
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    FuzzedDataProvider in(data, size);
    const auto device = [&] { return static_cast<hbn::Device>(in.ConsumeIntegralInRange<int>(0, 5)); };
    try {
        switch (in.ConsumeIntegralInRange<int>(0, 9)) {
        case 0: hbn::backend_status(device()); break;
        case 1: hbn::auto_device(); break;
        case 2:
            if (hbn::device_name(device()) == nullptr) {
                __builtin_trap();
            }
            break;
        case 3: hbn::opencl_context(); break;
        case 4: hbn::cuda_context(); break;
        case 5:
        case 6: fuzz_batch_norm(in, true); break;
        default: fuzz_batch_norm(in, false); break;
        }
    } catch (const hbn::Error &e) {
        check_error_kind(e);
    }
    return 0;
}
