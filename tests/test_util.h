// Test fixtures: host tensors in any dtype, a batch-norm case that runs
// hbn and the double reference on the same (dtype-rounded) inputs, and
// comparisons that report the first few mismatches.
#pragma once

#include "float16.h"
#include "bfloat16.h"
#include "reference.h"
#include "test_dtypes.h"

#include <gtest/gtest.h>
#include <hbn/batch_norm.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace hbn_test {

using hbn::bfloat16;
using hbn::float16;

class HostTensor {
public:
    HostTensor() = default;
    HostTensor(hbn::DType dtype, std::vector<int64_t> shape, const std::vector<double> &values)
        : dtype_(dtype), shape_(std::move(shape)), bytes_(values.size() * element_size()) {
        for (size_t i = 0; i < values.size(); i++) {
            set(i, values[i]);
        }
    }

    size_t size() const { return bytes_.size() / element_size(); }
    double get(size_t i) const {
        switch (dtype_) {
        case hbn::DType::Float16: return load<float16>(i);
        case hbn::DType::BFloat16: return load<bfloat16>(i);
        default: return load<float>(i);
        }
    }
    void set(size_t i, double value) {
        switch (dtype_) {
        case hbn::DType::Float16: store<float16>(i, value); break;
        case hbn::DType::BFloat16: store<bfloat16>(i, value); break;
        default: store<float>(i, value); break;
        }
    }
    std::vector<double> values() const {
        std::vector<double> out(size());
        for (size_t i = 0; i < out.size(); i++) {
            out[i] = get(i);
        }
        return out;
    }
    // Change the dtype or memory tag only (to build an invalid tensor).
    void relabel(hbn::DType dtype) { dtype_ = dtype; }
    void relabel(hbn::Memory memory) { memory_ = memory; }
    hbn::Tensor view() { return {bytes_.empty() ? nullptr : bytes_.data(), dtype_, shape_, memory_}; }
    const std::vector<unsigned char> &bytes() const { return bytes_; }

private:
    size_t element_size() const { return dtype_ == hbn::DType::Float32 ? 4 : 2; }
    // Element i as a T, converted (T is never passed by value: clang 14's
    // __fp16 cannot be).
    template<typename T>
    double load(size_t i) const {
        T v;
        std::memcpy(&v, &bytes_[i * sizeof(T)], sizeof(T));
        return static_cast<double>(v);
    }
    template<typename T>
    void store(size_t i, double value) {
        const T v = static_cast<T>(value);
        std::memcpy(&bytes_[i * sizeof(T)], &v, sizeof(T));
    }

    hbn::DType dtype_ = hbn::DType::Float32;
    hbn::Memory memory_ = hbn::Memory::Host;
    std::vector<int64_t> shape_;
    std::vector<unsigned char> bytes_;
};

inline std::vector<double> random_values(size_t count, double mean, double spread, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> dist(mean, spread);
    std::vector<double> v(count);
    for (auto &x : v) {
        x = dist(rng);
    }
    return v;
}

inline std::string shape_name(const std::vector<int64_t> &shape) {
    std::string s;
    for (int64_t e : shape) {
        s += (s.empty() ? "" : "x") + std::to_string(e);
    }
    return s;
}

// The fused epilogues a case can ask for: options.activation, and a
// residual or not.
enum class Epilogue { None, ReLU, Add, AddReLU };
inline const std::vector<Epilogue> all_epilogues = {Epilogue::None, Epilogue::ReLU, Epilogue::Add, Epilogue::AddReLU};
inline bool adds_residual(Epilogue e) {
    return e == Epilogue::Add || e == Epilogue::AddReLU;
}
inline bool rectifies(Epilogue e) {
    return e == Epilogue::ReLU || e == Epilogue::AddReLU;
}
inline std::string epilogue_name(Epilogue e) {
    const char *names[] = {"", "relu ", "add ", "add+relu "};
    return names[static_cast<int>(e)];
}

