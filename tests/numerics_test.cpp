// Numerically hard statistics: a large offset with a small spread (where
// E[x^2] - E[x]^2 in float32 cancels catastrophically) and channels of more
// than 2^24 values (where float32 counts and running sums stall). And the
// float16 and bfloat16 conversions, exactly: every value in, and rounding on
// the way out.
#include "test_util.h"

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <limits>

namespace hbn_test {
namespace {

using hbn::DType;
using hbn::Layout;

// Runs a training case and checks the batch variance (through saved_inv_std
// and running_var) and mean against the double reference.
void check_training_statistics(BatchNormCase &t, double variance_tolerance, const char *label) {
    const ReferenceResult expected = t.reference();
    const auto channels = static_cast<int64_t>(expected.batch_mean.size());
    const BatchNormCase::SavedStatistics saved = t.run_training();

    for (int64_t c = 0; c < channels; c++) {
        // hbn's biased batch variance, recovered from its float32 1/sqrt(var + eps).
        const double inv_std = saved.inv_std.get(c);
        const double var = 1 / (inv_std * inv_std) - t.options.eps;
        const double rel = std::abs(var - expected.batch_var[c]) / expected.batch_var[c];
        std::printf("%s channel %lld: variance %.9g, reference %.9g, relative error %.2e\n", label,
                    static_cast<long long>(c), var, expected.batch_var[c], rel);
        EXPECT_LE(rel, variance_tolerance) << label << " channel " << c;
        EXPECT_NEAR(saved.mean.get(c), expected.batch_mean[c], 1e-6 * std::abs(expected.batch_mean[c]));
    }
    expect_close(t.running_var.values(), expected.running_var, 2e-6, "running_var");
    // float32 cannot hold x - mean to better than half an ulp of x (5e-4 at
    // 1e4), so y is checked at that scale rather than at the variance's, and
    // at float16's rounding for float16 output.
    const double x_ulp_in_std = std::abs(expected.batch_mean[0]) * 6e-8 * expected.inv_std[0];
    expect_close(t.output.values(), expected.output, 4 * x_ulp_in_std + output_tolerance(t.x.view().dtype), "output");
}

// float32 and float16: a sum that cut float16's terms to float32 anywhere on
// the way would show here first.
class LargeOffset : public ::testing::TestWithParam<std::tuple<Layout, DType>> {
protected:
    Layout layout() const { return std::get<0>(GetParam()); }
    DType dtype() const { return std::get<1>(GetParam()); }
};

TEST_P(LargeOffset, VarianceMatchesReference) {
    // mean / std = 1e4 (float32), 1e3 (float16, whose spacing at 1e4 is 8)
    const double mean = dtype() == DType::Float32 ? 1e4 : 1e3;
    BatchNormCase t({8, 5, 33, 31}, layout(), dtype(), DType::Float32, true, 23, mean, 1.0);
    check_training_statistics(t, 1e-3, "large mean/std");
}

// A float32 running sum stalls at 2^24 (adding 1 no longer changes it), and
// a float32 count cannot tell 2^24 + 1 from 2^24.
TEST_P(LargeOffset, MoreThan2To24ValuesPerChannel) {
    // 2 channels of 2^24 + 2^13 values each, mean / std = 1e4.
    std::vector<int64_t> shape = layout() == Layout::NCHW ? std::vector<int64_t>{2, 2, 4096, 2049}
                                                          : std::vector<int64_t>{2, 4096, 2049, 2};
    BatchNormCase t(shape, layout(), dtype(), DType::Float32, true, 29, 1000.0, 0.1);
    check_training_statistics(t, 1e-3, "2^24+ values, mean/std 1e4");
}

INSTANTIATE_TEST_SUITE_P(Numerics, LargeOffset,
                         ::testing::Combine(::testing::Values(Layout::NCHW, Layout::NHWC),
                                            ::testing::Values(DType::Float32, DType::Float16)),
                         [](const auto &info) {
                             return std::string(std::get<0>(info.param) == Layout::NCHW ? "nchw" : "nhwc") + "_" +
                                    dtype_label(std::get<1>(info.param));
                         });

// A 16-bit floating-point format, decoded and rounded to by hand from its
// field widths, independently of the conversions under test.
struct Format16 {
    DType dtype;
    int exponent_bits, fraction_bits;

    int bias() const { return (1 << (exponent_bits - 1)) - 1; }
    int max_exponent_field() const { return (1 << exponent_bits) - 1; }
    // The exponent of the denormals' spacing: 2^-24 (float16), 2^-133 (bfloat16).
    int denormal_exponent() const { return 1 - bias() - fraction_bits; }

    double value(uint16_t bits) const {
        const int exponent = (bits >> fraction_bits) & max_exponent_field();
        const int significand = bits & ((1 << fraction_bits) - 1);
        const double magnitude =
            exponent == max_exponent_field()
                ? (significand ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity())
            : exponent == 0 ? std::ldexp(significand, denormal_exponent())
                            : std::ldexp((1 << fraction_bits) + significand, exponent - bias() - fraction_bits);
        return (bits & 0x8000) ? -magnitude : magnitude;
    }

