// hbn_sync_overhead: what synchronized batch norm (BatchNormOptions::all_reduce)
// costs. The global batch is the benchmark's mid size, 32x64x56x56 float32,
// split by images across the MPI processes. For each layout and for the
// training forward (batch_norm_training) and backward (batch_norm_backward),
// every process times, per call:
//   local:  the call on its own slice without all_reduce (the kernel time);
//   synced: the same call with all_reduce = hbn::mpi_all_reduce(MPI_COMM_WORLD);
//   in all-reduce: the part of the synced call spent inside the hook.
// Local and synced calls alternate. Each figure is the median over the
// repetitions of the slowest process's time in that call (the step waits
// for the slowest). Rank 0 prints a markdown table. Run it with scripts/bench.sh, or
//   mpirun -np 2 -x HL_NUM_THREADS=1 build/bench/bench/hbn_sync_overhead [repetitions]
#include <hbn/mpi.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int kWarmups = 3;
constexpr int64_t kBatch = 32, kChannels = 64, kHeight = 56, kWidth = 56;
// The all-reduces of one call (see BatchNormOptions::all_reduce).
constexpr int kForwardAllReduces = 4, kBackwardAllReduces = 3;

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
    return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string cpu_model() {
    std::ifstream cpuinfo("/proc/cpuinfo");
    std::string line;
    while (std::getline(cpuinfo, line)) {
        if (line.rfind("model name", 0) == 0) {
            const auto colon = line.find(':');
            if (colon != std::string::npos) {
                const auto start = line.find_first_not_of(" \t", colon + 1);
                return start == std::string::npos ? "" : line.substr(start);
            }
        }
    }
    return "unknown CPU";
}

// The median over the repetitions of each repetition's largest time among
// the processes; meaningful on rank 0.
double slowest_median(std::vector<double> times) {
    std::vector<double> slowest(times.size());
    MPI_Reduce(times.data(), slowest.data(), static_cast<int>(times.size()), MPI_DOUBLE, MPI_MAX, 0,
               MPI_COMM_WORLD);
    std::sort(slowest.begin(), slowest.end());
    const size_t n = slowest.size();
    return n % 2 ? slowest[n / 2] : (slowest[n / 2 - 1] + slowest[n / 2]) / 2;
}

struct Row {
    std::string name;
    double local = 0, synced = 0, in_all_reduce = 0;
};

// One process's slice of the batch, and what the calls write.
class Case {
public:
    Case(hbn::Layout layout, int64_t images, int rank) : layout_(layout), images_(images) {
        const int64_t elements = images * kChannels * kHeight * kWidth;
        x_.resize(elements);
        y_.resize(elements);
        dy_.resize(elements);
        dx_.resize(elements);
        std::mt19937 random(1234 + rank);
        std::normal_distribution<float> normal(0.5f, 2.0f);
        for (int64_t i = 0; i < elements; i++) {
            x_[i] = normal(random);
            dy_[i] = normal(random);
        }
    }

    std::string name(const char *mode) const {
        return std::string(mode) + (layout_ == hbn::Layout::NCHW ? "/float32/nchw/mid" : "/float32/nhwc/mid");
    }

    void forward(const hbn::BatchNormOptions &options) {
        Saved &saved = saved_for(options);
        hbn::batch_norm_training(data(x_), channel(running_mean_), channel(running_var_), channel(weight_),
                                 channel(bias_), data(y_), channel(saved.mean), channel(saved.inv_std), options);
    }

    // On the statistics that the forward of the same kind (local or synced)
    // saved.
    void backward(const hbn::BatchNormOptions &options) {
        Saved &saved = saved_for(options);
        hbn::batch_norm_backward(data(dy_), data(x_), channel(weight_), hbn::Tensor{}, hbn::Tensor{},
                                 channel(saved.mean), channel(saved.inv_std), data(dx_), channel(grad_weight_),
                                 channel(grad_bias_), options);
    }

private:
    hbn::Tensor data(std::vector<float> &v) const {
        std::vector<int64_t> shape = layout_ == hbn::Layout::NCHW
                                         ? std::vector<int64_t>{images_, kChannels, kHeight, kWidth}
                                         : std::vector<int64_t>{images_, kHeight, kWidth, kChannels};
        return {v.data(), hbn::DType::Float32, std::move(shape)};
    }
    static hbn::Tensor channel(std::vector<float> &v) { return {v.data(), hbn::DType::Float32, {kChannels}}; }

    struct Saved {
        std::vector<float> mean = std::vector<float>(kChannels), inv_std = std::vector<float>(kChannels, 1.0f);
    };
    Saved &saved_for(const hbn::BatchNormOptions &options) { return options.all_reduce ? synced_ : local_; }

    hbn::Layout layout_;
    Saved local_, synced_;
    int64_t images_;
    std::vector<float> x_, y_, dy_, dx_;
    std::vector<float> running_mean_ = std::vector<float>(kChannels, 0.0f),
                       running_var_ = std::vector<float>(kChannels, 1.0f),
                       weight_ = std::vector<float>(kChannels, 1.0f), bias_ = std::vector<float>(kChannels, 0.0f),
                       grad_weight_ = std::vector<float>(kChannels), grad_bias_ = std::vector<float>(kChannels);
};

