// Benchmarks hbn::batch_norm and hbn::batch_norm_backward against a copy of
// the same bytes, oneDNN and libtorch, case by case, in one run.
//
// Names are BM/<mode>/<dtype>/<layout>/<size>/<impl>, mode being inference,
// training (the forward), backward_inference or backward_training (the
// backward, all three gradients), dtype float32, float16 or bfloat16, impl
// hbn, copy, onednn or torch;
// bench/report.py groups them by case. Every implementation reports the same
// bytes, so that their GB/s compare: x read plus y written (forward); x and
// dy read plus dx written (backward: 12 bytes per float32 element, the least
// it can move). The copy moves exactly those bytes. Buffers are allocated,
// filled and touched once per dtype, layout and size (outside any timed
// loop), and each implementation is warmed up once and checked on a sample of
// outputs, against a double-precision reference, after it is timed.
//
// The fused epilogue (BatchNormOptions::activation, residual) has modes of
// its own at the mid and large sizes: inference_relu, inference_add_relu,
// training_relu, training_add_relu (y = relu(bn(x) [+ residual])), and
// backward_training_relu, backward_training_add_relu (through that forward:
// dy masked by the forward's y, and add_relu's grad_residual). Their impls:
// hbn (fused, one call), hbn_unfused (hbn's plain batch norm and a separate
// oneDNN elementwise pass), onednn (fuse_norm_relu) and copy. Their bytes add
// the residual read (forward add_relu), and the forward's y read and
// grad_residual written (backward relu and add_relu).
#include "bench_case.h"
#include "dtypes.h"

#include <benchmark/benchmark.h>
#include <immintrin.h>

#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>

namespace bench {
namespace {

const int kThreads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

// ---- Sizes, as (N, C, H, W), for 4-byte (float32) and 2-byte (float16,
// bfloat16) elements ----
struct Size {
    const char *name;
    std::vector<int64_t> dims4, dims2;
    const std::vector<int64_t> &dims(hbn::DType dtype) const {
        return dtype_info(dtype).bytes == 2 ? dims2 : dims4;
    }
};
const Size kSizes[] = {
    // MindSpore's documented example (N=2, C=2): per-call latency.
    {"tiny", {2, 2}, {2, 2}},
    // x + y = 51 MB in float32 (backward: x + dy + dx = 77 MB): inside this
    // VM's 480 MB L3.
    {"mid", {32, 64, 56, 56}, {32, 64, 56, 56}},
    // x + y = 822 MB in every dtype (backward: 1.23 GB): DRAM.
    {"large", {128, 64, 112, 112}, {256, 64, 112, 112}},
};

enum class Impl { Hbn, HbnUnfused, Copy, Onednn, Torch };
const char *impl_name(Impl i) {
    switch (i) {
    case Impl::Hbn: return "hbn";
    case Impl::HbnUnfused: return "hbn_unfused";
    case Impl::Copy: return "copy";
    case Impl::Onednn: return "onednn";
    case Impl::Torch: return "torch";
    }
    return "?";
}

// ---- Elements: float32, float16, bfloat16, converted as the runtime
// converts per-channel values (runtime/dtypes.h) ----
double load(const Case &c, const void *p, int64_t i) {
    return hbn::internal::load_channel_value(c.dtype, p, i);
}
void store(const Case &c, void *p, int64_t i, float v) {
    hbn::internal::store_channel_value(c.dtype, p, i, v);
}
// The element's bits.
uint32_t load_bits(const Case &c, const void *p, int64_t i) {
    if (c.element_bytes() == 2) return static_cast<const uint16_t *>(p)[i];
    return static_cast<const uint32_t *>(p)[i];
}

// ---- Parallel helpers (setup only, and the copy) ----
void parallel_for(int64_t n, const std::function<void(int, int64_t, int64_t)> &body) {
    std::vector<std::thread> threads;
    for (int t = 1; t < kThreads; ++t)
        threads.emplace_back(body, t, n * t / kThreads, n * (t + 1) / kThreads);
    body(0, 0, n / kThreads);
    for (auto &t : threads) t.join();
}

// Runs part(begin, end) over the byte range [0, bytes), split at 64-byte
// edges across kThreads threads: the caller and kThreads - 1 persistent
// workers (no thread creation in the timed loop).
class CopyPool {
public:
    using Part = std::function<void(size_t, size_t)>;
    CopyPool() {
        for (int t = 1; t < kThreads; ++t) workers_.emplace_back([this, t] { work(t); });
    }
    ~CopyPool() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stop_ = true;
        }
        start_.notify_all();
        for (auto &w : workers_) w.join();
    }
    void run(size_t bytes, const Part &part) {
        if (workers_.empty()) {
            part(0, bytes);
            return;
        }
        {
            std::lock_guard<std::mutex> lock(mutex_);
            part_ = &part, bytes_ = bytes;
            pending_ = static_cast<int>(workers_.size());
            ++generation_;
        }
        start_.notify_all();
        run_part(0);
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [this] { return pending_ == 0; });
    }

