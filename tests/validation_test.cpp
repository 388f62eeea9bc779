// Bad input: each case raises hbn::Error of MindSpore's class, with a message
// naming the argument, and leaves the running statistics untouched.
#include "test_util.h"

#include "HalideRuntime.h"

#include <functional>
#include <limits>

namespace hbn_test {
namespace {

using hbn::DType;
using hbn::ErrorKind;
using hbn::Layout;

struct BadCall {
    const char *name;
    ErrorKind kind;
    const char *names_argument;  // substring the message must contain
    bool training;
    std::function<void(BatchNormCase &)> spoil;
    // The call to make, where it is not t.run() (tensors sharing memory).
    std::function<void(BatchNormCase &)> call = nullptr;
};

void PrintTo(const BadCall &call, std::ostream *os) {
    *os << call.name;
}

class Validation : public ::testing::TestWithParam<BadCall> {};

TEST_P(Validation, RaisesNamedErrorAndChangesNothing) {
    const BadCall &call = GetParam();
    BatchNormCase t({4, 3, 5}, Layout::NCHW, DType::Float32, DType::Float32, call.training);
    call.spoil(t);
    const auto mean_before = t.running_mean.bytes(), var_before = t.running_var.bytes();
    const auto output_before = t.output.bytes();
    try {
        call.call ? call.call(t) : t.run();
        FAIL() << "no hbn::Error for " << call.name;
    } catch (const hbn::Error &e) {
        EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(call.kind)) << e.what();
        EXPECT_NE(std::string(e.what()).find(call.names_argument), std::string::npos)
            << "message does not name " << call.names_argument << ": " << e.what();
    }
    EXPECT_EQ(t.running_mean.bytes(), mean_before) << "running_mean changed";
    EXPECT_EQ(t.running_var.bytes(), var_before) << "running_var changed";
    EXPECT_EQ(t.output.bytes(), output_before) << "output written before validation";
}

HostTensor with_dtype(const HostTensor &t, DType dtype, std::vector<int64_t> shape) {
    return HostTensor(dtype, std::move(shape), t.values());
}

const double nan = std::numeric_limits<double>::quiet_NaN();

// A shape whose element count overflows int64, with a small buffer behind
// it, and parameters of its channel count (so that only the count is wrong).
void huge_input(BatchNormCase &t, DType dtype, const std::vector<int64_t> &shape) {
    t.x = HostTensor(dtype, shape, std::vector<double>(64, 1));
    t.output = HostTensor(dtype, shape, std::vector<double>(64, 0));
    if (shape[1] < 64) {
        for (HostTensor *param : {&t.running_mean, &t.running_var, &t.weight, &t.bias}) {
            *param = HostTensor(DType::Float32, {shape[1]}, std::vector<double>(shape[1], 1));
        }
    }
}

// batch_norm with some tensors replaced by views of others' memory.
struct Views {
    hbn::Tensor x, running_mean, running_var, weight, bias, output;
};
Views views_of(BatchNormCase &t) {
    return {t.x.view(), t.running_mean.view(), t.running_var.view(), t.weight.view(), t.bias.view(),
            t.output.view()};
}
void call_with(BatchNormCase &t, const Views &v) {
    hbn::batch_norm(v.x, v.running_mean, v.running_var, v.weight, v.bias, v.output, t.options);
}
// A view of `t`'s memory starting `offset_bytes` in; the tensor is given a
// spare element so that the view stays inside it.
hbn::Tensor shifted(HostTensor &t, std::vector<int64_t> shape, size_t offset_bytes) {
    hbn::Tensor view = t.view();
    view.data = static_cast<unsigned char *>(view.data) + offset_bytes;
    view.shape = std::move(shape);
    return view;
}
HostTensor with_spare_element(const HostTensor &t, DType dtype) {
    std::vector<double> values = t.values();
    values.push_back(0);
    return HostTensor(dtype, {static_cast<int64_t>(values.size())}, values);
}

INSTANTIATE_TEST_SUITE_P(
    Errors, Validation,
    ::testing::Values(
        BadCall{"eps_zero", ErrorKind::ValueError, "eps", false, [](auto &t) { t.options.eps = 0; }},
        BadCall{"eps_above_one", ErrorKind::ValueError, "eps", false, [](auto &t) { t.options.eps = 1.5; }},
        BadCall{"eps_nan", ErrorKind::ValueError, "eps", true, [](auto &t) { t.options.eps = nan; }},
        BadCall{"momentum_negative", ErrorKind::ValueError, "momentum", true,
                [](auto &t) { t.options.momentum = -0.1; }},
        BadCall{"momentum_above_one", ErrorKind::ValueError, "momentum", true,
                [](auto &t) { t.options.momentum = 1.01; }},
        BadCall{"momentum_nan", ErrorKind::ValueError, "momentum", true, [](auto &t) { t.options.momentum = nan; }},
        BadCall{"rank_one", ErrorKind::ValueError, "input_x", false,
                [](auto &t) {
                    t.x = HostTensor(DType::Float32, {12}, std::vector<double>(12, 1));
                    t.output = t.x;
                }},
        BadCall{"negative_dimension", ErrorKind::ValueError, "input_x", false,
                [](auto &t) {
                    t.x = HostTensor(DType::Float32, {-4, 3, 5}, {});
                    t.output = HostTensor(DType::Float32, {-4, 3, 5}, {});
                }},
        BadCall{"null_input", ErrorKind::ValueError, "input_x", false,
                [](auto &t) { t.x = HostTensor(DType::Float32, {4, 3, 5}, {}); }},
        BadCall{"null_weight", ErrorKind::ValueError, "weight", true,
                [](auto &t) { t.weight = HostTensor(DType::Float32, {3}, {}); }},
        BadCall{"output_dtype", ErrorKind::TypeError, "output", false,
                [](auto &t) { t.output = with_dtype(t.output, DType::Float16, {4, 3, 5}); }},
        BadCall{"output_shape", ErrorKind::ValueError, "output", true,
                [](auto &t) { t.output = HostTensor(DType::Float32, {4, 5, 3}, std::vector<double>(60, 0)); }},
        BadCall{"input_dtype_invalid", ErrorKind::TypeError, "input_x", false,
                [](auto &t) { t.x.relabel(static_cast<DType>(7)); }},
        BadCall{"parameter_dtypes_differ", ErrorKind::TypeError, "running_var", true,
                [](auto &t) { t.running_var = with_dtype(t.running_var, DType::Float16, {3}); }},
        BadCall{"weight_dtype_differs", ErrorKind::TypeError, "weight", false,
                [](auto &t) { t.weight = with_dtype(t.weight, DType::Float16, {3}); }},
        BadCall{"bias_wrong_length", ErrorKind::ValueError, "bias", false,
                [](auto &t) { t.bias = HostTensor(DType::Float32, {4}, {1, 2, 3, 4}); }},
        BadCall{"running_mean_rank_two", ErrorKind::ValueError, "running_mean", true,
                [](auto &t) { t.running_mean = HostTensor(DType::Float32, {1, 3}, {1, 2, 3}); }},
        BadCall{"nhwc_channel_mismatch", ErrorKind::ValueError, "running_mean", false,
                [](auto &t) { t.options.layout = Layout::NHWC; }},  // C is now 5, parameters hold 3
        BadCall{"training_one_value_per_channel", ErrorKind::ValueError, "value per channel", true,
                [](auto &t) {
                    t.x = HostTensor(DType::Float32, {1, 3}, {1, 2, 3});
                    t.output = HostTensor(DType::Float32, {1, 3}, {0, 0, 0});
                }},
        BadCall{"unknown_device", ErrorKind::ValueError, "options.device", false,
                [](auto &t) { t.options.device = static_cast<hbn::Device>(9); }},
        BadCall{"unknown_memory", ErrorKind::ValueError, "input_x.memory", false,
                [](auto &t) { t.x.relabel(static_cast<hbn::Memory>(9)); }},
        BadCall{"running_var_in_device_memory", ErrorKind::ValueError, "running_var", true,
                [](auto &t) { t.running_var.relabel(hbn::Memory::OpenCL); }},
        BadCall{"output_memory_differs", ErrorKind::ValueError, "output", false,
                [](auto &t) { t.output.relabel(hbn::Memory::CUDA); }},
        BadCall{"device_memory_on_cpu", ErrorKind::ValueError, "input_x", true,
                [](auto &t) {
                    t.x.relabel(hbn::Memory::OpenCL);
                    t.output.relabel(hbn::Memory::OpenCL);
                    t.options.device = hbn::Device::CPU;
                }},
        // Element counts that overflow int64: the products must not wrap
        // into a small or negative count that passes.
        BadCall{"count_wraps_negative", ErrorKind::ValueError, "input_x shape", true,
                [](auto &t) {
                    const int64_t huge = std::numeric_limits<int64_t>::max() - 2;  // 2^63 - 3
                    huge_input(t, DType::Float32, {5, huge, 6});
                    for (HostTensor *param : {&t.running_mean, &t.running_var, &t.weight, &t.bias}) {
                        *param = HostTensor(DType::Float16, {huge}, {1, 2, 3});
                    }
                }},
        BadCall{"count_wraps_small", ErrorKind::ValueError, "input_x shape", false,
                [](auto &t) { huge_input(t, DType::Float32, {1, 1, (int64_t(1) << 62) + 1, 4}); }},
        BadCall{"count_wraps_float16", ErrorKind::ValueError, "input_x shape", false,
                [](auto &t) { huge_input(t, DType::Float16, {2, 3, 3037000500, 3037000500}); }},
        BadCall{"bytes_overflow", ErrorKind::ValueError, "input_x shape", false,
                [](auto &t) { huge_input(t, DType::Float32, {1, 3, int64_t(1) << 60, 2}); }},  // 3 * 2^61 elements
        // Element-aligned data only (alignment rule of the header).
        BadCall{"misaligned_input", ErrorKind::ValueError, "input_x.data is not aligned", false,
                [](auto &t) { t.x = with_spare_element(t.x, DType::Float32); },
                [](auto &t) {
                    Views v = views_of(t);
                    v.x = shifted(t.x, {4, 3, 5}, 1);
                    call_with(t, v);
                }},
        BadCall{"misaligned_running_var", ErrorKind::ValueError, "running_var.data is not aligned", true,
                [](auto &t) { t.running_var = with_spare_element(t.running_var, DType::Float32); },
                [](auto &t) {
                    Views v = views_of(t);
                    v.running_var = shifted(t.running_var, {3}, 2);
                    call_with(t, v);
                }},
        // Aliasing: a tensor hbn writes shares memory with another argument.
        BadCall{"running_mean_is_running_var", ErrorKind::ValueError, "running_mean and running_var", true,
                [](auto &) {},
                [](auto &t) {
                    Views v = views_of(t);
                    v.running_var = v.running_mean;
                    call_with(t, v);
                }},
        BadCall{"running_var_inside_output", ErrorKind::ValueError, "output and running_var", true,
                [](auto &) {},
                [](auto &t) {
                    Views v = views_of(t);
                    v.running_var = shifted(t.output, {3}, 8);
                    call_with(t, v);
                }},
        BadCall{"inference_output_over_running_var", ErrorKind::ValueError, "output and running_var", false,
                [](auto &) {},
                [](auto &t) {
                    Views v = views_of(t);
                    v.running_var = shifted(t.output, {3}, 0);
                    call_with(t, v);
                }},
        BadCall{"output_overlaps_input_shifted", ErrorKind::ValueError, "input_x and output", false,
                [](auto &t) { t.x = with_spare_element(t.x, DType::Float32); },
                [](auto &t) {
                    Views v = views_of(t);
                    v.x = shifted(t.x, {4, 3, 5}, 0);
                    v.output = shifted(t.x, {4, 3, 5}, 4);
                    call_with(t, v);
                }},
        BadCall{"weight_is_running_mean", ErrorKind::ValueError, "running_mean and weight", true,
                [](auto &) {},
                [](auto &t) {
                    Views v = views_of(t);
                    v.weight = v.running_mean;
                    call_with(t, v);
                }},
        BadCall{"saved_mean_is_running_mean", ErrorKind::ValueError, "running_mean and saved_mean", true,
                [](auto &) {},
                [](auto &t) {
                    HostTensor saved_inv_std(DType::Float32, {3}, {0, 0, 0});
                    hbn::batch_norm_training(t.x.view(), t.running_mean.view(), t.running_var.view(),
                                             t.weight.view(), t.bias.view(), t.output.view(),
                                             t.running_mean.view(), saved_inv_std.view(), t.options);
                }},
        BadCall{"saved_inv_std_is_saved_mean", ErrorKind::ValueError, "saved_mean and saved_inv_std", true,
                [](auto &) {},
                [](auto &t) {
                    HostTensor saved(DType::Float32, {3}, {0, 0, 0});
                    hbn::batch_norm_training(t.x.view(), t.running_mean.view(), t.running_var.view(),
                                             t.weight.view(), t.bias.view(), t.output.view(), saved.view(),
                                             saved.view(), t.options);
                }},
        // The fused epilogue's activation and residual.
        BadCall{"activation_unknown", ErrorKind::ValueError, "options.activation", true,
                [](auto &t) { t.options.activation = static_cast<hbn::Activation>(2); }},
        BadCall{"residual_dtype", ErrorKind::TypeError, "options.residual", true,
                [](auto &t) {
                    t.set_epilogue(Epilogue::AddReLU);
                    t.residual = with_dtype(t.residual, DType::BFloat16, {4, 3, 5});
                }},
        BadCall{"residual_shape", ErrorKind::ValueError, "options.residual", false,
                [](auto &t) {
                    t.set_epilogue(Epilogue::Add);
                    t.residual = with_dtype(t.residual, DType::Float32, {4, 5, 3});
                }},
        BadCall{"residual_null", ErrorKind::ValueError, "options.residual", true,
                [](auto &t) {
                    t.set_epilogue(Epilogue::AddReLU);
                    t.residual = HostTensor(DType::Float32, {4, 3, 5}, {});
                }},
        BadCall{"residual_memory_differs", ErrorKind::ValueError, "options.residual", false,
                [](auto &t) {
                    t.set_epilogue(Epilogue::Add);
                    t.residual.relabel(hbn::Memory::CUDA);
                }},
        // In place is output at the residual's very address only.
        BadCall{"output_overlaps_residual_shifted", ErrorKind::ValueError, "output and options.residual", true,
                [](auto &t) {
                    t.set_epilogue(Epilogue::AddReLU);
                    std::vector<double> values = t.residual.values();
                    values.push_back(0);
                    t.residual = HostTensor(DType::Float32, {61}, values);
                },
                [](auto &t) {
                    hbn::BatchNormOptions options = t.options;
                    options.residual = shifted(t.residual, {4, 3, 5}, 0);
                    hbn::batch_norm(t.x.view(), t.running_mean.view(), t.running_var.view(), t.weight.view(),
                                    t.bias.view(), shifted(t.residual, {4, 3, 5}, 4), options);
                }}),
    [](const auto &info) { return std::string(info.param.name); });

// A failure inside a Halide pipeline (here: its heap scratch allocation
// fails) comes back as hbn::Error, not an abort, and commits nothing. Both
// cases below keep per-channel scratch on the heap; NCHW training does not.
void *failing_malloc(void *, size_t) {
    return nullptr;
}

TEST(HalideErrors, PipelineFailureBecomesRuntimeError) {
    HBN_SKIP_UNLESS_ON_CPU("GPU pipelines allocate device memory, not through halide_malloc "
                           "(backend_test covers a failing OpenCL kernel build)");
    for (bool training : {false, true}) {
        const Layout layout = training ? Layout::NHWC : Layout::NCHW;
        BatchNormCase t({16, 40, 32, 32}, layout, DType::Float32, DType::Float32, training);
        const auto mean_before = t.running_mean.bytes(), var_before = t.running_var.bytes();
        const halide_malloc_t previous = halide_set_custom_malloc(failing_malloc);
        std::string message;
        try {
            t.run();
        } catch (const hbn::Error &e) {
            EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(ErrorKind::RuntimeError));
            message = e.what();
        }
        halide_set_custom_malloc(previous);
        EXPECT_NE(message.find(training ? "training pipeline failed" : "inference pipeline failed"),
                  std::string::npos)
            << message;
        EXPECT_EQ(t.running_mean.bytes(), mean_before) << "running_mean changed";
        EXPECT_EQ(t.running_var.bytes(), var_before) << "running_var changed";
        // And the library still works afterwards.
        const ReferenceResult expected = t.reference();
        t.run();
        expect_close(t.running_var.values(), expected.running_var, 2e-6, "running_var after recovery");
    }
}

}  // namespace
}  // namespace hbn_test
