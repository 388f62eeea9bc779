// Concurrent calls from many threads on distinct data.
#include "test_util.h"

#include "HalideRuntime.h"

#include <atomic>
#include <cmath>
#include <thread>

namespace hbn_test {
namespace {

using hbn::DType;
using hbn::Layout;

TEST(Threading, ConcurrentCallsOnDistinctDataAreCorrect) {
    constexpr int threads = 8, calls_per_thread = 20;
    std::vector<BatchNormCase> cases;
    std::vector<ReferenceResult> expected;
    std::vector<DType> dtypes;
    for (int i = 0; i < threads; i++) {
        // Mixed modes, layouts, dtypes and sizes (tiny ones run serially,
        // large ones on the thread pool).
        const Layout layout = i % 2 ? Layout::NHWC : Layout::NCHW;
        dtypes.push_back(all_dtypes[i % all_dtypes.size()]);
        const std::vector<int64_t> shape = i % 4 < 2 ? std::vector<int64_t>{4, 16, 24, 24}
                                                     : std::vector<int64_t>{2, 3};
        cases.emplace_back(shape, layout, dtypes[i], DType::Float32, i % 2 == 0, 100 + i);
        expected.push_back(cases.back().reference());
    }
    std::vector<std::thread> pool;
    std::vector<std::string> errors(threads);
    for (int i = 0; i < threads; i++) {
        pool.emplace_back([&, i] {
            try {
                BatchNormCase &t = cases[i];
                // Training updates the running statistics each call: keep
                // the first call's inputs by restoring them.
                const HostTensor mean0 = t.running_mean, var0 = t.running_var;
                for (int k = 0; k < calls_per_thread; k++) {
                    t.running_mean = mean0;
                    t.running_var = var0;
                    t.run();
                }
            } catch (const std::exception &e) {
                errors[i] = e.what();
            }
        });
    }
    for (auto &th : pool) {
        th.join();
    }
    for (int i = 0; i < threads; i++) {
        EXPECT_EQ(errors[i], "") << "thread " << i;
        expect_close(cases[i].output.values(), expected[i].output, output_tolerance(dtypes[i]),
                     "thread " + std::to_string(i) + " output");
        expect_close(cases[i].running_var.values(), expected[i].running_var, 2e-6,
                     "thread " + std::to_string(i) + " running_var");
    }
}

// Two concurrent calls whose outputs (64 MiB each) are written with streaming
// stores from Halide's thread pool: inference on NCHW, and training on NHWC
// (statistics first, then the streamed normalization). The
// sanitizer jobs run this test rather than the slower LargeOutputs one; the
// reference is checked on a sample of the elements, with the training
// statistics from every element, in double.
TEST(Threading, ConcurrentStreamedOutputs) {
    const int64_t channels = 32, count = int64_t(16) * 182 * 182 * channels;  // 67.8 MB of float32
    const std::vector<int64_t> shapes[2] = {{16, channels, 182, 182}, {16, 182, 182, channels}};
    const Layout layouts[2] = {Layout::NCHW, Layout::NHWC};
    const auto channel_of = [&](int call, int64_t i) {
        return call == 0 ? (i / (182 * 182)) % channels : i % channels;
    };
    std::vector<float> x(count);
    for (int64_t i = 0; i < count; i++) {
        x[i] = static_cast<float>(i % 251) * 0.01f - 1;
    }
    // Per call: running_mean, running_var, weight, bias.
    const float initial[2][4] = {{0.5f, 2.0f, 1.5f, 0.1f}, {-1.0f, 0.25f, -0.5f, 2.0f}};
    std::vector<std::vector<float>> params(8);
    for (int call = 0; call < 2; call++) {
        for (int k = 0; k < 4; k++) {
            params[call * 4 + k].assign(channels, initial[call][k]);
        }
    }
    std::vector<std::vector<float>> outputs(2, std::vector<float>(count));
    std::vector<std::thread> calls;
    std::vector<std::string> errors(2);
    for (int call = 0; call < 2; call++) {
        calls.emplace_back([&, call] {
            try {
                const auto channel = [&](int k) {
                    return hbn::Tensor{params[call * 4 + k].data(), DType::Float32, {channels}};
                };
                hbn::BatchNormOptions options;
                options.layout = layouts[call];
                options.training = call == 1;
                hbn::batch_norm({x.data(), DType::Float32, shapes[call]}, channel(0), channel(1), channel(2),
                                channel(3), {outputs[call].data(), DType::Float32, shapes[call]}, options);
            } catch (const std::exception &e) {
                errors[call] = e.what();
            }
        });
    }
    for (auto &call : calls) {
        call.join();
    }
    // The training call's batch statistics, two-pass in double.
    std::vector<double> sum(channels), sum_sq(channels);
    for (int64_t i = 0; i < count; i++) {
        sum[channel_of(1, i)] += x[i];
    }
    const double m = double(count / channels);
    for (int64_t i = 0; i < count; i++) {
        const double d = x[i] - sum[channel_of(1, i)] / m;
        sum_sq[channel_of(1, i)] += d * d;
    }
    for (int call = 0; call < 2; call++) {
        ASSERT_EQ(errors[call], "") << "call " << call;
        std::vector<double> sampled, expected;
        for (int64_t i = 0; i < count; i += 4099) {
            const int64_t c = channel_of(call, i);
            const double mean = call == 0 ? initial[0][0] : sum[c] / m;
            const double var = call == 0 ? initial[0][1] : sum_sq[c] / m;
            sampled.push_back(outputs[call][i]);
            expected.push_back((x[i] - mean) * initial[call][2] / std::sqrt(var + 1e-5) + initial[call][3]);
        }
        expect_close(sampled, expected, output_tolerance(DType::Float32), "call " + std::to_string(call));
    }
    std::vector<double> running_var(channels);
    for (int64_t c = 0; c < channels; c++) {
        running_var[c] = 0.9 * initial[1][1] + 0.1 * sum_sq[c] / (m - 1);
    }
    expect_close(std::vector<double>(params[5].begin(), params[5].end()), running_var, 2e-6, "running_var");
}

std::atomic<int> parallel_loops{0};

int counting_do_par_for(void *user_context, halide_task_t task, int min, int size, uint8_t *closure) {
    parallel_loops++;
    return halide_default_do_par_for(user_context, task, min, size, closure);
}

// Per-call latency of tiny tensors: they must not wake the thread pool, while
// large ones must use it.
TEST(Threading, TinyTensorsRunWithoutTheThreadPool) {
    HBN_SKIP_UNLESS_ON_CPU("only the CPU kernels use the thread pool");
    const halide_do_par_for_t previous = halide_set_custom_do_par_for(counting_do_par_for);
    for (bool training : {false, true}) {
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            parallel_loops = 0;
            BatchNormCase tiny({2, 2}, layout, DType::Float32, DType::Float32, training);
            tiny.run();
            BatchNormCase small({2, 8, 16, 16}, layout, DType::Float16, DType::Float32, training);
            small.run();
            EXPECT_EQ(parallel_loops.load(), 0) << (training ? "training " : "inference ")
                                                << (layout == Layout::NCHW ? "NCHW" : "NHWC");
            BatchNormCase large({8, 32, 32, 32}, layout, DType::Float32, DType::Float32, training);
            large.run();
            EXPECT_GT(parallel_loops.load(), 0) << "a large tensor ran serially";
        }
    }
    halide_set_custom_do_par_for(previous);
}

}  // namespace
}  // namespace hbn_test
