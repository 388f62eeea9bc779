// libFuzzer target: bytes decode into calls of every public entry point of
// <hbn/batch_norm.h>, with shapes of zero, negative and huge extents (element
// counts and byte sizes beyond int64 among them), invalid enum values,
// extreme eps and momentum, null, misaligned and aliased data, device memory
// kinds, the fused epilogue (options.activation, and options.residual,
// forward_output and grad_residual, each passed to both directions though
// one ignores it), and, in the backward, default Tensor{}s for the optional
// tensors (the gradients, either pair of statistics). The contract it
// asserts (a breach traps, naming it on stderr):
//  - a call returns or throws hbn::Error; any other exception is a crash;
//  - a throw writes nothing: every argument (output, the running and saved
//    statistics, grad_input, grad_weight, grad_bias and grad_residual among
//    them) is left byte-for-byte unchanged;
//  - a non-empty input_x with any shape that a call checks having a negative
//    extent, or more elements or bytes than int64 holds, is a ValueError (a
//    TypeError or RuntimeError may come first where the call has those
//    faults too); so is an unknown options.activation, and a backward given
//    a default Tensor{} for a statistic its mode uses (training: saved_mean,
//    saved_inv_std; inference: running_mean, running_var) or, with ReLU, for
//    options.forward_output;
//  - a call that returns had valid arguments: no bad value, enum, dtype,
//    shape, null or misaligned data, missing statistic, forbidden aliasing
//    or unusable GPU backend (LLVMFuzzerInitialize makes every GPU backend
//    the build has unusable, so a GPU call must fail).
//    The backward checks neither the statistics its mode does not use, nor
//    the gradients it is not asked for (a default Tensor{}, rank 0), nor
//    forward_output without ReLU, nor residual; the forward checks neither
//    forward_output nor grad_residual;
//  - a non-empty call with valid arguments returns;
//  - a call that returns left what it does not write (the forward writes
//    output, and in training the running and saved statistics; the backward
//    its gradients, grad_residual among them) unchanged, bar what a tensor
//    it writes overlaps: input_x or the residual under output, grad_output
//    under grad_input or grad_residual (in place), or an argument it does not
//    check.
// Empty calls (input_x with an extent 0) need only return or throw
// hbn::Error; an empty backward that returns leaves grad_weight and
// grad_bias, where given, all zero. Every tensor's bytes end at a PROT_NONE
// page, so a kernel that reads past them faults: ASan does not see into the
// generated kernels. A shape too large to back with memory, but
// representable, is never passed, nor an alias that reaches past the memory
// it points into.
#include <fuzzer/FuzzedDataProvider.h>
#include <hbn/batch_norm.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iterator>
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

constexpr DType valid_dtypes[] = {DType::Float16, DType::Float32, DType::BFloat16};

bool valid_dtype(DType dtype) {
    return std::find(std::begin(valid_dtypes), std::end(valid_dtypes), dtype) != std::end(valid_dtypes);
}

int64_t element_bytes(DType dtype) {
    return dtype == DType::Float32 ? 4 : 2;
}

DType fuzz_dtype(FuzzedDataProvider &in) {
    return in.PickValueInArray(valid_dtypes);
}

