// libFuzzer target: bytes decode into calls of every public entry point of
// <hbn/batch_norm.h>, with shapes of zero, negative and huge extents (element
// counts and byte sizes beyond int64 among them), invalid enum values,
// extreme eps and momentum, null, misaligned and aliased data, and device
// memory kinds. The contract it asserts (a breach traps, naming it on stderr):
//  - a call returns or throws hbn::Error; any other exception is a crash;
//  - a throw leaves running_mean and running_var byte-for-byte unchanged;
//  - a non-empty input_x with any shape that has a negative extent, or more
//    elements or bytes than int64 holds, is a ValueError (a TypeError or
//    RuntimeError may come first where the call has those faults too);
//  - a call that returns had valid arguments: no bad value, enum, dtype,
//    shape, null or misaligned data, forbidden aliasing or GPU backend (this
//    build has none: CMake requires HBN_BACKENDS=cpu), and in inference left
//    the running statistics unchanged.
// Empty calls (input_x with an extent 0) need only return or throw
// hbn::Error. Every tensor's bytes end at a PROT_NONE page, so a kernel that
// reads past them faults: ASan does not see into the generated kernels. A
// shape too large to back with memory, but representable, is never passed,
// nor an alias that reaches past the memory it points into.
#include <fuzzer/FuzzedDataProvider.h>
#include <hbn/batch_norm.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

namespace {

using hbn::DType;
using hbn::Tensor;

constexpr int64_t max_elements = 1 << 14;  // backed tensors; 1 << 14 runs the parallel kernels
constexpr int64_t int64_max = std::numeric_limits<int64_t>::max();

[[noreturn]] void finding(const char *what) {
    std::fprintf(stderr, "hbn contract violated: %s\n", what);
    std::fflush(stderr);
    __builtin_trap();
}

// Memory whose usable bytes end exactly at a PROT_NONE page and start 16
// bytes or more after another: data - 1 (misaligned) and data - 4 (an
// overlapping output) stay inside, and reads past either end fault.
class GuardedBuffer {
public:
    explicit GuardedBuffer(size_t bytes) {
        page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
        const size_t usable = (bytes + 16 + page_ - 1) / page_ * page_;
        size_ = usable + 2 * page_;
        void *region = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (region == MAP_FAILED) {
            std::abort();
        }
        region_ = static_cast<unsigned char *>(region);
        if (mprotect(region_, page_, PROT_NONE) != 0 || mprotect(end(), page_, PROT_NONE) != 0) {
            std::abort();
        }
        data_ = end() - bytes;
    }
    ~GuardedBuffer() { munmap(region_, size_); }
    GuardedBuffer(const GuardedBuffer &) = delete;
    GuardedBuffer &operator=(const GuardedBuffer &) = delete;

    unsigned char *data() const { return data_; }
    // The accessible bytes from p on, where p points into them; else 0.
    size_t readable_from(uintptr_t p) const {
        const auto begin = reinterpret_cast<uintptr_t>(region_ + page_);
        const auto stop = reinterpret_cast<uintptr_t>(end());
        return p >= begin && p < stop ? stop - p : 0;
    }

private:
    unsigned char *end() const { return region_ + size_ - page_; }

