// Benchmarks hbn::batch_norm against a copy of the same bytes, oneDNN and
// libtorch, case by case, in one run.
//
// Names are BM/<mode>/<dtype>/<layout>/<size>/<impl>, impl being hbn, copy,
// onednn or torch; bench/report.py groups them by case. Every implementation
// reports the bytes of x read plus y written, in both modes, so that their
// GB/s compare. Buffers are allocated, filled and touched once per dtype,
// layout and size (outside any timed loop), and each implementation is
// warmed up once and checked on a sample of outputs after it is timed.
#include "bench_case.h"

#include <benchmark/benchmark.h>
#include <immintrin.h>

#include <malloc.h>

#include <algorithm>
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

// ---- Sizes, as (N, C, H, W) ----
struct Size {
    const char *name;
    std::vector<int64_t> float32_dims, float16_dims;
};
const Size kSizes[] = {
    // MindSpore's documented example (N=2, C=2): per-call latency.
    {"tiny", {2, 2}, {2, 2}},
    // x + y = 51 MB in float32: inside this VM's 480 MB L3.
    {"mid", {32, 64, 56, 56}, {32, 64, 56, 56}},
    // x + y = 822 MB in both dtypes: DRAM.
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

// ---- float16 ----
__attribute__((target("f16c"))) uint16_t to_half(float f) {
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
}
__attribute__((target("f16c"))) float from_half(uint16_t h) { return _cvtsh_ss(h); }

double load(const Case &c, const void *p, int64_t i) {
    return c.dtype == hbn::DType::Float16 ? from_half(static_cast<const uint16_t *>(p)[i])
                                          : static_cast<const float *>(p)[i];
}

// ---- Parallel helpers (setup only, and the copy) ----
void parallel_for(int64_t n, const std::function<void(int, int64_t, int64_t)> &body) {
    std::vector<std::thread> threads;
    for (int t = 1; t < kThreads; ++t)
        threads.emplace_back(body, t, n * t / kThreads, n * (t + 1) / kThreads);
    body(0, 0, n / kThreads);
    for (auto &t : threads) t.join();
}

// memcpy split across kThreads threads: the caller and kThreads - 1 persistent
// workers (no thread creation in the timed loop).
class CopyPool {
public:
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
    void copy(void *dst, const void *src, size_t bytes) {
        if (workers_.empty() || bytes < (256u << 10)) {
            std::memcpy(dst, src, bytes);
            return;
        }
        {
            std::lock_guard<std::mutex> lock(mutex_);
            dst_ = static_cast<char *>(dst), src_ = static_cast<const char *>(src), bytes_ = bytes;
            pending_ = static_cast<int>(workers_.size());
            ++generation_;
        }
        start_.notify_all();
        copy_part(0);
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [this] { return pending_ == 0; });
    }

private:
    void copy_part(int t) const {
        auto edge = [&](int i) { return bytes_ * i / kThreads / 64 * 64; };
        const size_t begin = edge(t), end = t + 1 == kThreads ? bytes_ : edge(t + 1);
        std::memcpy(dst_ + begin, src_ + begin, end - begin);
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
            copy_part(t);
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
    char *dst_ = nullptr;
    const char *src_ = nullptr;
    size_t bytes_ = 0;
};

// ---- Buffers ----
uint64_t splitmix(uint64_t &s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
float uniform(uint64_t &s, float lo, float hi) {
    return lo + (hi - lo) * static_cast<float>(splitmix(s) >> 40) * 0x1p-24f;
}

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

std::unique_ptr<Data> make_data(const Case &c) {
    auto d = std::make_unique<Data>();
    d->x = allocate(c.tensor_bytes());
    d->y = allocate(c.tensor_bytes());
    // Writing every page here is the first touch; nothing timed page-faults.
    parallel_for(c.elements(), [&](int t, int64_t begin, int64_t end) {
        uint64_t s = 0x1234 + t;
        for (int64_t i = begin; i < end; ++i) {
            const float v = uniform(s, -2, 2);
            if (c.dtype == hbn::DType::Float16)
                static_cast<uint16_t *>(d->x.get())[i] = to_half(v);
            else
                static_cast<float *>(d->x.get())[i] = v;
        }
        std::memset(static_cast<char *>(d->y.get()) + begin * c.element_bytes(), 0,
                    (end - begin) * c.element_bytes());
    });
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

// ---- hbn and copy ----
struct HbnRunner : Runner {
    hbn::Tensor x, mean, var, weight, bias, y;
    hbn::BatchNormOptions options;
    void run() override { hbn::batch_norm(x, mean, var, weight, bias, y, options); }
};

std::unique_ptr<Runner> make_hbn(const Case &c, Data &d) {
    auto r = std::make_unique<HbnRunner>();
    auto param = [&](std::vector<float> &v) {
        return hbn::Tensor{v.data(), hbn::DType::Float32, {c.channels()}};
    };
    r->x = {d.x.get(), c.dtype, c.shape()};
    r->y = {d.y.get(), c.dtype, c.shape()};
    r->mean = param(d.running_mean);
    r->var = param(d.running_var);
    r->weight = param(d.weight);
    r->bias = param(d.bias);
    r->options.training = c.mode == Mode::Training;
    r->options.layout = c.layout;
    r->options.momentum = kMomentum;
    r->options.eps = kEps;
    return r;
}

struct CopyRunner : Runner {
    void *dst;
    const void *src;
    size_t bytes;
    void run() override {
        static CopyPool pool;
        pool.copy(dst, src, bytes);
    }
};

std::unique_ptr<Runner> make_copy(const Case &c, Data &d) {
    auto r = std::make_unique<CopyRunner>();
    r->dst = d.y.get(), r->src = d.x.get(), r->bytes = c.tensor_bytes();
    r->label = std::to_string(c.tensor_bytes() < (256 << 10) ? 1 : kThreads) + "-thread memcpy";
    return r;
}

// ---- Checking a sample of outputs against a double-precision reference ----
std::string check(const Case &c, Impl impl, const Data &d) {
    if (!guard_intact(d.y.get(), c.tensor_bytes())) return "wrote past the end of the output";
    const int64_t C = c.channels(), M = c.elements() / C, S = M / c.dims[0];
    const double tol = c.dtype == hbn::DType::Float16 ? 4e-3 : 1e-4;
    for (int64_t ch : {int64_t{0}, C / 2, C - 1}) {
        double mean = d.running_mean[ch], var = d.running_var[ch];
        if (c.mode == Mode::Training) {  // biased batch statistics, two passes
            double sum = 0, sq = 0;
            for (int64_t m = 0; m < M; ++m) sum += load(c, d.x.get(), c.offset(m / S, ch, m % S));
            mean = sum / M;
            for (int64_t m = 0; m < M; ++m) {
                const double v = load(c, d.x.get(), c.offset(m / S, ch, m % S)) - mean;
                sq += v * v;
            }
            var = sq / M;
        }
        for (int k = 0; k < 64; ++k) {
            const int64_t m = (M - 1) * k / 63, i = c.offset(m / S, ch, m % S);
            const double x = load(c, d.x.get(), i), y = load(c, d.y.get(), i);
            const double want = impl == Impl::Copy
                                    ? x
                                    : (x - mean) / std::sqrt(var + kEps) * d.weight[ch] + d.bias[ch];
            if (!(std::abs(y - want) <= tol * (1 + std::abs(want)))) {
                char msg[160];
                std::snprintf(msg, sizeof msg, "wrong result: y[%lld] = %.7g, want %.7g",
                              static_cast<long long>(i), y, want);
                return msg;
            }
        }
    }
    return "";
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
        switch (impl) {
        case Impl::Hbn: cur.runner = make_hbn(c, d); break;
        case Impl::Copy: cur.runner = make_copy(c, d); break;
        case Impl::Onednn: cur.runner = make_onednn(c, d); break;
        case Impl::Torch: cur.runner = make_torch(c, d); break;
        }
        // Poison y (NaN in both dtypes) so that the check sees this
        // implementation's output, then warm up (JIT, thread pools, caches).
        std::memset(d.y.get(), 0xff, c.tensor_bytes());
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
    state.SetBytesProcessed(state.iterations() * 2 * c.tensor_bytes());
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
        for (hbn::DType dtype : {hbn::DType::Float32, hbn::DType::Float16})
            for (hbn::Layout layout : {hbn::Layout::NCHW, hbn::Layout::NHWC})
                for (Mode mode : {Mode::Inference, Mode::Training})
                    for (Impl impl : {Impl::Hbn, Impl::Copy, Impl::Onednn, Impl::Torch}) {
                        const Case c{mode, dtype, layout, size.name,
                                     dtype == hbn::DType::Float16 ? size.float16_dims
                                                                  : size.float32_dims};
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
