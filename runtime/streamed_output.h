// Large outputs on x86, written with streaming stores.
#pragma once

#include "HalideRuntime.h"
#include "kernels.h"
#include "validation.h"

namespace hbn::internal {

// Halide 14 emits no streaming stores, and a plain store to a line that is not
// in cache first reads it (a read-for-ownership), which caps an elementwise
// pass near 2/3 of copy speed once the tensor is in DRAM. So a large output
// (of inference, and of training once its statistics are done) is written by
// the serial inference kernel chunk by chunk, in parallel on Halide's thread
// pool, into scratch that stays in the core's L2 cache, and each chunk is
// streamed out with non-temporal stores while the next chunk's input is
// prefetched.

// Whether a call's output takes this path (64 MiB and more, on x86).
bool streams_output(DType dtype, const Slice &slice);

// Writes `output` = the inference pipeline of `input` (and `residual`, of
// input's shape and layout), through `chunk_kernel` (a serial inference
// kernel, which takes the same arguments) and streaming stores.
int run_streamed_inference(void *user_context, InferenceFn chunk_kernel, halide_buffer_t *input,
                           halide_buffer_t *residual, bool add_residual, bool relu, halide_buffer_t *mean,
                           halide_buffer_t *var, halide_buffer_t *weight, halide_buffer_t *bias, double eps,
                           bool scale_in_double, halide_buffer_t *output);

}  // namespace hbn::internal
