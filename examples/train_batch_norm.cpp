// Trains a batch-norm layer for a few steps: the forward in training mode, a
// squared-error loss against a target, the backward, and an SGD update of
// weight and bias. The target is an affine map of the input per channel,
// which the layer can fit exactly, so the loss falls towards zero.
// Exits with 1 if it does not fall.
#include <hbn/batch_norm.h>

#include <cstdio>
#include <random>
#include <vector>

int main() {
    const int64_t batch = 8, channels = 3, height = 5, width = 5;
    const int64_t count = batch * channels * height * width;
    const std::vector<int64_t> shape = {batch, channels, height, width};  // NCHW
    const auto per_channel = [&](float *data) { return hbn::Tensor{data, hbn::DType::Float32, {channels}}; };
    const auto data = [&](float *values) { return hbn::Tensor{values, hbn::DType::Float32, shape}; };

    // Input, and the target: 3 * x - 1 in channel 0, -x + 2 in channel 1,
    // 0.5 * x in channel 2.
    std::mt19937 rng(42);
    std::normal_distribution<float> normal(1.0f, 2.0f);
    std::vector<float> x(count), target(count);
    const float slope[] = {3, -1, 0.5f}, offset[] = {-1, 2, 0};
    for (int64_t i = 0; i < count; i++) {
        const int64_t c = i / (height * width) % channels;
        x[i] = normal(rng);
        target[i] = slope[c] * x[i] + offset[c];
    }

    std::vector<float> weight(channels, 1), bias(channels, 0);
    std::vector<float> running_mean(channels, 0), running_var(channels, 1);
    std::vector<float> y(count), grad_y(count), saved_mean(channels), saved_inv_std(channels);
    std::vector<float> grad_weight(channels), grad_bias(channels);
    hbn::BatchNormOptions options;
    options.training = true;
    const float learning_rate = 0.5f;

    double first_loss = 0, loss = 0;
    try {
        for (int step = 0; step < 10; step++) {
            hbn::batch_norm_training(data(x.data()), per_channel(running_mean.data()),
                                     per_channel(running_var.data()), per_channel(weight.data()),
                                     per_channel(bias.data()), data(y.data()), per_channel(saved_mean.data()),
                                     per_channel(saved_inv_std.data()), options);
            // loss = mean((y - target)^2) / 2, so grad_y = (y - target) / count.
            loss = 0;
            for (int64_t i = 0; i < count; i++) {
                const double error = y[i] - target[i];
                loss += error * error / (2 * count);
                grad_y[i] = static_cast<float>(error / count);
            }
            std::printf("step %d: loss %.6f\n", step, loss);
            first_loss = step == 0 ? loss : first_loss;
            // The layer's input is the network's input, so its gradient is
            // skipped (a default Tensor{}).
            hbn::batch_norm_backward(data(grad_y.data()), data(x.data()), per_channel(weight.data()),
                                     hbn::Tensor{}, hbn::Tensor{}, per_channel(saved_mean.data()),
                                     per_channel(saved_inv_std.data()), hbn::Tensor{},
                                     per_channel(grad_weight.data()), per_channel(grad_bias.data()), options);
            for (int64_t c = 0; c < channels; c++) {
                weight[c] -= learning_rate * grad_weight[c];
                bias[c] -= learning_rate * grad_bias[c];
            }
        }
    } catch (const hbn::Error &e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    const bool fell = loss < first_loss / 10;
    std::printf("loss %s: %.6f -> %.6f\n", fell ? "fell" : "did not fall", first_loss, loss);
    return fell ? 0 : 1;
}
