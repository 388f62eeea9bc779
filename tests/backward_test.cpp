// batch_norm_backward: PyTorch's native_batch_norm_backward, against the
// double reference (every rank, layout, dtype and mode), against finite
// differences of the reference forward, in place, with gradients skipped, at
// the edges (one value per channel, empty tensors, NaN), on numerically hard
// inputs, and its validation.
#include "backward_bounds.h"
#include "test_util.h"

#include "HalideRuntime.h"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <limits>
#include <tuple>

namespace hbn_test {
namespace {

using hbn::DType;
using hbn::ErrorKind;
using hbn::Layout;

const double sentinel = BackwardCase::sentinel;

void expect_grad_input(HostTensor &actual, const ReferenceBackward &expected, const std::string &what) {
    expect_within(actual.values(), expected.grad_input, grad_input_bounds(expected, actual.view().dtype),
                  what + "grad_input");
}

void expect_grad_weight(HostTensor &actual, const ReferenceBackward &expected, const std::string &what) {
    expect_within(actual.values(), expected.grad_weight,
                  sum_bounds(expected.grad_weight, expected.grad_weight_terms, grad_weight_per_term,
                             actual.view().dtype),
                  what + "grad_weight");
}

void expect_grad_bias(HostTensor &actual, const ReferenceBackward &expected, const std::string &what) {
    expect_within(actual.values(), expected.grad_bias,
                  sum_bounds(expected.grad_bias, expected.grad_bias_terms, grad_bias_per_term, actual.view().dtype),
                  what + "grad_bias");
}

void expect_parameter_gradients(BackwardCase &t, const ReferenceBackward &expected, const std::string &what) {
    expect_grad_weight(t.grad_weight, expected, what);
    expect_grad_bias(t.grad_bias, expected, what);
}

void expect_gradients(BackwardCase &t, const ReferenceBackward &expected, const std::string &what) {
    expect_grad_input(t.grad_input, expected, what);
    expect_parameter_gradients(t, expected, what);
}

std::string case_name(Layout layout, bool training) {
    return std::string(training ? "training " : "inference ") + (layout == Layout::NCHW ? "NCHW: " : "NHWC: ");
}

// Every rank, layout, dtype, mode and fused epilogue against the reference,
// in training with the saved statistics of hbn's own forward.
class BackwardMatrix : public ::testing::TestWithParam<MatrixParam> {};

TEST_P(BackwardMatrix, MatchesDoubleReference) {
    const auto &[layout, x_dtype, param_dtype, training] = GetParam();
    for (const std::vector<int64_t> &shape : matrix_shapes) {
        for (Epilogue epilogue : all_epilogues) {
            BackwardCase t(shape, layout, x_dtype, param_dtype, training, 7);
            t.set_epilogue(epilogue);
            const ReferenceBackward expected = t.reference();
            t.run();
            const std::string what = epilogue_name(epilogue) + shape_name(shape) + " ";
            expect_gradients(t, expected, what);
            t.expect_grad_residual(what);
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Backward, BackwardMatrix, matrix_params(), matrix_name);

TEST(Backward, GradInputMayBeGradOutput) {
    for (bool training : {false, true}) {
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            for (DType dtype : all_dtypes) {
                BackwardCase t({4, 11, 9, 10}, layout, dtype, DType::Float32, training, 5);
                const ReferenceBackward expected = t.reference();
                BackwardCase::Views v = t.views();
                v.grad_input = v.grad_output;
                t.call(v);
                const std::string what = case_name(layout, training) + "in place ";
                expect_grad_input(t.dy, expected, what);
                expect_parameter_gradients(t, expected, what);
            }
        }
    }
}

// Through the fused epilogue, grad_residual may be grad_output itself (the
// masked dy over dy), and grad_input is still formed from the masked dy.
TEST(BackwardEpilogue, GradResidualMayBeGradOutput) {
    for (bool training : {false, true}) {
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            for (DType dtype : all_dtypes) {
                for (Epilogue epilogue : {Epilogue::Add, Epilogue::AddReLU}) {
                    BackwardCase t({4, 11, 9, 10}, layout, dtype, DType::Float32, training, 5);
                    t.set_epilogue(epilogue);
                    const ReferenceBackward expected = t.reference();
                    const std::vector<double> expected_dz = t.normalized_gradient();
                    BackwardCase::Views v = t.views();
                    v.grad_residual = v.grad_output;
                    t.call(v);
                    const std::string what = epilogue_name(epilogue) + dtype_label(dtype) + " " +
                                             case_name(layout, training) + "in place ";
                    expect_close(t.dy.values(), expected_dz, 0, what + "grad_residual");
                    expect_gradients(t, expected, what);
                }
            }
        }
    }
}

// The fused forward, then the backward through it with the forward's own
// output as the mask: against the double reference of the whole chain,
// relu(bn(x) + residual), whose mask is the reference output's sign.
TEST(BackwardEpilogue, ChainedWithTheFusedForwardMatchesReference) {
    for (bool training : {false, true}) {
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            for (DType dtype : all_dtypes) {
                for (Epilogue epilogue : {Epilogue::ReLU, Epilogue::AddReLU}) {
                    BackwardCase t({3, 7, 6, 5}, layout, dtype, DType::Float32, training, 23);
                    t.set_epilogue(epilogue);
                    t.forward.set_epilogue(epilogue);
                    const ReferenceResult forward_expected = t.forward.reference();
                    if (training) {
                        t.saved = t.forward.run_training();
                    } else {
                        t.forward.run();
                    }
                    const std::string what = epilogue_name(epilogue) + dtype_label(dtype) + " " +
                                             case_name(layout, training);
                    expect_close(t.forward.output.values(), forward_expected.output, output_tolerance(dtype),
                                 what + "forward output");
                    t.forward_output = t.forward.output;
                    // The reference's own mask, not hbn's output: an independent chain.
                    const std::vector<double> dz = reference_relu_gradient(t.dy.values(), forward_expected.output);
                    const ReferenceBackward expected =
                        reference_batch_norm_backward(dz, t.forward.x.values(), t.forward.shape, layout,
                                                      t.forward.weight.values(), t.mean(), t.inv_std(), training);
                    t.run();
                    expect_gradients(t, expected, what);
                    if (adds_residual(epilogue)) {
                        expect_close(t.grad_residual.values(), dz, 0, what + "grad_residual");
                    }
                }
            }
        }
    }
}

// A NaN in the forward's output passes dy, as PyTorch's ReLU backward does
// (NaN <= 0 is false): the mask, and so grad_residual, differ there only.
TEST(BackwardEpilogue, NaNInForwardOutputPassesTheGradient) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (bool training : {false, true}) {
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            for (DType dtype : all_dtypes) {
                BackwardCase t({3, 6, 5, 5}, layout, dtype, DType::Float32, training, 29);
                t.set_epilogue(Epilogue::AddReLU);
                for (size_t i : {size_t(0), size_t(5), size_t(77)}) {  // among them, exact zeros
                    t.forward_output.set(i, nan);
                }
                const ReferenceBackward expected = t.reference();
                t.run();
                const std::string what = dtype_label(dtype) + " " + case_name(layout, training);
                for (size_t i : {size_t(0), size_t(5), size_t(77)}) {
                    EXPECT_EQ(t.grad_residual.get(i), t.dy.get(i)) << what << "grad_residual at NaN " << i;
                }
                expect_gradients(t, expected, what);
                t.expect_grad_residual(what);
            }
        }
    }
}

