// MindSpore ops.batch_norm semantics: the documented examples, every rank,
// layout and dtype combination against the double reference, and the edge
// cases of shared/semantics.md.
#include "test_util.h"
#include "x86_variant.h"

#include <limits>
#include <tuple>

namespace hbn_test {
namespace {

using hbn::DType;
using hbn::Layout;

// input_x = [[1, 2], [3, 4]], running_mean = [0.5, 1.5], running_var = [0.1, 0.2],
// weight = [2, 2], bias = [-1, -1], momentum = 0.1, eps = 1e-5.
BatchNormCase documented_example(bool training) {
    BatchNormCase t({2, 2}, Layout::NCHW, DType::Float32, DType::Float32, training);
    t.x = HostTensor(DType::Float32, {2, 2}, {1, 2, 3, 4});
    t.running_mean = HostTensor(DType::Float32, {2}, {0.5, 1.5});
    t.running_var = HostTensor(DType::Float32, {2}, {0.1, 0.2});
    t.weight = HostTensor(DType::Float32, {2}, {2, 2});
    t.bias = HostTensor(DType::Float32, {2}, {-1, -1});
    return t;
}

TEST(Semantics, DocumentedInferenceExample) {
    BatchNormCase t = documented_example(false);
    const std::vector<double> mean_before = t.running_mean.values(), var_before = t.running_var.values();
    t.run();
    // MindSpore's documented output.
    expect_close(t.output.values(), {2.1621194, 1.2360122, 14.810596, 10.180061}, 1e-6, "output");
    expect_close(t.running_mean.values(), mean_before, 0, "running_mean is read only");
    expect_close(t.running_var.values(), var_before, 0, "running_var is read only");
}

TEST(Semantics, DocumentedTrainingExample) {
    BatchNormCase t = documented_example(true);
    t.run();
    const double y = 2 / std::sqrt(1.00001);  // 2 * (+-1) / sqrt(1 + eps)
    expect_close(t.output.values(), {-y - 1, -y - 1, y - 1, y - 1}, 1e-6, "output");
    expect_close(t.running_mean.values(), {0.65, 1.65}, 1e-7, "running_mean");
    expect_close(t.running_var.values(), {0.29, 0.38}, 1e-7, "running_var");
}

// Every rank, layout, input dtype, parameter dtype, mode and fused epilogue
// against the reference. Sizes avoid multiples of the vector widths on
// purpose.
class ReferenceMatrix : public ::testing::TestWithParam<MatrixParam> {};

TEST_P(ReferenceMatrix, MatchesDoubleReference) {
    const auto &[layout, x_dtype, param_dtype, training] = GetParam();
    for (const std::vector<int64_t> &shape : matrix_shapes) {
        for (Epilogue epilogue : all_epilogues) {
            BatchNormCase t(shape, layout, x_dtype, param_dtype, training, 7);
            t.set_epilogue(epilogue);
            const ReferenceResult expected = t.reference();
            t.run();
            const std::string what = epilogue_name(epilogue) + shape_name(shape) + " ";
            expect_close(t.output.values(), expected.output, output_tolerance(x_dtype), what + "output");
            expect_close(t.running_mean.values(), expected.running_mean, parameter_tolerance(param_dtype),
                         what + "running_mean");
            expect_close(t.running_var.values(), expected.running_var, parameter_tolerance(param_dtype),
                         what + "running_var");
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Semantics, ReferenceMatrix, matrix_params(), matrix_name);

TEST(Semantics, TrainingEntryPointReturnsMeanAndInverseStd) {
    for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
        BatchNormCase t({3, 13, 5, 7}, layout, DType::Float32, DType::Float32, true, 3);
        const ReferenceResult expected = t.reference();
        t.options.training = false;  // the entry point trains regardless
        const BatchNormCase::SavedStatistics saved = t.run_training();
        expect_close(saved.mean.values(), expected.batch_mean, 1e-6, "saved_mean");
        expect_close(saved.inv_std.values(), expected.inv_std, 1e-6, "saved_inv_std");
        expect_close(t.output.values(), expected.output, output_tolerance(DType::Float32), "output");
        expect_close(t.running_var.values(), expected.running_var, 2e-6, "running_var");
    }
}

TEST(Semantics, OutputMayAliasInput) {
    for (bool training : {false, true}) {
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            BatchNormCase t({4, 11, 9, 10}, layout, DType::Float32, DType::Float32, training, 5);
            const ReferenceResult expected = t.reference();
            hbn::batch_norm(t.x.view(), t.running_mean.view(), t.running_var.view(), t.weight.view(),
                            t.bias.view(), t.x.view(), t.options);
            expect_close(t.x.values(), expected.output, output_tolerance(DType::Float32), "in-place output");
            expect_close(t.running_var.values(), expected.running_var, 2e-6, "running_var");
        }
    }
}

// With a residual, output may be input_x or the residual itself.
TEST(SemanticsEpilogue, OutputMayBeInputOrResidual) {
    for (bool training : {false, true}) {
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            for (DType dtype : all_dtypes) {
                for (bool over_residual : {false, true}) {
                    BatchNormCase t({4, 11, 9, 10}, layout, dtype, DType::Float32, training, 5);
                    t.set_epilogue(Epilogue::AddReLU);
                    const ReferenceResult expected = t.reference();
                    HostTensor &output = over_residual ? t.residual : t.x;
                    hbn::batch_norm(t.x.view(), t.running_mean.view(), t.running_var.view(), t.weight.view(),
                                    t.bias.view(), output.view(), t.call_options());
                    const std::string what = dtype_label(dtype) + (training ? " training " : " inference ") +
                                             (layout == Layout::NCHW ? "NCHW " : "NHWC ") +
                                             (over_residual ? "over the residual: " : "over input_x: ");
                    expect_close(output.values(), expected.output, output_tolerance(dtype), what + "output");
                    expect_close(t.running_var.values(), expected.running_var, 2e-6, what + "running_var");
                }
            }
        }
    }
}

// The epilogue keeps NaN where it is: relu(NaN) is NaN (a NaN in x still
// spreads through its channel), and a NaN in the residual makes only its own
// output NaN, not its channel's statistics.
TEST(SemanticsEpilogue, NaNStaysWhereItIs) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (bool in_residual : {false, true}) {
        for (DType dtype : all_dtypes) {
            for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
                for (bool training : {false, true}) {
                    BatchNormCase t({3, 6, 5, 5}, layout, dtype, DType::Float32, training, 17);
                    t.set_epilogue(Epilogue::AddReLU);
                    const Geometry g(t.shape, layout);
                    (in_residual ? t.residual : t.x).set(g.offset(2, 7), nan);
                    const ReferenceResult expected = t.reference();
                    t.run();
                    const std::string what = std::string(in_residual ? "NaN in the residual, " : "NaN in x, ") +
                                             dtype_label(dtype) + (training ? " training " : " inference ") +
                                             (layout == Layout::NCHW ? "NCHW: " : "NHWC: ");
                    expect_close(t.output.values(), expected.output, output_tolerance(dtype), what + "output");
                    expect_close(t.running_mean.values(), expected.running_mean, 2e-6, what + "running_mean");
                    expect_close(t.running_var.values(), expected.running_var, 2e-6, what + "running_var");
                }
            }
        }
    }
}

