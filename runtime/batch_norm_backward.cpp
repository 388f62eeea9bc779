// The backward entry point: validate, pick the kernels, run them over views
// of the caller's memory, and store the per-channel gradients in weight's
// dtype. Where grad_input needs only its own slice's sums (inference, or one
// slice on one process), the fused backward kernel runs slice by slice. A
// synchronized batch norm, and a training tensor too large for one call,
// first add up the sums of every slice and process, then form grad_input
// slice by slice from them (batch_norm_grad_input).
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

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

namespace hbn {
namespace {

using namespace internal;

// What every kernel call of a backward reads per channel.
struct ChannelInputs {
    ChannelFloats weight, mean;
    std::vector<double> inv_std;
    bool in_double = false;

    ChannelInputs(const BackwardArguments &args, const BatchNormOptions &options, int64_t channels)
        : weight(args.weight, channels),
          mean(options.training ? args.saved_mean : args.running_mean, channels),
          inv_std(channels) {
        const ChannelFloats spread(options.training ? args.saved_inv_std : args.running_var, channels);
        for (int64_t c = 0; c < channels; c++) {
            inv_std[c] = options.training ? spread[c] : 1 / std::sqrt(static_cast<double>(spread[c]) + options.eps);
        }
        // grad_input in double where weight * inv_std, or inv_std itself,
        // may leave float's range (see generators/grad_input.h).
        const double largest_inv_std = largest_magnitude(inv_std.data(), channels);
        in_double = !fits_float(largest_inv_std) || !fits_float(weight.largest_magnitude() * largest_inv_std);
    }
};

// This process's per-channel sums: grad_weight's, then grad_bias's.
struct ChannelSums {
    std::vector<double> grad_weight, grad_bias;
    explicit ChannelSums(int64_t channels) : grad_weight(channels), grad_bias(channels) {}
};

// The backward kernel over one slice: adds the slice's sums to `sums`, writes
// its grad_residual when the options give one, and its grad_input, or none
// (`dx_wanted` false).
void run_backward_kernel(const BackwardArguments &args, const BatchNormOptions &options, bool training,
                         const ChannelInputs &inputs, Device device, const Slice &slice, bool dx_wanted,
                         ChannelSums &sums) {
    const Tensor &x = args.input_x, &dy = args.grad_output;
    HalideBuffer x_buffer(x, slice), dy_buffer(dy, slice), mean_buffer(inputs.mean.data(), slice),
        inv_std_buffer(inputs.inv_std.data(), slice), weight_buffer(inputs.weight.data(), slice);
    const BackwardEpilogue epilogue(options, slice, dy_buffer);
    const Tensor &dr = options.grad_residual;
    std::optional<HalideBuffer> dx_buffer, dr_buffer;
    std::optional<UnwantedOutput> no_dx, no_dr;
    halide_buffer_t *dx = dx_wanted ? dx_buffer.emplace(args.grad_input, slice).get()
                                    : no_dx.emplace(device, x.dtype, slice).get();
    halide_buffer_t *dr_out = given(dr) ? dr_buffer.emplace(dr, slice).get() : no_dr.emplace(device, x.dtype, slice).get();
    std::vector<double> grad_weight(slice.channels), grad_bias(slice.channels);
    HalideBuffer grad_weight_buffer(grad_weight.data(), slice.channels),
        grad_bias_buffer(grad_bias.data(), slice.channels);
    const Kernels kernels = kernels_for(device, x.dtype, slice);
    call_pipeline(
        device,
        {{x_buffer.get(), &x}, {dy_buffer.get(), &dy}, epilogue.forward_output.call_buffer(), {mean_buffer.get()},
         {inv_std_buffer.get()}, {weight_buffer.get()}},
        {{dx, dx_wanted ? &args.grad_input : nullptr},
         {grad_weight_buffer.get()},
         {grad_bias_buffer.get()},
         {dr_out, given(dr) ? &dr : nullptr}},
        [&](void *context) {
            return kernels.backward(context, x_buffer.get(), dy_buffer.get(), epilogue.forward_output.get(),
                                    epilogue.relu, mean_buffer.get(), inv_std_buffer.get(), weight_buffer.get(),
                                    training, inputs.in_double, kernels.stream_output, dx, grad_weight_buffer.get(),
                                    grad_bias_buffer.get(), dr_out);
        },
        "hbn::batch_norm_backward: pipeline");
    for (int64_t c = 0; c < slice.channels; c++) {
        sums.grad_weight[slice.first_channel + c] += grad_weight[c];
        sums.grad_bias[slice.first_channel + c] += grad_bias[c];
    }
}

// The training grad_input of one slice, from sums over the whole batch of M
// values per channel.
void run_grad_input_kernel(const BackwardArguments &args, const BatchNormOptions &options,
                           const ChannelInputs &inputs, Device device, const Slice &slice,
                           const ChannelSums &batch_sums, double count) {
    const Tensor &x = args.input_x, &dy = args.grad_output;
    const int64_t first = slice.first_channel;
    std::vector<double> scale(slice.channels), mean_dy(slice.channels), slope(slice.channels);
    for (int64_t c = 0; c < slice.channels; c++) {
        scale[c] = inputs.weight[first + c] * inputs.inv_std[first + c];
        mean_dy[c] = batch_sums.grad_bias[first + c] / count;
        slope[c] = batch_sums.grad_weight[first + c] / count;
    }
    HalideBuffer x_buffer(x, slice), dy_buffer(dy, slice), dx_buffer(args.grad_input, slice),
        mean_buffer(inputs.mean.data(), slice), inv_std_buffer(inputs.inv_std.data(), slice),
        scale_buffer(scale.data(), slice.channels), mean_dy_buffer(mean_dy.data(), slice.channels),
        slope_buffer(slope.data(), slice.channels);
    const BackwardEpilogue epilogue(options, slice, dy_buffer);
    const Kernels kernels = kernels_for(device, x.dtype, slice);
    call_pipeline(
        device,
        {{x_buffer.get(), &x}, {dy_buffer.get(), &dy}, epilogue.forward_output.call_buffer(), {mean_buffer.get()},
         {scale_buffer.get()}, {mean_dy_buffer.get()}, {slope_buffer.get()}, {inv_std_buffer.get()}},
        {{dx_buffer.get(), &args.grad_input}},
        [&](void *context) {
            return kernels.grad_input(context, x_buffer.get(), dy_buffer.get(), epilogue.forward_output.get(),
                                      epilogue.relu, mean_buffer.get(), scale_buffer.get(), mean_dy_buffer.get(),
                                      slope_buffer.get(), inv_std_buffer.get(), inputs.in_double,
                                      kernels.stream_output, dx_buffer.get());
        },
        "hbn::batch_norm_backward: grad_input pipeline");
}

// Each slice's grad_input needs only its own sums.
ChannelSums backward_slice_by_slice(const BackwardArguments &args, const BatchNormOptions &options,
                                    const DataView &view, Device device) {
    ChannelSums sums(view.channels);
    install_error_handler();
    const ChannelInputs inputs(args, options, view.channels);
    for (const Slice &slice : slices_of(view)) {
        run_backward_kernel(args, options, options.training, inputs, device, slice, given(args.grad_input), sums);
    }
    return sums;
}

// Training over several slices or processes: every sum first, then grad_input.
ChannelSums backward_in_parts(const BackwardArguments &args, const BatchNormOptions &options) {
    Collective collective(options.all_reduce);
    DataView view;
    Device device = Device::CPU;
    std::vector<Slice> slices;
    std::optional<ChannelInputs> inputs;
    std::optional<ChannelSums> sums;
    std::exception_ptr failure = Collective::attempt([&] {
        view = validate_backward(args, options);
        device = backend_for_call(options.device, args.input_x.memory);
        sums.emplace(view.channels);
        if (view.empty()) {
            return;  // this process holds none of the batch
        }
        install_error_handler();
        slices = slices_of(view);
        inputs.emplace(args, options, view.channels);
        for (const Slice &slice : slices) {
            run_backward_kernel(args, options, true, *inputs, device, slice, false, *sums);
        }
    });
    collective.agree_on_start(failure, view.channels);

    // From here every process runs the same all-reduces: M, then both sums.
    const int64_t channels = view.channels;
    std::vector<double> reduced(1 + 2 * channels);
    reduced[0] = static_cast<double>(view.values_per_channel());
    std::copy(sums->grad_weight.begin(), sums->grad_weight.end(), reduced.begin() + 1);
    std::copy(sums->grad_bias.begin(), sums->grad_bias.end(), reduced.begin() + 1 + channels);
    collective.sum(reduced);
    const double count = reduced[0];
    check_global_values_per_channel(count);
    ChannelSums batch_sums(channels);
    std::copy(reduced.begin() + 1, reduced.begin() + 1 + channels, batch_sums.grad_weight.begin());
    std::copy(reduced.begin() + 1 + channels, reduced.end(), batch_sums.grad_bias.begin());

    failure = Collective::attempt([&] {
        if (view.empty() || !given(args.grad_input)) {
            return;
        }
        for (const Slice &slice : slices) {
            run_grad_input_kernel(args, options, *inputs, device, slice, batch_sums, count);
        }
    });
    collective.agree_on_finish(failure);
    return std::move(*sums);
}

// Stores grad_weight and grad_bias, where given, from `sums` (null: zeros),
// once every kernel has succeeded.
void store_gradients(const BackwardArguments &args, int64_t channels, const ChannelSums *sums) {
    const std::array<std::pair<const Tensor *, const std::vector<double> *>, 2> channel_gradients = {
        {{&args.grad_weight, sums ? &sums->grad_weight : nullptr}, {&args.grad_bias, sums ? &sums->grad_bias : nullptr}}};
    for (const auto &[gradient, values] : channel_gradients) {
        for (int64_t c = 0; given(*gradient) && c < channels; c++) {
            store_channel(*gradient, c, values ? (*values)[c] : 0);
        }
    }
}

}  // namespace

void batch_norm_backward(const Tensor &grad_output, const Tensor &input_x, const Tensor &weight,
                         const Tensor &running_mean, const Tensor &running_var,
                         const Tensor &saved_mean, const Tensor &saved_inv_std,
                         const Tensor &grad_input, const Tensor &grad_weight, const Tensor &grad_bias,
                         const BatchNormOptions &options) {
    const BackwardArguments args{grad_output, input_x,    weight,      running_mean, running_var,
                                 saved_mean,  saved_inv_std, grad_input, grad_weight,  grad_bias};
    if (!(options.training && options.all_reduce)) {
        const DataView view = validate_backward(args, options);
        const Device device = backend_for_call(options.device, input_x.memory);
        if (view.empty()) {
            // No values: zero sums, and nothing allocated (C need not fit in memory).
            store_gradients(args, view.channels, nullptr);
            return;
        }
        if (!options.training || !needs_slices(view)) {
            const ChannelSums sums = backward_slice_by_slice(args, options, view, device);
            store_gradients(args, view.channels, &sums);
            return;
        }
    }
    const ChannelSums sums = backward_in_parts(args, options);
    store_gradients(args, static_cast<int64_t>(sums.grad_bias.size()), &sums);
}

}  // namespace hbn
