// The generated functions, and which of them a call runs.
#pragma once

#include "HalideRuntime.h"
#include "hbn/batch_norm.h"
#include "partition.h"

namespace hbn::internal {

// (x, residual, add_residual, relu, running_mean, running_var, weight, bias,
// eps, scale_in_double, stream_output, output)
using InferenceFn = int (*)(const void *, halide_buffer_t *, halide_buffer_t *, bool, bool, halide_buffer_t *,
                            halide_buffer_t *, halide_buffer_t *, halide_buffer_t *, double, bool, bool,
                            halide_buffer_t *);
// (x, residual, add_residual, relu, weight, bias, eps, scale_in_double,
// output, batch_mean, batch_var, batch_inv_std)
using TrainingFn = int (*)(const void *, halide_buffer_t *, halide_buffer_t *, bool, bool, halide_buffer_t *,
                           halide_buffer_t *, double, bool, halide_buffer_t *, halide_buffer_t *,
                           halide_buffer_t *, halide_buffer_t *);

// (x, grad_output, forward_output, relu, mean, inv_std, weight, training,
// in_double, stream_output, grad_input, grad_weight, grad_bias, grad_residual)
using BackwardFn = int (*)(const void *, halide_buffer_t *, halide_buffer_t *, halide_buffer_t *, bool,
                           halide_buffer_t *, halide_buffer_t *, halide_buffer_t *, bool, bool, bool,
                           halide_buffer_t *, halide_buffer_t *, halide_buffer_t *, halide_buffer_t *);

// (x, grad_output, forward_output, relu, mean, scale, mean_dy, slope, inv_std,
// in_double, stream_output, grad_input)
using GradInputFn = int (*)(const void *, halide_buffer_t *, halide_buffer_t *, halide_buffer_t *, bool,
                            halide_buffer_t *, halide_buffer_t *, halide_buffer_t *, halide_buffer_t *,
                            halide_buffer_t *, bool, bool, halide_buffer_t *);

struct Kernels {
    InferenceFn inference = nullptr;
    TrainingFn training = nullptr;
    BackwardFn backward = nullptr;
    GradInputFn grad_input = nullptr;
    // The kernels' stream_output: set for outputs too large for the cache,
    // which the x86 CPU kernels then write with streaming stores
    // (generators/streaming_stores.h). Other kernels ignore it.
    bool stream_output = false;
};

// The kernels for a call on `device` over a slice of input_x.
Kernels kernels_for(Device device, DType dtype, const Slice &slice);

}  // namespace hbn::internal
