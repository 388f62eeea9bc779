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
        t.run();
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