    size_t page_ = 0, size_ = 0;
    unsigned char *region_ = nullptr, *data_ = nullptr;
};

bool valid_dtype(DType dtype) {
    return dtype == DType::Float16 || dtype == DType::Float32;
}

int64_t element_bytes(DType dtype) {
    return dtype == DType::Float16 ? 2 : 4;
}

// What a shape asks of memory. Empty: an extent 0 (whatever the others);
// Bad: otherwise a negative extent, or more elements or bytes than int64
// holds, which hbn must refuse; Huge: representable but too large to back
// here; Small: count elements, backed.
enum class Size { Empty, Bad, Huge, Small };
struct Extent {
    Size size;
    int64_t count;  // exact for Empty and Small
};

Extent extent_of(const Tensor &t) {
    if (std::find(t.shape.begin(), t.shape.end(), 0) != t.shape.end()) {
        return {Size::Empty, 0};
    }
    int64_t count = 1;
    for (int64_t e : t.shape) {
        if (e < 0) {
            return {Size::Bad, 0};
        }
    }
    for (int64_t e : t.shape) {
        if (__builtin_mul_overflow(count, e, &count)) {
            return {Size::Bad, 0};
        }
    }
    if (count > int64_max / element_bytes(t.dtype)) {
        return {Size::Bad, 0};
    }
    return {count > max_elements ? Size::Huge : Size::Small, count};
}

// A tensor's bytes as hbn would address them (Small and Empty shapes only).
size_t byte_size(const Tensor &t) {
    return static_cast<size_t>(extent_of(t).count * element_bytes(t.dtype));
}

// Most decisions take the valid choice; one in `odds` takes a fault, so that
// valid calls (which run the kernels) stay common and faults still combine.
// Once the input is used up, every decision is valid.
bool fault(FuzzedDataProvider &in, int odds) {
    return in.ConsumeIntegralInRange<int>(1, odds) == odds;
}

// One of `valid`, or with odds 1 in 8 one of `invalid` or any double.
template<size_t valid_count, size_t invalid_count>
double fuzz_double(FuzzedDataProvider &in, const double (&valid)[valid_count],
                   const double (&invalid)[invalid_count]) {
    if (!fault(in, 8)) {
        return valid[in.ConsumeIntegralInRange<size_t>(0, valid_count - 1)];
    }
    const size_t pick = in.ConsumeIntegralInRange<size_t>(0, invalid_count);
    return pick < invalid_count ? invalid[pick] : in.ConsumeFloatingPoint<double>();
}

constexpr double nan = std::numeric_limits<double>::quiet_NaN();
constexpr double inf = std::numeric_limits<double>::infinity();

double fuzz_eps(FuzzedDataProvider &in) {
    const double valid[] = {1e-5, 1e-3, 0.1, 1.0, 5e-324, 1e-300, 1e-45, 2.2250738585072014e-308};
    const double invalid[] = {0.0, -0.0, -5e-324, -1e-5, 1.0000001, 2.0, nan, inf, -inf,
                              std::numeric_limits<double>::max()};
    return fuzz_double(in, valid, invalid);
}

double fuzz_momentum(FuzzedDataProvider &in) {
    const double valid[] = {0.1, 0.0, -0.0, 1.0, 0.5, 5e-324, 0.9999999};
    const double invalid[] = {-5e-324, -0.1, 1.0000001, 2.0, nan, inf, -inf};
    return fuzz_double(in, valid, invalid);
}

// An extent: mostly small, else 0, negative or huge. 3037000500^2 and
// 5 * (2^63 - 3) overflow int64; 2^62 + 1 elements fit but not their bytes.
int64_t fuzz_extent(FuzzedDataProvider &in) {
    const int64_t small[] = {1, 2, 3, 4, 5, 7, 9, 16, 33};
    const int64_t odd[] = {0, -1, std::numeric_limits<int64_t>::min(), int64_t(1) << 31, int64_t(1) << 40,
                           3037000500, (int64_t(1) << 62) + 1, int64_max - 2, int64_max};
    return fault(in, 6) ? odd[in.ConsumeIntegralInRange<size_t>(0, std::size(odd) - 1)]
                        : small[in.ConsumeIntegralInRange<size_t>(0, std::size(small) - 1)];
}

// Any of an enum's values, or -1 or one past them.
template<typename Enum>
Enum fuzz_enum(FuzzedDataProvider &in, int valid_count) {
    return static_cast<Enum>(in.ConsumeIntegralInRange<int>(-1, valid_count));
}

// Fills in a tensor of `shape`, mostly of `dtype`, and returns the memory
// behind it: as many elements as the shape holds when Small or Empty, else
// a little that hbn must not read. Its data is mostly that memory, else
// null or misaligned.
std::unique_ptr<GuardedBuffer> make_tensor(FuzzedDataProvider &in, Tensor &t, std::vector<int64_t> shape,
                                           DType dtype) {
    t.shape = std::move(shape);
    t.dtype = fault(in, 32) ? fuzz_enum<DType>(in, 2) : dtype;
    t.memory = fault(in, 32) ? fuzz_enum<hbn::Memory>(in, 3) : hbn::Memory::Host;
    const Extent e = extent_of(t);
    const size_t bytes = e.size == Size::Small || e.size == Size::Empty ? byte_size(t) : 64;
    auto memory = std::make_unique<GuardedBuffer>(bytes);
    const std::vector<uint8_t> fill = in.ConsumeBytes<uint8_t>(bytes);
    std::copy(fill.begin(), fill.end(), memory->data());
    t.data = memory->data();
    if (fault(in, 16)) {
        t.data = in.ConsumeBool() ? nullptr : memory->data() - 1;  // null or misaligned
    }
    return memory;
}

// A call's tensors by role, as passed.
struct Call {
    bool training_entry = false;
    hbn::BatchNormOptions options;
    Tensor x, running_mean, running_var, weight, bias, output, saved_mean, saved_inv_std;

