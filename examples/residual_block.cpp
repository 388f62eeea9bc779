// The tail of a ResNet block, y = relu(bn(x) + identity), in one fused pass
// each way: the training forward with the residual add and the ReLU, and the
// backward through them, which takes the forward's output as the ReLU's mask
// and also returns the identity branch's gradient. Checks both against the
// same block run unfused (plain batch norm, then the add and the ReLU by
// hand) and exits with 1 if they differ.
#include <hbn/batch_norm.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
    const int64_t batch = 4, channels = 8, height = 6, width = 6;
    const int64_t count = batch * channels * height * width;
    const std::vector<int64_t> shape = {batch, channels, height, width};  // NCHW
    const auto data = [&](float *values) { return hbn::Tensor{values, hbn::DType::Float32, shape}; };
    const auto per_channel = [&](float *values) { return hbn::Tensor{values, hbn::DType::Float32, {channels}}; };

    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(count), identity(count), grad_y(count);
    for (int64_t i = 0; i < count; i++) {
        x[i] = 2 * normal(rng) + 1;
        identity[i] = normal(rng);
        grad_y[i] = normal(rng);
    }
    std::vector<float> weight(channels, 1.5f), bias(channels, 0.25f);
    std::vector<float> running_mean(channels, 0), running_var(channels, 1), saved_mean(channels),
        saved_inv_std(channels);
    std::vector<float> y(count), grad_x(count), grad_identity(count), grad_weight(channels), grad_bias(channels);

    // Unfused: plain batch norm, the add and the ReLU by hand, the ReLU's
    // gradient by hand, then the plain backward.
    std::vector<float> unfused_y(count), masked(count), unfused_grad_x(count), unfused_grad_weight(channels),
        unfused_grad_bias(channels), unfused_mean(channels), unfused_inv_std(channels);
    std::vector<float> unfused_running_mean = running_mean, unfused_running_var = running_var;

    hbn::BatchNormOptions options;
    options.training = true;
    try {
        hbn::batch_norm_training(data(x.data()), per_channel(unfused_running_mean.data()),
                                 per_channel(unfused_running_var.data()), per_channel(weight.data()),
                                 per_channel(bias.data()), data(unfused_y.data()), per_channel(unfused_mean.data()),
                                 per_channel(unfused_inv_std.data()), options);
        for (int64_t i = 0; i < count; i++) {
            unfused_y[i] = std::max(unfused_y[i] + identity[i], 0.0f);
            masked[i] = unfused_y[i] > 0 ? grad_y[i] : 0;
        }
        hbn::batch_norm_backward(data(masked.data()), data(x.data()), per_channel(weight.data()), {}, {},
                                 per_channel(unfused_mean.data()), per_channel(unfused_inv_std.data()),
                                 data(unfused_grad_x.data()), per_channel(unfused_grad_weight.data()),
                                 per_channel(unfused_grad_bias.data()), options);

        // Fused: the same options name the epilogue for both directions.
        options.activation = hbn::Activation::ReLU;
        options.residual = data(identity.data());            // read by the forward
        options.forward_output = data(y.data());             // the backward's ReLU mask
        options.grad_residual = data(grad_identity.data());  // written by the backward
        hbn::batch_norm_training(data(x.data()), per_channel(running_mean.data()), per_channel(running_var.data()),
                                 per_channel(weight.data()), per_channel(bias.data()), data(y.data()),
                                 per_channel(saved_mean.data()), per_channel(saved_inv_std.data()), options);
        hbn::batch_norm_backward(data(grad_y.data()), data(x.data()), per_channel(weight.data()), {}, {},
                                 per_channel(saved_mean.data()), per_channel(saved_inv_std.data()),
                                 data(grad_x.data()), per_channel(grad_weight.data()), per_channel(grad_bias.data()),
                                 options);
    } catch (const hbn::Error &e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }

    // The unfused output was rounded to float32 before the add, the fused one
    // only after it: they agree to a few float32 roundings.
    const auto largest_difference = [](const std::vector<float> &a, const std::vector<float> &b) {
        double largest = 0;
        for (size_t i = 0; i < a.size(); i++) {
            largest = std::max(largest, static_cast<double>(std::abs(a[i] - b[i])));
        }
        return largest;
    };
    const double y_difference = largest_difference(y, unfused_y);
    const double grad_x_difference = largest_difference(grad_x, unfused_grad_x);
    const double grad_identity_difference = largest_difference(grad_identity, masked);
    const double grad_weight_difference = largest_difference(grad_weight, unfused_grad_weight);
    const int64_t zeros = std::count(y.begin(), y.end(), 0.0f);
    std::printf("fused vs unfused, largest difference: y %.2g, grad_x %.2g, grad_identity %.2g, grad_weight %.2g\n",
                y_difference, grad_x_difference, grad_identity_difference, grad_weight_difference);
    std::printf("the ReLU zeroed %lld of %lld outputs\n", static_cast<long long>(zeros),
                static_cast<long long>(count));
    const bool same = y_difference < 1e-5 && grad_x_difference < 1e-4 && grad_identity_difference < 1e-5 &&
                      grad_weight_difference < 1e-3;
    std::printf(same ? "fused block matches\n" : "fused block differs\n");
    return same ? 0 : 1;
}
