// An independent double-precision batch norm, written from the definition in
// shared/semantics.md (two-pass statistics over the original shape), used as
// the oracle for every test.
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
    for (int64_t c = 0; c < g.channels; c++) {
        double mean = running_mean[c], var = running_var[c];
        if (training) {
            double sum = 0;
            for (int64_t k = 0; k < g.values_per_channel; k++) {
                sum += x[g.offset(c, k)];
            }
            mean = sum / m;
            double sum_sq = 0;
            for (int64_t k = 0; k < g.values_per_channel; k++) {
                const double d = x[g.offset(c, k)] - mean;
                sum_sq += d * d;
            }
            var = sum_sq / m;
            r.batch_mean.push_back(mean);
            r.batch_var.push_back(var);
            r.inv_std.push_back(1 / std::sqrt(var + eps));
            r.running_mean[c] = (1 - momentum) * running_mean[c] + momentum * mean;
            r.running_var[c] = (1 - momentum) * running_var[c] + momentum * var * m / (m - 1);
        }
        const double scale = weight[c] / std::sqrt(var + eps);
        for (int64_t k = 0; k < g.values_per_channel; k++) {
            const int64_t o = g.offset(c, k);
            r.output[o] = (x[o] - mean) * scale + bias[c];
        }
    }
    return r;
}

}  // namespace hbn_test