// Tensors the backward only reads may share memory: here grad_output is
// input_x itself, and in inference weight is running_var.
TEST(Backward, ReadOnlyTensorsMayShareMemory) {
    for (bool training : {false, true}) {
        BackwardCase t({3, 5, 4, 7}, Layout::NCHW, DType::Float32, DType::Float32, training, 41);
        t.dy = t.forward.x;
        if (!training) {  // one tensor serves as both: a positive variance
            for (size_t c = 0; c < t.forward.weight.size(); c++) {
                t.forward.weight.set(c, 0.5 + std::abs(t.forward.weight.get(c)));
            }
            t.forward.running_var = t.forward.weight;
        }
        const ReferenceBackward expected = t.reference();
        BackwardCase::Views v = t.views();
        v.grad_output = v.input_x;
        if (!training) {
            v.running_var = v.weight;
        }
        t.call(v);
        expect_gradients(t, expected, case_name(Layout::NCHW, training));
    }
}

TEST(Backward, UnusedStatisticsMayBeDefaultTensors) {
    for (bool training : {false, true}) {
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            BackwardCase t({3, 6, 5}, layout, DType::Float32, DType::Float32, training, 43);
            const ReferenceBackward expected = t.reference();
            BackwardCase::Views v = t.views();
            if (training) {
                v.running_mean = v.running_var = hbn::Tensor{};
            } else {
                v.saved_mean = v.saved_inv_std = hbn::Tensor{};
            }
            t.call(v);
            expect_gradients(t, expected, case_name(layout, training));
        }
    }
}

