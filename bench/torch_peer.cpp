// libtorch peer: ATen's CPU batch norm over tensors that wrap the case's buffers
// (channels_last strides for NHWC). at::native_batch_norm_out is the kernel
// at::batch_norm calls, writing into our output: at::batch_norm would allocate
// (and page-fault) a fresh output tensor on every call.
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

struct TorchRunner : Runner {
    at::Tensor x, y, weight, bias, running_mean, running_var, save_mean, save_invstd;
    bool training = false;

    void run() override {
        at::native_batch_norm_out(y, save_mean, save_invstd, x, weight, bias, running_mean,
                                  running_var, training, kMomentum, kEps);
    }
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
    r->save_mean = at::empty({c.channels()}, at::kFloat);
    r->save_invstd = at::empty({c.channels()}, at::kFloat);

    // Probe the dtype and layout on a small tensor first: an unsupported dtype
    // is "unavailable", not a failure.
    Case small = c;
    small.dims = c.dims.size() == 2 ? std::vector<int64_t>{2, 2} : std::vector<int64_t>{2, 2, 2, 2};
    std::vector<float> xs(8 * 4, 1.0f), ys(8 * 4), p = {1, 1};
    try {
        at::Tensor sm = at::empty({2}, at::kFloat), si = at::empty({2}, at::kFloat);
        at::Tensor px = wrap(xs.data(), small), py = wrap(ys.data(), small);
        at::Tensor pp = wrap_param(p), rm = pp.clone(), rv = pp.clone();
        at::native_batch_norm_out(py, sm, si, px, pp, pp, rm, rv, r->training, kMomentum, kEps);
    } catch (const c10::Error &e) {
        throw Unavailable("libtorch " + std::string(TORCH_VERSION) + ": " +
                          first_line(e.what_without_backtrace()));
    }
    r->label = "at::native_batch_norm_out";
    return r;
}

}  // namespace bench
