// Tensors too large for one kernel call run in slices whose statistics are
// merged as a synchronized batch norm merges processes'. The slice limit is
// lowered (hbn::internal::set_slice_extent_limit) so that the sliced path
// runs at small sizes: along n, channels and inner (NCHW), along rows and
// channels (NHWC), in every entry point, mode and fused epilogue, against
// the double reference and against an unsliced call; the slices themselves
// cover the view exactly once within the limit. LargeSliced.* runs real
// float16 tensors of more than 2^31 elements, only with HBN_TEST_LARGE=1.
#include "fake_collective.h"

#include "partition.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <memory>
#include <thread>
#include <tuple>

namespace hbn_test {
namespace {

using hbn::DType;
using hbn::Layout;
using hbn::internal::DataView;

constexpr int64_t default_limit = hbn::internal::default_slice_extent_limit;

// Sets the slice limit for a scope, and restores the previous one.
class SliceLimit {
public:
    explicit SliceLimit(int64_t limit) : previous_(hbn::internal::set_slice_extent_limit(limit)) {}
    ~SliceLimit() { hbn::internal::set_slice_extent_limit(previous_); }
    SliceLimit(const SliceLimit &) = delete;
    SliceLimit &operator=(const SliceLimit &) = delete;
    int64_t previous() const { return previous_; }

private:
    int64_t previous_;
};

DataView view_of(const std::vector<int64_t> &shape, Layout layout) {
    DataView v;
    v.nchw = layout == Layout::NCHW;
    if (v.nchw) {
        v.outer = shape[0];
        v.channels = shape[1];
        v.inner = product(shape, 2);
    } else {
        v.channels = shape.back();
        v.inner = 1;
        v.outer = product(shape) / shape.back();
    }
    return v;
}

std::string view_name(const DataView &v) {
    return std::string(v.nchw ? "NCHW inner " : "NHWC ") + (v.nchw ? std::to_string(v.inner) + " C " : "C ") +
           std::to_string(v.channels) + (v.nchw ? " n " : " m ") + std::to_string(v.outer);
}

// Whether `view` fits one kernel call at `limit`, as partition.h defines
// it: every extent of its dense buffer dimensions, and the stride of every
// dimension of more than one index, at most the limit. (The element count
// does not matter: the kernels are built with large_buffers.)
bool fits(const DataView &view, int64_t limit) {
    const std::vector<std::pair<int64_t, int64_t>> dims =  // (extent, stride), innermost first
        view.nchw ? std::vector<std::pair<int64_t, int64_t>>{{view.inner, 1},
                                                             {view.channels, view.inner},
                                                             {view.outer, view.inner * view.channels}}
                  : std::vector<std::pair<int64_t, int64_t>>{{view.channels, 1}, {view.outer, view.channels}};
    for (const auto &[extent, stride] : dims) {
        if (extent > limit || (extent > 1 && stride > limit)) {
            return false;
        }
    }
    return true;
}

// The slices of `view` at the current limit: each a box within the limit
// (every extent, and the stride of every dimension of more than one index),
// every min 0 (channel 0 of a call is the slice's first_channel), its
// channels and values_per_channel its extents'; one slice exactly when the
// view fits; with `enumerate`, every element of the view covered by exactly
// one slice, at the channel the slice gives it. Returns the number of slices.
size_t check_slices(const DataView &view, int64_t limit, bool enumerate) {
    const std::string what = view_name(view) + ", limit " + std::to_string(limit) + ": ";
    const std::vector<hbn::internal::Slice> slices = hbn::internal::slices_of(view);
    EXPECT_FALSE(slices.empty()) << what;
    EXPECT_EQ(hbn::internal::needs_slices(view), slices.size() > 1) << what;
    EXPECT_EQ(slices.size() == 1, fits(view, limit)) << what << slices.size() << " slices";
    const int64_t total = view.inner * view.channels * view.outer;
    const int channel_dim = view.nchw ? 1 : 0;
    std::vector<unsigned char> covered(enumerate ? static_cast<size_t>(total) : 0, 0);
    int64_t elements = 0;
    int reported = 0;
    for (size_t k = 0; k < slices.size(); k++) {
        const hbn::internal::Slice &s = slices[k];
        const std::string where = what + "slice " + std::to_string(k) + ": ";
        if (s.dimensions != (view.nchw ? 3 : 2)) {
            ADD_FAILURE() << where << s.dimensions << " dimensions";
            continue;
        }
        EXPECT_EQ(s.nchw(), view.nchw) << where;
        int64_t span = 1, non_channel = 1;  // span: from the slice's first element to its last
        for (int d = 0; d < s.dimensions; d++) {
            const halide_dimension_t &dim = s.dims[d];
            EXPECT_GE(dim.extent, 1) << where << "dimension " << d;
            EXPECT_LE(dim.extent, limit) << where << "dimension " << d << " extent";
            if (dim.extent > 1) {  // an extent-1 dimension's stride addresses nothing
                EXPECT_LE(dim.stride, limit) << where << "dimension " << d << " stride";
                EXPECT_GE(dim.stride, 0) << where << "dimension " << d << " stride";
            }
            EXPECT_EQ(dim.min, 0) << where << "dimension " << d << " min";
            span += int64_t(dim.extent - 1) * std::abs(int64_t(dim.stride));
            if (d != channel_dim) {
                non_channel *= dim.extent;
            }
        }
        EXPECT_EQ(s.channels, s.dims[channel_dim].extent) << where;
        EXPECT_EQ(s.values_per_channel, non_channel) << where;
        EXPECT_GE(s.first_channel, 0) << where;
        EXPECT_LE(s.first_channel + s.channels, view.channels) << where;
        EXPECT_GE(s.offset, 0) << where;
        EXPECT_LE(s.offset + span, total) << where;
        elements += s.elements();
        if (!enumerate) {
            continue;
        }
        const halide_dimension_t *d = s.dims.data();
        const int64_t outer_extent = view.nchw ? d[2].extent : 1;
        for (int64_t n = 0; n < outer_extent; n++) {
            for (int64_t c = s.first_channel; c < s.first_channel + d[channel_dim].extent; c++) {
                const int64_t inner_extent = view.nchw ? d[0].extent : d[1].extent;
                for (int64_t i = 0; i < inner_extent; i++) {
                    // NCHW (inner, c, n); NHWC (c, m), m playing "inner" here.
                    const int64_t index =
                        view.nchw ? s.offset + i * d[0].stride + (c - s.first_channel) * d[1].stride + n * d[2].stride
                                  : s.offset + (c - s.first_channel) * d[0].stride + i * d[1].stride;
                    const bool inside = index >= 0 && index < total;
                    const int64_t channel = !inside ? -1 : view.nchw ? (index / view.inner) % view.channels
                                                                     : index % view.channels;
                    if ((!inside || channel != c || covered[index]++ != 0) && reported++ < 5) {
                        ADD_FAILURE() << where << "element " << index << " (channel " << channel << ", slice says "
                                      << c << ") outside, at the wrong channel, or covered twice";
                    }
                }
            }
        }
    }
    EXPECT_EQ(elements, total) << what << "the slices' elements do not add up to the view's";
    if (enumerate) {
        const auto missed = std::count(covered.begin(), covered.end(), 0);
        EXPECT_EQ(missed, 0) << what << missed << " elements in no slice";
    }
    return slices.size();
}

// Shapes and limits that make the view run in slices, along each axis: an
// extent or a stride beyond the limit (and, so that a rule on the element
// count would slice them too, more elements than the limit).
struct SlicedCase {
    const char *name;
    std::vector<int64_t> shape;
    Layout layout;
    int64_t limit;
};

std::vector<SlicedCase> sliced_cases() {
    return {
        // NCHW (inner, c, n): n's stride inner * C beyond the limit: one
        // image per slice.
        {"nchw_one_image_per_slice", {7, 3, 2, 5}, Layout::NCHW, 16},
        // N beyond the limit: images in pieces of the limit (37 = 5 * 7 + 2).
        {"nchw_rank2_images_in_pieces", {37, 3}, Layout::NCHW, 7},
        // C beyond the limit: channels in pieces (20 = 7 + 7 + 6), one image each.
        {"nchw_along_channels", {3, 20, 2, 2}, Layout::NCHW, 7},
        {"nchw_along_channels_exact", {2, 12, 3, 1}, Layout::NCHW, 4},
        // inner beyond the limit: one channel's plane in pieces.
        {"nchw_along_inner", {2, 3, 5, 7}, Layout::NCHW, 16},
        {"nchw_along_inner_exact", {2, 3, 5, 7}, Layout::NCHW, 7},
        // NHWC (c, m): M beyond the limit: rows in pieces (60 = 3 * 16 + 12).
        {"nhwc_along_rows", {4, 3, 5, 6}, Layout::NHWC, 16},
        {"nhwc_rank2_along_rows", {37, 3}, Layout::NHWC, 7},
        // C beyond the limit: channels in pieces, one row each.
        {"nhwc_along_channels", {2, 3, 4, 20}, Layout::NHWC, 7},
        {"nhwc_rank2_along_channels", {9, 11}, Layout::NHWC, 4},
    };
}

TEST(SlicesOf, CoverTheViewOnceWithinTheLimit) {
    for (const SlicedCase &c : sliced_cases()) {
        SliceLimit limit(c.limit);
        const DataView view = view_of(c.shape, c.layout);
        EXPECT_TRUE(hbn::internal::needs_slices(view)) << c.name << " is not sliced at limit " << c.limit;
        EXPECT_GT(check_slices(view, c.limit, true), 1u) << c.name;
    }
    // Every limit from 1 up on a few views: each axis and combination.
    for (const DataView &view : {DataView{true, 6, 4, 5}, DataView{true, 1, 7, 9}, DataView{false, 1, 5, 13},
                                 DataView{false, 1, 1, 17}, DataView{true, 23, 1, 2}}) {
        const int64_t total = view.inner * view.channels * view.outer;
        for (int64_t l = 1; l <= total + 1; l++) {
            SliceLimit limit(l);
            check_slices(view, l, true);
        }
    }
}

// At the real limit, 2^30 (checked without enumerating the elements):
// a view whose extents and strides fit is one slice, however many elements
// it has; an extent or a stride beyond it, and it is sliced.
TEST(SlicesOf, RealLimitSlicesOnlyWhatExceedsIt) {
    SliceLimit limit(default_limit);
    const int64_t big = default_limit;
    EXPECT_EQ(check_slices(DataView{true, 1000, 64, 32}, big, false), 1u);
    EXPECT_EQ(check_slices(DataView{false, 1, 1, big}, big, false), 1u);
    EXPECT_EQ(check_slices(DataView{true, big, 1, 1}, big, false), 1u);
    EXPECT_EQ(check_slices(DataView{false, 1, 8, (int64_t(1) << 28) + 1}, big, false), 1u);  // 2^31 + 8 elements
    EXPECT_EQ(check_slices(DataView{true, int64_t(1) << 30, 5, 1}, big, false), 1u);       // 5 * 2^30 elements
    EXPECT_GT(check_slices(DataView{false, 1, 1, big + 1}, big, false), 1u);                // NHWC rows
    EXPECT_GT(check_slices(DataView{false, 1, big + 3, 2}, big, false), 1u);                // NHWC channels
    EXPECT_GT(check_slices(DataView{true, big + 5, 2, 3}, big, false), 1u);                 // NCHW inner
    EXPECT_GT(check_slices(DataView{true, 1, big + 3, 2}, big, false), 1u);                 // NCHW channels
    EXPECT_GT(check_slices(DataView{true, int64_t(1) << 20, 2048, 3}, big, false), 1u);     // n's stride 2^31
    // Rows the NHWC training kernel's blocks of 512 overflowed (2^31 - 511 on).
    EXPECT_GT(check_slices(DataView{false, 1, 1, (int64_t(1) << 31) - 1}, big, false), 1u);
}

using SlicedParam = std::tuple<SlicedCase, DType>;

std::string sliced_name(const ::testing::TestParamInfo<SlicedParam> &info) {
    return std::string(std::get<0>(info.param).name) +
           "_x" + dtype_tag(std::get<1>(info.param));
}

void PrintTo(const SlicedCase &c, std::ostream *os) {
    *os << c.name;
}

// Sliced against unsliced: the same arithmetic per element, statistics
// merged in another order, so about one rounding of the stored result.
double tight(DType dtype) {
    return dtype == DType::Float32 ? 4 * unit_roundoff32 : storage_rounding(dtype);
}

// Sliced against unsliced outputs: tight(), relative to the normalized value
// before the residual was added (the sum may cancel it), whose magnitude is
// at most |output| + |residual|.
void expect_output_tight(const BatchNormCase &t, const std::vector<double> &unsliced, DType dtype,
                         const std::string &what) {
    const std::vector<double> residual = adds_residual(t.epilogue) ? t.residual.values() : std::vector<double>{};
    std::vector<double> bounds(unsliced.size());
    for (size_t i = 0; i < bounds.size(); i++) {
        bounds[i] = tight(dtype) * (1 + std::abs(unsliced[i]) + (residual.empty() ? 0 : std::abs(residual[i])));
    }
    expect_within(t.output.values(), unsliced, bounds, what + "output vs unsliced");
}

class SlicedMatrix : public ::testing::TestWithParam<SlicedParam> {
protected:
    const SlicedCase &sliced() const { return std::get<0>(GetParam()); }
    DType dtype() const { return std::get<1>(GetParam()); }
};

// Each test runs every fused epilogue; the unsliced call is a copy of the
// case made after set_epilogue, so both read the same residual (or mask).
TEST_P(SlicedMatrix, InferenceMatchesReferenceAndUnsliced) {
    for (Epilogue epilogue : all_epilogues) {
        const std::string what = epilogue_name(epilogue);
        BatchNormCase t(sliced().shape, sliced().layout, dtype(), DType::Float32, false, 7);
        t.set_epilogue(epilogue);
        BatchNormCase unsliced = t;
        const ReferenceResult expected = t.reference();
        {
            SliceLimit limit(sliced().limit);
            ASSERT_TRUE(hbn::internal::needs_slices(view_of(sliced().shape, sliced().layout)));
            t.run();
        }
        unsliced.run();
        expect_close(t.output.values(), expected.output, output_tolerance(dtype()), what + "output");
        expect_output_tight(t, unsliced.output.values(), dtype(), what);
        EXPECT_EQ(t.running_mean.bytes(), unsliced.running_mean.bytes()) << what << "inference wrote running_mean";
        EXPECT_EQ(t.running_var.bytes(), unsliced.running_var.bytes()) << what << "inference wrote running_var";
    }
}

TEST_P(SlicedMatrix, TrainingMatchesReferenceAndUnsliced) {
    for (Entry entry : {Entry::BatchNorm, Entry::BatchNormTraining}) {
        for (Epilogue epilogue : all_epilogues) {
            const std::string what = epilogue_name(epilogue) + entry_name(entry) + " ";
            BatchNormCase t(sliced().shape, sliced().layout, dtype(), DType::Float32, true, 9);
            t.set_epilogue(epilogue);
            BatchNormCase unsliced = t;
            const ReferenceResult expected = t.reference();
            BatchNormCase::SavedStatistics saved, unsliced_saved;
            const auto run = [entry](BatchNormCase &c, BatchNormCase::SavedStatistics &s) {
                if (entry == Entry::BatchNorm) {
                    c.run();
                } else {
                    s = c.run_training();
                }
            };
            {
                SliceLimit limit(sliced().limit);
                run(t, saved);
            }
            run(unsliced, unsliced_saved);
            expect_close(t.output.values(), expected.output, output_tolerance(dtype()), what + "output");
            expect_close(t.running_mean.values(), expected.running_mean, parameter_tolerance(DType::Float32),
                         what + "running_mean");
            expect_close(t.running_var.values(), expected.running_var, parameter_tolerance(DType::Float32),
                         what + "running_var");
            expect_output_tight(t, unsliced.output.values(), dtype(), what);
            expect_close(t.running_mean.values(), unsliced.running_mean.values(), tight(DType::Float32),
                         what + "running_mean vs unsliced");
            expect_close(t.running_var.values(), unsliced.running_var.values(), tight(DType::Float32),
                         what + "running_var vs unsliced");
            if (entry == Entry::BatchNormTraining) {
                expect_close(saved.mean.values(), expected.batch_mean, 1e-6, what + "saved_mean");
                expect_close(saved.inv_std.values(), expected.inv_std, 2e-6, what + "saved_inv_std");
                expect_close(saved.mean.values(), unsliced_saved.mean.values(), tight(DType::Float32),
                             what + "saved_mean vs unsliced");
                expect_close(saved.inv_std.values(), unsliced_saved.inv_std.values(), tight(DType::Float32),
                             what + "saved_inv_std vs unsliced");
            }
        }
    }
}

// Bounds of a sliced gradient against the unsliced one: two roundings of
// its terms, then one to the stored dtype.
std::vector<double> tight_bounds(const std::vector<double> &expected, const std::vector<double> &terms, DType dtype) {
    std::vector<double> bounds(expected.size());
    for (size_t i = 0; i < bounds.size(); i++) {
        bounds[i] = 2 * unit_roundoff32 * terms[i] + storage_rounding(dtype) * std::abs(expected[i]) +
                    denormal_spacing(dtype);
    }
    return bounds;
}

TEST_P(SlicedMatrix, BackwardMatchesReferenceAndUnsliced) {
    for (bool training : {false, true}) {
        for (Epilogue epilogue : all_epilogues) {
            const std::string what = std::string(training ? "training " : "inference ") + epilogue_name(epilogue);
            // Built (the forward's saved statistics) unsliced: both calls get the
            // same inputs.
            BackwardCase t(sliced().shape, sliced().layout, dtype(), DType::Float32, training, 13);
            t.set_epilogue(epilogue);
            BackwardCase unsliced = t;
            const ReferenceBackward expected = t.reference();
            {
                SliceLimit limit(sliced().limit);
                t.run();
            }
            unsliced.run();
            expect_within(t.grad_input.values(), expected.grad_input, grad_input_bounds(expected, dtype()),
                          what + "grad_input");
            expect_within(t.grad_weight.values(), expected.grad_weight, grad_weight_bounds(expected, DType::Float32),
                          what + "grad_weight");
            expect_within(t.grad_bias.values(), expected.grad_bias, grad_bias_bounds(expected, DType::Float32),
                          what + "grad_bias");
            t.expect_grad_residual(what);
            expect_within(t.grad_input.values(), unsliced.grad_input.values(),
                          tight_bounds(unsliced.grad_input.values(), expected.grad_input_terms, dtype()),
                          what + "grad_input vs unsliced");
            expect_within(t.grad_weight.values(), unsliced.grad_weight.values(),
                          tight_bounds(unsliced.grad_weight.values(), expected.grad_weight_terms, DType::Float32),
                          what + "grad_weight vs unsliced");
            expect_within(t.grad_bias.values(), unsliced.grad_bias.values(),
                          tight_bounds(unsliced.grad_bias.values(), expected.grad_bias_terms, DType::Float32),
                          what + "grad_bias vs unsliced");
        }
    }
}

// In place across slices: output over input_x, and, with a residual, over
// the residual; grad_input over grad_output, or, with a residual,
// grad_residual over grad_output (grad_input may not be grad_output then:
// ValueError, as grad_residual's pass reads grad_output).
TEST_P(SlicedMatrix, InPlaceMatchesReference) {
    for (bool training : {false, true}) {
        for (Epilogue epilogue : all_epilogues) {
            const std::string what = std::string(training ? "training " : "inference ") + epilogue_name(epilogue);
            for (bool over_residual : {false, true}) {
                if (over_residual && !adds_residual(epilogue)) {
                    continue;
                }
                BatchNormCase t(sliced().shape, sliced().layout, dtype(), DType::Float32, training, 15);
                t.set_epilogue(epilogue);
                const ReferenceResult expected = t.reference();
                HostTensor &output = over_residual ? t.residual : t.x;
                {
                    SliceLimit limit(sliced().limit);
                    hbn::batch_norm(t.x.view(), t.running_mean.view(), t.running_var.view(), t.weight.view(),
                                    t.bias.view(), output.view(), t.call_options());
                }
                const std::string where = what + (over_residual ? "over the residual: " : "over input_x: ");
                expect_close(output.values(), expected.output, output_tolerance(dtype()), where + "in-place output");
                expect_close(t.running_var.values(), expected.running_var, parameter_tolerance(DType::Float32),
                             where + "running_var");
            }
            BackwardCase b(sliced().shape, sliced().layout, dtype(), DType::Float32, training, 17);
            b.set_epilogue(epilogue);
            const ReferenceBackward backward_expected = b.reference();
            const std::vector<double> expected_dz = b.normalized_gradient();
            BackwardCase::Views v = b.views();
            const bool residual_in_place = adds_residual(epilogue);
            (residual_in_place ? v.grad_residual : v.grad_input) = v.grad_output;
            {
                SliceLimit limit(sliced().limit);
                b.call(v);
            }
            const HostTensor &grad_input = residual_in_place ? b.grad_input : b.dy;
            expect_within(grad_input.values(), backward_expected.grad_input,
                          grad_input_bounds(backward_expected, dtype()),
                          what + (residual_in_place ? "grad_input" : "in-place grad_input"));
            expect_within(b.grad_weight.values(), backward_expected.grad_weight,
                          grad_weight_bounds(backward_expected, DType::Float32), what + "grad_weight");
            if (residual_in_place) {
                expect_close(b.dy.values(), expected_dz, 0, what + "in-place grad_residual");
            }
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Sliced, SlicedMatrix,
                         ::testing::Combine(::testing::ValuesIn(sliced_cases()),
                                            ::testing::ValuesIn(all_dtypes)),
                         sliced_name);

// Sliced and synchronized at once, plain and through add+ReLU: each
// participant merges its slices, and the collectives are the same four and
// three as unsliced.
TEST(SlicedSync, MatchesConcatenatedBatchReference) {
    struct Case {
        std::vector<int64_t> shape;
        Layout layout;
        std::vector<int64_t> split;
        int64_t limit;
    };
    for (const Case &c : {Case{{5, 3, 4, 4}, Layout::NCHW, {2, 3}, 16}, Case{{5, 3, 4, 4}, Layout::NCHW, {2, 0, 3}, 7},
                          Case{{5, 3, 4, 6}, Layout::NHWC, {2, 0, 3}, 7}, Case{{4, 2, 9}, Layout::NHWC, {1, 3}, 5}}) {
        for (DType dtype : all_dtypes) {
            // add+ReLU: every tensor of the fused epilogue in slices at once.
            for (Epilogue epilogue : {Epilogue::None, Epilogue::AddReLU}) {
                const std::string what = epilogue_name(epilogue) + shape_name(c.shape) +
                                         (c.layout == Layout::NCHW ? " NCHW" : " NHWC") + " x" + dtype_tag(dtype) +
                                         ", limit " + std::to_string(c.limit) + ": ";
                SyncBatch batch(c.shape, c.layout, dtype, DType::Float32, c.split, 19);
                batch.set_epilogue(epilogue);
                FakeGroup group(batch.processes());
                std::vector<Participant> parts;
                for (int r = 0; r < batch.processes(); r++) {
                    parts.push_back(batch.participant(r));
                    parts.back().options.all_reduce = group.hook(r);
                }
                std::vector<Outcome> forward(parts.size()), backward(parts.size());
                {
                    SliceLimit limit(c.limit);  // set before the threads start: not thread-safe
                    run_participants(group, [&](int r) {
                        forward[r] = capture([&] { parts[r].forward(Entry::BatchNormTraining); });
                        backward[r] = capture([&] { parts[r].backward(); });
                    });
                }
                for (int r = 0; r < batch.processes(); r++) {
                    EXPECT_TRUE(forward[r].ok()) << what << "participant " << r << " forward: "
                                                 << describe(forward[r]);
                    EXPECT_TRUE(backward[r].ok()) << what << "participant " << r << " backward: "
                                                  << describe(backward[r]);
                }
                const int64_t channels = batch.channels();
                expect_collectives(group, joined(forward_collectives(channels), backward_collectives(channels)), what);
                const ReferenceResult expected = batch.forward_reference();
                const std::vector<double> mean = parts[0].saved_mean.values(),
                                          inv_std = parts[0].saved_inv_std.values();
                expect_close(mean, expected.batch_mean, 1e-6, what + "saved_mean");
                expect_close(inv_std, expected.inv_std, 2e-6, what + "saved_inv_std");
                const ReferenceBackward backward_expected = batch.backward_reference(mean, inv_std);
                const std::vector<double> bounds = grad_input_bounds(backward_expected, dtype);
                const std::vector<double> expected_dz = batch.normalized_gradient();
                for (int r = 0; r < batch.processes(); r++) {
                    const std::string who = what + "participant " + std::to_string(r) + " ";
                    EXPECT_EQ(parts[r].saved_inv_std.bytes(), parts[0].saved_inv_std.bytes()) << who << "saved_inv_std";
                    EXPECT_EQ(parts[r].running_var.bytes(), parts[0].running_var.bytes()) << who << "running_var";
                    expect_close(parts[r].output.values(), batch.part(expected.output, r), output_tolerance(dtype),
                                 who + "output");
                    expect_close(parts[r].running_var.values(), expected.running_var, 2e-6, who + "running_var");
                    expect_within(parts[r].grad_input.values(), batch.part(backward_expected.grad_input, r),
                                  batch.part(bounds, r), who + "grad_input");
                    if (adds_residual(epilogue)) {
                        expect_close(parts[r].grad_residual.values(), batch.part(expected_dz, r), 0,
                                     who + "grad_residual");
                    }
                    const ReferenceBackward local = batch.local_backward_reference(r, mean, inv_std);
                    expect_within(parts[r].grad_weight.values(), local.grad_weight,
                                  grad_weight_bounds(local, DType::Float32), who + "grad_weight");
                    expect_within(parts[r].grad_bias.values(), local.grad_bias, grad_bias_bounds(local, DType::Float32),
                                  who + "grad_bias");
                }
            }
        }
    }
}

// A real tensor of more than 2^31 elements ------------------------------

// Runs fn(begin, end, worker) over [0, count) in contiguous parts, one
// thread each.
template <class F>
void parallel_for(int64_t count, int workers, F fn) {
    std::vector<std::thread> threads;
    for (int w = 0; w < workers; w++) {
        const int64_t begin = count * w / workers, end = count * (w + 1) / workers;
        threads.emplace_back([=, &fn] { fn(begin, end, w); });
    }
    for (auto &t : threads) {
        t.join();
    }
}

uint64_t splitmix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// A value in [-1, 1) from an element's index: random access, no state.
double pattern(uint64_t index, uint64_t seed) {
    return static_cast<double>(splitmix64(index * 2 + seed) >> 11) * 0x1p-52 - 1;
}

// A real float16 tensor of more than 2^31 elements (4 GiB, and as much for
// grad_output): the forward in training in place (input_x is output), then
// the training backward in place (grad_input is grad_output), against double
// references computed here by streaming loops (per-channel sums over every
// element, then a sample of the elements). x is a per-channel offset plus a
// hash of the element's index, so it can be laid again after the forward
// overwrote it.
void check_large_float16(const std::vector<int64_t> &shape, Layout layout) {
    const char *enabled = std::getenv("HBN_TEST_LARGE");
    if (enabled == nullptr || std::string(enabled) != "1") {
        GTEST_SKIP() << "set HBN_TEST_LARGE=1: needs ~10 GiB and minutes";
    }
    constexpr int64_t max_channels = 8;
    const Geometry g(shape, layout);
    const int64_t channels = g.channels, total = g.channels * g.values_per_channel;
    ASSERT_LE(channels, max_channels);
    ASSERT_GT(total, int64_t(1) << 31);
    const double offsets[max_channels] = {0, 1, -3, 10, 50, -100, 0.5, 200};
    const double spreads[max_channels] = {1, 0.5, 2, 1, 4, 1, 0.25, 8};
    const int workers = static_cast<int>(std::max(1u, std::min(16u, std::thread::hardware_concurrency())));
    const auto m = static_cast<double>(g.values_per_channel);
    const auto channel_of = [&](int64_t i) { return g.channels_last ? i % channels : (i / g.inner) % channels; };
    std::printf("%s %s: %lld elements, %lld channels\n", shape_name(shape).c_str(),
                layout == Layout::NCHW ? "NCHW" : "NHWC", static_cast<long long>(total),
                static_cast<long long>(channels));

    std::unique_ptr<hbn::float16[]> x(new hbn::float16[total]), dy(new hbn::float16[total]);
    const auto fill_x = [&] {
        parallel_for(total, workers, [&](int64_t begin, int64_t end, int) {
            for (int64_t i = begin; i < end; i++) {
                const int64_t c = channel_of(i);
                x[i] = static_cast<hbn::float16>(offsets[c] + spreads[c] * pattern(i, 1));
            }
        });
    };
    fill_x();

    // Per-channel double sums of K functions of (element, channel) over
    // every element, in blocks: f returns std::array<double, K>.
    const auto channel_sums = [&](const auto &f) {
        using Values = decltype(f(int64_t(0), int64_t(0)));
        constexpr size_t k_count = std::tuple_size<Values>::value;
        using Sums = std::array<std::array<double, max_channels>, k_count>;
        std::vector<Sums> partial(workers);
        parallel_for(total, workers, [&](int64_t begin, int64_t end, int w) {
            Sums sum{};
            for (int64_t block = begin; block < end; block += 65536) {
                Sums part{};
                for (int64_t i = block; i < std::min(end, block + 65536); i++) {
                    const int64_t c = channel_of(i);
                    const Values v = f(i, c);
                    for (size_t k = 0; k < k_count; k++) {
                        part[k][c] += v[k];
                    }
                }
                for (size_t k = 0; k < k_count; k++) {
                    for (int64_t c = 0; c < channels; c++) {
                        sum[k][c] += part[k][c];
                    }
                }
            }
            partial[w] = sum;
        });
        std::array<std::vector<double>, k_count> totals;
        for (size_t k = 0; k < k_count; k++) {
            totals[k].assign(channels, 0.0);
            for (const Sums &p : partial) {  // in worker order: deterministic
                for (int64_t c = 0; c < channels; c++) {
                    totals[k][c] += p[k][c];
                }
            }
        }
        return totals;
    };

    std::vector<double> mean =
        channel_sums([&](int64_t i, int64_t) { return std::array<double, 1>{static_cast<double>(x[i])}; })[0];
    for (double &v : mean) {
        v /= m;
    }
    std::vector<double> var = channel_sums([&](int64_t i, int64_t c) {
        const double d = static_cast<double>(x[i]) - mean[c];
        return std::array<double, 1>{d * d};
    })[0];
    for (double &v : var) {
        v /= m;
    }

    // The sampled elements: the ends, around 2^31, and a stride through.
    std::vector<int64_t> samples;
    for (int64_t i = 0; i < 64; i++) {
        samples.push_back(i);
        samples.push_back(total - 1 - i);
        if ((int64_t(1) << 31) - 32 + i < total) {
            samples.push_back((int64_t(1) << 31) - 32 + i);
        }
    }
    for (int64_t k = 0; k < 4093; k++) {
        samples.push_back(k * (total / 4093) + k % 11);
    }
    std::sort(samples.begin(), samples.end());
    samples.erase(std::unique(samples.begin(), samples.end()), samples.end());
    std::vector<double> x_samples;
    for (int64_t i : samples) {
        x_samples.push_back(static_cast<double>(x[i]));
    }

    const double eps = 1e-5, momentum = 0.1;
    std::vector<double> weight(channels), bias(channels), running_mean0(channels), running_var0(channels);
    for (int64_t c = 0; c < channels; c++) {
        weight[c] = 1.5 - 0.125 * c;
        bias[c] = 0.25 * c - 1;
        running_mean0[c] = 0.5 * c;
        running_var0[c] = 1 + 0.25 * c;
    }
    const auto per_channel = [channels](const std::vector<double> &v) {
        return HostTensor(DType::Float32, {channels}, v);
    };
    HostTensor running_mean = per_channel(running_mean0), running_var = per_channel(running_var0),
               weight_t = per_channel(weight), bias_t = per_channel(bias),
               saved_mean = per_channel(constant(channels, 0.0)), saved_inv_std = per_channel(constant(channels, 0.0));
    const hbn::Tensor x_view{x.get(), DType::Float16, shape};
    hbn::BatchNormOptions options;
    options.training = true;
    options.layout = layout;
    options.eps = eps;
    options.momentum = momentum;
    ASSERT_NO_THROW(hbn::batch_norm_training(x_view, running_mean.view(), running_var.view(), weight_t.view(),
                                             bias_t.view(), x_view, saved_mean.view(), saved_inv_std.view(), options));

    std::vector<double> inv_std(channels), expected_running_mean(channels), expected_running_var(channels);
    for (int64_t c = 0; c < channels; c++) {
        inv_std[c] = 1 / std::sqrt(var[c] + eps);
        expected_running_mean[c] = (1 - momentum) * running_mean0[c] + momentum * mean[c];
        expected_running_var[c] = (1 - momentum) * running_var0[c] + momentum * var[c] * m / (m - 1);
        std::printf("channel %lld: mean %.9g (reference %.9g), inv_std %.9g (reference %.9g)\n",
                    static_cast<long long>(c), saved_mean.get(c), mean[c], saved_inv_std.get(c), inv_std[c]);
    }
    expect_close(saved_mean.values(), mean, 1e-6, "saved_mean");
    expect_close(saved_inv_std.values(), inv_std, 2e-6, "saved_inv_std");
    expect_close(running_mean.values(), expected_running_mean, 2e-6, "running_mean");
    expect_close(running_var.values(), expected_running_var, 2e-6, "running_var");
    std::vector<double> y, y_expected;
    for (size_t k = 0; k < samples.size(); k++) {
        const int64_t c = channel_of(samples[k]);
        y.push_back(static_cast<double>(x[samples[k]]));
        y_expected.push_back((x_samples[k] - mean[c]) * inv_std[c] * weight[c] + bias[c]);
    }
    expect_close(y, y_expected, output_tolerance(DType::Float16), "output sample");

    // The backward, with hbn's saved statistics, on x laid again.
    fill_x();
    parallel_for(total, workers, [&](int64_t begin, int64_t end, int) {
        for (int64_t i = begin; i < end; i++) {
            dy[i] = static_cast<hbn::float16>(pattern(i, 2) + 0.1 * channel_of(i));
        }
    });
    const std::vector<double> saved_m = saved_mean.values(), saved_s = saved_inv_std.values();
    // sum(dy), sum(dy * xhat), and for the bounds sum|dy|, sum|dy * xhat|.
    const auto backward_sums = channel_sums([&](int64_t i, int64_t c) {
        const double d = static_cast<double>(dy[i]);
        const double dx = d * (static_cast<double>(x[i]) - saved_m[c]) * saved_s[c];
        return std::array<double, 4>{d, dx, std::abs(d), std::abs(dx)};
    });
    const std::vector<double> &sum_dy = backward_sums[0], &sum_dy_xhat = backward_sums[1], &abs_dy = backward_sums[2],
                              &abs_dy_xhat = backward_sums[3];
    std::vector<double> dy_samples;
    for (int64_t i : samples) {
        dy_samples.push_back(static_cast<double>(dy[i]));
    }
    HostTensor grad_weight = per_channel(constant(channels, Participant::sentinel)),
               grad_bias = per_channel(constant(channels, Participant::sentinel));
    const hbn::Tensor dy_view{dy.get(), DType::Float16, shape};
    ASSERT_NO_THROW(hbn::batch_norm_backward(dy_view, x_view, weight_t.view(), hbn::Tensor{}, hbn::Tensor{},
                                             saved_mean.view(), saved_inv_std.view(), dy_view, grad_weight.view(),
                                             grad_bias.view(), options));
    // Double sums of up to 2^31 terms: 1e-7 of their magnitudes is generous.
    expect_within(grad_bias.values(), sum_dy, sum_bounds(sum_dy, abs_dy, 1e-7, DType::Float32), "grad_bias");
    expect_within(grad_weight.values(), sum_dy_xhat,
                  sum_bounds(sum_dy_xhat, abs_dy_xhat, grad_weight_per_term, DType::Float32), "grad_weight");
    std::vector<double> gi, gi_expected, gi_bounds;
    for (size_t k = 0; k < samples.size(); k++) {
        const int64_t c = channel_of(samples[k]);
        const double scale = weight[c] * saved_s[c], mean_dy = sum_dy[c] / m, slope = sum_dy_xhat[c] / m;
        const double h = (x_samples[k] - saved_m[c]) * saved_s[c];
        const double expected = scale * (dy_samples[k] - mean_dy - h * slope);
        gi.push_back(static_cast<double>(dy[samples[k]]));
        gi_expected.push_back(expected);
        gi_bounds.push_back(8 * unit_roundoff32 * std::abs(scale) *
                                (std::abs(dy_samples[k]) + std::abs(mean_dy) + std::abs(h * slope)) +
                            storage_rounding(DType::Float16) * std::abs(expected) + 0x1p-24);
    }
    expect_within(gi, gi_expected, gi_bounds, "grad_input sample");
}

// 2^31 + 8 elements in 8 channels: every extent and stride fits, so one
// kernel call (large_buffers) with 64-bit indexing.
TEST(LargeSliced, Float16NhwcEightChannelsOver2To31Elements) {
    check_large_float16({1, (int64_t(1) << 28) + 1, 8}, Layout::NHWC);
}

// M = 2^31 + 9 rows of one channel: the rows in slices.
TEST(LargeSliced, Float16NhwcRowsBeyondTheLimit) {
    check_large_float16({(int64_t(1) << 31) + 9, 1}, Layout::NHWC);
}

// inner = 2^31 + 9 in one channel: the plane in slices.
TEST(LargeSliced, Float16NchwInnerBeyondTheLimit) {
    check_large_float16({1, 1, (int64_t(1) << 31) + 9}, Layout::NCHW);
}

}  // namespace
}  // namespace hbn_test