// A default Tensor{} skips its gradient: each in turn, then all three (which
// leaves nothing to do, and is no error).
TEST(Backward, EachGradientMayBeSkipped) {
    const char *names[] = {"grad_input", "grad_weight", "grad_bias"};
    for (bool training : {false, true}) {
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            for (int skipped = 0; skipped <= 3; skipped++) {
                BackwardCase t({3, 7, 4, 5}, layout, DType::Float32, DType::Float32, training, 61);
                const ReferenceBackward expected = t.reference();
                const bool skip[] = {skipped == 0 || skipped == 3, skipped == 1 || skipped == 3,
                                     skipped == 2 || skipped == 3};
                BackwardCase::Views v = t.views();
                hbn::Tensor *views[] = {&v.grad_input, &v.grad_weight, &v.grad_bias};
                HostTensor *outputs[] = {&t.grad_input, &t.grad_weight, &t.grad_bias};
                std::vector<std::vector<unsigned char>> before;
                for (int i = 0; i < 3; i++) {
                    if (skip[i]) {
                        *views[i] = hbn::Tensor{};
                    }
                    before.push_back(outputs[i]->bytes());
                }
                const std::string what = case_name(layout, training) +
                                         (skipped == 3 ? std::string("all skipped: ")
                                                       : std::string(names[skipped]) + " skipped: ");
                ASSERT_NO_THROW(t.call(v)) << what;
                for (int i = 0; i < 3; i++) {
                    if (skip[i]) {
                        EXPECT_EQ(outputs[i]->bytes(), before[i]) << what << names[i] << " written";
                    }
                }
                if (!skip[0]) {
                    expect_grad_input(t.grad_input, expected, what);
                }
                if (!skip[1]) {
                    expect_grad_weight(t.grad_weight, expected, what);
                }
                if (!skip[2]) {
                    expect_grad_bias(t.grad_bias, expected, what);
                }
            }
        }
    }
}

TEST(Backward, InferenceWithOneValuePerChannel) {
    for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
        for (DType param_dtype : all_dtypes) {
            BackwardCase t({1, 7}, layout, DType::Float32, param_dtype, false, 19);
            const ReferenceBackward expected = t.reference();
            t.run();
            expect_gradients(t, expected, case_name(layout, false));
        }
    }
}

// An empty input_x in inference: nothing to sum, so zero grad_weight and
// grad_bias (over the sentinel), whichever extent is 0.
TEST(Backward, EmptyInputInInferenceGivesZeroParameterGradients) {
    for (const auto &[shape, layout] : {std::pair{std::vector<int64_t>{0, 3, 4}, Layout::NCHW},
                                        std::pair{std::vector<int64_t>{2, 3, 0}, Layout::NCHW},
                                        std::pair{std::vector<int64_t>{2, 0, 5}, Layout::NHWC}}) {
        for (DType param_dtype : all_dtypes) {
            BackwardCase t(shape, layout, DType::Float32, param_dtype, false);
            const auto channels = static_cast<size_t>(Geometry(shape, layout).channels);
            ASSERT_NO_THROW(t.run()) << shape_name(shape);
            expect_close(t.grad_weight.values(), std::vector<double>(channels, 0.0), 0,
                         shape_name(shape) + " grad_weight");
            expect_close(t.grad_bias.values(), std::vector<double>(channels, 0.0), 0,
                         shape_name(shape) + " grad_bias");
        }
    }
}

// Throws the expected error kind with `names` in its message, writing none
// of the gradients.
void expect_rejected(BackwardCase &t, const BackwardCase::Views &v, ErrorKind kind,
                     const std::vector<std::string> &names, const std::string &what) {
    const auto input_before = t.grad_input.bytes(), weight_before = t.grad_weight.bytes(),
               bias_before = t.grad_bias.bytes(), dy_before = t.dy.bytes(), residual_before = t.grad_residual.bytes();
    try {
        t.call(v);
        ADD_FAILURE() << "no hbn::Error for " << what;
    } catch (const hbn::Error &e) {
        EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(kind)) << what << ": " << e.what();
        for (const std::string &name : names) {
            EXPECT_NE(std::string(e.what()).find(name), std::string::npos)
                << what << ": message does not name " << name << ": " << e.what();
        }
    }
    EXPECT_EQ(t.grad_input.bytes(), input_before) << what << ": grad_input written";
    EXPECT_EQ(t.grad_weight.bytes(), weight_before) << what << ": grad_weight written";
    EXPECT_EQ(t.grad_bias.bytes(), bias_before) << what << ": grad_bias written";
    EXPECT_EQ(t.dy.bytes(), dy_before) << what << ": grad_output written";
    EXPECT_EQ(t.grad_residual.bytes(), residual_before) << what << ": grad_residual written";
}

// Training needs M >= 2, as the forward does: an empty input_x (M = 0) is
// rejected in training like M = 1, although the header also says that an
// empty input_x gives zero gradients (read here as inference only).
TEST(Backward, TrainingRejectsFewerThanTwoValuesPerChannel) {
    for (const auto &[shape, layout] : {std::pair{std::vector<int64_t>{1, 3}, Layout::NCHW},
                                        std::pair{std::vector<int64_t>{1, 1, 3}, Layout::NHWC},
                                        std::pair{std::vector<int64_t>{0, 3, 4}, Layout::NCHW},
                                        std::pair{std::vector<int64_t>{2, 3, 0}, Layout::NCHW}}) {
        BackwardCase t(shape, layout, DType::Float32, DType::Float32, true);
        expect_rejected(t, t.views(), ErrorKind::ValueError, {"value per channel"}, shape_name(shape));
    }
}

