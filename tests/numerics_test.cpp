// Numerically hard statistics: a large offset with a small spread (where
// E[x^2] - E[x]^2 in float32 cancels catastrophically) and channels of more
// than 2^24 values (where float32 counts and running sums stall).
#include "test_util.h"

#include <cstdio>

namespace hbn_test {
namespace {

using hbn::DType;
using hbn::Layout;

// Runs a training case and checks the batch variance (through saved_inv_std
// and running_var) and mean against the double reference.
void check_training_statistics(BatchNormCase &t, double variance_tolerance, const char *label) {
    const ReferenceResult expected = t.reference();
    const auto channels = static_cast<int64_t>(expected.batch_mean.size());
    HostTensor saved_mean(DType::Float32, {channels}, std::vector<double>(channels, 0));
    HostTensor saved_inv_std(DType::Float32, {channels}, std::vector<double>(channels, 0));
    hbn::batch_norm_training(t.x.view(), t.running_mean.view(), t.running_var.view(), t.weight.view(),
                             t.bias.view(), t.output.view(), saved_mean.view(), saved_inv_std.view(), t.options);

    for (int64_t c = 0; c < channels; c++) {
        // hbn's biased batch variance, recovered from its float32 1/sqrt(var + eps).
        const double inv_std = saved_inv_std.get(c);
        const double var = 1 / (inv_std * inv_std) - t.options.eps;
        const double rel = std::abs(var - expected.batch_var[c]) / expected.batch_var[c];
        std::printf("%s channel %lld: variance %.9g, reference %.9g, relative error %.2e\n", label,
                    static_cast<long long>(c), var, expected.batch_var[c], rel);
        EXPECT_LE(rel, variance_tolerance) << label << " channel " << c;
        EXPECT_NEAR(saved_mean.get(c), expected.batch_mean[c], 1e-6 * std::abs(expected.batch_mean[c]));
    }
    expect_close(t.running_var.values(), expected.running_var, 2e-6, "running_var");
    // float32 cannot hold x - mean to better than half an ulp of x (5e-4 at
    // 1e4), so y is checked at that scale rather than at the variance's.
    const double x_ulp_in_std = std::abs(expected.batch_mean[0]) * 6e-8 * expected.inv_std[0];
    expect_close(t.output.values(), expected.output, 4 * x_ulp_in_std + 2e-6, "output");
}

class LargeOffset : public ::testing::TestWithParam<Layout> {};

TEST_P(LargeOffset, VarianceMatchesReference) {
    // mean / std = 1e4
    BatchNormCase t({8, 5, 33, 31}, GetParam(), DType::Float32, DType::Float32, true, 23, 1e4, 1.0);
    check_training_statistics(t, 1e-3, "mean/std 1e4");
}

TEST_P(LargeOffset, MoreThan2To24ValuesPerChannel) {
    // 2 channels of 2^24 + 2^13 values each, mean / std = 1e4.
    std::vector<int64_t> shape = GetParam() == Layout::NCHW ? std::vector<int64_t>{2, 2, 4096, 2049}
                                                             : std::vector<int64_t>{2, 4096, 2049, 2};
    BatchNormCase t(shape, GetParam(), DType::Float32, DType::Float32, true, 29, 1000.0, 0.1);
    check_training_statistics(t, 1e-3, "2^24+ values, mean/std 1e4");
}

INSTANTIATE_TEST_SUITE_P(Numerics, LargeOffset, ::testing::Values(Layout::NCHW, Layout::NHWC),
                         [](const auto &info) { return info.param == Layout::NCHW ? "nchw" : "nhwc"; });

}  // namespace
}  // namespace hbn_test
