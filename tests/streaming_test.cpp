// The kernels' streaming stores (generators/streaming_stores.h), called
// directly. The runtime streams only outputs of 64 MiB and more, which
// Semantics.LargeOutputsMatchReference covers for the forward through the
// API; here every dtype, layout and threading variant of the inference,
// backward and grad_input kernels, with each flag of theirs, streams small
// tensors into outputs at every misalignment to 16 bytes, with extents that
// leave vector tails. A streamed output must equal the plain one bit for bit
// (the stores change where data goes, not what it is), and the inference and
// grad_input outputs must match the double reference. The backward kernel's
// plain outputs are checked against it by backward_test.cpp. (Elsewhere than
// x86 the kernels ignore the flag, and the test still holds.)
#include "bfloat16.h"
#include "float16.h"
#include "hbn_kernels.h"
#include "kernels.h"
#include "test_dtypes.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace {

using hbn::DType;
using namespace hbn_test;

// The kernels of one dtype, layout and threading variant.
hbn::internal::Kernels kernels_of(DType dtype, bool nchw, bool parallel) {
#define HBN_LAYOUT_KERNELS(type, layout, variant)                                                       \
    hbn::internal::Kernels {                                                                            \
        hbn_batch_norm_inference_##type##_##layout##_##variant, nullptr,                                \
            hbn_batch_norm_backward_##type##_##layout##_##variant,                                      \
            hbn_batch_norm_grad_input_##type##_##layout##_##variant                                     \
    }
#define HBN_KERNELS(type, enumerator)                                                                   \
    if (dtype == DType::enumerator) {                                                                   \
        if (nchw) {                                                                                     \
            return parallel ? HBN_LAYOUT_KERNELS(type, nchw, parallel) : HBN_LAYOUT_KERNELS(type, nchw, serial); \
        }                                                                                               \
        return parallel ? HBN_LAYOUT_KERNELS(type, nhwc, parallel) : HBN_LAYOUT_KERNELS(type, nhwc, serial); \
    }
    HBN_FOR_EACH_DATA_TYPE(HBN_KERNELS)
#undef HBN_KERNELS
#undef HBN_LAYOUT_KERNELS
    return {};
}

size_t element_bytes(DType dtype) {
    return dtype == DType::Float32 ? 4 : 2;
}

// A stored value of `dtype` (the bits at `at`), and back.
double load(DType dtype, const uint8_t *at) {
    switch (dtype) {
    case DType::Float16: { hbn::float16 v; std::memcpy(&v, at, 2); return static_cast<double>(v); }
    case DType::BFloat16: { hbn::bfloat16 v; std::memcpy(&v, at, 2); return static_cast<double>(v); }
    default: { float v; std::memcpy(&v, at, 4); return v; }
    }
}
void store(DType dtype, double value, uint8_t *at) {
    switch (dtype) {
    case DType::Float16: { const auto v = static_cast<hbn::float16>(value); std::memcpy(at, &v, 2); break; }
    case DType::BFloat16: { const hbn::bfloat16 v(value); std::memcpy(at, &v, 2); break; }
    default: { const auto v = static_cast<float>(value); std::memcpy(at, &v, 4); break; }
    }
}

// A dense data tensor, `misalignment` bytes past a 64-byte boundary, as the
// kernels take it: NCHW (HW, C, N), NHWC (C, N*HW).
struct Data {
    DType dtype;
    std::vector<uint8_t> storage;
    uint8_t *host;
    std::vector<halide_dimension_t> dims;
    halide_buffer_t buffer{};

    Data(DType dtype, bool nchw, int n, int c, int hw, size_t misalignment) : dtype(dtype) {
        const size_t count = size_t(n) * c * hw, bytes = element_bytes(dtype);
        storage.resize(count * bytes + 128);
        const auto address = reinterpret_cast<uintptr_t>(storage.data());
        host = storage.data() + (64 - address % 64) % 64 + misalignment;
        dims = nchw ? std::vector<halide_dimension_t>{{0, hw, 1}, {0, c, hw}, {0, n, c * hw}}
                    : std::vector<halide_dimension_t>{{0, c, 1}, {0, n * hw, c}};
        buffer.host = host;
        buffer.type = dtype == DType::Float32 ? halide_type_t(halide_type_float, 32)
                                                : halide_type_t(halide_type_uint, 16);
        buffer.dimensions = static_cast<int>(dims.size());
        buffer.dim = dims.data();
    }
    size_t count() const {
        return (storage.size() - 128) / element_bytes(dtype);
    }
    double operator[](size_t i) const {
        return load(dtype, host + i * element_bytes(dtype));
    }
    // The channel of element i.
    int channel(size_t i) const {
        return dims.size() == 3 ? static_cast<int>(i / dims[1].stride % dims[1].extent)
                                : static_cast<int>(i % dims[0].extent);
    }
};

