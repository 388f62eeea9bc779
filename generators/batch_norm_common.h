// Pieces shared by the batch-norm generators: how a layout maps onto buffer
// dimensions, how the data type is stored, the normalization itself, and the
// CPU and GPU schedules of the elementwise pass.
#pragma once

#include "Halide.h"
#include "checked_in_schedule.h"
#include "data_types.h"
#include "streaming_stores.h"

#include <map>
#include <string>
#include <vector>

namespace hbn_generators {

using namespace Halide;

enum class Layout { NCHW, NHWC };

inline const std::map<std::string, Layout> layout_names = {
    {"nchw", Layout::NCHW},
    {"nhwc", Layout::NHWC},
};

// The runtime views every tensor as
//   NCHW: (inner, c, n), inner = product of the spatial sizes, dense;
//   NHWC: (c, m),        m = every non-channel position, c dense.
// so one pipeline serves every rank. The two layouts vectorize along
// different axes, which is why they are separate compilations.
struct DataVars {
    std::vector<Var> args;  // in buffer-dimension order
    Var c{"c"};
    Var inner{"inner"}, n{"n"}, m{"m"};

    explicit DataVars(Layout layout) {
        if (layout == Layout::NCHW) {
            args = {inner, c, n};
        } else {
            args = {c, m};
        }
    }
};

inline int data_dimensions(Layout layout) {
    return layout == Layout::NCHW ? 3 : 2;
}

// Every value of a channel: NCHW (r.x, c, r.y) over (inner, n); NHWC
// (c, r.x) over m. The reductions run over `r`.
struct ChannelValues {
    RDom r;
    Layout layout;

    template<typename InputBuffer>
    ChannelValues(const InputBuffer &data, Layout layout_)
        : r(layout_ == Layout::NCHW ? RDom(0, data.dim(0).extent(), 0, data.dim(2).extent())
                                    : RDom(0, data.dim(1).extent())),
          layout(layout_) {}

    // The buffer arguments of channel c's value r.
    std::vector<Expr> of(const Expr &c) const {
        if (layout == Layout::NCHW) {
            return {r.x, c, r.y};
        }
        return {c, r.x};
    }
};

// Number of values per channel (M), in 64-bit so large tensors cannot
// overflow.
template<typename InputBuffer>
Expr values_per_channel(const InputBuffer &input, Layout layout) {
    return layout == Layout::NCHW
               ? cast<int64_t>(input.dim(0).extent()) * input.dim(2).extent()
               : cast<int64_t>(input.dim(1).extent());
}

// What both pipelines share: the data type and layout they are built for,
// the serial or parallel build, the data tensor in and out, and estimates.
template<typename T>
class BatchNormGenerator : public Generator<T> {
public:
    GeneratorParam<DataType> data_type{"data_type", DataType::Float32, data_type_names};
    GeneratorParam<Layout> layout{"layout", Layout::NCHW, layout_names};
    // Every pipeline is also built serial: the runtime runs tiny tensors on
    // it, since waking the thread pool costs more than their work. A build
    // per threading mode also serves the autoschedulers, where a specialize()
    // on the size could not.
    GeneratorParam<bool> parallel{"parallel", true};
    // A checked-in schedule, "<source>/<target class>/<library>", in place
    // of the manual one (see checked_in_schedule.h); empty: manual.
    GeneratorParam<std::string> schedule{"schedule", ""};

    // Declared first, so `input` leads the inputs and `output` the outputs.
    GeneratorInput<Buffer<>> input{"input"};
    GeneratorOutput<Buffer<>> output{"output"};

    void configure() {
        input.set_type(storage_type(data_type));
        input.set_dimensions(data_dimensions(layout));
        output.set_type(storage_type(data_type));
        output.set_dimensions(data_dimensions(layout));
        if (data_type == DataType::Float16) {
            link_float16_conversions(*this->get_externs_map(), this->get_target());
        }
    }

protected:
    // float16 and bfloat16: a 16-bit type, whose output rounding (2^-11,
    // 2^-8) dwarfs float32 arithmetic's error.
    bool is_16_bit() const {
        return data_type != DataType::Float32;
    }
    // A stored data value as float32, and a float32 value as stored.
    Expr load_float(const Expr &stored) const {
        return load_as_float32(data_type, stored, this->get_target());
    }
    Expr to_storage(const Expr &value) const {
        return store_from_float32(data_type, value, this->get_target());
    }

    // Estimates: the mid-size benchmark tensor, 32x64x56x56.
    static constexpr int estimated_channels = 64;

    // Writes the data outputs named with streaming stores where `stream`
    // holds at run time (see streaming_stores.h).
    void stream_stores_into(const std::vector<std::string> &outputs, const Expr &stream) {
        stream_stores(this->get_pipeline(), outputs, stream, *this->get_externs_map(), this->get_target());
    }

