// An independent double-precision batch norm, written from the definition in
// shared/semantics.md (two-pass statistics over the original shape), and its
// backward, written from PyTorch's formulas: the oracles for every test.
#pragma once

#include <hbn/batch_norm.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace hbn_test {

struct ReferenceResult {
    std::vector<double> output;
    std::vector<double> batch_mean, batch_var, inv_std;  // training only
    std::vector<double> running_mean, running_var;       // after the call
};

struct Geometry {
    int64_t channels = 0, values_per_channel = 0;
    // Offset of the k-th value (0 <= k < values_per_channel) of channel c.
    int64_t inner = 1;     // NCHW: product of spatial sizes; NHWC: 1
    bool channels_last = false;

    Geometry(const std::vector<int64_t> &shape, hbn::Layout layout) {
        channels_last = layout == hbn::Layout::NHWC;
        channels = channels_last ? shape.back() : shape[1];
        int64_t total = 1;
        for (int64_t e : shape) {
            total *= e;
        }
        values_per_channel = channels ? total / channels : 0;
        if (!channels_last) {
            for (size_t i = 2; i < shape.size(); i++) {
                inner *= shape[i];
            }
        }
    }

    int64_t offset(int64_t c, int64_t k) const {
        if (channels_last) {
            return k * channels + c;
        }
        const int64_t n = k / inner, i = k % inner;
        return (n * channels + c) * inner + i;
    }

    // fn(c, offset) for every value, in memory order, which visits each
    // channel's values in k order (so sums come out as a loop over k gives
    // them) and walks large tensors at the memory's pace.
    template<typename Fn>
    void for_each_value(Fn fn) const {
        const int64_t rows = channels ? values_per_channel / inner : 0;
        for (int64_t row = 0, o = 0; row < rows; row++) {
            for (int64_t c = 0; c < channels; c++) {
                if (channels_last) {
                    fn(c, o++);
                } else {
                    for (int64_t i = 0; i < inner; i++) {
                        fn(c, o++);
                    }
                }
            }
        }
    }
};

inline ReferenceResult reference_batch_norm(const std::vector<double> &x, const std::vector<int64_t> &shape,
                                            hbn::Layout layout, const std::vector<double> &running_mean,
                                            const std::vector<double> &running_var,
                                            const std::vector<double> &weight, const std::vector<double> &bias,
                                            bool training, double momentum, double eps) {
    const Geometry g(shape, layout);
    ReferenceResult r;
    r.output.resize(x.size());
    r.running_mean = running_mean;
    r.running_var = running_var;
    const auto m = static_cast<double>(g.values_per_channel);
    std::vector<double> mean = running_mean, var = running_var;
    if (training) {
        std::vector<double> sum(g.channels, 0.0), sum_sq(g.channels, 0.0);
        g.for_each_value([&](int64_t c, int64_t o) { sum[c] += x[o]; });
        for (int64_t c = 0; c < g.channels; c++) {
            mean[c] = sum[c] / m;
        }
        g.for_each_value([&](int64_t c, int64_t o) {
            const double d = x[o] - mean[c];
            sum_sq[c] += d * d;
        });
        for (int64_t c = 0; c < g.channels; c++) {
            var[c] = sum_sq[c] / m;
            r.batch_mean.push_back(mean[c]);
            r.batch_var.push_back(var[c]);
            r.inv_std.push_back(1 / std::sqrt(var[c] + eps));
            r.running_mean[c] = (1 - momentum) * running_mean[c] + momentum * mean[c];
            r.running_var[c] = (1 - momentum) * running_var[c] + momentum * var[c] * m / (m - 1);
        }
    }
    std::vector<double> scale(g.channels);
    for (int64_t c = 0; c < g.channels; c++) {
        scale[c] = weight[c] / std::sqrt(var[c] + eps);
    }
    g.for_each_value([&](int64_t c, int64_t o) { r.output[o] = (x[o] - mean[c]) * scale[c] + bias[c]; });
    return r;
}