// A per-channel input (float or double) or output (double).
template<typename T>
struct Channels {
    std::vector<T> values;
    halide_dimension_t dim;
    halide_buffer_t buffer{};
    explicit Channels(std::vector<T> v) : values(std::move(v)), dim{0, static_cast<int>(values.size()), 1} {
        buffer.host = reinterpret_cast<uint8_t *>(values.data());
        buffer.type = halide_type_t(halide_type_float, 8 * sizeof(T));
        buffer.dimensions = 1;
        buffer.dim = &dim;
    }
};

constexpr int batch = 3, channels = 37, spatial = 45;  // 37 and 45: vector tails in either layout
constexpr double eps = 1e-3;

// Each kernel call of a case writes its data outputs twice, plainly and
// streamed into buffers `misalignment` bytes past alignment, prefilled
// differently; the two must agree bit for bit. Returns the plain outputs.
template<typename Call>
std::vector<Data> expect_streamed_equals_plain(DType dtype, bool nchw, size_t misalignment, int outputs,
                                               const std::string &what, const Call &call) {
    std::vector<Data> plain, streamed;
    for (int k = 0; k < outputs; k++) {
        plain.emplace_back(dtype, nchw, batch, channels, spatial, misalignment);
        streamed.emplace_back(dtype, nchw, batch, channels, spatial, misalignment);
        std::fill(streamed.back().storage.begin(), streamed.back().storage.end(), 0xa5);  // not plain's zeros
    }
    EXPECT_EQ(call(false, plain), 0) << what;
    EXPECT_EQ(call(true, streamed), 0) << what;
    for (int k = 0; k < outputs; k++) {
        const size_t bytes = plain[k].count() * element_bytes(dtype);
        EXPECT_EQ(std::memcmp(plain[k].host, streamed[k].host, bytes), 0) << what << ", output " << k;
    }
    return plain;
}

// Expects `actual` within float32 arithmetic on terms of magnitude `terms`
// and one rounding to the dtype of `expected`.
bool close(DType dtype, double actual, double expected, double terms) {
    const double bound = 16 * unit_roundoff32 * terms + storage_rounding(dtype) * std::abs(expected) +
                         denormal_spacing(dtype);
    return std::abs(actual - expected) <= bound;
}