// Outputs of 64 MiB and more are written with the x86 kernels' streaming
// stores (training computes its statistics first, then normalizes with the
// inference kernel): plain, and with the fused add + ReLU written in place
// over its residual.
TEST(Semantics, LargeOutputsMatchReference) {
#ifndef __SSE2__
    GTEST_SKIP() << "streaming stores are x86's (generators/streaming_stores.h): here large outputs take the "
                    "kernels' plain stores, which the sliced tests cover";
#endif
    for (DType dtype : all_dtypes) {
        const int64_t batch = dtype == DType::Float32 ? 16 : 32;  // 67.8 MB in every dtype
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            const std::vector<int64_t> shape = layout == Layout::NCHW ? std::vector<int64_t>{batch, 32, 182, 182}
                                                                      : std::vector<int64_t>{batch, 182, 182, 32};
            // One set of inputs per dtype and layout (making them is most of this test's time).
            BatchNormCase inputs(shape, layout, dtype, DType::Float32, false, 11);
            inputs.set_epilogue(Epilogue::AddReLU);  // makes the residual, once
            ASSERT_GE(inputs.x.bytes().size(), size_t(64) << 20);
            for (bool training : {false, true}) {
                for (Epilogue epilogue : {Epilogue::None, Epilogue::AddReLU}) {
                    BatchNormCase t = inputs;
                    t.options.training = training;
                    t.set_epilogue(epilogue);
                    const ReferenceResult expected = t.reference();
                    const bool in_place = epilogue == Epilogue::AddReLU;
                    HostTensor &output = in_place ? t.residual : t.output;
                    hbn::batch_norm(t.x.view(), t.running_mean.view(), t.running_var.view(), t.weight.view(),
                                    t.bias.view(), output.view(), t.call_options());
                    const std::string what = dtype_label(dtype) + (training ? " training " : " inference ") +
                                             (layout == Layout::NCHW ? "NCHW" : "NHWC") +
                                             (in_place ? " add+relu in place" : "");
                    expect_close(output.values(), expected.output, output_tolerance(dtype), what + " output");
                    expect_close(t.running_var.values(), expected.running_var, 2e-6, what + " running_var");
                }
            }
        }
    }
}

