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
        dtypes.push_back(i % 3 ? DType::Float32 : DType::Float16);
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

// Two concurrent calls whose outputs (64 MiB each) take the streamed path,
// where hbn's own code runs on Halide's thread pool: the ThreadSanitizer job
// runs this test. The reference is checked on a sample of the elements, so
// that it stays quick under the sanitizer.
TEST(Threading, ConcurrentStreamedOutputs) {
    const std::vector<int64_t> shape = {16, 32, 182, 182};  // 67.8 MB of float32
    const int64_t channels = shape[1], inner = shape[2] * shape[3];
    const int64_t count = shape[0] * channels * inner;
    const std::vector<float> mean = {0.5f, -1.0f}, var = {2.0f, 0.25f}, weight = {1.5f, -0.5f}, bias = {0.1f, 2.0f};
    std::vector<float> x(count);
    for (int64_t i = 0; i < count; i++) {
        x[i] = static_cast<float>(i % 251) * 0.01f - 1;
    }
    std::vector<std::vector<float>> outputs(2, std::vector<float>(count));
    std::vector<std::vector<float>> params(2 * 4);  // per call: mean, var, weight, bias
    std::vector<std::thread> calls;
    std::vector<std::string> errors(2);
    for (int call = 0; call < 2; call++) {
        for (int k = 0; k < 4; k++) {
            const std::vector<float> &source = k == 0 ? mean : k == 1 ? var : k == 2 ? weight : bias;
            params[call * 4 + k].assign(channels, source[call]);
        }
        calls.emplace_back([&, call] {
            try {
                const auto channel = [&](int k) {
                    return hbn::Tensor{params[call * 4 + k].data(), DType::Float32, {channels}};
                };
                hbn::batch_norm({x.data(), DType::Float32, shape}, channel(0), channel(1), channel(2),
                                channel(3), {outputs[call].data(), DType::Float32, shape});
            } catch (const std::exception &e) {
                errors[call] = e.what();
            }
        });
    }
    for (auto &call : calls) {
        call.join();
    }
    for (int call = 0; call < 2; call++) {
        ASSERT_EQ(errors[call], "") << "call " << call;
        const double scale = weight[call] / std::sqrt(double(var[call]) + 1e-5);
        std::vector<double> sampled, expected;
        for (int64_t i = 0; i < count; i += 4099) {
            sampled.push_back(outputs[call][i]);
            expected.push_back((x[i] - double(mean[call])) * scale + bias[call]);
        }
        expect_close(sampled, expected, output_tolerance(DType::Float32), "call " + std::to_string(call));
    }
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