TEST(StreamingStores, MatchPlainStoresAndReferenceAtEveryAlignment) {
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> uniform(-2, 2), positive(0.25f, 3);
    auto random_channels = [&](auto &distribution) {
        std::vector<float> v(channels);
        for (float &value : v) {
            value = distribution(rng);
        }
        return v;
    };
    const std::vector<float> mean = random_channels(uniform), var = random_channels(positive),
                             weight = random_channels(uniform), bias = random_channels(uniform);
    std::vector<double> inv_std(channels), scale(channels), mean_dy(channels), slope(channels);
    for (int k = 0; k < channels; k++) {
        inv_std[k] = 1 / std::sqrt(double(var[k]) + eps);
        scale[k] = weight[k] * inv_std[k];
        mean_dy[k] = uniform(rng) / 4;
        slope[k] = uniform(rng) / 4;
    }
    Channels<float> mean_buffer(mean), var_buffer(var), weight_buffer(weight), bias_buffer(bias);
    Channels<double> inv_std_buffer(inv_std), scale_buffer(scale), mean_dy_buffer(mean_dy), slope_buffer(slope);
    for (DType dtype : all_dtypes) {
        for (bool nchw : {true, false}) {
            // x, and a second tensor: the residual, or dy; a third, y, the ReLU's mask.
            std::vector<Data> data;
            for (int k = 0; k < 3; k++) {
                data.emplace_back(dtype, nchw, batch, channels, spatial, 0);
                for (size_t i = 0; i < data[k].count(); i++) {
                    store(dtype, (k == 0 ? 3 : 1) * uniform(rng), data[k].host + i * element_bytes(dtype));
                }
            }
            const Data &x = data[0], &other = data[1], &y = data[2];
            for (bool parallel : {false, true}) {
                const hbn::internal::Kernels kernels = kernels_of(dtype, nchw, parallel);
                ASSERT_NE(kernels.inference, nullptr);
                for (size_t misalignment = 0; misalignment < 16; misalignment += element_bytes(dtype)) {
                    for (int flags = 0; flags < 8; flags++) {
                        const bool first = flags & 1, relu = flags & 2, in_double = flags & 4;
                        const std::string what = dtype_label(dtype) + (nchw ? " NCHW" : " NHWC") +
                                                 (parallel ? " parallel" : " serial") + ", outputs " +
                                                 std::to_string(misalignment) + " bytes past alignment, flags " +
                                                 std::to_string(flags);
                        auto buffer = [](const Data &d) { return const_cast<halide_buffer_t *>(&d.buffer); };
                        // Inference; `first`: add the residual.
                        const std::vector<Data> normalized = expect_streamed_equals_plain(
                            dtype, nchw, misalignment, 1, "inference " + what, [&](bool stream, std::vector<Data> &out) {
                                return kernels.inference(nullptr, buffer(x), buffer(other), first, relu,
                                                         &mean_buffer.buffer, &var_buffer.buffer, &weight_buffer.buffer,
                                                         &bias_buffer.buffer, eps, in_double, stream, &out[0].buffer);
                            });
                        // grad_input from given terms; `first` unused.
                        const std::vector<Data> grad_input = expect_streamed_equals_plain(
                            dtype, nchw, misalignment, 1, "grad_input " + what, [&](bool stream, std::vector<Data> &out) {
                                return kernels.grad_input(nullptr, buffer(x), buffer(other), buffer(y), relu,
                                                          &mean_buffer.buffer, &scale_buffer.buffer,
                                                          &mean_dy_buffer.buffer, &slope_buffer.buffer,
                                                          &inv_std_buffer.buffer, in_double, stream, &out[0].buffer);
                            });
                        // The backward: grad_input and grad_residual; `first`: training.
                        expect_streamed_equals_plain(
                            dtype, nchw, misalignment, 2, "backward " + what, [&](bool stream, std::vector<Data> &out) {
                                Channels<double> grad_weight{std::vector<double>(channels)},
                                    grad_bias{std::vector<double>(channels)};
                                return kernels.backward(nullptr, buffer(x), buffer(other), buffer(y), relu,
                                                        &mean_buffer.buffer, &inv_std_buffer.buffer,
                                                        &weight_buffer.buffer, first, in_double, stream, &out[0].buffer,
                                                        &grad_weight.buffer, &grad_bias.buffer, &out[1].buffer);
                            });
                        int mismatches = 0;
                        for (size_t i = 0; i < x.count() && mismatches < 5; i++) {
                            const int k = x.channel(i);
                            const double centered = (x[i] - mean[k]) * inv_std[k];
                            double z = centered * weight[k] + bias[k] + (first ? other[i] : 0);
                            z = relu ? std::max(z, 0.0) : z;
                            const double z_terms = std::abs(centered * weight[k]) + std::abs(bias[k]) +
                                                   (first ? std::abs(other[i]) : 0);
                            // The ReLU's gradient passes where y > 0 (y is never NaN here).
                            const double dy = relu && !(y[i] > 0) ? 0 : other[i];
                            const double dx = scale[k] * ((dy - mean_dy[k]) - centered * slope[k]);
                            const double dx_terms =
                                std::abs(scale[k]) * (std::abs(dy) + std::abs(mean_dy[k]) + std::abs(centered * slope[k]));
                            for (const auto &[name, actual, expected, terms] :
                                 {std::tuple{"inference", normalized[0][i], z, z_terms},
                                  std::tuple{"grad_input", grad_input[0][i], dx, dx_terms}}) {
                                if (!close(dtype, actual, expected, terms)) {
                                    ADD_FAILURE() << name << " " << what << ": element " << i << " is " << actual
                                                  << ", expected " << expected;
                                    mismatches++;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

}  // namespace
