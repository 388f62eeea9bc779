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

using namespace internal;

void batch_norm_backward(const Tensor &grad_output, const Tensor &input_x, const Tensor &weight,
                         const Tensor &running_mean, const Tensor &running_var,
                         const Tensor &saved_mean, const Tensor &saved_inv_std,
                         const Tensor &grad_input, const Tensor &grad_weight, const Tensor &grad_bias,
                         const BatchNormOptions &options) {
    const DataView view = validate_backward({grad_output, input_x, weight, running_mean, running_var, saved_mean,
                                             saved_inv_std, grad_input, grad_weight, grad_bias},
                                            options);
    const Device device = backend_for_call(options.device, input_x.memory);
    const int64_t channels = view.channels;
    const std::array<const Tensor *, 2> channel_gradients = {&grad_weight, &grad_bias};
    if (view.empty()) {
        // Sums over no values.
        for (const Tensor *gradient : channel_gradients) {
            for (int64_t c = 0; given(*gradient) && c < channels; c++) {
                store_channel(*gradient, c, 0);
            }
        }
        return;
    }
    install_error_handler();

    const bool training = options.training;
    ChannelFloats weight_f32(weight, channels);
    ChannelFloats mean_f32(training ? saved_mean : running_mean, channels);
    const ChannelFloats spread(training ? saved_inv_std : running_var, channels);
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

    HalideBuffer x_buffer(input_x, view), dy_buffer(grad_output, view);
    // A skipped grad_input is computed for one row only, into scratch: an
    // empty output would be a bounds query to Halide, and a zero-size device
    // allocation an error.
    std::vector<unsigned char> skipped_row;
    HalideBuffer dx_buffer;
    if (given(grad_input)) {
        dx_buffer = HalideBuffer(grad_input, view);
    } else {
        const int64_t row_elements = view.nchw ? view.inner * channels : channels;
        skipped_row.resize(row_elements * halide_type_of(input_x.dtype).bytes());
        dx_buffer = HalideBuffer(Tensor{skipped_row.data(), input_x.dtype, input_x.shape}, view);
        dx_buffer.dims[dx_buffer.buffer.dimensions - 1].extent = 1;
    }
    std::vector<float> sums(2 * channels);
    HalideBuffer grad_weight_buffer(sums.data(), channels), grad_bias_buffer(sums.data() + channels, channels);
    const Kernels kernels = kernels_for(device, input_x.dtype, view);
    call_pipeline(
        device,
        {{x_buffer.get(), &input_x}, {dy_buffer.get(), &grad_output}, {mean_f32.buffer()}, {inv_std_buffer.get()},
         {weight_f32.buffer()}},
        {{dx_buffer.get(), given(grad_input) ? &grad_input : nullptr}, {grad_weight_buffer.get()},
         {grad_bias_buffer.get()}},
        [&](void *context) {
            return kernels.backward(context, x_buffer.get(), dy_buffer.get(), mean_f32.buffer(), inv_std_buffer.get(),
                                    weight_f32.buffer(), training, in_double, dx_buffer.get(),
                                    grad_weight_buffer.get(), grad_bias_buffer.get());
        },
        "hbn::batch_norm_backward: pipeline");

    for (size_t i = 0; i < channel_gradients.size(); i++) {
        for (int64_t c = 0; given(*channel_gradients[i]) && c < channels; c++) {
            store_channel(*channel_gradients[i], c, sums[i * channels + c]);
        }
    }
}

}  // namespace hbn
