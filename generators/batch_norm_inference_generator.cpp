// Inference: normalize with the running statistics, and the fused epilogue
// (see NormalizingGenerator).
//   y = relu((x - running_mean) * (weight / sqrt(running_var + eps)) + bias + residual)
// One read and one write per element (and a read of the residual when it is
// added); the per-channel scale is folded once. Large outputs are written
// with streaming stores.
#include "batch_norm_common.h"

namespace {

using namespace Halide;
using namespace hbn_generators;

class BatchNormInference : public NormalizingGenerator<BatchNormInference> {
public:
    Input<Buffer<float, 1>> running_mean{"running_mean"};
    Input<Buffer<float, 1>> running_var{"running_var"};
    Input<Buffer<float, 1>> weight{"weight"};
    Input<Buffer<float, 1>> bias{"bias"};
    Input<double> eps{"eps"};
    Input<bool> scale_in_double{"scale_in_double"};  // see normalized()
    Input<bool> stream_output{"stream_output"};      // see streaming_stores.h

    void generate() {
        const DataVars v(layout);

        // Algorithm
        Func scale{"scale"};  // in double, and as float32
        const Expr scale_f64 = cast<double>(weight(v.c)) / sqrt(cast<double>(running_var(v.c)) + eps);
        scale(v.c) = Tuple(scale_f64, cast<float>(scale_f64));
        output(v.args) = fused_output(normalized(load_float(input(v.args)), channel_term(running_mean(v.c)),
                                                 {scale(v.c)[1], scale(v.c)[0]}, channel_term(bias(v.c))),
                                      scale_in_double, v.args);

        // Estimates
        set_data_estimates();
        for (auto *param : {&running_mean, &running_var, &weight, &bias}) {
            param->set_estimates({{0, estimated_channels}});
        }
        eps.set_estimate(1e-5);
        scale_in_double.set_estimate(false);
        stream_output.set_estimate(false);

        stream_stores_into({output.name()}, stream_output);

        // Schedule
        if (auto_schedule ||
            hbn_schedules::apply_checked_in(get_pipeline(), get_target(), schedule)) {
            return;
        }
        const std::vector<Expr> variants = elementwise_variants(scale_in_double);
        if (get_target().has_gpu_feature()) {
            // Inlined: recomputing the scale in every thread is cheaper than
            // a kernel launch for it.
            schedule_elementwise_gpu(output, v, layout, variants);
        } else {
            scale.compute_root();
            schedule_elementwise_cpu(output, v, layout, parallel, get_target(), variants);
        }
    }
};

}  // namespace

HALIDE_REGISTER_GENERATOR(BatchNormInference, batch_norm_inference)