    Region data_estimates() const {
        const int spatial = 56 * 56, batch = 32;
        return layout == Layout::NCHW ? Region{{0, spatial}, {0, estimated_channels}, {0, batch}}
                                      : Region{{0, estimated_channels}, {0, spatial * batch}};
    }
    void set_data_estimates() {
        input.set_estimates(data_estimates());
        output.set_estimates(data_estimates());
    }
};

// A value in double and in float32 arithmetic; the pipeline picks one.
struct BothPrecisions {
    Expr f64, f32;
};

// y = (x - mean) * scale + bias, with x a float32 value. Subtracting the mean first (rather than folding it
// into the bias) makes a constant channel give exactly bias.
// The arithmetic is float32, unless the pipeline's `in_double` flag picks
// the double value: weight / sqrt(var + eps)
// leaves float's range for a tiny eps (down to 5e-324) and a small variance,
// and a float scale of inf would turn a constant channel's zero into NaN. So
// the runtime asks for double, rounded once at the end, when
// max |weight| / sqrt(eps) exceeds float's range. Double is not the default:
// it costs 1.1-2x at the mid size (float16 NHWC inference 0.55 -> 1.25 ms).
// The schedules specialize on the flag, so each pass runs one of the two.
// Each term comes in both types, from Funcs computed once per channel, so
// that neither pass converts per element.
struct ChannelTerm {
    Expr f32, f64;
};
inline BothPrecisions normalized(const Expr &x, const ChannelTerm &mean, const ChannelTerm &scale,
                                 const ChannelTerm &bias) {
    return {(cast<double>(x) - mean.f64) * scale.f64 + bias.f64, (x - mean.f32) * scale.f32 + bias.f32};
}
// A float32 per-channel value as a term.
inline ChannelTerm channel_term(const Expr &value) {
    return {value, cast<double>(value)};
}

// ReLU and its gradient are decided on a float32's bits, read as int32:
// Halide compiles floats with LLVM's no-NaN flags, under which a float
// comparison may fold a NaN test away (and max() drops a NaN). Bits at or
// below those of -inf are -0, the negative numbers and -inf; above them, as
// negative integers, lie the NaNs with the sign bit set.
inline Expr float_bits(const Expr &value) {
    return reinterpret<int32_t>(value);
}
constexpr int32_t negative_infinity_bits = -8388608;  // 0xff800000

// max(y, 0) that keeps NaN: zero for y <= 0 (-0 included, which becomes +0).
inline Expr rectified(const Expr &y) {
    return select(float_bits(y) <= negative_infinity_bits, 0.0f, y);
}

// The gradient through y = relu(z), from y: dy where y > 0 or y is NaN, and
// 0 where y <= 0, as PyTorch's ReLU backward (threshold_backward on the
// output) gives it.
// `dy` may be stored (zero is all-zero bits in every data type).
inline Expr relu_gradient(const Expr &dy, const Expr &y) {
    const Expr bits = float_bits(y);
    return select(bits <= negative_infinity_bits || bits == 0, cast(dy.type(), 0), dy);
}

// The forward pipelines' fused epilogue (ResNet's BN -> ReLU and
// BN -> add -> ReLU), in the normalizing pass so that neither op reads and
// writes the tensor again:
//   output = relu(normalized + residual), each part when its flag is set.
template<typename T>
class NormalizingGenerator : public BatchNormGenerator<T> {
public:
    // Of input's type and shape. Read only when add_residual: without one,
    // the runtime passes input again.
    GeneratorInput<Buffer<>> residual{"residual"};
    GeneratorInput<bool> add_residual{"add_residual"};
    GeneratorInput<bool> relu{"relu"};

    void configure() {
        BatchNormGenerator<T>::configure();
        residual.set_type(storage_type(this->data_type));
        residual.set_dimensions(data_dimensions(this->layout));
    }

protected:
    // The stored output at `at` for a normalized value `z`. The residual is
    // added in the precision `in_double` picks, so either path rounds once.
    // `at`: Vars or Exprs.
    template<typename Args>
    Expr fused_output(const BothPrecisions &z, const Expr &in_double, const Args &at) const {
        const Expr r = this->load_float(residual(at));
        const Expr sum_f64 = select(add_residual, z.f64 + cast<double>(r), z.f64);
        const Expr sum_f32 = select(add_residual, z.f32 + r, z.f32);
        const Expr y = select(in_double, cast<float>(sum_f64), sum_f32);
        return this->to_storage(select(relu, rectified(y), y));
    }

    // The variants of the elementwise pass: double (rare, so its epilogue
    // stays a select), the residual (its ReLU a select), the ReLU alone
    // (which reads no residual), and plain BN (the default), which stays as
    // it was.
    std::vector<Expr> elementwise_variants(const Expr &in_double) const {
        return {in_double, add_residual, relu};
    }

