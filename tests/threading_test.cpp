// Concurrent calls from many threads on distinct data.
#include "test_util.h"

#include <thread>

namespace hbn_test {
namespace {

using hbn::DType;
using hbn::Layout;

TEST(Threading, ConcurrentCallsOnDistinctDataAreCorrect) {
    constexpr int threads = 8, calls_per_thread = 20;
    std::vector<BatchNormCase> cases;
    std::vector<ReferenceResult> expected;
    for (int i = 0; i < threads; i++) {
        // Mixed modes, layouts, dtypes and sizes (tiny ones run serially,
        // large ones on the thread pool).
        const Layout layout = i % 2 ? Layout::NHWC : Layout::NCHW;
        const DType dtype = i % 3 ? DType::Float32 : DType::Float16;
        const std::vector<int64_t> shape = i % 4 < 2 ? std::vector<int64_t>{4, 16, 24, 24}
                                                     : std::vector<int64_t>{2, 3};
        cases.emplace_back(shape, layout, dtype, DType::Float32, i % 2 == 0, 100 + i);
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
        const DType dtype = i % 3 ? DType::Float32 : DType::Float16;
        expect_close(cases[i].output.values(), expected[i].output, output_tolerance(dtype),
                     "thread " + std::to_string(i) + " output");
        expect_close(cases[i].running_var.values(), expected[i].running_var, 2e-6,
                     "thread " + std::to_string(i) + " running_var");
    }
}

}  // namespace
}  // namespace hbn_test
