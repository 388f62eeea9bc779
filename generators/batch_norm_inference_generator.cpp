// Inference: normalize with the running statistics.
//   y = (x - running_mean) * (weight / sqrt(running_var + eps)) + bias
// One read and one write per element; the per-channel scale is folded once.
#include "batch_norm_common.h"

namespace {

using namespace Halide;
using namespace hbn_generators;

class BatchNormInference : public Generator<BatchNormInference> {
public:
    GeneratorParam<Type> data_type{"data_type", Float(32)};
    GeneratorParam<Layout> layout{"layout", Layout::NCHW, layout_names};
    GeneratorParam<bool> parallel{"parallel", true};

    Input<Buffer<>> input{"input"};
    Input<Buffer<float, 1>> running_mean{"running_mean"};
    Input<Buffer<float, 1>> running_var{"running_var"};
    Input<Buffer<float, 1>> weight{"weight"};
    Input<Buffer<float, 1>> bias{"bias"};
    Input<float> eps{"eps"};
    Output<Buffer<>> output{"output"};

    void configure() {
        input.set_type(data_type);
        input.set_dimensions(data_dimensions(layout));
        output.set_type(data_type);
        output.set_dimensions(data_dimensions(layout));
    }

    void generate() {
        const DataVars v(layout);

        // Algorithm
        Func scale{"scale"};
        scale(v.c) = weight(v.c) / sqrt(running_var(v.c) + eps);
        output(v.args) = cast(data_type,
                              normalized(input(v.args), running_mean(v.c), scale(v.c), bias(v.c)));

        // Estimates: the mid-size benchmark tensor, 32x64x56x56.
        const int channels = 64, spatial = 56 * 56, batch = 32;
        for (auto *param : {&running_mean, &running_var, &weight, &bias}) {
            param->set_estimates({{0, channels}});
        }
        eps.set_estimate(1e-5f);
        if (layout == Layout::NCHW) {
            input.set_estimates({{0, spatial}, {0, channels}, {0, batch}});
            output.set_estimates({{0, spatial}, {0, channels}, {0, batch}});
        } else {
            input.set_estimates({{0, channels}, {0, spatial * batch}});
            output.set_estimates({{0, channels}, {0, spatial * batch}});
        }

        // Schedule
        if (auto_schedule) {
            return;
        }
        scale.compute_root();
        schedule_normalize_cpu(output, v, layout, parallel, get_target());
    }
};

}  // namespace

HALIDE_REGISTER_GENERATOR(BatchNormInference, batch_norm_inference)