    bool training() const { return training_entry || options.training; }
    std::vector<const Tensor *> channel_tensors() const {
        std::vector<const Tensor *> t = {&running_mean, &running_var, &weight, &bias};
        if (training_entry) {
            t.insert(t.end(), {&saved_mean, &saved_inv_std});
        }
        return t;
    }
    std::vector<const Tensor *> tensors() const {
        std::vector<const Tensor *> t = channel_tensors();
        t.insert(t.begin(), {&x, &output});
        return t;
    }
    bool gpu_requested() const {
        return options.device == hbn::Device::OpenCL || options.device == hbn::Device::CUDA ||
               x.memory != hbn::Memory::Host || output.memory != hbn::Memory::Host;
    }
    bool type_fault() const {
        bool fault = !valid_dtype(x.dtype) || output.dtype != x.dtype || !valid_dtype(running_mean.dtype);
        for (const Tensor *t : {&running_var, &weight, &bias}) {
            fault = fault || t->dtype != running_mean.dtype;
        }
        return fault || (training_entry &&
                         (saved_mean.dtype != DType::Float32 || saved_inv_std.dtype != DType::Float32));
    }
};

// Whether a written tensor shares a byte with another argument, beyond
// output being input_x itself. Host tensors whose shapes are Small only.
bool forbidden_overlap(const Call &call) {
    struct Range {
        const Tensor *t;
        bool written;
    };
    std::vector<Range> ranges = {{&call.x, false},
                                 {&call.output, true},
                                 {&call.running_mean, call.training()},
                                 {&call.running_var, call.training()},
                                 {&call.weight, false},
                                 {&call.bias, false}};
    if (call.training_entry) {
        ranges.push_back({&call.saved_mean, true});
        ranges.push_back({&call.saved_inv_std, true});
    }
    for (size_t i = 0; i < ranges.size(); i++) {
        for (size_t j = i + 1; j < ranges.size(); j++) {
            const Tensor &a = *ranges[i].t, &b = *ranges[j].t;
            const bool in_place = i == 0 && j == 1 && a.data == b.data;
            const auto a_begin = reinterpret_cast<uintptr_t>(a.data);
            const auto b_begin = reinterpret_cast<uintptr_t>(b.data);
            const bool overlap = a_begin < b_begin + byte_size(b) && b_begin < a_begin + byte_size(a);
            if ((ranges[i].written || ranges[j].written) && !in_place && overlap) {
                return true;
            }
        }
    }
    return false;
}

// Why a non-empty call that returned should have thrown, or null. x has no
// extent 0, and no tensor is Huge.
const char *invalid_argument(const Call &call) {
    const hbn::BatchNormOptions &o = call.options;
    if (!(o.eps > 0 && o.eps <= 1)) {
        return "eps outside (0, 1] accepted";
    }
    if (!(o.momentum >= 0 && o.momentum <= 1)) {
        return "momentum outside [0, 1] accepted";
    }
    if (o.layout != hbn::Layout::NCHW && o.layout != hbn::Layout::NHWC) {
        return "an unknown Layout accepted";
    }
    if (o.device != hbn::Device::Auto && o.device != hbn::Device::CPU) {
        return "a Device this CPU-only build cannot run (or an unknown one) accepted";
    }
    if (call.type_fault()) {
        return "a bad or mismatched dtype accepted";
    }
    if (call.x.shape.size() < 2) {
        return "input_x of rank < 2 accepted";
    }
    if (call.output.shape != call.x.shape) {
        return "output of another shape than input_x accepted";
    }
    const int64_t channels = o.layout == hbn::Layout::NCHW ? call.x.shape[1] : call.x.shape.back();
    for (const Tensor *t : call.channel_tensors()) {
        if (t->shape != std::vector<int64_t>{channels}) {
            return "a per-channel tensor not of shape {C} accepted";
        }
    }
    for (const Tensor *t : call.tensors()) {
        if (extent_of(*t).size == Size::Bad) {
            return "a negative extent, or an element count or byte size beyond int64, accepted";
        }
        if (t->memory != hbn::Memory::Host) {
            return "device (or unknown) memory accepted by a CPU-only build";
        }
        if (t->data == nullptr || reinterpret_cast<uintptr_t>(t->data) % element_bytes(t->dtype) != 0) {
            return "null or misaligned data accepted";
        }
    }
    if (call.training() && extent_of(call.x).count / channels < 2) {
        return "training with fewer than two values per channel accepted";
    }
    if (forbidden_overlap(call)) {
        return "forbidden aliasing accepted";
    }
    return nullptr;
}

void fuzz_batch_norm(FuzzedDataProvider &in, bool training_entry) {
    Call call;
    call.training_entry = training_entry;
    hbn::BatchNormOptions &options = call.options;
    options.training = in.ConsumeBool();
    options.momentum = fuzz_momentum(in);
    options.eps = fuzz_eps(in);
    options.layout = fault(in, 32) ? fuzz_enum<hbn::Layout>(in, 2)
                                   : in.ConsumeBool() ? hbn::Layout::NHWC : hbn::Layout::NCHW;
    options.device = fault(in, 16) ? fuzz_enum<hbn::Device>(in, 4)
                                   : in.ConsumeBool() ? hbn::Device::CPU : hbn::Device::Auto;

    std::vector<int64_t> shape(fault(in, 16) ? in.ConsumeIntegralInRange<size_t>(0, 1)
                                             : in.ConsumeIntegralInRange<size_t>(2, 5));
    for (int64_t &e : shape) {
        e = fuzz_extent(in);
    }
    const int64_t channels =
        shape.size() < 2 ? 1 : options.layout == hbn::Layout::NHWC ? shape.back() : shape[1];
    std::vector<int64_t> channel_shape = {channels};
    if (fault(in, 16)) {
        switch (in.ConsumeIntegralInRange<int>(0, 2)) {
        case 0: channel_shape = {channels == int64_max ? 0 : channels + 1}; break;
        case 1: channel_shape = {}; break;
        default: channel_shape = {1, channels}; break;
        }
    }

    const DType data_dtype = in.ConsumeBool() ? DType::Float16 : DType::Float32;
    const DType param_dtype = in.ConsumeBool() ? DType::Float16 : DType::Float32;
    std::vector<std::unique_ptr<GuardedBuffer>> memory;
    memory.push_back(make_tensor(in, call.x, shape, data_dtype));
    memory.push_back(make_tensor(in, call.output, fault(in, 32) ? channel_shape : shape,
                                 fault(in, 32) ? param_dtype : data_dtype));
    for (Tensor *t : {&call.running_mean, &call.running_var, &call.weight, &call.bias}) {
        memory.push_back(make_tensor(in, *t, channel_shape, param_dtype));
    }
    for (Tensor *t : {&call.saved_mean, &call.saved_inv_std}) {
        memory.push_back(make_tensor(in, *t, channel_shape, fault(in, 32) ? DType::Float16 : DType::Float32));
    }
    for (Tensor *t : {&call.running_mean, &call.running_var, &call.weight, &call.bias, &call.saved_mean,
                      &call.saved_inv_std}) {
        if (extent_of(*t).size == Size::Huge) {
            t->shape = {1};  // shrunk to its memory: input_x (empty, or one to refuse) still runs
        }
    }

    // Aliasing, valid and not (none where the input is used up): the same
    // tensor twice, or data inside another's bytes. Pointer arithmetic on
    // integers: data may be null.
    const auto at = [](const Tensor &t, int64_t offset) {
        return reinterpret_cast<void *>(reinterpret_cast<uintptr_t>(t.data) + static_cast<uintptr_t>(offset));
    };
    switch (in.ConsumeIntegralInRange<int>(0, 29)) {
    case 1: call.running_var = call.running_mean; break;
    case 2: call.output = call.x; break;
    case 3: call.output.data = at(call.x, -element_bytes(call.x.dtype)); break;  // one element before
    case 4: {  // running_var inside output, at an element offset where it fits
        const int64_t room =
            static_cast<int64_t>(byte_size(call.output)) - static_cast<int64_t>(byte_size(call.running_var));
        const int64_t step = element_bytes(call.running_var.dtype);
        const int64_t offset = room > 0 ? in.ConsumeIntegralInRange<int64_t>(0, room / step) * step : 0;
        call.running_var.data = at(call.output, offset);
        break;
    }
    case 5: call.saved_mean = call.running_mean; break;
    case 6: call.bias = call.weight; break;
    case 7: call.saved_inv_std = call.saved_mean; break;
    case 8: call.weight = call.running_var; break;
    case 9: call.running_mean.data = call.x.data; break;
    case 10: call.saved_mean.data = call.output.data; break;
    default: break;
    }

    // The accessible bytes from a tensor's data on.
    const auto readable = [&](const Tensor &t) {
        size_t bytes = 0;
        for (const auto &m : memory) {
            bytes = std::max(bytes, m->readable_from(reinterpret_cast<uintptr_t>(t.data)));
        }
        return bytes;
    };
    // hbn may read whatever a call names, even one it refuses, so each
    // tensor must lie in memory (null ones aside): no Huge shape (which
    // needs real memory) and no alias that reaches past the bytes it points
    // into. Bad shapes are never addressable, so never read.
    for (const Tensor *t : call.tensors()) {
        const Size size = extent_of(*t).size;
        const bool outside = size == Size::Small && t->data != nullptr && readable(*t) < byte_size(*t);
        if (size == Size::Huge || outside) {
            return;
        }
    }

    // The running statistics' bytes.
    const auto snapshot = [&](const Tensor &t) {
        const size_t bytes = extent_of(t).size == Size::Small && t.data != nullptr ? byte_size(t) : 0;
        const auto *p = static_cast<const unsigned char *>(t.data);
        return std::vector<unsigned char>(p, p + bytes);
    };
    const auto mean_before = snapshot(call.running_mean), var_before = snapshot(call.running_var);
    const Size x_size = extent_of(call.x).size;
    bool bad_shape = false;
    for (const Tensor *t : call.tensors()) {
        bad_shape = bad_shape || extent_of(*t).size == Size::Bad;
    }
    bad_shape = bad_shape && x_size != Size::Empty;

    try {
        if (training_entry) {
            hbn::batch_norm_training(call.x, call.running_mean, call.running_var, call.weight, call.bias,
                                     call.output, call.saved_mean, call.saved_inv_std, options);
        } else {
            hbn::batch_norm(call.x, call.running_mean, call.running_var, call.weight, call.bias, call.output,
                            options);
        }
    } catch (const hbn::Error &e) {
        const bool expected_kind = e.kind() == hbn::ErrorKind::ValueError ||
                                   (e.kind() == hbn::ErrorKind::TypeError && call.type_fault()) ||
                                   (e.kind() == hbn::ErrorKind::RuntimeError && call.gpu_requested());
        const bool unchanged =
            snapshot(call.running_mean) == mean_before && snapshot(call.running_var) == var_before;
        if (!unchanged || (bad_shape && !expected_kind)) {
            std::fprintf(stderr, "hbn::Error (kind %d): %s\n", static_cast<int>(e.kind()), e.what());
            finding(unchanged ? "a shape with a negative extent or beyond int64 was not a ValueError"
                              : "a call that threw changed the running statistics");
        }
        return;
    }
    if (x_size == Size::Empty) {
        return;
    }
    if (const char *why = invalid_argument(call)) {
        finding(why);
    }
    if (!call.training() &&
        (snapshot(call.running_mean) != mean_before || snapshot(call.running_var) != var_before)) {
        finding("inference changed the running statistics");
    }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    setenv("HBN_DEVICE", "cpu", 1);  // Device::Auto on the CPU, whatever the environment says
    // Device tensors here carry made-up handles, which no driver can check:
    // HL_GPU_DEVICE=-1 names no device, so every GPU backend that is built is
    // unusable, and a device call must fail before it touches a handle.
    setenv("HL_GPU_DEVICE", "-1", 1);
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    FuzzedDataProvider in(data, size);
    try {
        switch (in.ConsumeIntegralInRange<int>(0, 9)) {
        case 0: hbn::backend_status(fuzz_enum<hbn::Device>(in, 4)); break;
        case 1: hbn::auto_device(); break;
        case 2:
            if (hbn::device_name(fuzz_enum<hbn::Device>(in, 4)) == nullptr) {
                finding("device_name returned null");
            }
            break;
        case 3: hbn::opencl_context(); break;
        case 4: hbn::cuda_context(); break;
        case 5:
        case 6: fuzz_batch_norm(in, true); break;
        default: fuzz_batch_norm(in, false); break;
        }
    } catch (const hbn::Error &e) {
        if (e.kind() != hbn::ErrorKind::TypeError && e.kind() != hbn::ErrorKind::ValueError &&
            e.kind() != hbn::ErrorKind::RuntimeError) {
            finding("an hbn::Error of no known kind");
        }
    }
    return 0;
}
