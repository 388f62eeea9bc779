// Backward: the gradients of batch norm, as PyTorch's
// native_batch_norm_backward computes them. Per channel, over its M values,
// with xhat = (x - mean) * inv_std:
//   grad_bias   = sum(dy)
//   grad_weight = sum(dy * xhat)
//   grad_input  = weight * inv_std * (dy - grad_bias / M - xhat * grad_weight / M)   (training)
//   grad_input  = weight * inv_std * dy                                              (inference)
// `mean` and `inv_std` are the forward's saved statistics in training, and
// running_mean and 1 / sqrt(running_var + eps) in inference: the runtime
// passes whichever the mode uses. The two sums are the only reductions, and
// both modes need them (for grad_weight and grad_bias); the elementwise pass
// follows them, as in the training forward. Through the fused epilogue, dy
// is the gradient of batch norm's own output (see GradientGenerator), and it
// is also written out as grad_residual.
#include "grad_input.h"

namespace {

using namespace Halide;
using namespace hbn_generators;

class BatchNormBackward : public GradientGenerator<BatchNormBackward> {
public:
    Input<Buffer<float, 1>> mean{"mean"};
    Input<Buffer<double, 1>> inv_std{"inv_std"};
    Input<Buffer<float, 1>> weight{"weight"};
    Input<bool> training{"training"};
    // grad_input in double, rounded once at the end: set by the runtime when
    // weight * inv_std may leave float's range (see normalized() in
    // batch_norm_common.h).
    Input<bool> in_double{"in_double"};
    Input<bool> stream_output{"stream_output"};  // grad_input's and grad_residual's, see streaming_stores.h
    // In double: the runtime adds them up across slices and processes.
    Output<Buffer<double, 1>> grad_weight{"grad_weight"};
    Output<Buffer<double, 1>> grad_bias{"grad_bias"};
    // Of x's type and shape; the runtime gives it no rows when unwanted.
    Output<Buffer<>> grad_residual{"grad_residual"};

    void configure() {
        GradientGenerator<BatchNormBackward>::configure();
        grad_residual.set_type(storage_type(data_type));
        grad_residual.set_dimensions(data_dimensions(layout));
    }

    void generate() {
        const DataVars v(layout);
        const Var c = v.c;

        // Algorithm
        // sum(dy) and sum(dy * (x - mean)), accumulated in double: they stay
        // exact to ~1e-9 for more than 2^24 values, a mean/std ratio of 1e4
        // in x, or a large common offset in dy, where float32 sums are not.
        const ChannelValues values(input, layout);
        const Expr channel_dy = cast<double>(normalized_gradient(values.of(c)));
        const Expr channel_centered = cast<double>(load_float(input(values.of(c)))) - mean(c);
        Func sums{"sums"};
        sums(c) = Tuple(cast<double>(0), cast<double>(0));
        sums(c) = Tuple(sums(c)[0] + channel_dy, sums(c)[1] + channel_dy * channel_centered);
        grad_bias(c) = sums(c)[0];
        grad_weight(c) = sums(c)[1] * inv_std(c);

        // grad_input from per-channel terms (see grad_input.h).
        const Expr count = cast<double>(values_per_channel(input, layout));
        // inv_std reaches the elementwise pass through `terms` too, not from
        // its input: Halide 14's Mullapudi2016 fails an internal assertion
        // on the latter.
        Func terms{"terms"};
        terms(c) = grad_input_terms(cast<double>(weight(c)) * inv_std(c), sums(c)[0] / count,
                                    sums(c)[1] * inv_std(c) / count, inv_std(c));
        const GradInputTerms t(terms(c));
        const Expr dy = normalized_gradient(v.args), x = load_float(input(v.args));
        const BothPrecisions trained = training_grad_input(dy, x, mean(c), t, is_16_bit());
        const Expr dx_f64 = select(training, trained.f64, t.scale.f64 * dy);
        const Expr dx_f32 = select(training, trained.f32, t.scale.f32 * dy);
        output(v.args) = to_storage(select(in_double, cast<float>(dx_f64), dx_f32));
        grad_residual(v.args) = stored_normalized_gradient(v.args);

        // Estimates
        set_data_estimates();
        mean.set_estimates({{0, estimated_channels}});
        inv_std.set_estimates({{0, estimated_channels}});
        weight.set_estimates({{0, estimated_channels}});
        grad_weight.set_estimates({{0, estimated_channels}});
        grad_bias.set_estimates({{0, estimated_channels}});
        grad_residual.set_estimates(data_estimates());
        training.set_estimate(true);
        in_double.set_estimate(false);
        stream_output.set_estimate(false);

        stream_stores_into({output.name(), grad_residual.name()}, stream_output);

        // Schedule
        if (auto_schedule ||
            hbn_schedules::apply_checked_in(get_pipeline(), get_target(), schedule)) {
            return;
        }
        const int vector_size = get_target().natural_vector_size<float>();
        const std::vector<Func> channel_outputs = {grad_weight, grad_bias};
        // Double is rare, so its variant keeps the other flags as selects;
        // inference's grad_input is cheap enough to select between in the
        // ReLU variant.
        const std::vector<Expr> variants = {in_double, relu, training};
        if (get_target().has_gpu_feature()) {
            schedule_sums_gpu(sums, values.r, c, layout, {relu});
            schedule_per_channel_gpu({terms}, c);
            schedule_per_channel_gpu(channel_outputs, c);
            schedule_elementwise_gpu(output, v, layout, variants);
            schedule_elementwise_gpu(grad_residual, v, layout, {relu});
        } else if (layout == Layout::NCHW) {
            schedule_sums_nchw_cpu(sums, values.r, c, vector_size, {relu});
            schedule_slab_by_slab_cpu(output, channel_outputs, {sums, terms}, v, parallel, vector_size, variants);
            // Row by row with grad_input's pass, which has just read its dy
            // and y. (compute_with takes no specializations: the mask stays a
            // select on relu, over a y that is dy itself without it.)
            grad_residual.reorder(v.inner, v.n, v.c).vectorize(v.inner, vector_size, TailStrategy::GuardWithIf);
            if (parallel) {
                grad_residual.parallel(v.c);
            }
            grad_residual.compute_with(output, v.n);
        } else {
            // Both sums first, then the elementwise pass.
            schedule_sums_nhwc_cpu(sums, values.r, c, vector_size, parallel, {relu});
            terms.compute_root();
            schedule_elementwise_cpu(output, v, layout, parallel, get_target(), variants);
            // Block by block with grad_input's pass (see NCHW's).
            schedule_elementwise_cpu(grad_residual, v, layout, parallel, get_target(), {});
            grad_residual.compute_with(output, Var("row_block"));
        }
    }
};

}  // namespace

HALIDE_REGISTER_GENERATOR(BatchNormBackward, batch_norm_backward)
