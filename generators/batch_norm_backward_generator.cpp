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
// follows them, as in the training forward.
#include "batch_norm_common.h"

namespace {

using namespace Halide;
using namespace hbn_generators;

class BatchNormBackward : public BatchNormGenerator<BatchNormBackward> {
public:
    // `input` is x, and `output` grad_input.
    Input<Buffer<>> grad_output{"grad_output"};
    Input<Buffer<float, 1>> mean{"mean"};
    Input<Buffer<double, 1>> inv_std{"inv_std"};
    Input<Buffer<float, 1>> weight{"weight"};
    Input<bool> training{"training"};
    // grad_input in double, rounded once at the end: set by the runtime when
    // weight * inv_std may leave float's range (see normalized() in
    // batch_norm_common.h).
    Input<bool> in_double{"in_double"};
    Output<Buffer<float, 1>> grad_weight{"grad_weight"};
    Output<Buffer<float, 1>> grad_bias{"grad_bias"};

    void configure() {
        BatchNormGenerator::configure();
        grad_output.set_type(storage_type());
        grad_output.set_dimensions(data_dimensions(layout));
    }

    void generate() {
        const DataVars v(layout);
        const Var c = v.c;

        // Algorithm
        // sum(dy) and sum(dy * (x - mean)), accumulated in double: they stay
        // exact to ~1e-9 for more than 2^24 values, a mean/std ratio of 1e4
        // in x, or a large common offset in dy, where float32 sums are not.
        const ChannelValues values(input, layout);
        const Expr channel_dy = cast<double>(load_float(grad_output(values.of(c))));
        const Expr channel_centered = cast<double>(load_float(input(values.of(c)))) - mean(c);
        Func sums{"sums"};
        sums(c) = Tuple(cast<double>(0), cast<double>(0));
        sums(c) = Tuple(sums(c)[0] + channel_dy, sums(c)[1] + channel_dy * channel_centered);
        grad_bias(c) = cast<float>(sums(c)[0]);
        grad_weight(c) = cast<float>(sums(c)[1] * inv_std(c));

        // grad_input = scale * ((dy - mean_dy) - (x - mean) * inv_std * slope)
        // per channel, with scale = weight * inv_std and slope = grad_weight / M,
        // each in double and as float32. For float32 data, dy - mean_dy is
        // formed in double even on the float32 path: with a large common
        // offset in dy, a float32 mean_dy would lose the offset's last bits
        // (dy = 1e3 + N(0, 1): 3e-5 in grad_input values of ~3). A float32
        // pair hi + lo does not survive compilation: Halide's simplifier, and
        // LLVM under the fast-math flags Halide 14 sets, turn (dy - hi) - lo
        // into dy - (hi + lo). float16 data keeps it in float32: its output's
        // rounding (2^-11) dwarfs that error, and the conversions would cost
        // the compute-bound float16 pass.
        const Expr count = cast<double>(values_per_channel(input, layout));
        const Expr scale = cast<double>(weight(c)) * inv_std(c);
        const Expr slope = sums(c)[1] * inv_std(c) / count;
        // inv_std reaches the elementwise pass through `terms` too, not from
        // its input: Halide 14's Mullapudi2016 fails an internal assertion
        // on the latter.
        Func terms{"terms"};
        const Expr mean_dy_f64 = sums(c)[0] / count;
        terms(c) = Tuple(scale, mean_dy_f64, slope, inv_std(c), cast<float>(scale), cast<float>(mean_dy_f64),
                         cast<float>(slope), cast<float>(inv_std(c)));
        const ChannelTerm scale_term{terms(c)[4], terms(c)[0]}, mean_dy{terms(c)[5], terms(c)[1]},
            slope_term{terms(c)[6], terms(c)[2]}, inv_std_term{terms(c)[7], terms(c)[3]};
        const Expr dy = load_float(grad_output(v.args)), x = load_float(input(v.args));
        const Expr dx_f64 =
            select(training,
                   scale_term.f64 * ((cast<double>(dy) - mean_dy.f64) -
                                     (cast<double>(x) - mean(c)) * inv_std_term.f64 * slope_term.f64),
                   scale_term.f64 * dy);
        const Expr centered_dy =
            is_float16() ? dy - mean_dy.f32 : cast<float>(cast<double>(dy) - mean_dy.f64);
        const Expr dx_f32 = select(training,
                                   scale_term.f32 * (centered_dy -
                                                     (x - mean(c)) * inv_std_term.f32 * slope_term.f32),
                                   scale_term.f32 * dy);
        output(v.args) = to_storage(select(in_double, cast<float>(dx_f64), dx_f32));

        // Estimates
        set_data_estimates();
        grad_output.set_estimates(data_estimates());
        mean.set_estimates({{0, estimated_channels}});
        inv_std.set_estimates({{0, estimated_channels}});
        weight.set_estimates({{0, estimated_channels}});
        grad_weight.set_estimates({{0, estimated_channels}});
        grad_bias.set_estimates({{0, estimated_channels}});
        training.set_estimate(true);
        in_double.set_estimate(false);

        // Schedule
        if (auto_schedule ||
            hbn_schedules::apply_checked_in(get_pipeline(), get_target(), schedule)) {
            return;
        }
        const int vector_size = get_target().natural_vector_size<float>();
        const std::vector<Func> channel_outputs = {grad_weight, grad_bias};
        const std::vector<Expr> flags = {training, in_double};
        if (get_target().has_gpu_feature()) {
            schedule_sums_gpu(sums, values.r, c, layout);
            schedule_per_channel_gpu({terms}, c);
            schedule_per_channel_gpu(channel_outputs, c);
            schedule_elementwise_gpu(output, v, layout, flags);
        } else if (layout == Layout::NCHW) {
            schedule_sums_nchw_cpu(sums, values.r, c, vector_size);
            schedule_slab_by_slab_cpu(output, channel_outputs, {sums, terms}, v, parallel, vector_size, flags);
        } else {
            // Both sums first, then the elementwise pass.
            schedule_sums_nhwc_cpu(sums, values.r, c, vector_size, parallel);
            terms.compute_root();
            schedule_elementwise_cpu(output, v, layout, parallel, get_target(), flags);
        }
    }
};

}  // namespace

HALIDE_REGISTER_GENERATOR(BatchNormBackward, batch_norm_backward)