private:
    void run_part(int t) const {
        auto edge = [&](int i) { return bytes_ * i / kThreads / 64 * 64; };
        const size_t begin = edge(t), end = t + 1 == kThreads ? bytes_ : edge(t + 1);
        (*part_)(begin, end);
    }
    void work(int t) {
        uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lock(mutex_);
                start_.wait(lock, [&] { return stop_ || generation_ != seen; });
                if (stop_) return;
                seen = generation_;
            }
            run_part(t);
            std::lock_guard<std::mutex> lock(mutex_);
            if (--pending_ == 0) done_.notify_one();
        }
    }

    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable start_, done_;
    uint64_t generation_ = 0;
    int pending_ = 0;
    bool stop_ = false;
    const Part *part_ = nullptr;
    size_t bytes_ = 0;
};

// ---- Buffers ----

// Page-aligned, followed by kGuard bytes of kGuardByte that no implementation
// may write.
constexpr size_t kGuard = 4096;
constexpr unsigned char kGuardByte = 0xa5;

Buffer allocate(int64_t bytes) {
    void *p = std::aligned_alloc(4096, (bytes + kGuard + 4095) / 4096 * 4096);
    if (!p) throw std::bad_alloc();
    std::memset(static_cast<char *>(p) + bytes, kGuardByte, kGuard);
    return Buffer(p);
}

bool guard_intact(const void *buffer, int64_t bytes) {
    const unsigned char *g = static_cast<const unsigned char *>(buffer) + bytes;
    return std::all_of(g, g + kGuard, [](unsigned char b) { return b == kGuardByte; });
}

// A tensor of the case's, uniform in [lo, hi), or zeros. Writing every page
// here is the first touch; nothing timed page-faults.
Buffer make_tensor(const Case &c, uint64_t seed, float lo = 0, float hi = 0) {
    Buffer b = allocate(c.tensor_bytes());
    parallel_for(c.elements(), [&](int t, int64_t begin, int64_t end) {
        if (lo == hi) {
            std::memset(static_cast<char *>(b.get()) + begin * c.element_bytes(), 0,
                        (end - begin) * c.element_bytes());
            return;
        }
        uint64_t s = seed + t;
        for (int64_t i = begin; i < end; ++i) store(c, b.get(), i, uniform(s, lo, hi));
    });
    return b;
}

// Per-channel sums of f(channel, value) over all of p, in double.
template <class F>
std::vector<double> channel_sums(const Case &c, const void *p, F f) {
    const int64_t C = c.channels(), S = c.elements() / c.dims[0] / C;
    const bool nchw = c.layout == hbn::Layout::NCHW;
    // Memory as rows: N * C rows of S values of channel row % C (NCHW), or
    // N * S rows of C values, one per channel (NHWC).
    const int64_t row = nchw ? S : C;
    std::vector<std::vector<double>> part(kThreads, std::vector<double>(C));
    parallel_for(c.elements() / row, [&](int t, int64_t begin, int64_t end) {
        std::vector<double> &sum = part[t];
        for (int64_t r = begin; r < end; ++r)
            for (int64_t j = 0; j < row; ++j) {
                const int64_t ch = nchw ? r % C : j;
                sum[ch] += f(ch, load(c, p, r * row + j));
            }
    });
    std::vector<double> total(C);
    for (const auto &sum : part)
        for (int64_t ch = 0; ch < C; ++ch) total[ch] += sum[ch];
    return total;
}

std::unique_ptr<Data> make_data(const Case &c) {
    auto d = std::make_unique<Data>();
    d->x = make_tensor(c, 0x1234, -2, 2);
    d->y = make_tensor(c, 0);
    uint64_t s = 42;
    for (int64_t i = 0; i < c.channels(); ++i) {
        d->running_mean.push_back(uniform(s, -0.5f, 0.5f));
        d->running_var.push_back(uniform(s, 0.5f, 1.5f));
        d->weight.push_back(uniform(s, 0.5f, 1.5f));
        d->bias.push_back(uniform(s, -0.5f, 0.5f));
    }
    d->saved_mean.resize(c.channels());
    d->saved_var.resize(c.channels());
    return d;
}