// A NaN spreads only within its own channel, and there as in the reference.
// In x: in training the forward's saved mean and inv_std of the channel are
// NaN, and so are all its gradients but grad_bias; in inference only its
// grad_weight. In dy: its own grad_input value (in training the channel's
// every one), grad_weight and grad_bias. The other channels match the
// reference as usual.
TEST(Backward, NaNSpreadsOnlyWithinItsChannel) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (bool in_dy : {false, true}) {
        for (int64_t k : {0, 7}) {
            for (DType dtype : all_dtypes) {
                for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
                    for (bool training : {false, true}) {
                        BackwardCase t({3, 6, 5, 5}, layout, dtype, DType::Float32, training, 17);
                        const Geometry g(t.forward.shape, layout);
                        (in_dy ? t.dy : t.forward.x).set(g.offset(2, k), nan);
                        if (training && !in_dy) {
                            t.saved = t.forward.run_training();
                            for (int64_t c = 0; c < g.channels; c++) {
                                ASSERT_EQ(std::isnan(t.saved.mean.get(c)), c == 2) << "forward's saved_mean " << c;
                                ASSERT_EQ(std::isnan(t.saved.inv_std.get(c)), c == 2)
                                    << "forward's saved_inv_std " << c;
                            }
                        }
                        const ReferenceBackward expected = t.reference();
                        t.run();
                        const std::string what = std::string(in_dy ? "NaN in dy" : "NaN in x") + " at value " +
                                                 std::to_string(k) +
                                                 ", " + dtype_label(dtype) + " " +
                                                 case_name(layout, training);
                        expect_gradients(t, expected, what);
                    }
                }
            }
        }
    }
}

// Gradients against central finite differences of L = sum(y * g), with y
// from the double reference forward (in training its batch statistics
// depend on every x of the channel) and dy = g. hbn gets float32 inputs and
// the float32 saved statistics of its own forward, which move its gradients
// by ~1e-7 relative; the differences (h = 1e-6 relative, in double) are good
// to ~1e-9. A term of grad_input dropped, or inv_std applied once instead of
// twice, is off by 0.1 to 1 here.
double loss(const BatchNormCase &f, const std::vector<double> &x, const std::vector<double> &weight,
            const std::vector<double> &bias, const std::vector<double> &g) {
    const ReferenceResult r = reference_batch_norm(x, f.shape, f.layout, f.running_mean.values(),
                                                   f.running_var.values(), weight, bias, f.options.training,
                                                   f.options.momentum, f.options.eps);
    double sum = 0;
    for (size_t i = 0; i < g.size(); i++) {
        sum += r.output[i] * g[i];
    }
    return sum;
}

// d loss / d v[i] for each i, perturbing v (one of loss's inputs) in place.
std::vector<double> finite_differences(std::vector<double> &v, const std::function<double()> &loss_now) {
    std::vector<double> gradient(v.size());
    for (size_t i = 0; i < v.size(); i++) {
        const double v0 = v[i], h = 1e-6 * std::max(1.0, std::abs(v0));
        v[i] = v0 + h;
        const double up = loss_now();
        v[i] = v0 - h;
        const double down = loss_now();
        v[i] = v0;
        gradient[i] = (up - down) / (2 * h);
    }
    return gradient;
}

double max_abs_difference(const std::vector<double> &a, const std::vector<double> &b) {
    double worst = 0;
    for (size_t i = 0; i < a.size(); i++) {
        worst = std::max(worst, std::abs(a[i] - b[i]));
    }
    return worst;
}

TEST(BackwardGradientCheck, MatchesFiniteDifferencesOfReferenceForward) {
    double worst = 0;
    for (const auto &[shape, layout] : {std::pair{std::vector<int64_t>{3, 4, 5}, Layout::NCHW},
                                        std::pair{std::vector<int64_t>{4, 3, 2, 3}, Layout::NHWC}}) {
        for (bool training : {false, true}) {
            BackwardCase t(shape, layout, DType::Float32, DType::Float32, training, 53);
            const std::vector<double> g = t.dy.values();
            std::vector<double> x = t.forward.x.values(), weight = t.forward.weight.values(),
                                bias = t.forward.bias.values();
            const auto loss_now = [&] { return loss(t.forward, x, weight, bias, g); };
            const std::vector<double> dx = finite_differences(x, loss_now),
                                      dweight = finite_differences(weight, loss_now),
                                      dbias = finite_differences(bias, loss_now);
            t.run();
            const std::string what = case_name(layout, training);
            expect_close(t.grad_input.values(), dx, 1e-4, what + "grad_input");
            expect_close(t.grad_weight.values(), dweight, 1e-4, what + "grad_weight");
            expect_close(t.grad_bias.values(), dbias, 1e-4, what + "grad_bias");
            worst = std::max({worst, max_abs_difference(t.grad_input.values(), dx),
                              max_abs_difference(t.grad_weight.values(), dweight),
                              max_abs_difference(t.grad_bias.values(), dbias)});
        }
    }
    char figure[32];
    std::snprintf(figure, sizeof(figure), "%.3g", worst);
    RecordProperty("max_abs_difference", figure);
    std::printf("gradient check: largest |hbn - finite differences| %s\n", figure);
}