// |actual - expected| <= tolerance * (1 + |expected|), or equal (so equal
// infinities pass), NaN only where expected. Tolerance 0 asks for equality.
inline void expect_close(const std::vector<double> &actual, const std::vector<double> &expected,
                         double tolerance, const std::string &what) {
    ASSERT_EQ(actual.size(), expected.size()) << what;
    int reported = 0;
    size_t mismatches = 0;
    for (size_t i = 0; i < actual.size(); i++) {
        const bool ok = std::isnan(expected[i])
                            ? std::isnan(actual[i])
                            : actual[i] == expected[i] ||
                                  std::abs(actual[i] - expected[i]) <= tolerance * (1 + std::abs(expected[i]));
        if (!ok) {
            mismatches++;
            if (reported++ < 5) {
                ADD_FAILURE() << what << "[" << i << "] = " << actual[i] << ", expected " << expected[i]
                              << " (tolerance " << tolerance << ")";
            }
        }
    }
    EXPECT_EQ(mismatches, 0u) << what << ": " << mismatches << " of " << actual.size() << " differ";
}

struct BatchNormCase {
    std::vector<int64_t> shape;
    hbn::Layout layout = hbn::Layout::NCHW;
    hbn::BatchNormOptions options;  // but residual: see call_options()
    HostTensor x, output, running_mean, running_var, weight, bias;
    Epilogue epilogue = Epilogue::None;
    HostTensor residual;  // when the epilogue adds one

    // Random inputs: x ~ N(mean, spread) per element; positive running_var.
    BatchNormCase(std::vector<int64_t> shape_, hbn::Layout layout_, hbn::DType x_dtype,
                  hbn::DType param_dtype, bool training, uint32_t seed = 1, double mean = 0.5,
                  double spread = 2.0)
        : shape(std::move(shape_)), layout(layout_) {
        options.training = training;
        options.layout = layout;
        const Geometry g(shape, layout);
        const size_t total = static_cast<size_t>(g.channels * g.values_per_channel);
        const auto channels = static_cast<size_t>(g.channels);
        x = HostTensor(x_dtype, shape, random_values(total, mean, spread, seed));
        output = HostTensor(x_dtype, shape, std::vector<double>(total, 0.0));
        running_mean = HostTensor(param_dtype, {g.channels}, random_values(channels, 0, 1, seed + 1));
        auto var = random_values(channels, 0, 1, seed + 2);
        for (auto &v : var) {
            v = 0.1 + v * v;
        }
        running_var = HostTensor(param_dtype, {g.channels}, var);
        weight = HostTensor(param_dtype, {g.channels}, random_values(channels, 1, 0.5, seed + 3));
        bias = HostTensor(param_dtype, {g.channels}, random_values(channels, 0, 0.5, seed + 4));
    }

    // Asks for a fused epilogue. A residual is random, of x's dtype and
    // shape, of the normalized output's size, so that the ReLU cuts a share
    // of the sums; one made already is kept.
    void set_epilogue(Epilogue e, uint32_t seed = 31) {
        epilogue = e;
        options.activation = rectifies(e) ? hbn::Activation::ReLU : hbn::Activation::None;
        if (adds_residual(e) && residual.size() != x.size()) {
            residual = HostTensor(x.view().dtype, shape, random_values(x.size(), 0.2, 1.5, seed));
        }
    }

    // options, with the residual's view (taken here: the case may have moved).
    hbn::BatchNormOptions call_options() {
        hbn::BatchNormOptions o = options;
        o.residual = adds_residual(epilogue) ? residual.view() : hbn::Tensor{};
        return o;
    }

    // The reference on the inputs as they are now (call before run()).
    ReferenceResult reference() const {
        ReferenceResult r = reference_batch_norm(x.values(), shape, layout, running_mean.values(),
                                                 running_var.values(), weight.values(), bias.values(),
                                                 options.training, options.momentum, options.eps);
        r.output = reference_epilogue(std::move(r.output), adds_residual(epilogue) ? residual.values()
                                                                                   : std::vector<double>{},
                                      rectifies(epilogue));
        return r;
    }

    void run() {
        hbn::batch_norm(x.view(), running_mean.view(), running_var.view(), weight.view(), bias.view(),
                        output.view(), call_options());
    }

    // batch_norm_training, which also returns the batch statistics.
    struct SavedStatistics {
        HostTensor mean, inv_std;
    };
    SavedStatistics run_training() {
        const int64_t channels = running_mean.view().shape[0];
        SavedStatistics saved{HostTensor(hbn::DType::Float32, {channels}, std::vector<double>(channels, 0)),
                              HostTensor(hbn::DType::Float32, {channels}, std::vector<double>(channels, 0))};
        hbn::batch_norm_training(x.view(), running_mean.view(), running_var.view(), weight.view(), bias.view(),
                                 output.view(), saved.mean.view(), saved.inv_std.view(), call_options());
        return saved;
    }
};

