// Training: normalize with the batch statistics, and emit them.
//   mean, var = per-channel batch mean and biased variance
//   y = relu((x - mean) * (weight / sqrt(var + eps)) + bias + residual)
// with the fused epilogue of NormalizingGenerator.
// The running-statistics update is left to the caller, which commits it only
// once the whole pipeline has succeeded.
#include "batch_norm_common.h"

namespace {

using namespace Halide;
using namespace hbn_generators;

class BatchNormTraining : public NormalizingGenerator<BatchNormTraining> {
public:
    Input<Buffer<float, 1>> weight{"weight"};
    Input<Buffer<float, 1>> bias{"bias"};
    Input<double> eps{"eps"};
    Input<bool> scale_in_double{"scale_in_double"};  // see normalized()
    // In double: the runtime merges the statistics of slices and processes
    // (Chan's update), which float32 means would spoil at large offsets.
    Output<Buffer<double, 1>> batch_mean{"batch_mean"};
    Output<Buffer<double, 1>> batch_var{"batch_var"};  // biased
    Output<Buffer<float, 1>> batch_inv_std{"batch_inv_std"};

    void generate() {
        const DataVars v(layout);
        const Var c = v.c;

        // Algorithm
        // Every value of channel c, and one of them to shift by.
        const bool nchw = layout == Layout::NCHW;
        const ChannelValues values(input, layout);
        const Expr channel_value = load_float(input(values.of(c)));
        // An infinite first value would make every d NaN (inf - inf), where
        // the channel's mean is infinite: a non-finite shift becomes 0. The
        // test is on the bits, since Halide compiles floats with LLVM's
        // no-NaN and no-inf flags, under which a float test may fold away.
        const Expr first_bits =
            reinterpret<uint32_t>(load_float(nchw ? input(0, c, 0) : input(c, 0)));
        const Expr first_is_finite = (first_bits & 0x7f800000) != 0x7f800000;
        Func shift{"shift"};
        shift(c) = cast<double>(reinterpret<float>(select(first_is_finite, first_bits, cast<uint32_t>(0))));

        // Shifted sums accumulated in double: sum(d) and sum(d^2) with
        // d = x - shift. Double keeps E[d^2] - E[d]^2 exact to ~1e-9 even for
        // mean/std ratios of 1e4 and more than 2^24 values, in one read of x.
        Func sums{"sums"};
        sums(c) = Tuple(cast<double>(0), cast<double>(0));
        const Expr d = cast<double>(channel_value) - shift(c);
        sums(c) = Tuple(sums(c)[0] + d, sums(c)[1] + d * d);

        const Expr count = cast<double>(values_per_channel(input, layout));
        const Expr mean_offset = sums(c)[0] / count;
        const Expr shifted_var = sums(c)[1] / count - mean_offset * mean_offset;
        // Rounding can leave a nearly constant channel's variance a hair
        // below zero. (v + |v|) / 2 clamps it to zero with arithmetic alone:
        // a comparison (select, max) is simplified into max(v, 0), whose
        // machine instructions drop a NaN, and Halide compiles floats with
        // LLVM's no-NaN flags, under which a NaN test may fold away.
        const Expr var = (shifted_var + abs(shifted_var)) / 2;
        Func statistics{"statistics"};  // mean, biased variance, 1 / std in double; mean as float32
        const Expr mean = shift(c) + mean_offset;
        statistics(c) = Tuple(mean, var, 1 / sqrt(var + eps), cast<float>(mean));
        batch_mean(c) = statistics(c)[0];
        batch_var(c) = statistics(c)[1];
        batch_inv_std(c) = cast<float>(statistics(c)[2]);

        Func scale{"scale"};  // in double, and as float32
        const Expr scale_f64 = cast<double>(weight(c)) * statistics(c)[2];
        scale(c) = Tuple(scale_f64, cast<float>(scale_f64));
        output(v.args) = fused_output(normalized(load_float(input(v.args)), {statistics(c)[3], statistics(c)[0]},
                                                 {scale(c)[1], scale(c)[0]}, channel_term(bias(c))),
                                      scale_in_double, v.args);

        // Estimates
        set_data_estimates();
        for (auto *param : {&weight, &bias}) {
            param->set_estimates({{0, estimated_channels}});
        }
        batch_mean.set_estimates({{0, estimated_channels}});
        batch_var.set_estimates({{0, estimated_channels}});
        batch_inv_std.set_estimates({{0, estimated_channels}});
        eps.set_estimate(1e-5);
        scale_in_double.set_estimate(false);

        // Schedule
        if (auto_schedule ||
            hbn_schedules::apply_checked_in(get_pipeline(), get_target(), schedule)) {
            return;
        }
        const int vector_size = get_target().natural_vector_size<float>();
        const std::vector<Func> channel_outputs = {batch_mean, batch_var, batch_inv_std};
        const std::vector<Expr> variants = elementwise_variants(scale_in_double);
        if (get_target().has_gpu_feature()) {
            schedule_sums_gpu(sums, values.r, c, layout);
            schedule_per_channel_gpu({statistics}, c);
            schedule_per_channel_gpu(channel_outputs, c);
            schedule_elementwise_gpu(output, v, layout, variants);
        } else if (layout == Layout::NCHW) {
            schedule_sums_nchw_cpu(sums, values.r, c, vector_size);
            schedule_slab_by_slab_cpu(output, channel_outputs, {statistics, sums, scale}, v, parallel,
                                      vector_size, variants);
        } else {
            // All statistics first, then the elementwise pass.
            schedule_sums_nhwc_cpu(sums, values.r, c, vector_size, parallel);
            statistics.compute_root();
            scale.compute_root();
            schedule_elementwise_cpu(output, v, layout, parallel, get_target(), variants);
        }
    }
};

}  // namespace

HALIDE_REGISTER_GENERATOR(BatchNormTraining, batch_norm_training)