// What the backward adds, for the first backward case on d.
void add_backward_data(const Case &c, Data &d) {
    const int64_t C = c.channels();
    const double M = static_cast<double>(c.elements() / C);
    d.dy = make_tensor(c, 0x5678, -1, 1);
    d.grad_weight.assign(C, 0);
    d.grad_bias.assign(C, 0);
    // x's batch statistics, in two passes, as batch_norm_training saves them.
    std::vector<double> mean = channel_sums(c, d.x.get(), [](int64_t, double v) { return v; });
    for (double &m : mean) m /= M;
    const std::vector<double> sq = channel_sums(c, d.x.get(), [&](int64_t ch, double v) {
        return (v - mean[ch]) * (v - mean[ch]);
    });
    for (int64_t ch = 0; ch < C; ++ch) {
        d.batch_mean.push_back(static_cast<float>(mean[ch]));
        d.batch_inv_std.push_back(static_cast<float>(1 / std::sqrt(sq[ch] / M + kEps)));
        const double inv_std = d.batch_inv_std.back();
        d.batch_var.push_back(static_cast<float>(std::max(0.0, 1 / (inv_std * inv_std) - kEps)));
    }
}

// The forward's output at offset i, of channel ch, in double on the given
// statistics: bn(x), then the case's epilogue; and the magnitudes it is
// formed from, |bn(x)| + |residual|, for the check's bound.
struct Reference {
    double y, terms;
};
Reference reference(const Case &c, const Data &d, int64_t i, int64_t ch, double mean,
                    double inv_std) {
    const double bn = (load(c, d.x.get(), i) - mean) * inv_std * d.weight[ch] + d.bias[ch];
    const double residual = c.add() ? load(c, d.residual.get(), i) : 0;
    return {c.relu() ? std::max(bn + residual, 0.0) : bn + residual,
            std::abs(bn) + std::abs(residual)};
}

// What the epilogue adds, for the first case on d that needs each part. The
// backward's forward_output is the fused training forward's y, computed on
// the host (so that no implementation under test makes the mask it is timed
// and checked on) for the case's epilogue, which the relu and add_relu
// backwards do not share.
void add_epilogue_data(const Case &c, Data &d) {
    if (c.add() && !d.residual) d.residual = make_tensor(c, 0x9abc, -1, 1);
    if (c.pass != Pass::Backward || !c.relu()) return;
    if (!d.grad_residual) d.grad_residual = make_tensor(c, 0);
    if (d.forward_output && d.forward_output_of == c.epilogue) return;
    if (!d.forward_output) d.forward_output = allocate(c.tensor_bytes());
    parallel_for(c.elements(), [&](int, int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const int64_t ch = c.channel_of(i);
            const double y = reference(c, d, i, ch, d.batch_mean[ch], d.batch_inv_std[ch]).y;
            store(c, d.forward_output.get(), i, static_cast<float>(y));
        }
    });
    d.forward_output_of = c.epilogue;
}

// The tensors that one call of the case reads and writes, named: the bytes
// every implementation is credited with (Case::tensors_moved of them), which
// the copy moves, and whose outputs are poisoned and checked.
struct Moved {
    std::vector<std::pair<std::string, const void *>> read;
    std::vector<std::pair<std::string, void *>> written;
};
Moved moved(const Case &c, const Data &d) {
    Moved m;
    if (c.pass == Pass::Forward) {
        m.read = {{"x", d.x.get()}};
        if (c.add()) m.read.emplace_back("residual", d.residual.get());
        m.written = {{"y", d.y.get()}};
    } else {
        m.read = {{"x", d.x.get()}, {"dy", d.dy.get()}};
        if (c.relu()) m.read.emplace_back("y", d.forward_output.get());
        m.written = {{"dx", d.y.get()}};
        if (c.add()) m.written.emplace_back("grad_residual", d.grad_residual.get());
    }
    return m;
}

// ---- hbn and copy ----
struct HbnRunner : Runner {
    hbn::Tensor x, mean, var, weight, bias, y;
    hbn::BatchNormOptions options;
    void run() override { hbn::batch_norm(x, mean, var, weight, bias, y, options); }
};

struct HbnBackwardRunner : Runner {
    hbn::Tensor dy, x, weight, running_mean, running_var, saved_mean, saved_inv_std, dx,
        grad_weight, grad_bias;
    hbn::BatchNormOptions options;
    void run() override {
        hbn::batch_norm_backward(dy, x, weight, running_mean, running_var, saved_mean,
                                 saved_inv_std, dx, grad_weight, grad_bias, options);
    }
};