    void set_data_estimates() {
        BatchNormGenerator<T>::set_data_estimates();
        residual.set_estimates(this->data_estimates());
        // With the epilogue on: an autoscheduler that folds the flags to
        // their estimates then still sees the residual read (Mullapudi2016
        // fails an internal assertion on an input it never sees read).
        add_residual.set_estimate(true);
        relu.set_estimate(true);
    }
};

// Specializes `stage` on each of `conditions` in turn: a run executes the
// variant of the first that holds, or the default. Halide simplifies each
// later variant, and the default, knowing that the earlier conditions failed,
// so a variant is branch-free wherever its flags are known.
inline void specialize_in_turn(Stage stage, const std::vector<Expr> &conditions) {
    for (const Expr &condition : conditions) {
        stage.specialize(condition);
    }
}

// CPU schedule of the elementwise pass writing `output`: vectorized along
// the dense axis, blocks of rows in parallel when `parallel`. NHWC blocks of
// 512 rows: handing out a task costs about as much as normalizing a few KiB
// (mid, 64 channels, float16: 0.65 ms with 64 rows, 0.48-0.51 ms with 512).
// The factor stays a constant: with one computed from the channel count,
// Halide's bounds for an output of no rows reach before the input's start.
// `variants`: the conditions the pass specializes on (specialize_in_turn).
inline void schedule_elementwise_cpu(Func output, const DataVars &v, Layout layout, bool parallel,
                                   const Target &target, const std::vector<Expr> &variants) {
    const int vector_size = target.natural_vector_size<float>();
    Var rows{"rows"}, row_block{"row_block"};
    if (layout == Layout::NCHW) {
        output.fuse(v.c, v.n, rows)
            .vectorize(v.inner, vector_size, TailStrategy::GuardWithIf)
            .split(rows, row_block, rows, 8, TailStrategy::GuardWithIf);
    } else {
        output.vectorize(v.c, vector_size, TailStrategy::GuardWithIf)
            .split(v.m, row_block, rows, 512, TailStrategy::GuardWithIf);
    }
    if (parallel) {
        output.parallel(row_block);
    }
    specialize_in_turn(output, variants);  // after the directives, which it inherits
}

// GPU schedule of the elementwise pass: a thread per element, neighbouring
// threads on neighbouring addresses (the dense axis) so accesses coalesce.
inline void schedule_elementwise_gpu(Func output, const DataVars &v, Layout layout,
                                   const std::vector<Expr> &variants) {
    Var block_x{"block_x"}, block_y{"block_y"}, thread_x{"thread_x"}, thread_y{"thread_y"};
    if (layout == Layout::NCHW) {
        Var rows{"rows"};
        output.fuse(v.c, v.n, rows)
            .gpu_tile(v.inner, rows, block_x, block_y, thread_x, thread_y, 64, 4,
                      TailStrategy::GuardWithIf);
    } else {
        output.gpu_tile(v.c, v.m, block_x, block_y, thread_x, thread_y, 32, 8,
                        TailStrategy::GuardWithIf);
    }
    specialize_in_turn(output, variants);
}

// Schedules of the per-channel sums, `sums(c)` with one update over a
// ChannelValues' `r`, shared by the pipelines that reduce every value of a
// channel (training: sum(d), sum(d^2); backward: sum(dy), sum(dy * (x - mean))).
// `variants` specialize the stage that reads every value (specialize_in_turn).

// CPU, NCHW, with `sums` computed per channel inside the caller's loop: vector
// lanes along the dense inner axis, and the slab's rows (images n) four at a
// time, read side by side into their own accumulators. A loop this heavy in
// double arithmetic issues its loads too slowly for one stream's hardware
// prefetch to keep DRAM busy; four streams keep more reads in flight
// (training, large: 52 -> 45.6 ms; a plain loop of the same shape: 17.4 ->
// 22 GB/s).
inline void schedule_sums_nchw_cpu(Func sums, const RDom &r, const Var &c, int vector_size,
                                   const std::vector<Expr> &variants = {}) {
    RVar inner_outer, inner_lane, n_outer, n_stream;
    Var lane{"lane"}, stream{"stream"};
    Func lane_sums = sums.update()
                         .split(r.x, inner_outer, inner_lane, vector_size, TailStrategy::GuardWithIf)
                         .split(r.y, n_outer, n_stream, 4, TailStrategy::GuardWithIf)
                         .rfactor({{inner_lane, lane}, {n_stream, stream}});
    lane_sums.compute_at(sums, c).vectorize(lane);
    lane_sums.update().reorder(lane, stream, inner_outer, n_outer).vectorize(lane).unroll(stream);
    specialize_in_turn(lane_sums.update(), variants);
}

// CPU, NHWC (channels are the dense axis), computed at root: in parallel over
// blocks of 512 rows (training, mid: 1.52-1.58 ms with 256, 1.44-1.47 ms with
// 512 to 2048). Within a block, four vectors of channels at a time run down
// the rows, so that their accumulators stay in registers, and more of them
// are independent (mid 1.94-2.07 ms -> 1.67-1.79 ms, large 65 -> 57 ms,
// against one vector). The block's four quarters are read side by side, as
// four streams, for the same reason as NCHW's four rows (large 51-53 -> 45
// ms, float16 69-70 -> 51-53 ms).
inline void schedule_sums_nhwc_cpu(Func sums, const RDom &r, const Var &c, int vector_size, bool parallel,
                                   const std::vector<Expr> &variants = {}) {
    RVar block, row, row_stream;
    Var row_block{"row_block"}, c_vector{"c_vector"};
    Func block_sums = sums.update()
                          .split(r.x, block, row, 512, TailStrategy::GuardWithIf)
                          .rfactor(block, row_block);
    block_sums.compute_root().vectorize(c, vector_size, TailStrategy::GuardWithIf);
    block_sums.update()
        .split(c, c_vector, c, vector_size * 4, TailStrategy::GuardWithIf)
        .split(row, row_stream, row, 128, TailStrategy::GuardWithIf)
        .reorder(c, row_stream, row, c_vector, row_block)
        .vectorize(c)
        .unroll(row_stream);
    if (parallel) {
        block_sums.update().parallel(row_block);
    }
    specialize_in_turn(block_sums.update(), variants);
    sums.compute_root().update().vectorize(c, vector_size, TailStrategy::GuardWithIf);
}

// GPU, computed at root in two kernels: partial sums over slices of each
// channel, in parallel over channels and slices, then a thread per channel
// adds its partials. Threads on neighbouring addresses, so that loads
// coalesce.
inline void schedule_sums_gpu(Func sums, const RDom &r, const Var &c, Layout layout,
                              const std::vector<Expr> &variants = {}) {
    Var part{"part"}, c_block{"c_block"}, c_thread{"c_thread"};
    Func partial_sums;
    if (layout == Layout::NCHW) {
        // A block per channel; its threads stride through the channel's
        // values as one flat range, whatever inner and N.
        RVar flat, flat_outer, flat_lane;
        partial_sums = sums.update()
                           .fuse(r.x, r.y, flat)
                           .split(flat, flat_outer, flat_lane, 256, TailStrategy::GuardWithIf)
                           .rfactor(flat_lane, part);
        partial_sums.compute_root().reorder(part, c).gpu_blocks(c).gpu_threads(part);
        partial_sums.update().reorder(flat_outer, part, c).gpu_blocks(c).gpu_threads(part);
    } else {
        // A block per (slice of rows, group of channels); a thread per
        // channel runs down the rows.
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
    specialize_in_turn(partial_sums.update(), variants);
    sums.compute_root().gpu_tile(c, c_block, c_thread, 64, TailStrategy::GuardWithIf);
    sums.update().gpu_tile(c, c_block, c_thread, 64, TailStrategy::GuardWithIf);
}

// GPU: per-channel Funcs at root, a thread per channel.
inline void schedule_per_channel_gpu(const std::vector<Func> &funcs, const Var &c) {
    Var c_block{"c_block"}, c_thread{"c_thread"};
    for (Func f : funcs) {
        f.compute_root().gpu_tile(c, c_block, c_thread, 64, TailStrategy::GuardWithIf);
    }
}

// CPU, NCHW: channel by channel. A channel's slab (N * inner values) is read
// once for its sums and again, from cache, by the elementwise pass writing
// `output`, vectorized along the dense inner axis. `channel_outputs` (one
// value per channel) are computed with the output, and `channel_funcs` (which
// include the sums) inside its loop over channels.
inline void schedule_slab_by_slab_cpu(Func output, const std::vector<Func> &channel_outputs,
                                      const std::vector<Func> &channel_funcs, const DataVars &v,
                                      bool parallel, int vector_size, const std::vector<Expr> &variants) {
    output.reorder(v.inner, v.n, v.c).vectorize(v.inner, vector_size, TailStrategy::GuardWithIf);
    if (parallel) {
        output.parallel(v.c);
    }
    for (Func f : channel_outputs) {
        if (parallel) {
            f.parallel(v.c);  // loops fused by compute_with must match
        }
        f.compute_with(output, v.c);
    }
    for (Func f : channel_funcs) {
        f.compute_at(output, v.c);
    }
    specialize_in_turn(output, variants);
}

}  // namespace hbn_generators