DType other_dtype(DType dtype) {
    return dtype == DType::Float32 ? DType::Float16 : DType::Float32;
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

// Whether an optional tensor is given: a default Tensor{} (rank 0) is not.
bool given(const Tensor &t) {
    return !t.shape.empty();
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
    t.dtype = fault(in, 32) ? fuzz_enum<DType>(in, static_cast<int>(std::size(valid_dtypes))) : dtype;
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

// The options both directions take, valid or not, but for the epilogue's
// tensors (fuzz_epilogue); options.training picks the mode
// (batch_norm_training runs in training whatever it says).
hbn::BatchNormOptions fuzz_options(FuzzedDataProvider &in) {
    hbn::BatchNormOptions options;
    options.training = in.ConsumeBool();
    options.momentum = fuzz_momentum(in);
    options.eps = fuzz_eps(in);
    options.layout = fault(in, 32) ? fuzz_enum<hbn::Layout>(in, 2)
                                   : in.ConsumeBool() ? hbn::Layout::NHWC : hbn::Layout::NCHW;
    options.device = fault(in, 16) ? fuzz_enum<hbn::Device>(in, 4)
                                   : in.ConsumeBool() ? hbn::Device::CPU : hbn::Device::Auto;
    options.activation = fault(in, 32) ? fuzz_enum<hbn::Activation>(in, 2)
                                       : in.ConsumeBool() ? hbn::Activation::ReLU : hbn::Activation::None;
    return options;
}

// A data tensor's shape, mostly of rank 2 to 5, and the per-channel shape
// {C} that goes with it under `layout`, else one of another length or rank.
struct Shapes {
    std::vector<int64_t> data, channel;
};
Shapes fuzz_shapes(FuzzedDataProvider &in, hbn::Layout layout) {
    Shapes s;
    s.data.resize(fault(in, 16) ? in.ConsumeIntegralInRange<size_t>(0, 1)
                                : in.ConsumeIntegralInRange<size_t>(2, 5));
    for (int64_t &e : s.data) {
        e = fuzz_extent(in);
    }
    const int64_t channels = s.data.size() < 2 ? 1 : layout == hbn::Layout::NHWC ? s.data.back() : s.data[1];
    s.channel = {channels};
    if (fault(in, 16)) {
        switch (in.ConsumeIntegralInRange<int>(0, 2)) {
        case 0: s.channel = {channels == int64_max ? 0 : channels + 1}; break;
        case 1: s.channel = {}; break;
        default: s.channel = {1, channels}; break;
        }
    }
    return s;
}

// Per-channel tensors whose shape is Huge, shrunk to the memory behind them,
// so that input_x (empty, or one to refuse) still runs.
void shrink_huge(std::initializer_list<Tensor *> tensors) {
    for (Tensor *t : tensors) {
        if (extent_of(*t).size == Size::Huge) {
            t->shape = {1};
        }
    }
}

// Aliases: data `offset` bytes from t's (integer arithmetic: data may be
// null), and data inside outer's bytes at an element offset where inner
// fits.
void *offset_data(const Tensor &t, int64_t offset) {
    return reinterpret_cast<void *>(reinterpret_cast<uintptr_t>(t.data) + static_cast<uintptr_t>(offset));
}
void *data_inside(FuzzedDataProvider &in, const Tensor &outer, const Tensor &inner) {
    const int64_t room = static_cast<int64_t>(byte_size(outer)) - static_cast<int64_t>(byte_size(inner));
    const int64_t step = element_bytes(inner.dtype);
    return offset_data(outer, room > 0 ? in.ConsumeIntegralInRange<int64_t>(0, room / step) * step : 0);
}

using Memories = std::vector<std::unique_ptr<GuardedBuffer>>;

// Adds a tensor mostly of its role's shape (a data tensor's, else {C}) and
// dtype, else a data tensor of shape {C} or a mismatched valid dtype
// (make_tensor adds bad dtypes, device memory, null and misaligned data).
void add_tensor(FuzzedDataProvider &in, Memories &memory, Tensor &t, const Shapes &shapes, bool data,
                DType dtype) {
    const bool other_shape = data && fault(in, 32);
    const bool other_type = fault(in, 32);
    memory.push_back(make_tensor(in, t, data && !other_shape ? shapes.data : shapes.channel,
                                 other_type ? other_dtype(dtype) : dtype));
}

// The epilogue's data tensors, each left out (a default Tensor{}) one time in
// four. Both directions get all three, so that the one that ignores a tensor
// runs with it there (and must leave it unchanged).
void fuzz_epilogue(FuzzedDataProvider &in, hbn::BatchNormOptions &options, const Shapes &shapes, DType dtype,
                   Memories &memory) {
    for (Tensor *t : {&options.residual, &options.forward_output, &options.grad_residual}) {
        if (!fault(in, 4)) {
            add_tensor(in, memory, *t, shapes, true, dtype);
        }
    }
}

// The accessible bytes from a tensor's data on.
size_t readable(const Memories &memory, const Tensor &t) {
    size_t bytes = 0;
    for (const auto &m : memory) {
        bytes = std::max(bytes, m->readable_from(reinterpret_cast<uintptr_t>(t.data)));
    }
    return bytes;
}

// hbn may read whatever a call names, even one it refuses, so each tensor
// must lie in memory (null ones aside): no Huge shape (which needs real
// memory) and no alias that reaches past the bytes it points into. Bad
// shapes are never addressable, so never read.
bool in_memory(const Memories &memory, const std::vector<const Tensor *> &tensors) {
    for (const Tensor *t : tensors) {
        const Size size = extent_of(*t).size;
        if (size == Size::Huge ||
            (size == Size::Small && t->data != nullptr && readable(memory, *t) < byte_size(*t))) {
            return false;
        }
    }
    return true;
}

// A tensor's bytes, where its shape is Small and its data not null.
std::vector<unsigned char> snapshot(const Tensor &t) {
    const size_t bytes = extent_of(t).size == Size::Small && t.data != nullptr ? byte_size(t) : 0;
    const auto *p = static_cast<const unsigned char *>(t.data);
    return std::vector<unsigned char>(p, p + bytes);
}
std::vector<std::vector<unsigned char>> snapshots(const std::vector<const Tensor *> &tensors) {
    std::vector<std::vector<unsigned char>> bytes;
    for (const Tensor *t : tensors) {
        bytes.push_back(snapshot(*t));
    }
    return bytes;
}

// Whether two tensors share a byte (Small or Empty shapes; Bad ones have
// none).
bool overlap(const Tensor &a, const Tensor &b) {
    const auto a_begin = reinterpret_cast<uintptr_t>(a.data);
    const auto b_begin = reinterpret_cast<uintptr_t>(b.data);
    return a_begin < b_begin + byte_size(b) && b_begin < a_begin + byte_size(a);
}

// A tensor of a call, and whether the call writes it.
struct Range {
    const Tensor *t;
    bool written;
};

// A pair of tensors that may be the same memory, in place: `target`
// (written) with the same data as `source` (read).
struct InPlace {
    const Tensor *source, *target;
};

// Whether a written tensor among `ranges` shares a byte with another, beyond
// the call's in-place pairs. Host tensors whose shapes are Small only.
bool forbidden_overlap(const std::vector<Range> &ranges, const std::vector<InPlace> &in_place) {
    for (size_t i = 0; i < ranges.size(); i++) {
        for (size_t j = i + 1; j < ranges.size(); j++) {
            const Tensor &a = *ranges[i].t, &b = *ranges[j].t;
            const bool pair = std::any_of(in_place.begin(), in_place.end(), [&](const InPlace &p) {
                return (&a == p.source && &b == p.target) || (&a == p.target && &b == p.source);
            });
            if ((ranges[i].written || ranges[j].written) && !(pair && a.data == b.data) && overlap(a, b)) {
                return true;
            }
        }
    }
    return false;
}

// Whether a call that returned changed one of `tensors` (whose bytes were
// `before`) that none of `written`, the tensors it writes, overlaps.
bool changed_unwritten(const std::vector<const Tensor *> &tensors,
                       const std::vector<std::vector<unsigned char>> &before,
                       const std::vector<const Tensor *> &written) {
    for (size_t i = 0; i < tensors.size(); i++) {
        const Tensor &t = *tensors[i];
        const bool overwritten =
            std::any_of(written.begin(), written.end(), [&](const Tensor *w) { return overlap(*w, t); });
        if (!overwritten && snapshot(t) != before[i]) {
            return true;
        }
    }
    return false;
}

bool known_activation(hbn::Activation a) {
    return a == hbn::Activation::None || a == hbn::Activation::ReLU;
}

// Argument checks that both directions share, each giving why a call that
// returned should have thrown, or null.

const char *invalid_options(const hbn::BatchNormOptions &o) {
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
    if (!known_activation(o.activation)) {
        return "an unknown Activation accepted";
    }
    return nullptr;
}

// x of rank >= 2 under a known layout; C its channel extent.
int64_t channels_of(const Tensor &x, hbn::Layout layout) {
    return layout == hbn::Layout::NCHW ? x.shape[1] : x.shape.back();
}

// input_x of rank >= 2, each of `like_x` of its shape, each of
// `per_channel` of shape {C}.
const char *invalid_shapes(const Tensor &x, const std::vector<const Tensor *> &like_x,
                           const std::vector<const Tensor *> &per_channel, hbn::Layout layout) {
    if (x.shape.size() < 2) {
        return "input_x of rank < 2 accepted";
    }
    for (const Tensor *t : like_x) {
        if (t->shape != x.shape) {
            return "a data tensor (output, grad_output, grad_input, an epilogue's) of another shape than input_x "
                   "accepted";
        }
    }
    for (const Tensor *t : per_channel) {
        if (t->shape != std::vector<int64_t>{channels_of(x, layout)}) {
            return "a per-channel tensor not of shape {C} accepted";
        }
    }
    return nullptr;
}

// Each tensor's extents, memory and data.
const char *invalid_tensors(const std::vector<const Tensor *> &tensors) {
    for (const Tensor *t : tensors) {
        if (extent_of(*t).size == Size::Bad) {
            return "a negative extent, or an element count or byte size beyond int64, accepted";
        }
        if (t->memory != hbn::Memory::Host) {
            return "device (or unknown) memory accepted with every GPU backend unusable";
        }
        if (t->data == nullptr || reinterpret_cast<uintptr_t>(t->data) % element_bytes(t->dtype) != 0) {
            return "null or misaligned data accepted";
        }
    }
    return nullptr;
}

// Training: x (of valid shape, no extent 0) needs M >= 2 values per channel.
const char *too_few_values(const Tensor &x, hbn::Layout layout) {
    return extent_of(x).count / channels_of(x, layout) < 2
               ? "training with fewer than two values per channel accepted"
               : nullptr;
}

// Whether a call whose arguments include a ValueError's fault threw a kind
// those faults allow (another fault of the call may be found first).
bool allowed_kind(const hbn::Error &e, bool type_fault, bool gpu_requested) {
    return e.kind() == hbn::ErrorKind::ValueError || (e.kind() == hbn::ErrorKind::TypeError && type_fault) ||
           (e.kind() == hbn::ErrorKind::RuntimeError && gpu_requested);
}

[[noreturn]] void finding_after(const hbn::Error &e, const char *what) {
    std::fprintf(stderr, "hbn::Error (kind %d): %s\n", static_cast<int>(e.kind()), e.what());
    finding(what);
}

bool device_memory(const Tensor &t) {
    return t.memory != hbn::Memory::Host;
}
bool gpu_device(hbn::Device device) {
    return device == hbn::Device::OpenCL || device == hbn::Device::CUDA;
}

// Forward ---------------------------------------------------------------------

// A forward call's tensors by role, as passed.
// What a call (Call, BackwardCall) checks: input_x, the tensors of its
// shape, and the per-channel ones.
template<typename CallType>
std::vector<const Tensor *> checked_tensors(const CallType &call) {
    std::vector<const Tensor *> t = call.like_x();
    t.insert(t.begin(), &call.x);
    const std::vector<const Tensor *> c = call.channel_tensors();
    t.insert(t.end(), c.begin(), c.end());
    return t;
}

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
    // The data tensors of input_x's dtype, shape and memory.
    std::vector<const Tensor *> like_x() const {
        std::vector<const Tensor *> t = {&output};
        if (given(options.residual)) {
            t.push_back(&options.residual);
        }
        return t;
    }
    // What the call checks (checked_tensors): like_x() and channel_tensors()
    // hold all but the backward's epilogue tensors.
    std::vector<const Tensor *> tensors() const {
        std::vector<const Tensor *> t = channel_tensors();
        t.insert(t.end(), {&x, &output, &options.residual, &options.forward_output, &options.grad_residual});
        return t;
    }
    std::vector<const Tensor *> written() const {
        std::vector<const Tensor *> t = {&output};
        if (training()) {
            t.insert(t.end(), {&running_mean, &running_var});
        }
        if (training_entry) {
            t.insert(t.end(), {&saved_mean, &saved_inv_std});
        }
        return t;
    }
    std::vector<Range> ranges() const {
        const std::vector<const Tensor *> w = written();
        std::vector<Range> r;
        for (const Tensor *t : checked_tensors(*this)) {
            r.push_back({t, std::find(w.begin(), w.end(), t) != w.end()});
        }
        return r;
    }
    bool gpu_requested() const {
        const std::vector<const Tensor *> d = like_x();
        return gpu_device(options.device) || device_memory(x) ||
               std::any_of(d.begin(), d.end(), [](const Tensor *t) { return device_memory(*t); });
    }
    bool type_fault() const {
        const std::vector<const Tensor *> d = like_x();
        bool fault = !valid_dtype(x.dtype) || !valid_dtype(running_mean.dtype) ||
                     std::any_of(d.begin(), d.end(), [&](const Tensor *t) { return t->dtype != x.dtype; });
        for (const Tensor *t : {&running_var, &weight, &bias}) {
            fault = fault || t->dtype != running_mean.dtype;
        }
        return fault || (training_entry &&
                         (saved_mean.dtype != DType::Float32 || saved_inv_std.dtype != DType::Float32));
    }
};

// Why a non-empty call that returned should have thrown, or null. x has no
// extent 0, and no tensor is Huge.
const char *invalid_argument(const Call &call) {
    if (const char *why = invalid_options(call.options)) {
        return why;
    }
    if (call.type_fault()) {
        return "a bad or mismatched dtype accepted";
    }
    const hbn::Layout layout = call.options.layout;
    if (const char *why = invalid_shapes(call.x, call.like_x(), call.channel_tensors(), layout)) {
        return why;
    }
    if (const char *why = invalid_tensors(checked_tensors(call))) {
        return why;
    }
    if (const char *why = call.training() ? too_few_values(call.x, layout) : nullptr) {
        return why;
    }
    if (forbidden_overlap(call.ranges(), {{&call.x, &call.output}, {&call.options.residual, &call.output}})) {
        return "forbidden aliasing accepted";
    }
    return nullptr;
}

void fuzz_batch_norm(FuzzedDataProvider &in, bool training_entry) {
    Call call;
    call.training_entry = training_entry;
    call.options = fuzz_options(in);
    const hbn::BatchNormOptions &options = call.options;
    const Shapes shapes = fuzz_shapes(in, options.layout);

    const DType data_dtype = fuzz_dtype(in);
    const DType param_dtype = fuzz_dtype(in);
    Memories memory;
    memory.push_back(make_tensor(in, call.x, shapes.data, data_dtype));
    memory.push_back(make_tensor(in, call.output, fault(in, 32) ? shapes.channel : shapes.data,
                                 fault(in, 32) ? param_dtype : data_dtype));
    for (Tensor *t : {&call.running_mean, &call.running_var, &call.weight, &call.bias}) {
        memory.push_back(make_tensor(in, *t, shapes.channel, param_dtype));
    }
    for (Tensor *t : {&call.saved_mean, &call.saved_inv_std}) {
        const DType dtype = fault(in, 32) ? DType::Float16 : DType::Float32;
        memory.push_back(make_tensor(in, *t, shapes.channel, dtype));
    }
    shrink_huge({&call.running_mean, &call.running_var, &call.weight, &call.bias, &call.saved_mean,
                 &call.saved_inv_std});
    fuzz_epilogue(in, call.options, shapes, data_dtype, memory);
    Tensor &residual = call.options.residual;

    // Aliasing, valid and not (none where the input is used up): the same
    // tensor twice, or data inside another's bytes. The forward does not
    // check forward_output and grad_residual, so they may overlap anything.
    switch (in.ConsumeIntegralInRange<int>(0, 29)) {
    case 1: call.running_var = call.running_mean; break;
    case 2: call.output = call.x; break;
    case 3: call.output.data = offset_data(call.x, -element_bytes(call.x.dtype)); break;  // an element before
    case 4: call.running_var.data = data_inside(in, call.output, call.running_var); break;
    case 5: call.saved_mean = call.running_mean; break;
    case 6: call.bias = call.weight; break;
    case 7: call.saved_inv_std = call.saved_mean; break;
    case 8: call.weight = call.running_var; break;
    case 9: call.running_mean.data = call.x.data; break;
    case 10: call.saved_mean.data = call.output.data; break;
    case 11: residual = call.output; break;  // in place
    case 12: residual.data = call.output.data; break;
    case 13: residual.data = offset_data(call.output, -element_bytes(call.output.dtype)); break;
    case 14: residual = call.x; break;  // both only read
    case 15: residual = call.output = call.x; break;  // output is both at once
    case 16: call.running_mean.data = data_inside(in, residual, call.running_mean); break;
    case 17: call.saved_inv_std.data = data_inside(in, residual, call.saved_inv_std); break;
    case 18: call.options.forward_output = call.output; break;
    case 19: call.options.grad_residual = call.running_var; break;
    default: break;
    }
    if (!in_memory(memory, call.tensors())) {
        return;
    }

    const std::vector<const Tensor *> tensors = call.tensors();
    const auto before = snapshots(tensors);
    const Size x_size = extent_of(call.x).size;
    bool value_fault = !known_activation(options.activation);
    for (const Tensor *t : checked_tensors(call)) {
        value_fault = value_fault || extent_of(*t).size == Size::Bad;
    }
    value_fault = value_fault && x_size != Size::Empty;

    try {
        if (training_entry) {
            hbn::batch_norm_training(call.x, call.running_mean, call.running_var, call.weight, call.bias,
                                     call.output, call.saved_mean, call.saved_inv_std, options);
        } else {
            hbn::batch_norm(call.x, call.running_mean, call.running_var, call.weight, call.bias, call.output,
                            options);
        }
    } catch (const hbn::Error &e) {
        if (snapshots(tensors) != before) {
            finding_after(e, "a call that threw changed an argument's bytes (output, the statistics among them)");
        }
        if (value_fault && !allowed_kind(e, call.type_fault(), call.gpu_requested())) {
            finding_after(e, "a shape with a negative extent or beyond int64, or an unknown activation, was not a "
                             "ValueError");
        }
        if (x_size != Size::Empty && invalid_argument(call) == nullptr) {
            finding_after(e, "a call with valid arguments threw");
        }
        return;
    }
    if (x_size == Size::Empty) {
        return;
    }
    if (const char *why = invalid_argument(call)) {
        finding(why);
    }
    if (changed_unwritten(tensors, before, call.written())) {
        finding("a call that returned changed a tensor it does not write (input_x, weight, bias, the residual, "
                "the running statistics in inference, the backward's epilogue tensors)");
    }
}

// Backward --------------------------------------------------------------------

// A backward call's tensors by role, as passed.
struct BackwardCall {
    hbn::BatchNormOptions options;
    Tensor grad_output, x, weight, running_mean, running_var, saved_mean, saved_inv_std;
    Tensor grad_input, grad_weight, grad_bias;

    bool training() const { return options.training; }
    bool relu() const { return options.activation == hbn::Activation::ReLU; }
    // The pair of statistics the mode uses (the other is neither read nor
    // checked).
    std::vector<const Tensor *> statistics() const {
        if (training()) {
            return {&saved_mean, &saved_inv_std};
        }
        return {&running_mean, &running_var};
    }
    // The gradients asked for: what the call writes.
    std::vector<const Tensor *> gradients() const {
        std::vector<const Tensor *> t;
        for (const Tensor *g : {&grad_input, &grad_weight, &grad_bias, &options.grad_residual}) {
            if (given(*g)) {
                t.push_back(g);
            }
        }
        return t;
    }
    // The data tensors of input_x's dtype, shape and memory that the call
    // checks: forward_output only with ReLU.
    std::vector<const Tensor *> like_x() const {
        std::vector<const Tensor *> t = {&grad_output};
        for (const Tensor *d : {&grad_input, &options.grad_residual}) {
            if (given(*d)) {
                t.push_back(d);
            }
        }
        if (relu() && given(options.forward_output)) {
            t.push_back(&options.forward_output);
        }
        return t;
    }
    std::vector<const Tensor *> channel_tensors() const {
        std::vector<const Tensor *> t = statistics();
        t.insert(t.begin(), &weight);
        for (const Tensor *g : {&grad_weight, &grad_bias}) {
            if (given(*g)) {
                t.push_back(g);
            }
        }
        return t;
    }
    // What the call checks (checked_tensors): like_x() and channel_tensors()
    // leave out the unused statistics and the gradients not asked for.
    std::vector<const Tensor *> tensors() const {
        return {&grad_output, &x, &weight, &running_mean, &running_var, &saved_mean, &saved_inv_std,
                &grad_input, &grad_weight, &grad_bias, &options.residual, &options.forward_output,
                &options.grad_residual};
    }
    std::vector<Range> ranges() const {
        const std::vector<const Tensor *> g = gradients();
        std::vector<Range> r;
        for (const Tensor *t : checked_tensors(*this)) {
            if (given(*t)) {
                r.push_back({t, std::find(g.begin(), g.end(), t) != g.end()});
            }
        }
        return r;
    }
    // grad_residual's pass reads grad_output, so only it may be grad_output
    // when given.
    InPlace in_place() const {
        return {&grad_output, given(options.grad_residual) ? &options.grad_residual : &grad_input};
    }
    bool missing_statistic() const {
        const std::vector<const Tensor *> s = statistics();
        return !given(*s[0]) || !given(*s[1]);
    }
    bool missing_forward_output() const { return relu() && !given(options.forward_output); }
    bool gpu_requested() const {
        const std::vector<const Tensor *> d = like_x();
        return gpu_device(options.device) || device_memory(x) ||
               std::any_of(d.begin(), d.end(), [](const Tensor *t) { return device_memory(*t); });
    }
    bool type_fault() const {
        const std::vector<const Tensor *> d = like_x();
        bool fault = !valid_dtype(grad_output.dtype) || !valid_dtype(weight.dtype) ||
                     std::any_of(d.begin(), d.end(), [&](const Tensor *t) { return t->dtype != x.dtype; });
        for (const Tensor *s : statistics()) {
            fault = fault || (given(*s) && s->dtype != (training() ? DType::Float32 : weight.dtype));
        }
        for (const Tensor *g : {&grad_weight, &grad_bias}) {
            fault = fault || (given(*g) && g->dtype != weight.dtype);
        }
        return fault;
    }
};

// The same for a backward call: the unused statistics, the gradients not
// asked for, forward_output without ReLU and the residual are not arguments
// to check.
const char *invalid_argument(const BackwardCall &call) {
    if (const char *why = invalid_options(call.options)) {
        return why;
    }
    if (call.type_fault()) {
        return "a bad or mismatched dtype accepted";
    }
    if (call.missing_statistic()) {
        return "a backward without a statistic its mode uses (a default Tensor{}) accepted";
    }
    if (call.missing_forward_output()) {
        return "a ReLU backward without options.forward_output (a default Tensor{}) accepted";
    }
    const hbn::Layout layout = call.options.layout;
    if (const char *why = invalid_shapes(call.x, call.like_x(), call.channel_tensors(), layout)) {
        return why;
    }
    if (const char *why = invalid_tensors(checked_tensors(call))) {
        return why;
    }
    if (const char *why = call.training() ? too_few_values(call.x, layout) : nullptr) {
        return why;
    }
    if (forbidden_overlap(call.ranges(), {call.in_place()})) {
        return "forbidden aliasing accepted";
    }
    return nullptr;
}

// Leaves out (a default Tensor{}) either or both of a pair, or with `none`
// neither.
void leave_out(FuzzedDataProvider &in, Tensor &a, Tensor &b, bool none) {
    const int pick = in.ConsumeIntegralInRange<int>(none ? 0 : 1, 3);
    if (pick & 1) {
        a = Tensor{};
    }
    if (pick & 2) {
        b = Tensor{};
    }
}

void fuzz_batch_norm_backward(FuzzedDataProvider &in) {
    BackwardCall call;
    call.options = fuzz_options(in);
    const hbn::BatchNormOptions &options = call.options;
    const Shapes shapes = fuzz_shapes(in, options.layout);

    const DType data_dtype = fuzz_dtype(in);
    const DType param_dtype = fuzz_dtype(in);
    Memories memory;
    memory.push_back(make_tensor(in, call.grad_output, shapes.data, data_dtype));
    for (Tensor *t : {&call.x, &call.grad_input}) {
        add_tensor(in, memory, *t, shapes, true, data_dtype);
    }
    for (Tensor *t : {&call.weight, &call.running_mean, &call.running_var, &call.grad_weight,
                      &call.grad_bias}) {
        add_tensor(in, memory, *t, shapes, false, param_dtype);
    }
    for (Tensor *t : {&call.saved_mean, &call.saved_inv_std}) {
        add_tensor(in, memory, *t, shapes, false, DType::Float32);
    }
    shrink_huge({&call.weight, &call.running_mean, &call.running_var, &call.saved_mean, &call.saved_inv_std,
                 &call.grad_weight, &call.grad_bias});
    fuzz_epilogue(in, call.options, shapes, data_dtype, memory);
    Tensor &forward_output = call.options.forward_output, &grad_residual = call.options.grad_residual;

    // Aliasing, valid and not (none where the input is used up): the same
    // tensor twice, or data inside another's bytes. A statistic the mode
    // does not use is not checked, so a gradient may overlap it; nor are
    // the residual and, without ReLU, forward_output.
    switch (in.ConsumeIntegralInRange<int>(0, 29)) {
    case 1: call.grad_input = call.grad_output; break;  // in place, unless grad_residual is given
    case 2: call.grad_input.data = call.grad_output.data; break;
    case 3:  // an element before
        call.grad_input.data = offset_data(call.grad_output, -element_bytes(call.grad_output.dtype));
        break;
    case 4: call.grad_input = call.x; break;
    case 5: call.x = call.grad_output; break;  // both only read
    case 6: call.grad_bias = call.grad_weight; break;
    case 7: call.grad_weight = call.weight; break;
    case 8: call.grad_bias.data = data_inside(in, call.grad_input, call.grad_bias); break;
    case 9: call.running_var = call.running_mean; break;
    case 10: call.saved_inv_std = call.saved_mean; break;
    case 11: call.weight = call.running_var; break;
    case 12: call.saved_mean.data = call.grad_input.data; break;
    case 13: call.grad_weight = call.running_mean; break;
    case 14: call.running_mean.data = call.x.data; break;
    case 15: call.grad_weight.data = data_inside(in, call.x, call.grad_weight); break;
    case 16: grad_residual = call.grad_output; break;  // in place
    case 17: grad_residual.data = offset_data(call.grad_output, -element_bytes(call.grad_output.dtype)); break;
    case 18: grad_residual = call.grad_input; break;
    case 19: grad_residual = call.x; break;
    case 20: grad_residual = forward_output; break;
    case 21: forward_output = call.grad_output; break;  // both only read
    case 22: call.grad_bias.data = data_inside(in, grad_residual, call.grad_bias); break;
    case 23: call.options.residual = call.grad_input; break;
    default: break;
    }
    // Optional tensors left out: each gradient one time in four; the pair of
    // statistics the mode does not use, often; rarely, of the pair it uses
    // (a ValueError).
    for (Tensor *g : {&call.grad_input, &call.grad_weight, &call.grad_bias}) {
        if (fault(in, 4)) {
            *g = Tensor{};
        }
    }
    Tensor *const statistics[2][2] = {{&call.running_mean, &call.running_var},
                                      {&call.saved_mean, &call.saved_inv_std}};
    leave_out(in, *statistics[!options.training][0], *statistics[!options.training][1], true);
    if (fault(in, 16)) {
        leave_out(in, *statistics[options.training][0], *statistics[options.training][1], false);
    }
    if (!in_memory(memory, call.tensors())) {
        return;
    }

    const std::vector<const Tensor *> tensors = call.tensors();
    const auto before = snapshots(tensors);
    const Size x_size = extent_of(call.x).size;
    bool value_fault =
        call.missing_statistic() || call.missing_forward_output() || !known_activation(options.activation);
    for (const Tensor *t : checked_tensors(call)) {
        value_fault = value_fault || extent_of(*t).size == Size::Bad;
    }
    value_fault = value_fault && x_size != Size::Empty;

    try {
        hbn::batch_norm_backward(call.grad_output, call.x, call.weight, call.running_mean, call.running_var,
                                 call.saved_mean, call.saved_inv_std, call.grad_input, call.grad_weight,
                                 call.grad_bias, options);
    } catch (const hbn::Error &e) {
        if (snapshots(tensors) != before) {
            finding_after(e, "a backward that threw changed an argument's bytes (the gradients among them)");
        }
        if (value_fault && !allowed_kind(e, call.type_fault(), call.gpu_requested())) {
            finding_after(e, "a backward shape with a negative extent or beyond int64, an unknown activation, "
                             "or without a statistic its mode uses or forward_output with ReLU, was not a "
                             "ValueError");
        }
        if (x_size != Size::Empty && invalid_argument(call) == nullptr) {
            finding_after(e, "a backward with valid arguments threw");
        }
        return;
    }
    if (x_size == Size::Empty) {
        for (const Tensor *g : {&call.grad_weight, &call.grad_bias}) {
            const std::vector<unsigned char> bytes = given(*g) ? snapshot(*g) : std::vector<unsigned char>{};
            if (std::any_of(bytes.begin(), bytes.end(), [](unsigned char b) { return b != 0; })) {
                finding("an empty backward returned grad_weight or grad_bias not all zero");
            }
        }
        return;
    }
    if (const char *why = invalid_argument(call)) {
        finding(why);
    }
    // grad_output may change only in place, and a tensor the call does not
    // check only where a gradient overlaps it.
    if (changed_unwritten(tensors, before, call.gradients())) {
        finding("a backward that returned changed a tensor it does not write (input_x, grad_output, weight, "
                "the statistics, the epilogue's inputs)");
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
        switch (in.ConsumeIntegralInRange<int>(0, 12)) {
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
        case 10:
        case 11:
        case 12: fuzz_batch_norm_backward(in); break;
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