// A backward case: the forward case it differentiates (in training, its
// batch_norm_training supplies saved_mean and saved_inv_std), random dy of
// input_x's dtype, and the three gradients filled with a sentinel.
struct BackwardCase {
    static constexpr double sentinel = 10000;  // exact in float16 too

    BatchNormCase forward;
    HostTensor dy, grad_input, grad_weight, grad_bias;
    BatchNormCase::SavedStatistics saved;
    // Through a fused forward: the forward's output (the ReLU's mask) and
    // grad_residual, when the epilogue has them.
    HostTensor forward_output, grad_residual;

    BackwardCase(std::vector<int64_t> shape, hbn::Layout layout, hbn::DType x_dtype, hbn::DType param_dtype,
                 bool training, uint32_t seed = 1, double x_mean = 0.5, double x_spread = 2.0)
        : forward(std::move(shape), layout, x_dtype, param_dtype, training, seed, x_mean, x_spread) {
        const Geometry g(forward.shape, layout);
        const size_t total = static_cast<size_t>(g.channels * g.values_per_channel);
        const auto channels = static_cast<size_t>(g.channels);
        dy = HostTensor(x_dtype, forward.shape, random_values(total, 0, 1, seed + 5));
        grad_input = HostTensor(x_dtype, forward.shape, std::vector<double>(total, sentinel));
        grad_weight = HostTensor(param_dtype, {g.channels}, std::vector<double>(channels, sentinel));
        grad_bias = HostTensor(param_dtype, {g.channels}, std::vector<double>(channels, sentinel));
        if (training && g.values_per_channel >= 2) {
            saved = forward.run_training();
        } else {  // placeholders: inference does not read them, and training rejects M < 2
            saved = {HostTensor(hbn::DType::Float32, {g.channels}, std::vector<double>(channels, 0.0)),
                     HostTensor(hbn::DType::Float32, {g.channels}, std::vector<double>(channels, 1.0))};
        }
    }

    bool training() const { return forward.options.training; }
    Epilogue epilogue() const { return forward.epilogue; }

    // The backward through a fused forward. With ReLU, forward_output is
    // random with a share of exact zeros and -0 (the mask's edge) and
    // negatives, unless given (a forward's own output).
    void set_epilogue(Epilogue e, uint32_t seed = 37) {
        forward.options.activation = rectifies(e) ? hbn::Activation::ReLU : hbn::Activation::None;
        forward.epilogue = e;
        if (rectifies(e)) {
            std::vector<double> y = random_values(dy.size(), 0.3, 1, seed);
            for (size_t i = 0; i < y.size(); i += 5) {
                y[i] = i % 10 == 0 ? 0.0 : -0.0;
            }
            forward_output = HostTensor(dy.view().dtype, forward.shape, y);
        }
        if (adds_residual(e)) {
            grad_residual = HostTensor(dy.view().dtype, forward.shape, std::vector<double>(dy.size(), sentinel));
        }
    }

    // The gradient that reaches batch norm: dy through the ReLU's mask.
    std::vector<double> normalized_gradient() const {
        return rectifies(epilogue()) ? reference_relu_gradient(dy.values(), forward_output.values()) : dy.values();
    }

    // The statistics the mode uses, as hbn reads them.
    std::vector<double> mean() const { return training() ? saved.mean.values() : forward.running_mean.values(); }
    std::vector<double> inv_std() const {
        if (training()) {
            return saved.inv_std.values();
        }
        std::vector<double> v = forward.running_var.values();
        for (double &s : v) {
            s = 1 / std::sqrt(s + forward.options.eps);
        }
        return v;
    }

    // The reference on the inputs as they are now (call before run()).
    ReferenceBackward reference() const {
        return reference_batch_norm_backward(normalized_gradient(), forward.x.values(), forward.shape,
                                             forward.layout, forward.weight.values(), mean(), inv_std(), training());
    }

    // The call's tensors; the epilogue's go into its options.
    struct Views {
        hbn::Tensor grad_output, input_x, weight, running_mean, running_var, saved_mean, saved_inv_std, grad_input,
            grad_weight, grad_bias, forward_output, grad_residual;
    };
    Views views() {
        return {dy.view(),
                forward.x.view(),
                forward.weight.view(),
                forward.running_mean.view(),
                forward.running_var.view(),
                saved.mean.view(),
                saved.inv_std.view(),
                grad_input.view(),
                grad_weight.view(),
                grad_bias.view(),
                rectifies(epilogue()) ? forward_output.view() : hbn::Tensor{},
                adds_residual(epilogue()) ? grad_residual.view() : hbn::Tensor{}};
    }
    void call(const Views &v) const {
        hbn::BatchNormOptions options = forward.options;
        options.forward_output = v.forward_output;
        options.grad_residual = v.grad_residual;
        hbn::batch_norm_backward(v.grad_output, v.input_x, v.weight, v.running_mean, v.running_var, v.saved_mean,
                                 v.saved_inv_std, v.grad_input, v.grad_weight, v.grad_bias, options);
    }
    void run() { call(views()); }