// The fused epilogue, from its definition: relu(z + residual), each part
// when asked for (`residual` empty: none), NaN kept NaN.
inline std::vector<double> reference_epilogue(std::vector<double> z, const std::vector<double> &residual,
                                              bool relu) {
    for (size_t i = 0; i < z.size(); i++) {
        const double sum = residual.empty() ? z[i] : z[i] + residual[i];
        z[i] = relu && sum <= 0 ? 0 : sum;
    }
    return z;
}

// The gradient through y = relu(z) given y, as PyTorch's ReLU backward
// forms it: dy where y > 0 or y is NaN, 0 where y <= 0.
inline std::vector<double> reference_relu_gradient(std::vector<double> dy, const std::vector<double> &y) {
    for (size_t i = 0; i < dy.size(); i++) {
        if (y[i] <= 0) {
            dy[i] = 0;
        }
    }
    return dy;
}

struct ReferenceBackward {
    std::vector<double> grad_input, grad_weight, grad_bias;
    // For error bounds, the magnitudes the results are formed from: per
    // element, |weight * inv_std| times the sum of |each term| in grad_input's
    // bracket (it is a difference, which may cancel); per channel, the sums of
    // |dy * xhat| and |dy|.
    std::vector<double> grad_input_terms, grad_weight_terms, grad_bias_terms;
};

// PyTorch's native_batch_norm_backward, from its formulas, with
// xhat = (x - mean) * inv_std per channel: mean and inv_std are the forward's
// saved statistics in training, running_mean and 1 / sqrt(running_var + eps)
// in inference. Two passes: the per-channel sums, then grad_input.
inline ReferenceBackward reference_batch_norm_backward(const std::vector<double> &dy, const std::vector<double> &x,
                                                       const std::vector<int64_t> &shape, hbn::Layout layout,
                                                       const std::vector<double> &weight,
                                                       const std::vector<double> &mean,
                                                       const std::vector<double> &inv_std, bool training) {
    const Geometry g(shape, layout);
    ReferenceBackward r;
    r.grad_input.resize(x.size());
    r.grad_input_terms.resize(x.size());
    const auto m = static_cast<double>(g.values_per_channel);
    for (int64_t c = 0; c < g.channels; c++) {
        double sum_dy = 0, sum_dy_xhat = 0, abs_dy = 0, abs_dy_xhat = 0;
        for (int64_t k = 0; k < g.values_per_channel; k++) {
            const int64_t o = g.offset(c, k);
            const double dy_xhat = dy[o] * (x[o] - mean[c]) * inv_std[c];
            sum_dy += dy[o];
            sum_dy_xhat += dy_xhat;
            abs_dy += std::abs(dy[o]);
            abs_dy_xhat += std::abs(dy_xhat);
        }
        r.grad_bias.push_back(sum_dy);
        r.grad_weight.push_back(sum_dy_xhat);
        r.grad_bias_terms.push_back(abs_dy);
        r.grad_weight_terms.push_back(abs_dy_xhat);
        const double scale = weight[c] * inv_std[c];
        for (int64_t k = 0; k < g.values_per_channel; k++) {
            const int64_t o = g.offset(c, k);
            if (training) {
                const double xhat = (x[o] - mean[c]) * inv_std[c];
                const double mean_dy = sum_dy / m, slope = sum_dy_xhat / m;
                r.grad_input[o] = scale * (dy[o] - mean_dy - xhat * slope);
                r.grad_input_terms[o] =
                    std::abs(scale) * (std::abs(dy[o]) + std::abs(mean_dy) + std::abs(xhat * slope));
            } else {
                r.grad_input[o] = scale * dy[o];
                r.grad_input_terms[o] = std::abs(scale * dy[o]);
            }
        }
    }
    return r;
}

}  // namespace hbn_test