// x with mean / std = 1e4 (training). x - mean is exact in float32 here
// (Sterbenz), so a careful float32 implementation meets the usual bounds;
// the one-pass grad_weight = (sum(dy * x) - mean * sum(dy)) * inv_std in
// float32 cancels: simulated at this size (8184 values per channel) it errs
// by 0.01 to 4 against a bound of ~1.3e-3 (4 unit_roundoff32 * sum |dy * xhat|, ~5200),
// and its grad_input by 300 to 50000 times the bound.
// float16 at mean / std = 1e3, where its spacing is 0.5.
TEST(BackwardNumerics, LargeOffsetInX) {
    for (DType dtype : {DType::Float32, DType::Float16}) {
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            const std::vector<int64_t> shape = layout == Layout::NCHW ? std::vector<int64_t>{8, 5, 33, 31}
                                                                      : std::vector<int64_t>{8, 33, 31, 5};
            const double mean = dtype == DType::Float32 ? 1e4 : 1e3;
            BackwardCase t(shape, layout, dtype, DType::Float32, true, 23, mean, 1.0);
            const ReferenceBackward expected = t.reference();
            t.run();
            const std::string what = dtype_label(dtype) + " " + case_name(layout, true) + "large mean/std ";
            for (size_t c = 0; c < expected.grad_weight.size(); c++) {
                std::printf("%schannel %zu: grad_weight %.9g, reference %.9g\n", what.c_str(), c,
                            t.grad_weight.get(c), expected.grad_weight[c]);
            }
            expect_gradients(t, expected, what);
        }
    }
}

// dy = 1e3 + N(0, 1), 2^20 + 4096 values per channel. A float32 sum of dy
// reaches ~1e9, where float32's spacing is 64, so each dy ~ 1e3 adds 1024:
// simulated, a sequential float32 sum errs by ~1e7 (1%), which puts mean_dy
// off by ~10 and grad_input off by 1e4 times its bound (~1e-3 |weight *
// inv_std|: eight roundings of |dy| ~ 1e3). grad_bias's bound is its
// float32 rounding, ~125. Also float16, whose bound is its own rounding of
// grad_input.
TEST(BackwardNumerics, LargeCommonOffsetInGradOutput) {
    for (DType dtype : {DType::Float32, DType::Float16}) {
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            const std::vector<int64_t> shape = layout == Layout::NCHW ? std::vector<int64_t>{16, 2, 256, 257}
                                                                      : std::vector<int64_t>{16, 256, 257, 2};
            BackwardCase t(shape, layout, dtype, DType::Float32, true, 43);
            t.dy = HostTensor(dtype, shape, random_values(t.dy.size(), 1e3, 1, 47));
            const ReferenceBackward expected = t.reference();
            t.run();
            for (size_t c = 0; c < expected.grad_bias.size(); c++) {
                std::printf("dy offset 1e3 channel %zu: grad_bias %.9g, reference %.9g\n", c, t.grad_bias.get(c),
                            expected.grad_bias[c]);
            }
            double worst = 0, largest = 0;
            for (size_t i = 0; i < expected.grad_input.size(); i++) {
                worst = std::max(worst, std::abs(t.grad_input.get(i) - expected.grad_input[i]));
                largest = std::max(largest, std::abs(expected.grad_input[i]));
            }
            std::printf("dy offset 1e3: largest |grad_input - reference| %.3g, largest |reference| %.3g\n", worst,
                        largest);
            // The offset itself must cost nothing: eight float32 roundings of the
            // largest value. Where mean_dy reached the elementwise pass as a
            // float32 (or as a pair hi + lo that the compiler folds back into
            // one), the error was 2.7e-5 to 4.1e-5 against values of ~3.4.
            const double rounding = dtype == DType::Float32 ? 8 * unit_roundoff32 : storage_rounding(dtype);
            EXPECT_LE(worst, rounding * largest) << dtype_label(dtype) << ": grad_input lost precision to dy's offset";
            expect_gradients(t, expected, dtype_label(dtype) + " " + case_name(layout, true) + "dy offset 1e3 ");
        }
    }
}

