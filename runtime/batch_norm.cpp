// The forward entry points: validate, pick the kernels, run them over views
// of the caller's memory, and commit the running-statistics update only after
// the pipeline succeeded.
#include "hbn/batch_norm.h"

#include "backend.h"
#include "buffers.h"
#include "float16.h"
#include "gpu_call.h"
#include "halide_call.h"
#include "kernels.h"
#include "streamed_output.h"
#include "validation.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace hbn {
namespace {

using namespace internal;

void run(const Tensor &x, const Tensor &running_mean, const Tensor &running_var,
         const Tensor &weight, const Tensor &bias, const Tensor &output,
         const Tensor *saved_mean, const Tensor *saved_inv_std,
         const BatchNormOptions &options, bool training) {
    const DataView view = validate_forward(
        {x, running_mean, running_var, weight, bias, output, saved_mean, saved_inv_std}, options, training);
    const Device device = backend_for_call(options.device, x.memory);
    if (view.empty()) {
        return;  // nothing to normalize, nothing to learn
    }
    const int64_t channels = view.channels;
    install_error_handler();

    HalideBuffer input_buffer(x, view);
    HalideBuffer output_buffer(output, view);
    ChannelFloats weight_f32(weight, channels), bias_f32(bias, channels);
    const double eps = options.eps;
    // Whether some channel's weight / sqrt(var + eps) may leave float's
    // range, so that the kernels normalize in double (see
    // generators/batch_norm_common.h). NaN weights take the double path too.
    const bool scale_in_double = !fits_float(weight_f32.largest_magnitude() / std::sqrt(eps));
    const Kernels kernels = kernels_for(device, x.dtype, view);

    if (!training) {
        ChannelFloats mean_f32(running_mean, channels), var_f32(running_var, channels);
        call_pipeline(
            device,
            {{input_buffer.get(), &x}, {mean_f32.buffer()}, {var_f32.buffer()}, {weight_f32.buffer()},
             {bias_f32.buffer()}},
            {{output_buffer.get(), &output}},
            [&](void *context) {
                if (kernels.streamed_chunk) {
                    return run_streamed_inference(context, kernels.streamed_chunk,
                                                  input_buffer.get(), mean_f32.buffer(),
                                                  var_f32.buffer(), weight_f32.buffer(),
                                                  bias_f32.buffer(), eps, scale_in_double, output_buffer.get());
                }
                return kernels.inference(context, input_buffer.get(), mean_f32.buffer(),
                                         var_f32.buffer(), weight_f32.buffer(), bias_f32.buffer(),
                                         eps, scale_in_double, output_buffer.get());
            },
            "hbn::batch_norm: inference pipeline");
        return;
    }

    // Batch statistics land in scratch (or the caller's saved_* tensors) and
    // reach the running statistics only once the pipeline has succeeded.
    std::vector<float> scratch(static_cast<size_t>(channels) * 3);
    float *mean = saved_mean ? static_cast<float *>(saved_mean->data) : scratch.data();
    float *inv_std = saved_inv_std ? static_cast<float *>(saved_inv_std->data) : scratch.data() + channels;
    float *var = scratch.data() + 2 * channels;
    HalideBuffer mean_buffer(mean, channels), var_buffer(var, channels),
        inv_std_buffer(inv_std, channels);
    call_pipeline(
        device, {{input_buffer.get(), &x}, {weight_f32.buffer()}, {bias_f32.buffer()}},
        {{output_buffer.get(), &output}, {mean_buffer.get()}, {var_buffer.get()}, {inv_std_buffer.get()}},
        [&](void *context) {
            if (!kernels.streamed_chunk) {
                return kernels.training(context, input_buffer.get(), weight_f32.buffer(),
                                        bias_f32.buffer(), eps, scale_in_double, output_buffer.get(),
                                        mean_buffer.get(), var_buffer.get(), inv_std_buffer.get());
            }
            // A large output is streamed: the training kernel computes only
            // the statistics (asked for no rows of output, it still reduces
            // all of input_x), and the streamed inference pass normalizes
            // with them.
            HalideBuffer no_rows = output_buffer;
            no_rows.dims[no_rows.buffer.dimensions - 1].extent = 0;
            const int status = kernels.training(context, input_buffer.get(), weight_f32.buffer(),
                                                bias_f32.buffer(), eps, scale_in_double, no_rows.get(),
                                                mean_buffer.get(), var_buffer.get(),
                                                inv_std_buffer.get());
            return status != 0 ? status
                               : run_streamed_inference(context, kernels.streamed_chunk,
                                                        input_buffer.get(), mean_buffer.get(),
                                                        var_buffer.get(), weight_f32.buffer(),
                                                        bias_f32.buffer(), eps, scale_in_double, output_buffer.get());
        },
        "hbn::batch_norm: training pipeline");

    const ChannelFloats old_mean(running_mean, channels), old_var(running_var, channels);
    const double momentum = options.momentum;
    const auto count = static_cast<double>(view.values_per_channel());
    const double unbias = count / (count - 1);
    for (int64_t c = 0; c < channels; c++) {
        store_channel(running_mean, c, (1 - momentum) * old_mean[c] + momentum * mean[c]);
        store_channel(running_var, c, (1 - momentum) * old_var[c] + momentum * var[c] * unbias);
    }
}

}  // namespace

void batch_norm(const Tensor &input_x, const Tensor &running_mean, const Tensor &running_var,
                const Tensor &weight, const Tensor &bias, const Tensor &output,
                const BatchNormOptions &options) {
    run(input_x, running_mean, running_var, weight, bias, output, nullptr, nullptr, options,
        options.training);
}

void batch_norm_training(const Tensor &input_x, const Tensor &running_mean,
                         const Tensor &running_var, const Tensor &weight, const Tensor &bias,
                         const Tensor &output, const Tensor &saved_mean,
                         const Tensor &saved_inv_std, const BatchNormOptions &options) {
    run(input_x, running_mean, running_var, weight, bias, output, &saved_mean, &saved_inv_std,
        options, true);
}

}  // namespace hbn