TEST(Semantics, MomentumZeroKeepsAndOneReplacesRunningStatistics) {
    for (double momentum : {0.0, 1.0}) {
        BatchNormCase t({6, 5, 8}, Layout::NCHW, DType::Float32, DType::Float32, true, 11);
        t.options.momentum = momentum;
        const std::vector<double> old_mean = t.running_mean.values(), old_var = t.running_var.values();
        const ReferenceResult expected = t.reference();
        t.run();
        if (momentum == 0) {
            expect_close(t.running_mean.values(), old_mean, 0, "running_mean, momentum 0");
            expect_close(t.running_var.values(), old_var, 0, "running_var, momentum 0");
        } else {
            const double m = 6 * 8;
            std::vector<double> unbiased;
            for (double v : expected.batch_var) {
                unbiased.push_back(v * m / (m - 1));
            }
            expect_close(t.running_mean.values(), expected.batch_mean, 2e-6, "running_mean, momentum 1");
            expect_close(t.running_var.values(), unbiased, 2e-6, "running_var, momentum 1");
        }
        expect_close(t.output.values(), expected.output, output_tolerance(DType::Float32), "output");
    }
}

TEST(Semantics, ConstantChannelNormalizesToExactlyBias) {
    for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
        for (DType dtype : all_dtypes) {
            BatchNormCase t({4, 3, 5, 6}, layout, dtype, DType::Float32, true, 13);
            const Geometry g(t.shape, layout);
            for (int64_t k = 0; k < g.values_per_channel; k++) {
                t.x.set(g.offset(1, k), 3.140625);  // exactly representable in every dtype
            }
            const double old_var = t.running_var.get(1);
            t.run();
            const double expected = rounded(dtype, {t.bias.get(1)})[0];
            for (int64_t k = 0; k < g.values_per_channel; k++) {
                ASSERT_EQ(t.output.get(g.offset(1, k)), expected) << "value " << k;
            }
            // Batch variance 0: the running variance only decays.
            EXPECT_NEAR(t.running_var.get(1), 0.9 * old_var, 1e-6 * old_var);
        }
    }
}

// A NaN or an infinity spreads only within its own channel, and there to
// every result as in the reference (and libtorch): +inf gives the channel the
// mean inf and the variance NaN, so its running_var becomes NaN rather than
// decaying. At the channel's first value too, which its statistics are
// shifted by.
TEST(Semantics, NonFiniteValueSpreadsOnlyWithinItsChannel) {
    const double inf = std::numeric_limits<double>::infinity();
    for (double value : {std::numeric_limits<double>::quiet_NaN(), inf, -inf}) {
        for (int64_t k : {0, 7}) {
            for (DType dtype : all_dtypes) {
                for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
                    for (bool training : {false, true}) {
                        BatchNormCase t({3, 6, 5, 5}, layout, dtype, DType::Float32, training, 17);
                        t.options.momentum = 0.5;
                        const Geometry g(t.shape, layout);
                        t.x.set(g.offset(2, k), value);
                        const ReferenceResult expected = t.reference();
                        const std::string what = std::to_string(value) + " at value " + std::to_string(k) +
                                                 (training ? ", training" : ", inference") +
                                                 (layout == Layout::NCHW ? " NCHW " : " NHWC ") +
                                                 dtype_label(dtype) + ": ";
                        if (training) {
                            const BatchNormCase::SavedStatistics saved = t.run_training();
                            expect_close(saved.mean.values(), expected.batch_mean, 1e-6, what + "saved_mean");
                            expect_close(saved.inv_std.values(), expected.inv_std, 2e-6,
                                         what + "saved_inv_std");
                        } else {
                            t.run();
                        }
                        expect_close(t.output.values(), expected.output, output_tolerance(dtype), what + "output");
                        expect_close(t.running_mean.values(), expected.running_mean, 2e-6, what + "running_mean");
                        expect_close(t.running_var.values(), expected.running_var, 2e-6, what + "running_var");
                    }
                }
            }
        }
    }
}