// 2^24 + 3 values per channel, dy = 1: grad_bias is M, 16777219, which
// float32 stores as 16777220; a float32 sum stops at 2^24 = 16777216. x is
// the saved mean, so grad_weight is 0, and so is grad_input, mean_dy being
// exactly 1 (the float32 sum's mean_dy, 2^24 / M, would leave
// 1.8e-7 * weight * inv_std = 5.4e-7 in every value).
// float16 too.
TEST(BackwardNumerics, MoreThan2To24ValuesPerChannel) {
    const int64_t m = (int64_t(1) << 24) + 3;
    for (DType dtype : {DType::Float32, DType::Float16}) {
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            const std::vector<int64_t> shape =
                layout == Layout::NCHW ? std::vector<int64_t>{1, 1, m} : std::vector<int64_t>{m, 1};
            HostTensor x(dtype, shape, std::vector<double>(m, 0.75)), dy(dtype, shape, std::vector<double>(m, 1.0)),
                grad_input(dtype, shape, std::vector<double>(m, sentinel));
            HostTensor weight(DType::Float32, {1}, {1.5}), saved_mean(DType::Float32, {1}, {0.75}),
                saved_inv_std(DType::Float32, {1}, {2.0}), grad_weight(DType::Float32, {1}, {sentinel}),
                grad_bias(DType::Float32, {1}, {sentinel});
            hbn::BatchNormOptions options;
            options.training = true;
            options.layout = layout;
            hbn::batch_norm_backward(dy.view(), x.view(), weight.view(), hbn::Tensor{}, hbn::Tensor{},
                                     saved_mean.view(), saved_inv_std.view(), grad_input.view(), grad_weight.view(),
                                     grad_bias.view(), options);
            std::printf("%s: 2^24 + 3 values, dy = 1: grad_bias %.9g\n", dtype_label(dtype).c_str(), grad_bias.get(0));
            EXPECT_EQ(grad_bias.get(0), static_cast<double>(static_cast<float>(m)))
                << dtype_label(dtype) << ": grad_bias " << std::to_string(grad_bias.get(0));
            EXPECT_EQ(grad_weight.get(0), 0.0);
            size_t nonzero = 0;
            for (size_t i = 0; i < grad_input.size(); i++) {
                nonzero += !(std::abs(grad_input.get(i)) <= 1e-9);
            }
            EXPECT_EQ(nonzero, 0u) << "grad_input values not 0";
        }
    }
}

// Bad input: each case raises hbn::Error of MindSpore's class, its message
// naming the arguments, and writes nothing.
struct BadBackward {
    const char *name;
    ErrorKind kind;
    std::vector<std::string> names;  // substrings the message must contain
    bool training;
    std::function<void(BackwardCase &)> spoil;
    // Changes to the views, for missing or overlapping tensors.
    std::function<void(BackwardCase &, BackwardCase::Views &)> alias = nullptr;
};

void PrintTo(const BadBackward &bad, std::ostream *os) {
    *os << bad.name;
}

class BackwardValidation : public ::testing::TestWithParam<BadBackward> {};

TEST_P(BackwardValidation, RaisesNamedErrorAndWritesNothing) {
    const BadBackward &bad = GetParam();
    BackwardCase t({4, 3, 5}, Layout::NCHW, DType::Float32, DType::Float32, bad.training);
    bad.spoil(t);
    BackwardCase::Views v = t.views();
    if (bad.alias) {
        bad.alias(t, v);
    }
    const std::vector<std::pair<const char *, const HostTensor *>> read = {
        {"input_x", &t.forward.x},           {"weight", &t.forward.weight},
        {"running_mean", &t.forward.running_mean}, {"running_var", &t.forward.running_var},
        {"saved_mean", &t.saved.mean},       {"saved_inv_std", &t.saved.inv_std}};
    std::vector<std::vector<unsigned char>> before;
    for (const auto &[name, tensor] : read) {
        before.push_back(tensor->bytes());
    }
    expect_rejected(t, v, bad.kind, bad.names, bad.name);
    for (size_t i = 0; i < read.size(); i++) {
        EXPECT_EQ(read[i].second->bytes(), before[i]) << read[i].first << " changed";
    }
}

HostTensor retyped(const HostTensor &t, DType dtype, std::vector<int64_t> shape) {
    return HostTensor(dtype, std::move(shape), t.values());
}

HostTensor filled(DType dtype, std::vector<int64_t> shape, double value) {
    int64_t count = 1;
    for (int64_t e : shape) {
        count *= e;
    }
    return HostTensor(dtype, std::move(shape), std::vector<double>(count, value));
}

// A view of `t`'s memory `offset_bytes` in, with another shape.
hbn::Tensor shifted(HostTensor &t, std::vector<int64_t> shape, size_t offset_bytes) {
    hbn::Tensor view = t.view();
    view.data = static_cast<unsigned char *>(view.data) + offset_bytes;
    view.shape = std::move(shape);
    return view;
}

