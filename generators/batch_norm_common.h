// Pieces shared by the batch-norm generators: how a layout maps onto buffer
// dimensions, how the data type is stored, the normalization itself, and the
// CPU and GPU schedules of the elementwise pass.
#pragma once

#include "Halide.h"
#include "checked_in_schedule.h"
#include "float16_conversions.h"

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
    GeneratorParam<Type> data_type{"data_type", Float(32)};
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
        input.set_type(storage_type());
        input.set_dimensions(data_dimensions(layout));
        output.set_type(storage_type());
        output.set_dimensions(data_dimensions(layout));
        if (is_float16()) {
            link_float16_conversions(*this->get_externs_map(), this->get_target());
        }
    }

protected:
    // float16 data is stored as its bits (see float16_conversions.h).
    bool is_float16() const {
        return Type(data_type) == Float(16);
    }
    Type storage_type() const {
        return is_float16() ? UInt(16) : Type(data_type);
    }
    // A stored data value as float32, and a float32 value as stored.
    Expr load_float(const Expr &stored) const {
        return is_float16() ? float16_bits_to_float32(stored, this->get_target()) : cast<float>(stored);
    }
    Expr to_storage(const Expr &value) const {
        return is_float16() ? float32_to_float16_bits(value, this->get_target()) : cast(data_type, value);
    }

    // Estimates: the mid-size benchmark tensor, 32x64x56x56.
    static constexpr int estimated_channels = 64;

    void set_data_estimates() {
        const int spatial = 56 * 56, batch = 32;
        const Region region = layout == Layout::NCHW
                                  ? Region{{0, spatial}, {0, estimated_channels}, {0, batch}}
                                  : Region{{0, estimated_channels}, {0, spatial * batch}};
        input.set_estimates(region);
        output.set_estimates(region);
    }
};

// y = (x - mean) * scale + bias, with x a float32 value. Subtracting the mean first (rather than folding it
// into the bias) makes a constant channel give exactly bias.
// The arithmetic is float32, unless `in_double`: weight / sqrt(var + eps)
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
inline Expr normalized(const Expr &x, const ChannelTerm &mean, const ChannelTerm &scale,
                       const ChannelTerm &bias, const Expr &in_double) {
    return select(in_double, cast<float>((cast<double>(x) - mean.f64) * scale.f64 + bias.f64),
                  (x - mean.f32) * scale.f32 + bias.f32);
}
// A float32 per-channel value as a term.
inline ChannelTerm channel_term(const Expr &value) {
    return {value, cast<double>(value)};
}

// CPU schedule of the elementwise pass writing `output`: vectorized along
// the dense axis, blocks of rows in parallel when `parallel`. NHWC blocks of
// 512 rows: handing out a task costs about as much as normalizing a few KiB
// (mid, 64 channels, float16: 0.65 ms with 64 rows, 0.48-0.51 ms with 512).
// The factor stays a constant: with one computed from the channel count,
// Halide's bounds for an output of no rows reach before the input's start.
inline void schedule_normalize_cpu(Func output, const DataVars &v, Layout layout, bool parallel,
                                   const Target &target, const Expr &in_double) {
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
    output.specialize(in_double);  // after the directives, which it inherits
}

// GPU schedule of the elementwise pass: a thread per element, neighbouring
// threads on neighbouring addresses (the dense axis) so accesses coalesce.
inline void schedule_normalize_gpu(Func output, const DataVars &v, Layout layout, const Expr &in_double) {
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
    output.specialize(in_double);
}

}  // namespace hbn_generators