// hbn on the case: with its epilogue fused into the call, or (fused false,
// for hbn_unfused) plain batch norm, whose backward then reads the masked dy
// that the separate pass leaves in grad_residual's buffer.
std::unique_ptr<Runner> make_hbn(const Case &c, Data &d, bool fused = true) {
    auto param = [&](std::vector<float> &v) {
        return hbn::Tensor{v.data(), hbn::DType::Float32, {c.channels()}};
    };
    auto tensor = [&](Buffer &b) { return hbn::Tensor{b.get(), c.dtype, c.shape()}; };
    hbn::BatchNormOptions options;
    options.training = c.mode == Mode::Training;
    options.layout = c.layout;
    options.momentum = kMomentum;
    options.eps = kEps;
    if (fused && c.relu()) options.activation = hbn::Activation::ReLU;
    if (c.pass == Pass::Forward) {
        if (fused && c.add()) options.residual = tensor(d.residual);
        auto r = std::make_unique<HbnRunner>();
        r->x = tensor(d.x);
        r->y = tensor(d.y);
        r->mean = param(d.running_mean);
        r->var = param(d.running_var);
        r->weight = param(d.weight);
        r->bias = param(d.bias);
        r->options = options;
        return r;
    }
    if (fused && c.relu()) options.forward_output = tensor(d.forward_output);
    if (fused && c.add()) options.grad_residual = tensor(d.grad_residual);
    auto r = std::make_unique<HbnBackwardRunner>();
    r->dy = tensor(fused ? d.dy : d.grad_residual);
    r->x = tensor(d.x);
    r->dx = tensor(d.y);
    r->weight = param(d.weight);
    // The mode's pair of statistics; the other stays a default Tensor{}.
    if (options.training) {
        r->saved_mean = param(d.batch_mean);
        r->saved_inv_std = param(d.batch_inv_std);
    } else {
        r->running_mean = param(d.running_mean);
        r->running_var = param(d.running_var);
    }
    r->grad_weight = param(d.grad_weight);
    r->grad_bias = param(d.grad_bias);
    r->options = options;
    return r;
}

// Runs its parts in order, as one call.
struct SequenceRunner : Runner {
    std::vector<std::unique_ptr<Runner>> parts;
    void run() override {
        for (auto &part : parts) part->run();
    }
    void finish() override {
        for (auto &part : parts) part->finish();
    }
};

// hbn_unfused: hbn's plain batch norm and oneDNN's pass of the epilogue, as
// a framework without the fusion runs them: the forward's pass over y after
// batch norm, the backward's (the ReLU's backward into dz) before it.
std::unique_ptr<Runner> make_hbn_unfused(const Case &c, Data &d) {
    auto r = std::make_unique<SequenceRunner>();
    const bool forward = c.pass == Pass::Forward;
    r->parts.resize(2);
    r->parts[forward ? 0 : 1] = make_hbn(c, d, /*fused=*/false);
    r->parts[forward ? 1 : 0] = make_onednn_epilogue(c, d);
    r->label = "hbn + oneDNN " + r->parts[forward ? 1 : 0]->label;
    return r;
}

// A copy of the least bytes the case's pass moves. part(begin, end) does the
// bytes [begin, end) of the output; below kSerialBytes of output the calling
// thread does them all.
constexpr size_t kSerialBytes = 256u << 10;

CopyPool &copy_pool() {
    static CopyPool pool;
    return pool;
}

template <class Part>
struct CopyRunner : Runner {
    Part part;
    size_t bytes;
    void run() override {
        if (bytes < kSerialBytes)
            part(0, bytes);
        else
            copy_pool().run(bytes, std::cref(part));
    }
};

// Forward: y = x, by glibc's memcpy or with streaming (non-temporal) stores,
// whose writes skip the read-for-ownership that plain stores pay: AVX-512
// where the CPU has it, else SSE2 (every x86-64). dst and src are 64-byte
// aligned (page-aligned buffers, 64-byte parts).
using CopyKernel = void (*)(char *, const char *, size_t);

void memcpy_kernel(char *dst, const char *src, size_t n) { std::memcpy(dst, src, n); }

__attribute__((target("avx512f"))) void stream_copy_avx512(char *dst, const char *src, size_t n) {
    size_t i = 0;
    for (; i + 64 <= n; i += 64)
        _mm512_stream_si512(reinterpret_cast<__m512i *>(dst + i), _mm512_load_si512(src + i));
    std::memcpy(dst + i, src + i, n - i);
    _mm_sfence();
}

void stream_copy_sse2(char *dst, const char *src, size_t n) {
    size_t i = 0;
    for (; i + 64 <= n; i += 64)
        for (size_t k = 0; k < 64; k += 16)
            _mm_stream_si128(reinterpret_cast<__m128i *>(dst + i + k),
                             _mm_load_si128(reinterpret_cast<const __m128i *>(src + i + k)));
    std::memcpy(dst + i, src + i, n - i);
    _mm_sfence();
}

