// Error bounds of the backward's results against the double reference
// (reference.h), shared by the backward, sync and sliced tests.
#pragma once

#include "reference.h"
#include "test_dtypes.h"

#include <hbn/batch_norm.h>

#include <cmath>
#include <vector>

namespace hbn_test {

// grad_input is weight * inv_std times a difference of terms, which may
// cancel, so its float32 error is relative to the terms, not to the result:
// about six roundings (x - mean, the products, the subtractions), bounded by
// eight, then one rounding to the output dtype (among float16's denormals,
// a whole spacing, 2^-24).
inline std::vector<double> grad_input_bounds(const ReferenceBackward &r, hbn::DType dtype) {
    std::vector<double> bounds(r.grad_input.size());
    for (size_t i = 0; i < bounds.size(); i++) {
        bounds[i] = 8 * unit_roundoff32 * r.grad_input_terms[i] + storage_rounding(dtype) * std::abs(r.grad_input[i]) +
                    denormal_spacing(dtype);
    }
    return bounds;
}

// A per-channel sum accumulated in double, error `per_term` of the sum of
// its terms' magnitudes, then rounded to the parameter dtype.
inline std::vector<double> sum_bounds(const std::vector<double> &expected, const std::vector<double> &terms,
                                      double per_term, hbn::DType dtype) {
    std::vector<double> bounds(expected.size());
    for (size_t c = 0; c < bounds.size(); c++) {
        bounds[c] = per_term * terms[c] + storage_rounding(dtype) * std::abs(expected[c]);
    }
    return bounds;
}

// grad_weight's terms dy * xhat may each be formed in float32 (two
// roundings) before the double sum.
constexpr double grad_weight_per_term = 4 * unit_roundoff32;
// grad_bias sums dy, exact in double, so only the double sum's own error:
// at most (M - 1) * 2^-53, 1.2e-10 for the largest M here (2^20 + 4096).
constexpr double grad_bias_per_term = 1e-9;

inline std::vector<double> grad_weight_bounds(const ReferenceBackward &r, hbn::DType dtype) {
    return sum_bounds(r.grad_weight, r.grad_weight_terms, grad_weight_per_term, dtype);
}
inline std::vector<double> grad_bias_bounds(const ReferenceBackward &r, hbn::DType dtype) {
    return sum_bounds(r.grad_bias, r.grad_bias_terms, grad_bias_per_term, dtype);
}

}  // namespace hbn_test