INSTANTIATE_TEST_SUITE_P(
    Errors, BackwardValidation,
    ::testing::Values(
        BadBackward{"grad_output_dtype_invalid", ErrorKind::TypeError, {"grad_output"}, false,
                    [](auto &t) { t.dy.relabel(static_cast<DType>(7)); }},
        BadBackward{"input_x_dtype_differs", ErrorKind::TypeError, {"input_x"}, true,
                    [](auto &t) { t.forward.x = retyped(t.forward.x, DType::Float16, {4, 3, 5}); }},
        BadBackward{"input_x_shape_differs", ErrorKind::ValueError, {"input_x"}, false,
                    [](auto &t) { t.forward.x = retyped(t.forward.x, DType::Float32, {4, 5, 3}); }},
        BadBackward{"grad_input_shape", ErrorKind::ValueError, {"grad_input"}, true,
                    [](auto &t) { t.grad_input = filled(DType::Float32, {4, 5, 3}, sentinel); }},
        BadBackward{"grad_input_dtype", ErrorKind::TypeError, {"grad_input"}, false,
                    [](auto &t) { t.grad_input = filled(DType::Float16, {4, 3, 5}, sentinel); }},
        BadBackward{"grad_weight_dtype_differs_from_weight", ErrorKind::TypeError, {"grad_weight"}, true,
                    [](auto &t) { t.grad_weight = filled(DType::Float16, {3}, sentinel); }},
        BadBackward{"grad_bias_wrong_length", ErrorKind::ValueError, {"grad_bias"}, false,
                    [](auto &t) { t.grad_bias = filled(DType::Float32, {4}, sentinel); }},
        BadBackward{"weight_wrong_length", ErrorKind::ValueError, {"weight"}, true,
                    [](auto &t) { t.forward.weight = filled(DType::Float32, {4}, 1); }},
        BadBackward{"training_without_saved_mean", ErrorKind::ValueError, {"saved_mean"}, true, [](auto &) {},
                    [](auto &, auto &v) { v.saved_mean = hbn::Tensor{}; }},
        BadBackward{"saved_inv_std_float16", ErrorKind::TypeError, {"saved_inv_std"}, true,
                    [](auto &t) { t.saved.inv_std = retyped(t.saved.inv_std, DType::Float16, {3}); }},
        BadBackward{"inference_without_running_var", ErrorKind::ValueError, {"running_var"}, false, [](auto &) {},
                    [](auto &, auto &v) { v.running_var = hbn::Tensor{}; }},
        BadBackward{"running_mean_dtype_differs_from_weight", ErrorKind::TypeError, {"running_mean"}, false,
                    [](auto &t) { t.forward.running_mean = retyped(t.forward.running_mean, DType::Float16, {3}); }},
        BadBackward{"eps_zero", ErrorKind::ValueError, {"eps"}, true, [](auto &t) { t.forward.options.eps = 0; }},
        BadBackward{"momentum_two", ErrorKind::ValueError, {"momentum"}, false,
                    [](auto &t) { t.forward.options.momentum = 2; }},
        BadBackward{"training_one_value_per_channel", ErrorKind::ValueError, {"value per channel"}, true,
                    [](auto &t) { t = BackwardCase({1, 3}, Layout::NCHW, DType::Float32, DType::Float32, true); }},
        // Aliasing: a gradient shares memory with another argument.
        BadBackward{"grad_weight_inside_input_x", ErrorKind::ValueError, {"input_x", "grad_weight"}, true,
                    [](auto &) {}, [](auto &t, auto &v) { v.grad_weight = shifted(t.forward.x, {3}, 8); }},
        BadBackward{"grad_input_is_input_x", ErrorKind::ValueError, {"input_x", "grad_input"}, false,
                    [](auto &) {}, [](auto &, auto &v) { v.grad_input = v.input_x; }},
        // In place is grad_input at grad_output's very address only.
        BadBackward{"grad_input_overlaps_grad_output_shifted", ErrorKind::ValueError, {"grad_output", "grad_input"},
                    true,
                    [](auto &t) {
                        std::vector<double> values = t.dy.values();
                        values.push_back(0);
                        t.dy = HostTensor(DType::Float32, {61}, values);
                    },
                    [](auto &t, auto &v) {
                        v.grad_output = shifted(t.dy, {4, 3, 5}, 0);
                        v.grad_input = shifted(t.dy, {4, 3, 5}, 4);
                    }},
        BadBackward{"grad_weight_is_grad_bias", ErrorKind::ValueError, {"grad_weight", "grad_bias"}, false,
                    [](auto &) {}, [](auto &, auto &v) { v.grad_bias = v.grad_weight; }},
        BadBackward{"grad_bias_is_saved_mean", ErrorKind::ValueError, {"saved_mean", "grad_bias"}, true,
                    [](auto &) {}, [](auto &, auto &v) { v.grad_bias = v.saved_mean; }},
        BadBackward{"grad_bias_is_weight", ErrorKind::ValueError, {"weight", "grad_bias"}, false, [](auto &) {},
                    [](auto &, auto &v) { v.grad_bias = v.weight; }},
        // The fused epilogue's tensors.
        BadBackward{"activation_unknown", ErrorKind::ValueError, {"options.activation"}, true,
                    [](auto &t) { t.forward.options.activation = static_cast<hbn::Activation>(3); }},
        BadBackward{"relu_without_forward_output", ErrorKind::ValueError, {"options.forward_output", "ReLU"}, false,
                    [](auto &t) { t.set_epilogue(Epilogue::ReLU); },
                    [](auto &, auto &v) { v.forward_output = hbn::Tensor{}; }},
        BadBackward{"forward_output_shape", ErrorKind::ValueError, {"options.forward_output"}, true,
                    [](auto &t) {
                        t.set_epilogue(Epilogue::AddReLU);
                        t.forward_output = filled(DType::Float32, {4, 5, 3}, 1);
                    }},
        BadBackward{"forward_output_dtype", ErrorKind::TypeError, {"options.forward_output"}, false,
                    [](auto &t) {
                        t.set_epilogue(Epilogue::ReLU);
                        t.forward_output = filled(DType::BFloat16, {4, 3, 5}, 1);
                    }},
        BadBackward{"forward_output_memory", ErrorKind::ValueError, {"options.forward_output"}, true,
                    [](auto &t) {
                        t.set_epilogue(Epilogue::ReLU);
                        t.forward_output.relabel(hbn::Memory::OpenCL);
                    }},
        BadBackward{"grad_residual_dtype", ErrorKind::TypeError, {"options.grad_residual"}, true,
                    [](auto &t) {
                        t.set_epilogue(Epilogue::Add);
                        t.grad_residual = filled(DType::Float16, {4, 3, 5}, sentinel);
                    }},
        BadBackward{"grad_residual_null", ErrorKind::ValueError, {"options.grad_residual"}, false,
                    [](auto &t) {
                        t.set_epilogue(Epilogue::AddReLU);
                        t.grad_residual = HostTensor(DType::Float32, {4, 3, 5}, {});
                    }},
        BadBackward{"grad_residual_is_grad_input", ErrorKind::ValueError, {"grad_input", "options.grad_residual"},
                    true, [](auto &t) { t.set_epilogue(Epilogue::AddReLU); },
                    [](auto &, auto &v) { v.grad_residual = v.grad_input; }},
        BadBackward{"grad_residual_is_forward_output", ErrorKind::ValueError,
                    {"options.forward_output", "options.grad_residual"}, false,
                    [](auto &t) { t.set_epilogue(Epilogue::AddReLU); },
                    [](auto &, auto &v) { v.grad_residual = v.forward_output; }},
        // grad_residual's pass reads grad_output, which in place grad_input
        // would already have overwritten.
        BadBackward{"grad_input_is_grad_output_with_grad_residual", ErrorKind::ValueError,
                    {"grad_output", "grad_input", "options.grad_residual"}, true,
                    [](auto &t) { t.set_epilogue(Epilogue::Add); },
                    [](auto &, auto &v) { v.grad_input = v.grad_output; }},
        BadBackward{"grad_input_is_forward_output", ErrorKind::ValueError, {"grad_input", "options.forward_output"},
                    false, [](auto &t) { t.set_epilogue(Epilogue::ReLU); },
                    [](auto &, auto &v) { v.grad_input = v.forward_output; }}),
    [](const auto &info) { return std::string(info.param.name); });