struct Copy {
    char *dst;
    const char *src;
    CopyKernel kernel;
    void operator()(size_t begin, size_t end) const { kernel(dst + begin, src + begin, end - begin); }
};

// Backward, and the forward of add_relu: every output is the XOR of the
// inputs, bitwise (dx = x ^ dy for the backward). It reads each input and
// writes each output once (the backward: 3 bytes per byte of x, 12 per
// float32 element, its least traffic) in every dtype, with no arithmetic
// that could bound it; with plain or (AVX2) streaming stores. The pointers
// come by value, so that stores through char * cannot alias them.
template <int Inputs, int Outputs>
using XorKernel = void (*)(std::array<char *, Outputs>, std::array<const char *, Inputs>, size_t);

template <int Inputs, int Outputs, bool Stream>
__attribute__((target("avx2"))) void xor_avx2(std::array<char *, Outputs> dst,
                                              std::array<const char *, Inputs> src, size_t n) {
    // All 64-byte aligned: page-aligned buffers, 64-byte parts.
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m256i v[2];
        for (int h = 0; h < 2; ++h) {
            v[h] = _mm256_load_si256(reinterpret_cast<const __m256i *>(src[0] + i) + h);
            for (int k = 1; k < Inputs; ++k)
                v[h] = _mm256_xor_si256(
                    v[h], _mm256_load_si256(reinterpret_cast<const __m256i *>(src[k] + i) + h));
        }
        for (char *d : dst)
            for (int h = 0; h < 2; ++h) {
                __m256i *out = reinterpret_cast<__m256i *>(d + i) + h;
                if (Stream)
                    _mm256_stream_si256(out, v[h]);
                else
                    _mm256_store_si256(out, v[h]);
            }
    }
    for (; i < n; ++i) {
        char b = 0;
        for (const char *s : src) b ^= s[i];
        for (char *d : dst) d[i] = b;
    }
    if (Stream) _mm_sfence();
}

template <int Inputs, int Outputs>
void xor_plain(std::array<char *, Outputs> dst, std::array<const char *, Inputs> src, size_t n) {
    for (size_t i = 0; i < n; ++i) {  // SSE2, by the compiler
        char b = 0;
        for (const char *s : src) b ^= s[i];
        for (char *d : dst) d[i] = b;
    }
}

template <int Inputs, int Outputs>
struct Xor {
    std::array<char *, Outputs> dst;
    std::array<const char *, Inputs> src;
    XorKernel<Inputs, Outputs> kernel;
    void operator()(size_t begin, size_t end) const {
        auto d = dst;
        auto s = src;
        for (char *&p : d) p += begin;
        for (const char *&p : s) p += begin;
        kernel(d, s, end - begin);
    }
};

template <class Part>
std::unique_ptr<Runner> make_copy_runner(const Part &part, size_t bytes, const std::string &what) {
    auto r = std::make_unique<CopyRunner<Part>>();
    r->part = part, r->bytes = bytes;
    r->label = std::to_string(bytes < kSerialBytes ? 1 : kThreads) + "-thread " + what;
    return r;
}

