// grad_input of the training backward, given its per-channel terms:
//   grad_input = scale * ((dy - mean_dy) - (x - mean) * inv_std * slope)
// where the runtime forms scale = weight * inv_std, mean_dy = sum(dy) / M and
// slope = sum(dy * xhat) / M from sums that batch_norm_backward gathered over
// every slice of a tensor too large for one call, and over every process of a
// synchronized batch norm. One elementwise pass: two reads and one write per
// element.
#include "grad_input.h"

namespace {

using namespace Halide;
using namespace hbn_generators;

class BatchNormGradInput : public GradientGenerator<BatchNormGradInput> {
public:
    Input<Buffer<float, 1>> mean{"mean"};
    Input<Buffer<double, 1>> scale{"scale"};
    Input<Buffer<double, 1>> mean_dy{"mean_dy"};
    Input<Buffer<double, 1>> slope{"slope"};
    Input<Buffer<double, 1>> inv_std{"inv_std"};
    Input<bool> in_double{"in_double"};          // as batch_norm_backward's
    Input<bool> stream_output{"stream_output"};  // see streaming_stores.h

    void generate() {
        const DataVars v(layout);
        const Var c = v.c;

        // Algorithm
        Func terms{"terms"};
        terms(c) = grad_input_terms(scale(c), mean_dy(c), slope(c), inv_std(c));
        const Expr dy = normalized_gradient(v.args), x = load_float(input(v.args));
        const BothPrecisions dx = training_grad_input(dy, x, mean(c), GradInputTerms(terms(c)), is_16_bit());
        output(v.args) = to_storage(select(in_double, cast<float>(dx.f64), dx.f32));

        // Estimates
        set_data_estimates();
        for (auto *term : {&scale, &mean_dy, &slope, &inv_std}) {
            term->set_estimates({{0, estimated_channels}});
        }
        mean.set_estimates({{0, estimated_channels}});
        in_double.set_estimate(false);
        stream_output.set_estimate(false);

        stream_stores_into({output.name()}, stream_output);

        // Schedule
        if (auto_schedule ||
            hbn_schedules::apply_checked_in(get_pipeline(), get_target(), schedule)) {
            return;
        }
        if (get_target().has_gpu_feature()) {
            // Inlined: converting the terms in every thread is cheaper than
            // a kernel launch for them.
            schedule_elementwise_gpu(output, v, layout, {in_double, relu});
        } else {
            terms.compute_root();
            schedule_elementwise_cpu(output, v, layout, parallel, get_target(), {in_double, relu});
        }
    }
};

}  // namespace

HALIDE_REGISTER_GENERATOR(BatchNormGradInput, batch_norm_grad_input)