TEST(Semantics, InferenceWithOneValuePerChannel) {
    BatchNormCase t({1, 7}, Layout::NCHW, DType::Float32, DType::Float32, false, 19);
    const ReferenceResult expected = t.reference();
    t.run();
    expect_close(t.output.values(), expected.output, output_tolerance(DType::Float32), "output");
}

TEST(Semantics, EmptyBatchIsANoOp) {
    for (bool training : {false, true}) {
        BatchNormCase t({0, 4, 3}, Layout::NCHW, DType::Float32, DType::Float32, training);
        const std::vector<double> old_mean = t.running_mean.values();
        if (training) {
            EXPECT_THROW(t.run(), hbn::Error);  // no variance from zero values
        } else {
            t.run();
        }
        expect_close(t.running_mean.values(), old_mean, 0, "running_mean");
    }
}

// Emptiness decides before size: an empty tensor is a no-op in inference
// however large its other extents, even where their product overflows.
TEST(Semantics, EmptyTensorWithHugeExtentsIsANoOp) {
    const int64_t huge = int64_t(1) << 40;
    for (const auto &[shape, layout] : {std::pair{std::vector<int64_t>{0, 4, huge}, Layout::NCHW},
                                        std::pair{std::vector<int64_t>{huge, 0, huge, 4}, Layout::NHWC},
                                        std::pair{std::vector<int64_t>{huge, 4, 0, huge, huge}, Layout::NCHW}}) {
        BatchNormCase t({2, 4}, Layout::NHWC, DType::Float32, DType::Float32, false);
        t.options.layout = layout;
        t.x = HostTensor(DType::Float32, shape, {});
        t.output = HostTensor(DType::Float32, shape, {});
        const std::vector<double> old_mean = t.running_mean.values();
        EXPECT_NO_THROW(t.run()) << shape_name(shape);
        expect_close(t.running_mean.values(), old_mean, 0, "running_mean");
    }
}

// Tensors that hbn only reads may share memory: weight and bias, and in
// inference running_mean and running_var. (Written ones may not; see
// validation_test. output may be input_x itself: OutputMayAliasInput.)
TEST(Semantics, ReadOnlyTensorsMayShareMemory) {
    for (bool training : {false, true}) {
        BatchNormCase t({3, 5, 4, 7}, Layout::NCHW, DType::Float32, DType::Float32, training, 41);
        t.bias = t.weight;
        if (!training) {  // one tensor serves as both: a valid variance
            for (size_t c = 0; c < t.running_mean.size(); c++) {
                t.running_mean.set(c, 0.5 + std::abs(t.running_mean.get(c)));
            }
            t.running_var = t.running_mean;
        }
        const ReferenceResult expected = t.reference();
        hbn::batch_norm(t.x.view(), t.running_mean.view(), training ? t.running_var.view() : t.running_mean.view(),
                        t.weight.view(), t.weight.view(), t.output.view(), t.options);
        expect_close(t.output.values(), expected.output, output_tolerance(DType::Float32), "output");
    }
}

// The generated wrapper consulted the forced variant's hook, so the kernels
// that ran are the forced ones.
TEST(Variant, ForcedVariantIsTheOneDispatched) {
    HBN_SKIP_UNLESS_ON_CPU("the GPU libraries are single-target");
    BatchNormCase t({2, 3, 4, 5}, Layout::NCHW, DType::Float32, DType::Float32, false);
    t.run();
    const VariantRecord &record = x86_variant_record();
    if (record.forced.empty()) {
        GTEST_SKIP() << "HBN_TEST_X86_VARIANT is not set: the CPU's best variant runs";
    }
    EXPECT_GT(record.queries.load(), 0) << "the multi-target wrapper never asked which variant to use";
    if (record.forced == "avx512") {
        EXPECT_EQ(record.rejections.load(), 0);
    } else {
        EXPECT_GT(record.rejections.load(), 0) << "a better variant than " << record.forced << " was not refused";
    }
}

}  // namespace
}  // namespace hbn_test
