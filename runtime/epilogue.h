// The fused epilogue's tensors (BatchNormOptions::activation, residual,
// forward_output, grad_residual) as a kernel call over one slice takes them.
// Where a tensor is absent the kernels get another buffer of the same shape,
// which their flags tell them not to read (or, for grad_residual, an output
// with no rows).
#pragma once

#include "buffers.h"
#include "gpu_call.h"
#include "validation.h"

#include <optional>

namespace hbn::internal {

// A tensor of the slice that may stand in for an absent one: the caller's
// when given, else `stand_in` (a buffer of the call already), attached once.
class DataInput {
public:
    DataInput(const Tensor &t, bool wanted, const Slice &slice, HalideBuffer &stand_in) {
        if (wanted) {
            buffer_ = own_.emplace(t, slice).get();
            tensor_ = &t;
        } else {
            buffer_ = stand_in.get();
        }
    }
    DataInput(const DataInput &) = delete;
    DataInput &operator=(const DataInput &) = delete;

    halide_buffer_t *get() const { return buffer_; }
    // For call_pipeline: a stand-in is the same buffer as one already
    // attached, which GpuCall attaches once.
    CallBuffer call_buffer() const { return {buffer_, tensor_}; }

private:
    std::optional<HalideBuffer> own_;
    halide_buffer_t *buffer_ = nullptr;
    const Tensor *tensor_ = nullptr;
};

// A forward kernel call's epilogue: the residual (else the slice's input)
// and the flags.
struct ForwardEpilogue {
    bool add_residual, relu;
    DataInput residual;

    ForwardEpilogue(const BatchNormOptions &options, const Slice &slice, HalideBuffer &input)
        : add_residual(given(options.residual)),
          relu(options.activation == Activation::ReLU),
          residual(options.residual, add_residual, slice, input) {}
};

// A backward kernel call's: the forward's output as the ReLU's mask (else
// the slice's grad_output) and the flag.
struct BackwardEpilogue {
    bool relu;
    DataInput forward_output;

    BackwardEpilogue(const BatchNormOptions &options, const Slice &slice, HalideBuffer &grad_output)
        : relu(options.activation == Activation::ReLU),
          forward_output(options.forward_output, relu, slice, grad_output) {}
};

}  // namespace hbn::internal
