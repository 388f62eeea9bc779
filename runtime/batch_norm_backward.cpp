// The backward entry point: validate, pick the kernel, run it over views of
// the caller's memory, and store the per-channel gradients in weight's dtype.
#include "hbn/batch_norm.h"

#include "backend.h"
#include "buffers.h"
#include "gpu_call.h"
#include "halide_call.h"
#include "kernels.h"
#include "validation.h"

#include <array>
#include <cmath>
#include <vector>

namespace hbn {
namespace {

using namespace internal;

// Runs the backward kernel over a non-empty input_x; grad_weight's and
// grad_bias's sums land in `sums` (C each) as float32.
void run(const BackwardArguments &args, const BatchNormOptions &options, const DataView &view, Device device,
         float *sums) {
    const int64_t channels = view.channels;
    const bool training = options.training;
    install_error_handler();

    ChannelFloats weight_f32(args.weight, channels);
    ChannelFloats mean_f32(training ? args.saved_mean : args.running_mean, channels);
    const ChannelFloats spread(training ? args.saved_inv_std : args.running_var, channels);
    std::vector<double> inv_std(channels);
    for (int64_t c = 0; c < channels; c++) {
        inv_std[c] = training ? spread[c] : 1 / std::sqrt(static_cast<double>(spread[c]) + options.eps);
    }
    HalideBuffer inv_std_buffer(inv_std.data(), channels);
    // grad_input in double where weight * inv_std, or inv_std itself, may
    // leave float's range (see generators/batch_norm_backward_generator.cpp).
    const double largest_inv_std = largest_magnitude(inv_std.data(), channels);
    const bool in_double =
        !fits_float(largest_inv_std) || !fits_float(weight_f32.largest_magnitude() * largest_inv_std);

    HalideBuffer x_buffer(args.input_x, view), dy_buffer(args.grad_output, view);
    // A skipped grad_input is computed for one row only, into scratch: an
    // empty output would be a bounds query to Halide, and a zero-size device
    // allocation an error.
    const bool dx_given = given(args.grad_input);
    std::vector<unsigned char> skipped_row;
    HalideBuffer dx_buffer;
    if (dx_given) {
        dx_buffer = HalideBuffer(args.grad_input, view);
    } else {
        const DType dtype = args.input_x.dtype;
        const int64_t row_elements = view.nchw ? view.inner * channels : channels;
        skipped_row.resize(row_elements * halide_type_of(dtype).bytes());
        dx_buffer = HalideBuffer(Tensor{skipped_row.data(), dtype, args.input_x.shape}, view);
        dx_buffer.dims[dx_buffer.buffer.dimensions - 1].extent = 1;
    }
    HalideBuffer grad_weight_buffer(sums, channels), grad_bias_buffer(sums + channels, channels);
    const Kernels kernels = kernels_for(device, args.input_x.dtype, view);
    call_pipeline(
        device,
        {{x_buffer.get(), &args.input_x}, {dy_buffer.get(), &args.grad_output}, {mean_f32.buffer()},
         {inv_std_buffer.get()}, {weight_f32.buffer()}},
        {{dx_buffer.get(), dx_given ? &args.grad_input : nullptr}, {grad_weight_buffer.get()},
         {grad_bias_buffer.get()}},
        [&](void *context) {
            return kernels.backward(context, x_buffer.get(), dy_buffer.get(), mean_f32.buffer(), inv_std_buffer.get(),
                                    weight_f32.buffer(), training, in_double, dx_buffer.get(),
                                    grad_weight_buffer.get(), grad_bias_buffer.get());
        },
        "hbn::batch_norm_backward: pipeline");
}

}  // namespace

void batch_norm_backward(const Tensor &grad_output, const Tensor &input_x, const Tensor &weight,
                         const Tensor &running_mean, const Tensor &running_var,
                         const Tensor &saved_mean, const Tensor &saved_inv_std,
                         const Tensor &grad_input, const Tensor &grad_weight, const Tensor &grad_bias,
                         const BatchNormOptions &options) {
    const BackwardArguments args{grad_output, input_x,    weight,      running_mean, running_var,
                                 saved_mean,  saved_inv_std, grad_input, grad_weight,  grad_bias};
    const DataView view = validate_backward(args, options);
    const Device device = backend_for_call(options.device, input_x.memory);
    // grad_weight's sums, then grad_bias's, reach the caller's tensors only
    // once the pipeline has succeeded. An empty input_x sums no values (and
    // allocates nothing: its C need not fit in memory).
    const int64_t channels = view.channels;
    std::vector<float> sums;
    if (!view.empty()) {
        sums.resize(2 * channels);
        run(args, options, view, device, sums.data());
    }
    const std::array<const Tensor *, 2> channel_gradients = {&grad_weight, &grad_bias};
    for (size_t i = 0; i < channel_gradients.size(); i++) {
        for (int64_t c = 0; given(*channel_gradients[i]) && c < channels; c++) {
            store_channel(*channel_gradients[i], c, sums.empty() ? 0 : sums[i * channels + c]);
        }
    }
}

}  // namespace hbn
