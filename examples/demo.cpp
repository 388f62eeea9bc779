// Runs MindSpore's documented batch_norm example in both modes on the CPU.
#include <hbn/batch_norm.h>

#include <cstdio>
#include <vector>

namespace {

void print(const char *label, const std::vector<float> &values) {
    std::printf("  %-13s [", label);
    for (size_t i = 0; i < values.size(); i++) {
        std::printf("%s%.7g", i ? ", " : "", values[i]);
    }
    std::printf("]\n");
}

void run(bool training) {
    std::vector<float> x = {1, 2, 3, 4};  // (N=2, C=2)
    std::vector<float> running_mean = {0.5f, 1.5f}, running_var = {0.1f, 0.2f};
    std::vector<float> weight = {2, 2}, bias = {-1, -1};
    std::vector<float> y(4);
    hbn::BatchNormOptions options;
    options.training = training;
    options.momentum = 0.1;
    options.eps = 1e-5;

    hbn::batch_norm({x.data(), hbn::DType::Float32, {2, 2}},
                    {running_mean.data(), hbn::DType::Float32, {2}},
                    {running_var.data(), hbn::DType::Float32, {2}},
                    {weight.data(), hbn::DType::Float32, {2}},
                    {bias.data(), hbn::DType::Float32, {2}},
                    {y.data(), hbn::DType::Float32, {2, 2}}, options);

    std::printf("%s:\n", training ? "training" : "inference");
    print("output", y);
    print("running_mean", running_mean);
    print("running_var", running_var);
}

}  // namespace

int main() {
    run(false);
    run(true);
    return 0;
}