    // grad_residual is the masked dy itself: exact. Call after run().
    void expect_grad_residual(const std::string &what) const {
        if (adds_residual(epilogue())) {
            expect_close(grad_residual.values(), normalized_gradient(), 0,
                         what + "grad_residual (the masked grad_output)");
        }
    }
};

// Reference values as a tensor of `dtype` stores them (an overflow becomes
// inf, as it must in hbn's output).
inline std::vector<double> rounded(hbn::DType dtype, const std::vector<double> &values) {
    return HostTensor(dtype, {static_cast<int64_t>(values.size())}, values).values();
}

// The reference matrices (forward and backward): every layout, input dtype,
// parameter dtype and mode, each a test that runs every rank's shapes (one
// process per shape would cost more than the shapes do, under qemu most).
// Sizes avoid multiples of the vector widths on purpose.
using MatrixParam = std::tuple<hbn::Layout, hbn::DType, hbn::DType, bool>;

inline const std::vector<std::vector<int64_t>> matrix_shapes{
    {2, 2}, {5, 19}, {3, 5, 17}, {2, 3, 7, 9}, {2, 37, 6, 5}, {4, 33, 21, 23}, {2, 3, 3, 4, 5}, {1, 6, 9, 11}};

inline auto matrix_params() {
    return ::testing::Combine(::testing::Values(hbn::Layout::NCHW, hbn::Layout::NHWC), ::testing::ValuesIn(all_dtypes),
                              ::testing::ValuesIn(all_dtypes), ::testing::Bool());
}

inline std::string matrix_name(const ::testing::TestParamInfo<MatrixParam> &info) {
    const auto &[layout, x_dtype, param_dtype, training] = info.param;
    return std::string(layout == hbn::Layout::NCHW ? "nchw" : "nhwc") + "_x" + dtype_tag(x_dtype) + "_p" +
           dtype_tag(param_dtype) + (training ? "_training" : "_inference");
}

// Skips a test about the CPU kernels when the suite runs on a GPU backend
// (ctest's HBN_DEVICE).
#define HBN_SKIP_UNLESS_ON_CPU(why)                                                           \
    do {                                                                                      \
        if (hbn::auto_device() != hbn::Device::CPU) {                                         \
            GTEST_SKIP() << "the suite runs on " << hbn::device_name(hbn::auto_device())     \
                         << ", and " << why;                                                  \
        }                                                                                     \
    } while (0)

// |actual - expected| <= bounds[i] (per element), or equal (so equal
// infinities pass), NaN only where expected.
inline void expect_within(const std::vector<double> &actual, const std::vector<double> &expected,
                          const std::vector<double> &bounds, const std::string &what) {
    ASSERT_EQ(actual.size(), expected.size()) << what;
    ASSERT_EQ(bounds.size(), expected.size()) << what;
    int reported = 0;
    size_t mismatches = 0;
    for (size_t i = 0; i < actual.size(); i++) {
        const bool ok = std::isnan(expected[i]) ? std::isnan(actual[i])
                                                : actual[i] == expected[i] ||
                                                      std::abs(actual[i] - expected[i]) <= bounds[i];
        if (!ok) {
            mismatches++;
            if (reported++ < 5) {
                ADD_FAILURE() << what << "[" << i << "] = " << actual[i] << ", expected " << expected[i]
                              << " (bound " << bounds[i] << ")";
            }
        }
    }
    EXPECT_EQ(mismatches, 0u) << what << ": " << mismatches << " of " << actual.size() << " differ";
}

// Output tolerance: float32 rounding of the inputs' arithmetic, or one
// rounding of the result to a 16-bit type.
inline double output_tolerance(hbn::DType dtype) {
    return dtype == hbn::DType::Float32 ? 2e-6 : storage_rounding(dtype);
}

// Running statistics are stored in the parameter dtype.
inline double parameter_tolerance(hbn::DType dtype) {
    return output_tolerance(dtype);
}

}  // namespace hbn_test