// The faster of the candidates, each timed (its best of 5 runs, after a
// warm-up) on the case's buffers: the machine's limit on moving the bytes
// may be memcpy or streaming stores, depending on the machine and the size,
// so the anchor is measured rather than assumed. Each run repeats the copy
// to at least 64 MiB, so that tiny cases are timed above the clock's grain.
std::unique_ptr<Runner> faster_of(std::vector<std::unique_ptr<Runner>> candidates, size_t bytes) {
    const size_t repeats = std::max<size_t>(1, (size_t{64} << 20) / std::max<size_t>(bytes, 1));
    std::unique_ptr<Runner> fastest;
    double fastest_seconds = INFINITY;
    for (auto &candidate : candidates) {
        candidate->run();
        double seconds = INFINITY;
        for (int run = 0; run < 5; ++run) {
            const auto start = std::chrono::steady_clock::now();
            for (size_t i = 0; i < repeats; ++i) candidate->run();
            seconds = std::min(
                seconds, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
        }
        if (seconds < fastest_seconds) fastest_seconds = seconds, fastest = std::move(candidate);
    }
    return fastest;
}

// The XOR of m's inputs into its outputs, with plain and with streaming
// stores where the CPU has AVX2; labelled e.g. "dx = x ^ dy".
template <int Inputs, int Outputs>
void add_xor_candidates(const Moved &m, size_t bytes,
                        std::vector<std::unique_ptr<Runner>> &candidates) {
    Xor<Inputs, Outputs> part;
    std::string what;
    for (int k = 0; k < Outputs; ++k) {
        part.dst[k] = static_cast<char *>(m.written[k].second);
        what += m.written[k].first + " = ";
    }
    for (int k = 0; k < Inputs; ++k) {
        part.src[k] = static_cast<const char *>(m.read[k].second);
        what += (k ? " ^ " : "") + m.read[k].first;
    }
    if (__builtin_cpu_supports("avx2")) {
        part.kernel = xor_avx2<Inputs, Outputs, false>;
        candidates.push_back(make_copy_runner(part, bytes, what + ", AVX2"));
        part.kernel = xor_avx2<Inputs, Outputs, true>;
        candidates.push_back(make_copy_runner(part, bytes, what + ", AVX2, streaming stores"));
    } else {
        part.kernel = xor_plain<Inputs, Outputs>;
        candidates.push_back(make_copy_runner(part, bytes, what));
    }
}

std::unique_ptr<Runner> make_copy(const Case &c, Data &d) {
    const Moved m = moved(c, d);
    const size_t bytes = c.tensor_bytes();
    std::vector<std::unique_ptr<Runner>> candidates;
    if (m.read.size() == 1) {  // the forward, plain or relu: y = x
        char *y = static_cast<char *>(d.y.get());
        const char *x = static_cast<const char *>(d.x.get());
        const bool avx512 = __builtin_cpu_supports("avx512f");
        candidates.push_back(make_copy_runner(Copy{y, x, memcpy_kernel}, bytes, "memcpy"));
        candidates.push_back(make_copy_runner(Copy{y, x, avx512 ? stream_copy_avx512 : stream_copy_sse2},
                                              bytes,
                                              avx512 ? "AVX-512 streaming copy" : "SSE2 streaming copy"));
    } else if (m.read.size() == 2) {  // forward add_relu, plain backward
        add_xor_candidates<2, 1>(m, bytes, candidates);
    } else if (m.written.size() == 1) {  // backward relu
        add_xor_candidates<3, 1>(m, bytes, candidates);
    } else {  // backward add_relu
        add_xor_candidates<3, 2>(m, bytes, candidates);
    }
    return faster_of(std::move(candidates), bytes);
}

// ---- Checking a sample of outputs against a double-precision reference ----
// got is within bound of want; else a message saying where it is not.
std::string compare(const char *what, int64_t i, double got, double want, double bound) {
    if (std::abs(got - want) <= bound) return "";
    char msg[160];
    std::snprintf(msg, sizeof msg, "wrong result: %s[%lld] = %.10g, want %.10g", what,
                  static_cast<long long>(i), got, want);
    return msg;
}

// Checks the outputs' guards, then check_channel(ch, M, offset) on channels
// 0, C / 2 and C - 1, offset(m) being the element offset of the channel's
// m-th value (of M); the first error found, or "".
template <class F>
std::string check_channels(const Case &c, const Data &d, F check_channel) {
    for (const auto &[name, p] : moved(c, d).written)
        if (!guard_intact(p, c.tensor_bytes())) return "wrote past the end of " + name;
    const int64_t C = c.channels(), M = c.elements() / C, S = M / c.dims[0];
    for (int64_t ch : {int64_t{0}, C / 2, C - 1}) {
        const std::string err =
            check_channel(ch, M, [&](int64_t m) { return c.offset(m / S, ch, m % S); });
        if (!err.empty()) return err;
    }
    return "";
}

// The 64 sampled values of a channel of M values: m = 0 ... M - 1.
int64_t sample(int64_t M, int k) { return (M - 1) * k / 63; }

// The copy: every output's bits are the XOR of the inputs' (x's own, for the
// forward's y = x).
std::string check_copy(const Case &c, const Data &d) {
    const Moved m = moved(c, d);
    return check_channels(c, d, [&](int64_t, int64_t M, auto offset) -> std::string {
        for (int k = 0; k < 64; ++k) {
            const int64_t i = offset(sample(M, k));
            uint32_t want = 0;
            for (const auto &[name, p] : m.read) want ^= load_bits(c, p, i);
            for (const auto &[name, p] : m.written) {
                const std::string err =
                    compare((name + " bits").c_str(), i, load_bits(c, p, i), want, 0);
                if (!err.empty()) return err;
            }
        }
        return "";
    });
}

std::string check_forward(const Case &c, const Data &d) {
    const double tol = dtype_info(c.dtype).tolerance;
    return check_channels(c, d, [&](int64_t ch, int64_t M, auto offset) -> std::string {
        double mean = d.running_mean[ch], var = d.running_var[ch];
        if (c.mode == Mode::Training) {  // biased batch statistics, two passes
            double sum = 0, sq = 0;
            for (int64_t m = 0; m < M; ++m) sum += load(c, d.x.get(), offset(m));
            mean = sum / M;
            for (int64_t m = 0; m < M; ++m) {
                const double v = load(c, d.x.get(), offset(m)) - mean;
                sq += v * v;
            }
            var = sq / M;
        }
        for (int k = 0; k < 64; ++k) {
            const int64_t i = offset(sample(M, k));
            const Reference want = reference(c, d, i, ch, mean, 1 / std::sqrt(var + kEps));
            const std::string err =
                compare("y", i, load(c, d.y.get(), i), want.y, tol * (1 + want.terms));
            if (!err.empty()) return err;
        }
        return "";
    });
}

// PyTorch's native_batch_norm_backward formulas (see hbn/batch_norm.h), on
// the statistics the implementations were given, and, through a ReLU, on dy
// masked by the forward's y (passed where y > 0 or NaN), which add_relu's
// grad_residual must be exactly. Bounds are relative to the magnitudes each
// result is formed from: grad_input's terms, and the sums of |dy| and
// |dy * xhat| for grad_bias and grad_weight. Float accumulation over a
// channel stays well inside 1e-6 of the latter (libtorch's and oneDNN's NHWC
// sums, on 2 threads at the large size: 4e-8); the sums themselves, of random
// signs, are about 1 / sqrt(M) of them, so a wrong one is caught.
std::string check_backward(const Case &c, const Data &d) {
    const double tol = dtype_info(c.dtype).tolerance, sum_tol = 1e-6;
    const void *x = d.x.get(), *dx = d.y.get();
    const bool training = c.mode == Mode::Training;
    auto masked_dy = [&](int64_t i) {
        return c.relu() && load(c, d.forward_output.get(), i) <= 0 ? 0.0 : load(c, d.dy.get(), i);
    };
    return check_channels(c, d, [&](int64_t ch, int64_t M, auto offset) -> std::string {
        const double mean = training ? d.batch_mean[ch] : d.running_mean[ch];
        const double inv_std = training ? d.batch_inv_std[ch]
                                        : 1 / std::sqrt(d.running_var[ch] + kEps);
        double sum_dy = 0, sum_dy_xhat = 0, abs_dy = 0, abs_dy_xhat = 0;
        for (int64_t m = 0; m < M; ++m) {
            const int64_t i = offset(m);
            const double g = masked_dy(i), g_xhat = g * (load(c, x, i) - mean) * inv_std;
            sum_dy += g, abs_dy += std::abs(g);
            sum_dy_xhat += g_xhat, abs_dy_xhat += std::abs(g_xhat);
        }
        std::string err = compare("grad_bias", ch, d.grad_bias[ch], sum_dy, sum_tol * abs_dy);
        if (err.empty())
            err = compare("grad_weight", ch, d.grad_weight[ch], sum_dy_xhat, sum_tol * abs_dy_xhat);
        const double scale = d.weight[ch] * inv_std, mean_dy = sum_dy / M, slope = sum_dy_xhat / M;
        for (int k = 0; k < 64 && err.empty(); ++k) {
            const int64_t i = offset(sample(M, k));
            const double g = masked_dy(i), xhat = (load(c, x, i) - mean) * inv_std;
            const double want = training ? scale * (g - mean_dy - xhat * slope) : scale * g;
            const double terms = training ? std::abs(scale) * (std::abs(g) + std::abs(mean_dy) +
                                                               std::abs(xhat * slope))
                                          : std::abs(want);
            err = compare("dx", i, load(c, dx, i), want, tol * (1 + terms));
            if (err.empty() && c.add())
                err = compare("grad_residual", i, load(c, d.grad_residual.get(), i), g, 0);
        }
        return err;
    });
}

std::string check(const Case &c, Impl impl, const Data &d) {
    if (impl == Impl::Copy) return check_copy(c, d);
    return c.pass == Pass::Forward ? check_forward(c, d) : check_backward(c, d);
}

// ---- Running one benchmark ----
// Google Benchmark calls a benchmark's function several times while it sizes
// the run. Only one case's buffers and one prepared implementation are alive
// at a time; consecutive benchmarks on the same data reuse the buffers.
struct Current {
    std::string data_key, runner_key;
    std::unique_ptr<Data> data;
    std::unique_ptr<Runner> runner;
    std::string error;
    bool checked = false;
};

Current &prepare(const Case &c, Impl impl) {
    static Current cur;
    const std::string runner_key = c.name() + "/" + impl_name(impl);
    if (cur.runner_key == runner_key) return cur;
    cur.runner.reset();
    cur.runner_key = runner_key;
    cur.error.clear();
    cur.checked = false;
    try {
        if (cur.data_key != c.data_key()) {
            cur.data.reset();
            cur.data = make_data(c);
            cur.data_key = c.data_key();
        }
        Data &d = *cur.data;
        if (c.pass == Pass::Backward && !d.dy) add_backward_data(c, d);
        add_epilogue_data(c, d);
        switch (impl) {
        case Impl::Hbn: cur.runner = make_hbn(c, d); break;
        case Impl::HbnUnfused: cur.runner = make_hbn_unfused(c, d); break;
        case Impl::Copy: cur.runner = make_copy(c, d); break;
        case Impl::Onednn: cur.runner = make_onednn(c, d); break;
        case Impl::Torch: cur.runner = make_torch(c, d); break;
        }
        // Poison the outputs (all-ones bits: NaN in every dtype) so that the
        // check sees this implementation's, then warm up (JIT, thread pools,
        // caches).
        for (const auto &[name, p] : moved(c, d).written) std::memset(p, 0xff, c.tensor_bytes());
        std::fill(d.grad_weight.begin(), d.grad_weight.end(), NAN);
        std::fill(d.grad_bias.begin(), d.grad_bias.end(), NAN);
        cur.runner->run();
    } catch (const Unavailable &e) {
        cur.error = std::string("unavailable: ") + e.what();
    } catch (const std::exception &e) {
        cur.error = std::string("error: ") + e.what();
    }
    if (cur.error.size() > 300) cur.error = cur.error.substr(0, 300) + "...";
    if (!cur.error.empty()) cur.runner.reset();
    return cur;
}

void run_benchmark(benchmark::State &state, const Case &c, Impl impl) {
    Current &cur = prepare(c, impl);
    if (!cur.error.empty()) {
        state.SkipWithError(cur.error.c_str());
        return;
    }
    Runner &runner = *cur.runner;
    for (auto _ : state) runner.run();
    runner.finish();
    state.SetBytesProcessed(state.iterations() * c.bytes_moved());
    state.SetLabel(runner.label);
    if (!cur.checked) {
        cur.checked = true;
        const std::string err = check(c, impl, *cur.data);
        if (!err.empty()) {
            cur.error = err;
            state.SkipWithError(cur.error.c_str());
        }
    }
}

// Plain batch norm against torch; the epilogue cases (the forward in both
// modes, the backward of training's, at the mid and large sizes, where the
// bytes dominate) against hbn_unfused instead, libtorch having no fused form.
bool benchmarked(const Case &c, Impl impl) {
    if (c.epilogue == Epilogue::None) return impl != Impl::HbnUnfused;
    return impl != Impl::Torch && c.size != "tiny" &&
           (c.pass == Pass::Forward || c.mode == Mode::Training);
}

void register_all() {
    for (const Size &size : kSizes)
        for (const DTypeInfo &dtype : kDTypes)
            for (hbn::Layout layout : {hbn::Layout::NCHW, hbn::Layout::NHWC})
                for (Pass pass : {Pass::Forward, Pass::Backward})
                    for (Mode mode : {Mode::Inference, Mode::Training})
                        for (Epilogue epilogue : {Epilogue::None, Epilogue::Relu, Epilogue::AddRelu})
                            for (Impl impl : {Impl::Hbn, Impl::HbnUnfused, Impl::Copy, Impl::Onednn,
                                              Impl::Torch}) {
                                const Case c{pass,   mode,      epilogue, dtype.dtype,
                                             layout, size.name, size.dims(dtype.dtype)};
                                if (!benchmarked(c, impl)) continue;
                                const std::string name = "BM/" + c.name() + "/" + impl_name(impl);
                                auto *b = benchmark::RegisterBenchmark(
                                    name.c_str(),
                                    [c, impl](benchmark::State &s) { run_benchmark(s, c, impl); });
                                b->UseRealTime()->Unit(c.size == "tiny" ? benchmark::kNanosecond
                                                                        : benchmark::kMillisecond);
                                // Calls of 40 ms to 0.5 s: time at least 1 s of them.
                                if (c.size == "large") b->MinTime(1.0);
                            }
}

}  // namespace
}  // namespace bench

int main(int argc, char **argv) {
    // Keep freed memory mapped and reuse it: libtorch allocates a new output on
    // every call, and a fresh mmap of a large one would page-fault each time.
    mallopt(M_MMAP_MAX, 0);
    mallopt(M_TRIM_THRESHOLD, INT_MAX);
    bench::init_torch(bench::kThreads);
    bench::register_all();
    benchmark::AddCustomContext("threads", std::to_string(bench::kThreads));
    for (const char *var : {"OMP_WAIT_POLICY", "OMP_NUM_THREADS", "HL_NUM_THREADS"})
        if (const char *value = std::getenv(var)) benchmark::AddCustomContext(var, value);
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
