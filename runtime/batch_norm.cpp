// The forward entry points: validate, pick the kernels, run them over views
// of the caller's memory, and commit the running-statistics update only after
// the pipeline succeeded. A tensor that fits one kernel call, trained on one
// process, runs the fused training kernel; a synchronized batch norm, and a
// tensor too large for one call, gather statistics part by part, merge them
// (partition.h, collective.h), then normalize.
#include "hbn/batch_norm.h"

#include "backend.h"
#include "buffers.h"
#include "collective.h"
#include "epilogue.h"
#include "gpu_call.h"
#include "halide_call.h"
#include "kernels.h"
#include "partition.h"
#include "validation.h"

#include <cmath>
#include <vector>

namespace hbn {
namespace {

using namespace internal;

// Whether some channel's weight / sqrt(var + eps) may leave float's range,
// so that the kernels normalize in double (see generators/batch_norm_common.h).
// NaN weights take the double path too.
bool scale_in_double(const ChannelFloats &weight, double eps) {
    return !fits_float(weight.largest_magnitude() / std::sqrt(eps));
}

// Normalizes each slice of x into output with per-channel float32 `mean` and
// `var` (over every channel), and the options' epilogue: the inference
// kernel.
void normalize(Device device, const Tensor &x, const Tensor &output, const std::vector<Slice> &slices,
               const float *mean, const float *var, const ChannelFloats &weight, const ChannelFloats &bias,
               const BatchNormOptions &options, const char *what) {
    const double eps = options.eps;
    const bool in_double = scale_in_double(weight, eps);
    for (const Slice &slice : slices) {
        HalideBuffer input_buffer(x, slice), output_buffer(output, slice);
        HalideBuffer mean_buffer(mean, slice), var_buffer(var, slice), weight_buffer(weight.data(), slice),
            bias_buffer(bias.data(), slice);
        const ForwardEpilogue epilogue(options, slice, input_buffer);
        const Kernels kernels = kernels_for(device, x.dtype, slice);
        call_pipeline(
            device,
            {{input_buffer.get(), &x}, epilogue.residual.call_buffer(), {mean_buffer.get()}, {var_buffer.get()},
             {weight_buffer.get()}, {bias_buffer.get()}},
            {{output_buffer.get(), &output}},
            [&](void *context) {
                return kernels.inference(context, input_buffer.get(), epilogue.residual.get(), epilogue.add_residual,
                                         epilogue.relu, mean_buffer.get(), var_buffer.get(), weight_buffer.get(),
                                         bias_buffer.get(), eps, in_double, kernels.stream_output,
                                         output_buffer.get());
            },
            what);
    }
}

// A training step's batch statistics in double, and M, ready to commit.
struct BatchStatistics {
    std::vector<double> mean, var;  // biased
    double count = 0;
};

// Writes saved_mean and saved_inv_std (when given) and the running-statistics
// update; called only once every kernel of the call has succeeded.
void commit(const ForwardArguments &args, const BatchNormOptions &options, const BatchStatistics &batch) {
    const auto channels = static_cast<int64_t>(batch.mean.size());
    const ChannelFloats old_mean(args.running_mean, channels), old_var(args.running_var, channels);
    const double momentum = options.momentum, unbias = batch.count / (batch.count - 1);
    for (int64_t c = 0; c < channels; c++) {
        if (args.saved_mean != nullptr) {
            store_channel(*args.saved_mean, c, batch.mean[c]);
            store_channel(*args.saved_inv_std, c, 1 / std::sqrt(batch.var[c] + options.eps));
        }
        store_channel(args.running_mean, c, (1 - momentum) * old_mean[c] + momentum * batch.mean[c]);
        store_channel(args.running_var, c, (1 - momentum) * old_var[c] + momentum * batch.var[c] * unbias);
    }
}

void infer(const ForwardArguments &args, const BatchNormOptions &options) {
    const DataView view = validate_forward(args, options, false);
    const Device device = backend_for_call(options.device, args.input_x.memory);
    if (view.empty()) {
        return;  // nothing to normalize
    }
    install_error_handler();
    const int64_t channels = view.channels;
    const ChannelFloats mean(args.running_mean, channels), var(args.running_var, channels),
        weight(args.weight, channels), bias(args.bias, channels);
    normalize(device, args.input_x, args.output, slices_of(view), mean.data(), var.data(), weight, bias, options,
              "hbn::batch_norm: inference pipeline");
}

// One fused kernel: statistics, then normalization from cache.
void train_in_one_call(const ForwardArguments &args, const BatchNormOptions &options, const DataView &view,
                       Device device) {
    install_error_handler();
    const Tensor &x = args.input_x, &output = args.output;
    const int64_t channels = view.channels;
    const Slice slice = slices_of(view).front();
    const ChannelFloats weight(args.weight, channels), bias(args.bias, channels);
    const double eps = options.eps;
    const bool in_double = scale_in_double(weight, eps);
    BatchStatistics batch{std::vector<double>(channels), std::vector<double>(channels),
                          static_cast<double>(view.values_per_channel())};
    std::vector<float> inv_std(channels);
    HalideBuffer input_buffer(x, slice), output_buffer(output, slice), weight_buffer(weight.data(), channels),
        bias_buffer(bias.data(), channels), mean_buffer(batch.mean.data(), channels),
        var_buffer(batch.var.data(), channels), inv_std_buffer(inv_std.data(), channels);
    const ForwardEpilogue epilogue(options, slice, input_buffer);
    const Kernels kernels = kernels_for(device, x.dtype, slice);
    // A large output is streamed: the training kernel computes only the
    // statistics, and the inference kernel normalizes with them, with
    // streaming stores.
    std::vector<float> mean_f32, var_f32;
    call_pipeline(
        device, {{input_buffer.get(), &x}, epilogue.residual.call_buffer(), {weight_buffer.get()}, {bias_buffer.get()}},
        {{output_buffer.get(), &output}, {mean_buffer.get()}, {var_buffer.get()}, {inv_std_buffer.get()}},
        [&](void *context) {
            if (!kernels.stream_output) {
                return kernels.training(context, input_buffer.get(), epilogue.residual.get(), epilogue.add_residual,
                                        epilogue.relu, weight_buffer.get(), bias_buffer.get(), eps, in_double,
                                        output_buffer.get(), mean_buffer.get(), var_buffer.get(),
                                        inv_std_buffer.get());
            }
            // The statistics alone: no output, so no epilogue (the input
            // stands in for the residual).
            UnwantedOutput no_output(device, x.dtype, slice);
            const int status = kernels.training(context, input_buffer.get(), input_buffer.get(), false, false,
                                                weight_buffer.get(), bias_buffer.get(), eps, in_double,
                                                no_output.get(), mean_buffer.get(), var_buffer.get(),
                                                inv_std_buffer.get());
            if (status != 0) {
                return status;
            }
            mean_f32.assign(batch.mean.begin(), batch.mean.end());
            var_f32.assign(batch.var.begin(), batch.var.end());
            HalideBuffer mean_f32_buffer(mean_f32.data(), channels), var_f32_buffer(var_f32.data(), channels);
            return kernels.inference(context, input_buffer.get(), epilogue.residual.get(), epilogue.add_residual,
                                     epilogue.relu, mean_f32_buffer.get(), var_f32_buffer.get(), weight_buffer.get(),
                                     bias_buffer.get(), eps, in_double, kernels.stream_output, output_buffer.get());
        },
        "hbn::batch_norm: training pipeline");
    commit(args, options, batch);
}

// Statistics slice by slice, merged across slices and processes; then every
// slice normalized with them.
void train_in_parts(const ForwardArguments &args, const BatchNormOptions &options) {
    const Tensor &x = args.input_x;
    Collective collective(options.all_reduce);
    DataView view;
    Device device = Device::CPU;
    std::vector<Slice> slices;
    PartialStatistics partial;
    std::exception_ptr failure = Collective::attempt([&] {
        view = validate_forward(args, options, true);
        device = backend_for_call(options.device, x.memory);
        partial = PartialStatistics(view.channels, view.values_per_channel());
        if (view.empty()) {
            return;  // this process holds none of the batch
        }
        install_error_handler();
        slices = slices_of(view);
        const ChannelFloats weight(args.weight, view.channels), bias(args.bias, view.channels);
        for (const Slice &slice : slices) {
            SliceStatistics part(slice);
            std::vector<float> inv_std(slice.channels);
            HalideBuffer input_buffer(x, slice), weight_buffer(weight.data(), slice), bias_buffer(bias.data(), slice),
                mean_buffer(part.mean.data(), slice.channels), var_buffer(part.var.data(), slice.channels),
                inv_std_buffer(inv_std.data(), slice.channels);
            UnwantedOutput no_output(device, x.dtype, slice);
            const Kernels kernels = kernels_for(device, x.dtype, slice);
            call_pipeline(
                device, {{input_buffer.get(), &x}, {weight_buffer.get()}, {bias_buffer.get()}},
                {{no_output.get()}, {mean_buffer.get()}, {var_buffer.get()}, {inv_std_buffer.get()}},
                [&](void *context) {
                    // No output, so no epilogue: the input stands in for the residual.
                    return kernels.training(context, input_buffer.get(), input_buffer.get(), false, false,
                                            weight_buffer.get(), bias_buffer.get(), options.eps, false,
                                            no_output.get(), mean_buffer.get(), var_buffer.get(),
                                            inv_std_buffer.get());
                },
                "hbn::batch_norm: training statistics");
            partial.add(part);
        }
    });
    collective.agree_on_start(failure, view.channels);

    // From here every process runs the same all-reduces.
    BatchStatistics batch;
    partial.merge(collective, batch.mean, batch.var, batch.count);

    failure = Collective::attempt([&] {
        if (view.empty()) {
            return;
        }
        const std::vector<float> mean(batch.mean.begin(), batch.mean.end()), var(batch.var.begin(), batch.var.end());
        const ChannelFloats weight(args.weight, view.channels), bias(args.bias, view.channels);
        normalize(device, x, args.output, slices, mean.data(), var.data(), weight, bias, options,
                  "hbn::batch_norm: training pipeline");
    });
    collective.agree_on_finish(failure);
    commit(args, options, batch);
}

void train(const ForwardArguments &args, const BatchNormOptions &options) {
    if (!options.all_reduce) {
        const DataView view = validate_forward(args, options, true);
        const Device device = backend_for_call(options.device, args.input_x.memory);
        if (!needs_slices(view)) {
            train_in_one_call(args, options, view, device);
            return;
        }
    }
    train_in_parts(args, options);
}

}  // namespace

void batch_norm(const Tensor &input_x, const Tensor &running_mean, const Tensor &running_var,
                const Tensor &weight, const Tensor &bias, const Tensor &output,
                const BatchNormOptions &options) {
    const ForwardArguments args{input_x, running_mean, running_var, weight, bias, output};
    options.training ? train(args, options) : infer(args, options);
}

void batch_norm_training(const Tensor &input_x, const Tensor &running_mean,
                         const Tensor &running_var, const Tensor &weight, const Tensor &bias,
                         const Tensor &output, const Tensor &saved_mean,
                         const Tensor &saved_inv_std, const BatchNormOptions &options) {
    train({input_x, running_mean, running_var, weight, bias, output, &saved_mean, &saved_inv_std}, options);
}

}  // namespace hbn
