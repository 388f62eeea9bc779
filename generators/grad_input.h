// The backward's elementwise pass, shared by batch_norm_backward (which forms
// its per-channel terms from its own sums) and batch_norm_grad_input (which is
// given terms formed from sums reduced across slices and processes).
#pragma once

#include "batch_norm_common.h"

namespace hbn_generators {

// What both backward pipelines take: `input` is x, grad_output dy (of x's
// type and layout), and `output` grad_input. Through a forward with the
// fused ReLU (`relu`), the gradient that reaches batch norm is dy masked by
// the forward's output y (forward_output); without it, the runtime passes
// grad_output again as forward_output, which is then not read.
template<typename T>
class GradientGenerator : public BatchNormGenerator<T> {
public:
    GeneratorInput<Buffer<>> grad_output{"grad_output"};
    GeneratorInput<Buffer<>> forward_output{"forward_output"};
    GeneratorInput<bool> relu{"relu"};

    void configure() {
        BatchNormGenerator<T>::configure();
        for (auto *data : {&grad_output, &forward_output}) {
            data->set_type(storage_type(this->data_type));
            data->set_dimensions(data_dimensions(this->layout));
        }
    }

protected:
    // The gradient at `at` with respect to batch norm's own output z, where
    // y = relu(z + residual): dy, masked by y when relu. `at`: Vars or Exprs.
    template<typename Args>
    Expr normalized_gradient(const Args &at) const {
        const Expr dy = this->load_float(grad_output(at));
        return select(relu, relu_gradient(dy, this->load_float(forward_output(at))), dy);
    }
    // The same as stored, the residual's gradient: dy's own bits, or zero's,
    // with no conversion.
    template<typename Args>
    Expr stored_normalized_gradient(const Args &at) const {
        const Expr dy = grad_output(at);
        return select(relu, relu_gradient(dy, this->load_float(forward_output(at))), dy);
    }

    void set_data_estimates() {
        BatchNormGenerator<T>::set_data_estimates();
        grad_output.set_estimates(this->data_estimates());
        forward_output.set_estimates(this->data_estimates());
        relu.set_estimate(true);  // see NormalizingGenerator::set_data_estimates
    }
};

// A training grad_input's per-channel terms, each in double and as float32:
// scale = weight * inv_std, mean_dy = sum(dy) / M and
// slope = sum(dy * xhat) / M, with inv_std.
struct GradInputTerms {
    ChannelTerm scale, mean_dy, slope, inv_std;

    // From a Func whose Tuple holds the four terms in double, then as float32.
    explicit GradInputTerms(const FuncRef &terms)
        : scale{terms[4], terms[0]}, mean_dy{terms[5], terms[1]}, slope{terms[6], terms[2]},
          inv_std{terms[7], terms[3]} {}
};

// The four terms in double, then as float32, for such a Func.
inline Tuple grad_input_terms(const Expr &scale, const Expr &mean_dy, const Expr &slope, const Expr &inv_std) {
    return Tuple(scale, mean_dy, slope, inv_std, cast<float>(scale), cast<float>(mean_dy), cast<float>(slope),
                 cast<float>(inv_std));
}

// Training: grad_input = scale * ((dy - mean_dy) - (x - mean) * inv_std * slope),
// with dy and x float32 values and `mean` channel c's float32 mean.
// For float32 data, dy - mean_dy is formed in double even on the float32
// path: with a large common offset in dy, a float32 mean_dy would lose the
// offset's last bits (dy = 1e3 + N(0, 1): 3e-5 in grad_input values of ~3). A
// float32 pair hi + lo does not survive compilation: Halide's simplifier, and
// LLVM under the fast-math flags Halide 14 sets, turn (dy - hi) - lo into
// dy - (hi + lo). 16-bit data (`centered_in_float`) keeps it in float32: its
// output's rounding (2^-11 or 2^-8) dwarfs that error, and the conversions would cost
// the compute-bound 16-bit passes.
inline BothPrecisions training_grad_input(const Expr &dy, const Expr &x, const Expr &mean, const GradInputTerms &t,
                                          bool centered_in_float) {
    const Expr f64 = t.scale.f64 * ((cast<double>(dy) - t.mean_dy.f64) -
                                    (cast<double>(x) - mean) * t.inv_std.f64 * t.slope.f64);
    const Expr centered_dy = centered_in_float ? dy - t.mean_dy.f32 : cast<float>(cast<double>(dy) - t.mean_dy.f64);
    const Expr f32 = t.scale.f32 * (centered_dy - (x - mean) * t.inv_std.f32 * t.slope.f32);
    return {f64, f32};
}

}  // namespace hbn_generators