int run(int rank, int processes, int repetitions) {
    if (processes > kBatch) {
        if (rank == 0) {
            std::fprintf(stderr, "hbn_sync_overhead: at most %lld processes (one image each)\n",
                         static_cast<long long>(kBatch));
        }
        return 2;
    }
    const int64_t first = kBatch * rank / processes, last = kBatch * (rank + 1) / processes;

    // The hook: MPI's all-reduce, timed, and its calls counted.
    double hook_seconds = 0;
    int hook_calls = 0;
    const hbn::AllReduce mpi = hbn::mpi_all_reduce(MPI_COMM_WORLD);
    hbn::BatchNormOptions local, synced;
    local.training = synced.training = true;
    synced.all_reduce = [&hook_seconds, &hook_calls, mpi](double *values, std::size_t count) {
        const auto start = Clock::now();
        mpi(values, count);
        hook_seconds += seconds_since(start);
        hook_calls++;
    };

    struct Times {
        std::vector<double> local, synced, in_hook;
    };
    bool calls_as_documented = true;
    // One timed call: a barrier, so that every process starts it together,
    // then the call; the time inside the hook and the number of its calls
    // are recorded for a synced call.
    const auto timed = [&](const auto &call, const hbn::BatchNormOptions &options, int expected_calls,
                           std::vector<double> &times, std::vector<double> *in_hook) {
        MPI_Barrier(MPI_COMM_WORLD);
        hook_seconds = 0;
        hook_calls = 0;
        const auto start = Clock::now();
        call(options);
        const double elapsed = seconds_since(start);
        if (in_hook != nullptr) {
            calls_as_documented = calls_as_documented && hook_calls == expected_calls;
            in_hook->push_back(hook_seconds);
        }
        times.push_back(elapsed);
    };
    // Local and synced calls alternate, so that the machine's drift (this
    // VM's is large) reaches both alike.
    const auto measure = [&](const std::string &name, const auto &call, int expected_calls) {
        Times t;
        for (int i = 0; i < kWarmups + repetitions; i++) {
            timed(call, local, 0, t.local, nullptr);
            timed(call, synced, expected_calls, t.synced, &t.in_hook);
        }
        for (std::vector<double> *v : {&t.local, &t.synced, &t.in_hook}) {
            v->erase(v->begin(), v->begin() + kWarmups);
        }
        return Row{name, slowest_median(t.local), slowest_median(t.synced), slowest_median(t.in_hook)};
    };

    std::vector<Row> rows;
    for (hbn::Layout layout : {hbn::Layout::NCHW, hbn::Layout::NHWC}) {
        local.layout = synced.layout = layout;
        Case c(layout, last - first, rank);
        rows.push_back(measure(c.name("training"), [&](const hbn::BatchNormOptions &o) { c.forward(o); },
                               kForwardAllReduces));
        rows.push_back(measure(c.name("backward_training"), [&](const hbn::BatchNormOptions &o) { c.backward(o); },
                               kBackwardAllReduces));
    }

    int documented = calls_as_documented ? 1 : 0;
    MPI_Allreduce(MPI_IN_PLACE, &documented, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (rank == 0) {
        std::printf("## SyncBN overhead: all_reduce = hbn::mpi_all_reduce\n\n");
        const char *threads = std::getenv("HL_NUM_THREADS");
        const long long fewest = kBatch / processes, most = (kBatch + processes - 1) / processes;
        const std::string images = fewest == most ? std::to_string(most)
                                                  : std::to_string(fewest) + " to " + std::to_string(most);
        std::printf("CPU: %s; processes: %d; HL_NUM_THREADS=%s; global batch %lldx%lldx%lldx%lld float32 (NCHW "
                    "order), %s images per process.\n\n",
                    cpu_model().c_str(), processes, threads ? threads : "(unset)", static_cast<long long>(kBatch),
                    static_cast<long long>(kChannels), static_cast<long long>(kHeight),
                    static_cast<long long>(kWidth), images.c_str());
        std::printf("Per call, on each process's slice: local without all_reduce, synced with it, and the time "
                    "inside the hook during the synced call (%d all-reduces in the forward, %d in the backward). "
                    "Median of %d calls of each (alternating, after %d warm-ups), each the slowest process's "
                    "time.\n\n",
                    kForwardAllReduces, kBackwardAllReduces, repetitions, kWarmups);
        std::printf("| case | local call (ms) | synced call (ms) | in all-reduce (ms) | overhead (synced/local - 1, %%) |\n");
        std::printf("|---|---:|---:|---:|---:|\n");
        for (const Row &r : rows) {
            std::printf("| %s | %.3f | %.3f | %.3f | %.1f |\n", r.name.c_str(), r.local * 1e3, r.synced * 1e3,
                        r.in_all_reduce * 1e3, (r.synced / r.local - 1) * 100);
        }
        if (!documented) {
            std::printf("\nWarning: a synced call did not run the documented number of all-reduces.\n");
        }
    }
    return documented ? 0 : 1;
}

}  // namespace

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank = 0, processes = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &processes);
    const int repetitions = argc > 1 ? std::max(1, std::atoi(argv[1])) : 30;
    int status = 0;
    try {
        status = run(rank, processes, repetitions);
    } catch (const hbn::Error &e) {
        // A failed call throws on every process (see BatchNormOptions::all_reduce).
        std::fprintf(stderr, "hbn_sync_overhead: process %d: %s\n", rank, e.what());
        status = 1;
    }
    MPI_Finalize();
    return status;
}
