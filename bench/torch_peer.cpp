// libtorch peer: at::batch_norm, and at::native_batch_norm_backward (all
// three gradients), on tensors that wrap the case's buffers (channels_last
// strides for NHWC). Each returns new output tensors on every call (libtorch
// 1.13 has no CPU kernel for native_batch_norm.out, and
// native_batch_norm_backward.out is the functional call plus a copy); main()
// keeps freed memory mapped so that these allocations do not page-fault.
#include "bench_case.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/version.h>

#include <array>

namespace bench {
namespace {

at::ScalarType scalar_type(hbn::DType t) {
    switch (t) {
    case hbn::DType::Float16: return at::kHalf;
    case hbn::DType::BFloat16: return at::kBFloat16;
    default: return at::kFloat;
    }
}

// A tensor of logical sizes c.dims over data laid out as the case says.
at::Tensor wrap(void *data, const Case &c) {
    const std::vector<int64_t> &sizes = c.dims;
    std::vector<int64_t> strides(sizes.size());
    int64_t s = 1;
    if (c.layout == hbn::Layout::NCHW) {
        for (size_t i = sizes.size(); i-- > 0;) strides[i] = s, s *= sizes[i];
    } else {
        strides[1] = 1, s = sizes[1];
        for (size_t i = sizes.size(); i-- > 2;) strides[i] = s, s *= sizes[i];
        strides[0] = s;
    }
    return at::from_blob(data, sizes, strides, at::TensorOptions().dtype(scalar_type(c.dtype)));
}

at::Tensor wrap_param(std::vector<float> &v) {
    return at::from_blob(v.data(), {static_cast<int64_t>(v.size())}, at::kFloat);
}

// One call's arguments, and its outputs: {y} (forward) or
// {dx, grad_weight, grad_bias} (backward).
struct Args {
    Pass pass = Pass::Forward;
    bool training = false;
    at::Tensor x, dy, weight, bias, running_mean, running_var, save_mean, save_invstd;
};
using Outputs = std::array<at::Tensor, 3>;

Outputs call(const Args &a) {
    if (a.pass == Pass::Forward)
        return {at::batch_norm(a.x, a.weight, a.bias, a.running_mean, a.running_var, a.training,
                               kMomentum, kEps, /*cudnn_enabled=*/false)};
    // Both pairs of statistics, as autograd passes them; the mode reads one.
    auto g = at::native_batch_norm_backward(a.dy, a.x, a.weight, a.running_mean, a.running_var,
                                            a.save_mean, a.save_invstd, a.training, kEps,
                                            {true, true, true});
    return {std::get<0>(g), std::get<1>(g), std::get<2>(g)};
}

struct TorchRunner : Runner {
    Args args;
    Outputs out, dest;  // dest: the Data buffers that finish() copies out into

    void run() override {
        out = {};  // free the last outputs first, so that this call reuses their memory
        out = call(args);
    }
    void finish() override {
        for (size_t i = 0; i < out.size(); ++i)
            if (dest[i].defined()) dest[i].copy_(out[i]);
    }
};

std::string first_line(const std::string &s) { return s.substr(0, s.find('\n')); }

}  // namespace

void init_torch(int threads) { at::set_num_threads(threads); }

std::unique_ptr<Runner> make_torch(const Case &c, Data &d) {
    auto r = std::make_unique<TorchRunner>();
    Args &a = r->args;
    a.pass = c.pass;
    a.training = c.mode == Mode::Training;
    a.x = wrap(d.x.get(), c);
    a.weight = wrap_param(d.weight);
    a.bias = wrap_param(d.bias);
    a.running_mean = wrap_param(d.running_mean);
    a.running_var = wrap_param(d.running_var);
    r->dest[0] = wrap(d.y.get(), c);
    if (c.pass == Pass::Backward) {
        a.dy = wrap(d.dy.get(), c);
        a.save_mean = wrap_param(d.batch_mean);
        a.save_invstd = wrap_param(d.batch_inv_std);
        r->dest[1] = wrap_param(d.grad_weight);
        r->dest[2] = wrap_param(d.grad_bias);
    }

    // Probe the dtype and layout on a small tensor first: an unsupported dtype
    // is "unavailable", not a failure.
    Case small = c;
    small.dims = c.dims.size() == 2 ? std::vector<int64_t>{2, 2} : std::vector<int64_t>{2, 2, 2, 2};
    std::vector<float> xs(16, 1.0f), p = {1, 1};  // enough bytes for 16 elements of any dtype
    try {
        Args probe = a;
        at::Tensor pp = wrap_param(p);
        probe.x = probe.dy = wrap(xs.data(), small);
        probe.weight = probe.bias = probe.save_mean = probe.save_invstd = pp;
        probe.running_mean = pp.clone(), probe.running_var = pp.clone();
        call(probe);
    } catch (const c10::Error &e) {
        throw Unavailable("libtorch " + std::string(TORCH_VERSION) + ": " +
                          first_line(e.what_without_backtrace()));
    }
    r->label = c.pass == Pass::Forward ? "at::batch_norm" : "at::native_batch_norm_backward";
    return r;
}

}  // namespace bench