    // The value nearest to v, ties to the even significand.
    double nearest(double v) const {
        const double magnitude = std::abs(v);
        // Halfway from the largest finite value to the next power of two.
        const double overflow = std::ldexp((2 << fraction_bits) - 0.5, max_exponent_field() - 1 - bias() - fraction_bits);
        if (std::isnan(v) || magnitude >= overflow) {
            return std::isnan(v) ? v : std::copysign(std::numeric_limits<double>::infinity(), v);
        }
        int exponent;
        std::frexp(magnitude, &exponent);
        const double spacing = std::ldexp(1.0, std::max(exponent - fraction_bits - 1, denormal_exponent()));
        return std::copysign(std::nearbyint(magnitude / spacing) * spacing, v);  // ties to even
    }
};

constexpr Format16 float16_format{DType::Float16, 5, 10}, bfloat16_format{DType::BFloat16, 8, 7};

class Conversions16 : public ::testing::TestWithParam<std::tuple<Format16, Layout>> {
protected:
    const Format16 &format() const { return std::get<0>(GetParam()); }
    Layout layout() const { return std::get<1>(GetParam()); }
};

// y = x exactly (scale 1: running_var + eps == 1 in float32), so every one of
// the 65536 inputs must come back as itself.
TEST_P(Conversions16, EveryValueComesBackUnchanged) {
    const int64_t channels = 16;
    std::vector<double> every_value(65536);
    for (size_t bits = 0; bits < every_value.size(); bits++) {
        every_value[bits] = format().value(static_cast<uint16_t>(bits));
    }
    const std::vector<int64_t> shape = layout() == Layout::NCHW ? std::vector<int64_t>{2, channels, 2048}
                                                                : std::vector<int64_t>{4096, channels};
    BatchNormCase t(shape, layout(), format().dtype, DType::Float32, false);
    t.x = HostTensor(format().dtype, shape, every_value);
    ASSERT_EQ(t.x.size(), every_value.size());
    for (size_t i = 0; i < every_value.size(); i += 4099) {  // the fixture stores what the decoder reads
        ASSERT_TRUE(t.x.get(i) == every_value[i] || (std::isnan(t.x.get(i)) && std::isnan(every_value[i]))) << i;
    }
    t.options.eps = 1.0 / 1024;
    t.running_mean = HostTensor(DType::Float32, {channels}, std::vector<double>(channels, 0.0));
    t.running_var = HostTensor(DType::Float32, {channels}, std::vector<double>(channels, 1 - 1.0 / 1024));
    t.weight = HostTensor(DType::Float32, {channels}, std::vector<double>(channels, 1.0));
    t.bias = HostTensor(DType::Float32, {channels}, std::vector<double>(channels, 0.0));
    t.run();
    // Every value but -0, which (-0 - 0) * 1 + 0 makes +0.
    expect_close(t.output.values(), t.reference().output, 0, "output");
}

// Float32 biases whose rounding to the format is hard: ties, just above
// them, denormals and their edge, overflow, infinities and NaN.
std::vector<double> hard_roundings(const Format16 &f) {
    const double inf = std::numeric_limits<double>::infinity();
    const double half_ulp_at_1 = std::ldexp(1.0, -f.fraction_bits - 1);
    const double denormal = std::ldexp(1.0, f.denormal_exponent());
    const double smallest_normal = std::ldexp(1.0, 1 - f.bias());
    const double largest = f.value(static_cast<uint16_t>((f.max_exponent_field() << f.fraction_bits) - 1));
    const double top_spacing = largest - f.value(static_cast<uint16_t>((f.max_exponent_field() << f.fraction_bits) - 2));
    return {1 + half_ulp_at_1, 1 + 3 * half_ulp_at_1, 1 + half_ulp_at_1 + 0x1p-20, -(2 + 4 * half_ulp_at_1),
            denormal, 1.5 * denormal, 0.5 * denormal, 0.49 * denormal, 2.5 * denormal,
            smallest_normal - denormal / 2, smallest_normal - denormal, -3 * denormal / 4, 1e4 * denormal,
            largest, largest + top_spacing / 4, largest + top_spacing / 2, -(largest + top_spacing / 2),
            std::numeric_limits<float>::max(), inf, -inf, std::nan(""), 0.1, -1 / 3.0, 3e4, 5e-5, 1e-10, 1e6};
}

// With x = 0 and weight = 0, y is the float32 bias, so the output is the
// bias rounded to the format.
TEST_P(Conversions16, OutputsRoundToNearestEven) {
    std::vector<double> bias = hard_roundings(format());
    const auto randoms = random_values(39, 0, 100, 7);
    bias.insert(bias.end(), randoms.begin(), randoms.end());
    for (bool training : {false, true}) {
        const auto channels = static_cast<int64_t>(bias.size());
        const std::vector<int64_t> shape = layout() == Layout::NCHW ? std::vector<int64_t>{2, channels, 5, 7}
                                                                    : std::vector<int64_t>{70, channels};
        BatchNormCase t(shape, layout(), format().dtype, DType::Float32, training);
        t.x = HostTensor(format().dtype, shape, std::vector<double>(t.x.size(), 0.0));
        t.weight = HostTensor(DType::Float32, {channels}, std::vector<double>(channels, 0.0));
        t.bias = HostTensor(DType::Float32, {channels}, bias);
        // A NaN with every significand bit set: rounding its bits as a
        // number's would carry into the sign and give -0.
        const uint32_t full_nan = 0x7fffffff;
        std::memcpy(static_cast<unsigned char *>(t.bias.view().data) + 4 * (channels - 1), &full_nan, 4);
        std::vector<double> expected = t.reference().output;
        for (double &y : expected) {
            y = format().nearest(static_cast<float>(y));
        }
        t.run();
        expect_close(t.output.values(), expected, 0, training ? "training output" : "inference output");
    }
}

INSTANTIATE_TEST_SUITE_P(Numerics, Conversions16,
                         ::testing::Combine(::testing::Values(float16_format, bfloat16_format),
                                            ::testing::Values(Layout::NCHW, Layout::NHWC)),
                         [](const auto &info) {
                             return dtype_label(std::get<0>(info.param).dtype) +
                                    (std::get<1>(info.param) == Layout::NCHW ? "_nchw" : "_nhwc");
                         });

// Every eps in (0, 1] counts at full precision. A constant channel (training)
// or a zero running variance (inference) makes 1 / sqrt(var + eps) as large
// as 4.5e161 (eps = 5e-324), far beyond float32: a constant channel must still
// give exactly bias, and other values the reference rounded to the output
// dtype (inf where it overflows). eps below 1.4e-45 used to become 0 in
// float32, and 1e-45 became 1.4e-45.
class TinyEps : public ::testing::TestWithParam<double> {};

TEST_P(TinyEps, TrainingConstantChannelGivesBias) {
    const double eps = GetParam();
    for (DType dtype : all_dtypes) {
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            BatchNormCase t({4, 3, 5, 6}, layout, dtype, DType::Float32, true, 31);
            t.options.eps = eps;
            const Geometry g(t.shape, layout);
            for (int64_t k = 0; k < g.values_per_channel; k++) {
                t.x.set(g.offset(1, k), 3.140625);  // exactly representable in every dtype
            }
            const ReferenceResult expected = t.reference();
            const BatchNormCase::SavedStatistics saved = t.run_training();
            const double bias = rounded(dtype, {t.bias.get(1)})[0];
            for (int64_t k = 0; k < g.values_per_channel; k++) {
                ASSERT_EQ(t.output.get(g.offset(1, k)), bias) << "eps " << eps << ", value " << k;
            }
            expect_close(t.output.values(), rounded(dtype, expected.output), output_tolerance(dtype), "output");
            expect_close(saved.inv_std.values(), rounded(DType::Float32, expected.inv_std), 1e-6, "saved_inv_std");
            expect_close(t.running_var.values(), expected.running_var, 2e-6, "running_var");
        }
    }
}

TEST_P(TinyEps, InferenceWithZeroRunningVariance) {
    const double eps = GetParam();
    for (DType dtype : all_dtypes) {
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            BatchNormCase t({4, 3, 5, 6}, layout, dtype, DType::Float32, false, 37);
            t.options.eps = eps;
            t.running_var.set(1, 0);
            t.running_mean.set(1, 0.25);
            const Geometry g(t.shape, layout);
            for (int64_t k = 0; k < g.values_per_channel; k++) {
                // At the mean (y = bias exactly), and 0.25 or 2^-14 away from it.
                t.x.set(g.offset(1, k), k % 3 == 0 ? 0.25 : k % 3 == 1 ? 0.5 : 0.25 + 0x1p-14);
            }
            const ReferenceResult expected = t.reference();
            t.run();
            expect_close(t.output.values(), rounded(dtype, expected.output), output_tolerance(dtype),
                         "eps " + std::to_string(eps) + " output");
        }
    }
}

std::string eps_name(const ::testing::TestParamInfo<double> &info) {
    std::string name = std::to_string(info.index) + "_";
    char value[32];
    std::snprintf(value, sizeof(value), "%g", info.param);
    for (const char *p = value; *p; p++) {
        name += std::isalnum(static_cast<unsigned char>(*p)) ? *p : '_';
    }
    return name;
}

INSTANTIATE_TEST_SUITE_P(Numerics, TinyEps, ::testing::Values(5e-324, 1e-300, 1e-45, 1e-38, 1e-5, 1.0),
                         eps_name);

}  // namespace
}  // namespace hbn_test
