// Validation of a call's arguments. Every check runs before any work, so a
// bad call changes nothing.
#pragma once

#include "hbn/batch_norm.h"

#include <cstdint>

namespace hbn::internal {

// The pipelines' view of input_x: NCHW as (inner, c, n), NHWC as (c, m).
struct DataView {
    bool nchw = false;
    int64_t inner = 1, channels = 0, outer = 0;  // NHWC: inner == 1, outer == m
    int64_t values_per_channel() const { return inner * outer; }
    bool empty() const { return channels == 0 || outer == 0; }
};

// The tensors of a forward call; the saved statistics are batch_norm_training's.
struct ForwardArguments {
    const Tensor &input_x, &running_mean, &running_var, &weight, &bias, &output;
    const Tensor *saved_mean = nullptr, *saved_inv_std = nullptr;
};

// The tensors of a backward call.
struct BackwardArguments {
    const Tensor &grad_output, &input_x, &weight, &running_mean, &running_var, &saved_mean, &saved_inv_std,
        &grad_input, &grad_weight, &grad_bias;
};

// Whether an optional tensor was given: a default Tensor{} (rank 0) was not.
inline bool given(const Tensor &t) {
    return !t.shape.empty();
}

// Checks a forward call (types, values, shapes, memory, alignment and
// aliasing) and returns input_x's view. Throws hbn::Error naming the argument.
DataView validate_forward(const ForwardArguments &args, const BatchNormOptions &options, bool training);
// The same for a backward call, in options.training's mode.
DataView validate_backward(const BackwardArguments &args, const BatchNormOptions &options);
// With options.all_reduce, a process may hold fewer than two values per
// channel (even none): training needs M >= 2 across all of them, which this
// checks once M is summed.
void check_global_values_per_channel(double count);

}  // namespace hbn::internal
