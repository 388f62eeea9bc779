// Training: normalize with the batch statistics, and emit them.
//   mean, var = per-channel batch mean and biased variance
//   y = (x - mean) * (weight / sqrt(var + eps)) + bias
// The running-statistics update is left to the caller, which commits it only
// once the whole pipeline has succeeded.
#include "batch_norm_common.h"

namespace {

using namespace Halide;
using namespace hbn_generators;

class BatchNormTraining : public BatchNormGenerator<BatchNormTraining> {
public:
    Input<Buffer<float, 1>> weight{"weight"};
    Input<Buffer<float, 1>> bias{"bias"};
    Input<double> eps{"eps"};
    Input<bool> scale_in_double{"scale_in_double"};  // see normalized()
    Output<Buffer<float, 1>> batch_mean{"batch_mean"};
    Output<Buffer<float, 1>> batch_var{"batch_var"};  // biased
    Output<Buffer<float, 1>> batch_inv_std{"batch_inv_std"};

    void generate() {
        const DataVars v(layout);
        const Var c = v.c;

        // Algorithm
        // Every value of channel c, and one of them to shift by.
        const bool nchw = layout == Layout::NCHW;
        RDom r = nchw ? RDom(0, input.dim(0).extent(), 0, input.dim(2).extent())
                      : RDom(0, input.dim(1).extent());
        const Expr channel_value = load_float(nchw ? input(r.x, c, r.y) : input(c, r.x));
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
        batch_mean(c) = statistics(c)[3];
        batch_var(c) = cast<float>(statistics(c)[1]);
        batch_inv_std(c) = cast<float>(statistics(c)[2]);

        Func scale{"scale"};  // in double, and as float32
        const Expr scale_f64 = cast<double>(weight(c)) * statistics(c)[2];
        scale(c) = Tuple(scale_f64, cast<float>(scale_f64));
        output(v.args) = to_storage(normalized(load_float(input(v.args)), {statistics(c)[3], statistics(c)[0]},
                                               {scale(c)[1], scale(c)[0]}, channel_term(bias(c)),
                                               scale_in_double));

        // Estimates
        set_data_estimates();
        for (auto *param : {&weight, &bias}) {
            param->set_estimates({{0, estimated_channels}});
        }
        for (auto *stat : {&batch_mean, &batch_var, &batch_inv_std}) {
            stat->set_estimates({{0, estimated_channels}});
        }
        eps.set_estimate(1e-5);
        scale_in_double.set_estimate(false);

        // Schedule
        if (auto_schedule ||
            hbn_schedules::apply_checked_in(get_pipeline(), get_target(), schedule)) {
            return;
        }
        const int vector_size = get_target().natural_vector_size<float>();

        if (get_target().has_gpu_feature()) {
            // Statistics in two kernels: partial sums over slices of each
            // channel, in parallel over channels and slices, then a thread
            // per channel adds its partials. Threads on neighbouring
            // addresses, so that loads coalesce.
            Var part{"part"}, c_block{"c_block"}, c_thread{"c_thread"};
            Func partial_sums;
            if (nchw) {
                // A block per channel; its threads stride through the
                // channel's values as one flat range, whatever inner and N.
                RVar flat, flat_outer, flat_lane;
                partial_sums = sums.update()
                                   .fuse(r.x, r.y, flat)
                                   .split(flat, flat_outer, flat_lane, 256, TailStrategy::GuardWithIf)
                                   .rfactor(flat_lane, part);
                partial_sums.compute_root().reorder(part, c).gpu_blocks(c).gpu_threads(part);
                partial_sums.update().reorder(flat_outer, part, c).gpu_blocks(c).gpu_threads(part);
            } else {
                // A block per (slice of rows, group of channels); a thread
                // per channel runs down the rows.
                RVar row_slice, row;
                partial_sums = sums.update()
                                   .split(r.x, row_slice, row, 256, TailStrategy::GuardWithIf)
                                   .rfactor(row_slice, part);
                partial_sums.compute_root()
                    .split(c, c_block, c_thread, 64, TailStrategy::GuardWithIf)
                    .gpu_blocks(c_block, part)
                    .gpu_threads(c_thread);
                partial_sums.update()
                    .split(c, c_block, c_thread, 64, TailStrategy::GuardWithIf)
                    .reorder(row, c_thread, c_block, part)
                    .gpu_blocks(c_block, part)
                    .gpu_threads(c_thread);
            }
            for (Func per_channel : {Func(sums), statistics, Func(batch_mean), Func(batch_var),
                                     Func(batch_inv_std)}) {
                per_channel.gpu_tile(c, c_block, c_thread, 64, TailStrategy::GuardWithIf);
            }
            sums.compute_root().update().gpu_tile(c, c_block, c_thread, 64, TailStrategy::GuardWithIf);
            statistics.compute_root();
            schedule_normalize_gpu(output, v, layout, scale_in_double);
        } else if (nchw) {
            // Channel by channel: a channel's slab (N * inner values) is read
            // once for its statistics and again, from cache, to normalize.
            output.reorder(v.inner, v.n, v.c)
                .vectorize(v.inner, vector_size, TailStrategy::GuardWithIf);
            for (Func stat : {Func(output), Func(batch_mean), Func(batch_var), Func(batch_inv_std)}) {
                if (parallel) {
                    stat.parallel(c);  // fused loops must match
                }
            }
            for (Func stat : {Func(batch_mean), Func(batch_var), Func(batch_inv_std)}) {
                stat.compute_with(output, v.c);
            }
            for (Func per_channel : {statistics, sums, scale}) {
                per_channel.compute_at(output, v.c);
            }
            // Vector lanes along the dense inner axis, and the slab's rows
            // (images n) four at a time, read side by side into their own
            // accumulators. A loop this heavy in double arithmetic issues its
            // loads too slowly for one stream's hardware prefetch to keep
            // DRAM busy; four streams keep more reads in flight (large
            // 52 -> 45.6 ms; a plain loop of the same shape: 17.4 -> 22 GB/s).
            RVar inner_outer, inner_lane, n_outer, n_stream;
            Var lane{"lane"}, stream{"stream"};
            Func lane_sums = sums.update()
                                 .split(r.x, inner_outer, inner_lane, vector_size, TailStrategy::GuardWithIf)
                                 .split(r.y, n_outer, n_stream, 4, TailStrategy::GuardWithIf)
                                 .rfactor({{inner_lane, lane}, {n_stream, stream}});
            lane_sums.compute_at(sums, c).vectorize(lane);
            lane_sums.update().reorder(lane, stream, inner_outer, n_outer).vectorize(lane).unroll(stream);
            output.specialize(scale_in_double);
        } else {
            // Channels are the dense axis: all statistics first, in parallel
            // over blocks of rows, then the elementwise pass.
            // Within a block, a group of channels at a time runs down the
            // rows, so its accumulators stay in registers.
            // Blocks of 512 rows (mid: 1.52-1.58 ms with 256, 1.44-1.47 ms
            // with 512 to 2048).
            RVar block, row, row_stream;
            Var row_block{"row_block"}, c_vector{"c_vector"};
            Func block_sums = sums.update()
                                  .split(r.x, block, row, 512, TailStrategy::GuardWithIf)
                                  .rfactor(block, row_block);
            block_sums.compute_root()
                .vectorize(c, vector_size, TailStrategy::GuardWithIf);
            // Four vectors of channels at a time: more independent double
            // accumulators per row (mid 1.94-2.07 ms -> 1.67-1.79 ms, large
            // 65 -> 57 ms, against one vector).
            // The block's four quarters are read side by side, as four
            // streams, for the same reason as NCHW's four rows (large 51-53
            // -> 45 ms, float16 69-70 -> 51-53 ms).
            block_sums.update()
                .split(c, c_vector, c, vector_size * 4, TailStrategy::GuardWithIf)
                .split(row, row_stream, row, 128, TailStrategy::GuardWithIf)
                .reorder(c, row_stream, row, c_vector, row_block)
                .vectorize(c)
                .unroll(row_stream);
            if (parallel) {
                block_sums.update().parallel(row_block);
            }
            sums.compute_root().update().vectorize(c, vector_size, TailStrategy::GuardWithIf);
            statistics.compute_root();
            scale.compute_root();
            schedule_normalize_cpu(output, v, layout, parallel, get_target(), scale_in_double);
        }
    }
};

}  // namespace

HALIDE_REGISTER_GENERATOR(BatchNormTraining, batch_norm_training)
