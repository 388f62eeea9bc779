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
#include "bench_case.h"
#include "dtypes.h"

#include <benchmark/benchmark.h>
#include <immintrin.h>

#include <malloc.h>
#include <unistd.h>

#include <algorithm>
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

enum class Impl { Hbn, Copy, Onednn, Torch };
const char *impl_name(Impl i) {
    switch (i) {
    case Impl::Hbn: return "hbn";
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

std::unique_ptr<Runner> make_hbn(const Case &c, Data &d) {
    auto param = [&](std::vector<float> &v) {
        return hbn::Tensor{v.data(), hbn::DType::Float32, {c.channels()}};
    };
    auto tensor = [&](Buffer &b) { return hbn::Tensor{b.get(), c.dtype, c.shape()}; };
    hbn::BatchNormOptions options;
    options.training = c.mode == Mode::Training;
    options.layout = c.layout;
    options.momentum = kMomentum;
    options.eps = kEps;
    if (c.pass == Pass::Forward) {
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
    auto r = std::make_unique<HbnBackwardRunner>();
    r->dy = tensor(d.dy);
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

// Backward: dx = x ^ dy, bitwise. It reads x and dy and writes dx once each,
// 3 bytes per byte of x (12 per float32 element, the backward's least
// traffic) in every dtype, with no arithmetic that could bound it; with
// plain or (AVX2) streaming stores.
using XorKernel = void (*)(char *, const char *, const char *, size_t);

template <bool Stream>
__attribute__((target("avx2"))) void xor_avx2(char *dst, const char *a, const char *b, size_t n) {
    // dst, a and b are 64-byte aligned: page-aligned buffers, 64-byte parts.
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m256i *pa = reinterpret_cast<const __m256i *>(a + i);
        const __m256i *pb = reinterpret_cast<const __m256i *>(b + i);
        __m256i *out = reinterpret_cast<__m256i *>(dst + i);
        const __m256i v0 = _mm256_xor_si256(_mm256_load_si256(pa), _mm256_load_si256(pb));
        const __m256i v1 = _mm256_xor_si256(_mm256_load_si256(pa + 1), _mm256_load_si256(pb + 1));
        if (Stream) {
            _mm256_stream_si256(out, v0);
            _mm256_stream_si256(out + 1, v1);
        } else {
            _mm256_store_si256(out, v0);
            _mm256_store_si256(out + 1, v1);
        }
    }
    for (; i < n; ++i) dst[i] = a[i] ^ b[i];
    if (Stream) _mm_sfence();
}

void xor_plain(char *dst, const char *a, const char *b, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] = a[i] ^ b[i];  // SSE2, by the compiler
}

struct Xor {
    char *dst;
    const char *a, *b;
    XorKernel kernel;
    void operator()(size_t begin, size_t end) const {
        kernel(dst + begin, a + begin, b + begin, end - begin);
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

std::unique_ptr<Runner> make_copy(const Case &c, Data &d) {
    char *y = static_cast<char *>(d.y.get());
    const char *x = static_cast<const char *>(d.x.get());
    const size_t bytes = c.tensor_bytes();
    std::vector<std::unique_ptr<Runner>> candidates;
    if (c.pass == Pass::Forward) {
        const bool avx512 = __builtin_cpu_supports("avx512f");
        candidates.push_back(make_copy_runner(Copy{y, x, memcpy_kernel}, bytes, "memcpy"));
        candidates.push_back(make_copy_runner(Copy{y, x, avx512 ? stream_copy_avx512 : stream_copy_sse2},
                                              bytes,
                                              avx512 ? "AVX-512 streaming copy" : "SSE2 streaming copy"));
    } else {
        const char *dy = static_cast<const char *>(d.dy.get());
        if (__builtin_cpu_supports("avx2")) {
            candidates.push_back(make_copy_runner(Xor{y, x, dy, xor_avx2<false>}, bytes, "dx = x ^ dy, AVX2"));
            candidates.push_back(make_copy_runner(Xor{y, x, dy, xor_avx2<true>}, bytes,
                                                  "dx = x ^ dy, AVX2, streaming stores"));
        } else {
            candidates.push_back(make_copy_runner(Xor{y, x, dy, xor_plain}, bytes, "dx = x ^ dy"));
        }
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

// Checks y's guard, then check_channel(ch, M, offset) on channels 0, C / 2
// and C - 1, offset(m) being the element offset of the channel's m-th value
// (of M); the first error found, or "".
template <class F>
std::string check_channels(const Case &c, const Data &d, F check_channel) {
    if (!guard_intact(d.y.get(), c.tensor_bytes())) return "wrote past the end of the output";
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

std::string check_forward(const Case &c, Impl impl, const Data &d) {
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
            const double x = load(c, d.x.get(), i);
            const double want = impl == Impl::Copy
                                    ? x
                                    : (x - mean) / std::sqrt(var + kEps) * d.weight[ch] + d.bias[ch];
            const std::string err =
                compare("y", i, load(c, d.y.get(), i), want, tol * (1 + std::abs(want)));
            if (!err.empty()) return err;
        }
        return "";
    });
}

// PyTorch's native_batch_norm_backward formulas (see hbn/batch_norm.h), on
// the statistics the implementations were given. Bounds are relative to the
// magnitudes each result is formed from: grad_input's terms, and the sums of
// |dy| and |dy * xhat| for grad_bias and grad_weight. Float accumulation over
// a channel stays well inside 1e-6 of the latter (libtorch's and oneDNN's
// NHWC sums, on 2 threads at the large size: 4e-8); the sums themselves, of
// random signs, are about 1 / sqrt(M) of them, so a wrong one is caught.
std::string check_backward(const Case &c, Impl impl, const Data &d) {
    const double tol = dtype_info(c.dtype).tolerance, sum_tol = 1e-6;
    const void *x = d.x.get(), *dy = d.dy.get(), *dx = d.y.get();
    const bool training = c.mode == Mode::Training;
    return check_channels(c, d, [&](int64_t ch, int64_t M, auto offset) -> std::string {
        if (impl == Impl::Copy) {
            for (int k = 0; k < 64; ++k) {
                const int64_t i = offset(sample(M, k));
                const std::string err = compare("dx bits", i, load_bits(c, dx, i),
                                                load_bits(c, x, i) ^ load_bits(c, dy, i), 0);
                if (!err.empty()) return err;
            }
            return "";
        }
        const double mean = training ? d.batch_mean[ch] : d.running_mean[ch];
        const double inv_std = training ? d.batch_inv_std[ch]
                                        : 1 / std::sqrt(d.running_var[ch] + kEps);
        double sum_dy = 0, sum_dy_xhat = 0, abs_dy = 0, abs_dy_xhat = 0;
        for (int64_t m = 0; m < M; ++m) {
            const int64_t i = offset(m);
            const double g = load(c, dy, i), g_xhat = g * (load(c, x, i) - mean) * inv_std;
            sum_dy += g, abs_dy += std::abs(g);
            sum_dy_xhat += g_xhat, abs_dy_xhat += std::abs(g_xhat);
        }
        std::string err = compare("grad_bias", ch, d.grad_bias[ch], sum_dy, sum_tol * abs_dy);
        if (err.empty())
            err = compare("grad_weight", ch, d.grad_weight[ch], sum_dy_xhat, sum_tol * abs_dy_xhat);
        const double scale = d.weight[ch] * inv_std, mean_dy = sum_dy / M, slope = sum_dy_xhat / M;
        for (int k = 0; k < 64 && err.empty(); ++k) {
            const int64_t i = offset(sample(M, k));
            const double g = load(c, dy, i), xhat = (load(c, x, i) - mean) * inv_std;
            const double want = training ? scale * (g - mean_dy - xhat * slope) : scale * g;
            const double terms = training ? std::abs(scale) * (std::abs(g) + std::abs(mean_dy) +
                                                               std::abs(xhat * slope))
                                          : std::abs(want);
            err = compare("dx", i, load(c, dx, i), want, tol * (1 + terms));
        }
        return err;
    });
}

std::string check(const Case &c, Impl impl, const Data &d) {
    return c.pass == Pass::Forward ? check_forward(c, impl, d) : check_backward(c, impl, d);
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
        switch (impl) {
        case Impl::Hbn: cur.runner = make_hbn(c, d); break;
        case Impl::Copy: cur.runner = make_copy(c, d); break;
        case Impl::Onednn: cur.runner = make_onednn(c, d); break;
        case Impl::Torch: cur.runner = make_torch(c, d); break;
        }
        // Poison the outputs (all-ones bits: NaN in every dtype) so that the
        // check sees this implementation's, then warm up (JIT, thread pools,
        // caches).
        std::memset(d.y.get(), 0xff, c.tensor_bytes());
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

void register_all() {
    for (const Size &size : kSizes)
        for (const DTypeInfo &dtype : kDTypes)
            for (hbn::Layout layout : {hbn::Layout::NCHW, hbn::Layout::NHWC})
                for (Pass pass : {Pass::Forward, Pass::Backward})
                    for (Mode mode : {Mode::Inference, Mode::Training})
                        for (Impl impl : {Impl::Hbn, Impl::Copy, Impl::Onednn, Impl::Torch}) {
                            const Case c{pass, mode, dtype.dtype, layout, size.name,
                                         size.dims(dtype.dtype)};
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
