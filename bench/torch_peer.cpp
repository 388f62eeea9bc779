// libtorch peer: at::batch_norm on tensors that wrap the case's buffers
// (channels_last strides for NHWC). It returns a new output tensor on every
// call (libtorch 1.13 has no CPU kernel for native_batch_norm.out); main()
// keeps freed memory mapped so that this allocation does not page-fault.
#include "bench_case.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/version.h>

namespace bench {
namespace {

at::ScalarType scalar_type(hbn::DType t) {
    return t == hbn::DType::Float16 ? at::kHalf : at::kFloat;
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

at::Tensor batch_norm(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &bias,
                      const at::Tensor &running_mean, const at::Tensor &running_var,
                      bool training) {
    return at::batch_norm(x, weight, bias, running_mean, running_var, training, kMomentum, kEps,
                          /*cudnn_enabled=*/false);
}

struct TorchRunner : Runner {
    at::Tensor x, y, out, weight, bias, running_mean, running_var;
    bool training = false;

    void run() override {
        out.reset();  // free the last output first, so that this call reuses its memory
        out = batch_norm(x, weight, bias, running_mean, running_var, training);
    }
    void finish() override { y.copy_(out); }
};

std::string first_line(const std::string &s) { return s.substr(0, s.find('\n')); }

}  // namespace

void init_torch(int threads) { at::set_num_threads(threads); }

std::unique_ptr<Runner> make_torch(const Case &c, Data &d) {
    auto r = std::make_unique<TorchRunner>();
    r->training = c.mode == Mode::Training;
    r->x = wrap(d.x.get(), c);
    r->y = wrap(d.y.get(), c);
    r->weight = wrap_param(d.weight);
    r->bias = wrap_param(d.bias);
    r->running_mean = wrap_param(d.running_mean);
    r->running_var = wrap_param(d.running_var);

    // Probe the dtype and layout on a small tensor first: an unsupported dtype
    // is "unavailable", not a failure.
    Case small = c;
    small.dims = c.dims.size() == 2 ? std::vector<int64_t>{2, 2} : std::vector<int64_t>{2, 2, 2, 2};
    std::vector<float> xs(16, 1.0f), p = {1, 1};  // enough bytes for 16 float16 or float32
    try {
        at::Tensor pp = wrap_param(p);
        batch_norm(wrap(xs.data(), small), pp, pp, pp.clone(), pp.clone(), r->training);
    } catch (const c10::Error &e) {
        throw Unavailable("libtorch " + std::string(TORCH_VERSION) + ": " +
                          first_line(e.what_without_backtrace()));
    }
    r->label = "at::batch_norm";
    return r;
}

}  // namespace bench
