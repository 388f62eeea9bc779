// Concurrent calls from many threads on distinct data.
#include "test_util.h"

#include "HalideRuntime.h"

#include <atomic>

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
