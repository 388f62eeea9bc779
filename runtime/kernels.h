// The generated functions, and which of them a call runs.
#pragma once

#include "HalideRuntime.h"
#include "hbn/batch_norm.h"
#include "partition.h"

namespace hbn::internal {

using InferenceFn = int (*)(const void *, halide_buffer_t *, halide_buffer_t *, halide_buffer_t *,
                            halide_buffer_t *, halide_buffer_t *, double, bool, halide_buffer_t *);
using TrainingFn = int (*)(const void *, halide_buffer_t *, halide_buffer_t *, halide_buffer_t *,
                           double, bool, halide_buffer_t *, halide_buffer_t *, halide_buffer_t *,
                           halide_buffer_t *);

// (x, grad_output, mean, inv_std, weight, training, in_double, grad_input,
// grad_weight, grad_bias)
using BackwardFn = int (*)(const void *, halide_buffer_t *, halide_buffer_t *, halide_buffer_t *,
                           halide_buffer_t *, halide_buffer_t *, bool, bool, halide_buffer_t *,
                           halide_buffer_t *, halide_buffer_t *);

// (x, grad_output, mean, scale, mean_dy, slope, inv_std, in_double, grad_input)
using GradInputFn = int (*)(const void *, halide_buffer_t *, halide_buffer_t *, halide_buffer_t *,
                            halide_buffer_t *, halide_buffer_t *, halide_buffer_t *, halide_buffer_t *, bool,
                            halide_buffer_t *);

struct Kernels {
    InferenceFn inference = nullptr;
    TrainingFn training = nullptr;
    BackwardFn backward = nullptr;
    GradInputFn grad_input = nullptr;
    // Set when the output is streamed: the serial inference kernel that
    // writes each chunk.
    InferenceFn streamed_chunk = nullptr;
};

// The kernels for a call on `device` over a slice of input_x.
Kernels kernels_for(Device device, DType dtype, const Slice &slice);

}  // namespace hbn::internal