// A Halide runtime failure inside the backward (here, its NHWC block sums
// cannot be allocated) is a RuntimeError, not an abort, and grad_weight and
// grad_bias, written only after the pipeline succeeded, keep their bytes.
void *failing_malloc(void *, size_t) {
    return nullptr;
}

TEST(BackwardErrors, PipelineFailureBecomesRuntimeError) {
    HBN_SKIP_UNLESS_ON_CPU("GPU pipelines allocate device memory, not through halide_malloc");
    BackwardCase t({16, 32, 32, 40}, Layout::NHWC, DType::Float32, DType::Float32, true);
    const auto weight_before = t.grad_weight.bytes(), bias_before = t.grad_bias.bytes();
    const halide_malloc_t previous = halide_set_custom_malloc(failing_malloc);
    std::string message;
    try {
        t.run();
    } catch (const hbn::Error &e) {
        EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(ErrorKind::RuntimeError));
        message = e.what();
    }
    halide_set_custom_malloc(previous);
    EXPECT_NE(message.find("batch_norm_backward: pipeline failed"), std::string::npos) << message;
    EXPECT_EQ(t.grad_weight.bytes(), weight_before) << "grad_weight changed";
    EXPECT_EQ(t.grad_bias.bytes(), bias_before) << "grad_bias changed";
    // And the library still works afterwards.
    const ReferenceBackward expected = t.reference();
    t.run();
    expect_close(t.grad_bias.values(), rounded(DType::Float32, expected.grad_bias), 1e-6, "grad_bias after recovery");
}

}  // namespace
}  // namespace hbn_test
