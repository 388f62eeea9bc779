// What every implementation in the benchmark shares: the case, its buffers,
// and the interface of one implementation prepared for one case.
#pragma once

#include <hbn/batch_norm.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace bench {

// The inputs' values: uniform in [lo, hi), from a splitmix64 stream, the
// same on every machine.
inline uint64_t splitmix(uint64_t &s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
inline float uniform(uint64_t &s, float lo, float hi) {
    return lo + (hi - lo) * static_cast<float>(splitmix(s) >> 40) * 0x1p-24f;
}

// ---- Data types ----
// The dtypes benchmarked, in the order of the cases, and what each is:
// its name in the benchmarks' names, its bytes per element (float16 and
// bfloat16 cases have the same sizes, so the same bytes), and the relative
// tolerance of hbn_bench's output check: a few of the dtype's roundings
// (float16 keeps 11 significant bits, rounding by up to 2^-11 relative;
// bfloat16 8, up to 2^-8; the results are computed in float32 or better).
struct DTypeInfo {
    hbn::DType dtype;
    const char *name;
    int64_t bytes;
    double tolerance;
};
inline constexpr DTypeInfo kDTypes[] = {
    {hbn::DType::Float32, "float32", 4, 1e-4},
    {hbn::DType::Float16, "float16", 2, 4e-3},
    {hbn::DType::BFloat16, "bfloat16", 2, 0x1p-7},
};
inline const DTypeInfo &dtype_info(hbn::DType dtype) {
    for (const DTypeInfo &info : kDTypes)
        if (info.dtype == dtype) return info;
    throw std::invalid_argument("bench: unknown hbn::DType " +
                                std::to_string(static_cast<int>(dtype)));
}

constexpr double kMomentum = 0.1;
constexpr double kEps = 1e-5;

// The forward (hbn::batch_norm) or its backward (hbn::batch_norm_backward),
// each in either mode.
enum class Pass { Forward, Backward };
enum class Mode { Inference, Training };
// The fused epilogue (BatchNormOptions::activation and residual): none, ReLU,
// or a residual added then ReLU. Its backward reads the forward's output as
// the ReLU's mask, and add_relu's writes grad_residual too.
enum class Epilogue { None, Relu, AddRelu };

struct Case {
    Pass pass;
    Mode mode;
    Epilogue epilogue;
    hbn::DType dtype;
    hbn::Layout layout;
    std::string size;           // tiny | mid | large
    std::vector<int64_t> dims;  // logical: N, C, spatial... (NCHW order)

    int64_t channels() const { return dims[1]; }
    int64_t elements() const {
        int64_t n = 1;
        for (int64_t d : dims) n *= d;
        return n;
    }
    int64_t element_bytes() const { return dtype_info(dtype).bytes; }
    int64_t tensor_bytes() const { return elements() * element_bytes(); }
    bool relu() const { return epilogue != Epilogue::None; }
    bool add() const { return epilogue == Epilogue::AddRelu; }
    // What every implementation is credited with per call, the least any of
    // them must move, in tensors: x read and y written (forward), plus the
    // residual read (add_relu); x and dy read and dx written (backward), plus
    // the forward's output read (the ReLU's mask) and grad_residual written
    // (add_relu).
    int64_t tensors_moved() const {
        return pass == Pass::Forward ? 2 + add() : 3 + relu() + add();
    }
    int64_t bytes_moved() const { return tensors_moved() * tensor_bytes(); }

    // The dense shape in memory order: (N, C, H, W) or (N, H, W, C).
    std::vector<int64_t> shape() const {
        if (layout == hbn::Layout::NCHW) return dims;
        std::vector<int64_t> s = {dims[0]};
        s.insert(s.end(), dims.begin() + 2, dims.end());
        s.push_back(dims[1]);
        return s;
    }
    // Element offset of (n, c, s), s being the flat spatial index.
    int64_t offset(int64_t n, int64_t c, int64_t s) const {
        const int64_t C = channels(), S = elements() / dims[0] / C;
        return layout == hbn::Layout::NCHW ? (n * C + c) * S + s : (n * S + s) * C + c;
    }
    // The channel of the element at offset i.
    int64_t channel_of(int64_t i) const {
        const int64_t C = channels(), S = elements() / dims[0] / C;
        return layout == hbn::Layout::NCHW ? i / S % C : i % C;
    }

    // inference, training, backward_inference, backward_training, each
    // followed by the epilogue's _relu or _add_relu, if any.
    std::string mode_name() const {
        static const char *const suffix[] = {"", "_relu", "_add_relu"};
        return std::string(pass == Pass::Backward ? "backward_" : "") +
               (mode == Mode::Training ? "training" : "inference") +
               suffix[static_cast<int>(epilogue)];
    }
    std::string dtype_name() const { return dtype_info(dtype).name; }
    std::string layout_name() const { return layout == hbn::Layout::NHWC ? "nhwc" : "nchw"; }
    // Cases that differ only in pass, mode and epilogue share their buffers.
    std::string data_key() const { return dtype_name() + "/" + layout_name() + "/" + size; }
    std::string name() const { return mode_name() + "/" + data_key(); }
};

struct FreeDeleter {
    void operator()(void *p) const { std::free(p); }
};
using Buffer = std::unique_ptr<void, FreeDeleter>;

// x (random) and y, dense in the case's layout; parameters and statistics are
// float32 of shape {C}. Training runs update running_mean and running_var.
// The backward reads x and dy (random) and writes its grad_input into y (as
// dx; forward and backward cases never run at once) and grad_weight and
// grad_bias; dy and what follows it are set up by the first backward case.
struct Data {
    Buffer x, y;
    std::vector<float> running_mean, running_var, weight, bias;
    std::vector<float> saved_mean, saved_var;  // forward training outputs, where an API has them
    Buffer dy;
    std::vector<float> grad_weight, grad_bias;
    // x's biased batch statistics, computed on the host in double: the
    // forward's saved_mean and saved_inv_std that training's backward reads,
    // and batch_var = 1 / batch_inv_std^2 - eps, the form oneDNN takes.
    std::vector<float> batch_mean, batch_inv_std, batch_var;
    // The epilogue's, each set up by the first case that needs it: the
    // forward's residual (random); the backward's forward_output (the fused
    // forward's y on x's batch statistics, computed on the host: the ReLU's
    // mask), for the epilogue forward_output_of; grad_residual, written by
    // add_relu's backward (and hbn_unfused's masked dy in both).
    Buffer residual, forward_output, grad_residual;
    Epilogue forward_output_of = Epilogue::None;
};

// One implementation prepared for one case: run() is one call of the case's
// pass; finish() leaves the last call's outputs in Data (y, and the backward's
// grad_weight, grad_bias and grad_residual), for the check. label, if set, is
// reported with the result (e.g. oneDNN's implementation).
struct Runner {
    virtual ~Runner() = default;
    virtual void run() = 0;
    virtual void finish() {}
    std::string label;
};

// Thrown while preparing a peer that cannot run the case at all.
struct Unavailable : std::runtime_error {
    using std::runtime_error::runtime_error;
};

std::unique_ptr<Runner> make_onednn(const Case &c, Data &d);
// hbn_unfused's separate pass of the case's epilogue (oneDNN eltwise and
// binary primitives).
std::unique_ptr<Runner> make_onednn_epilogue(const Case &c, Data &d);
std::unique_ptr<Runner> make_torch(const Case &c, Data &d);
void init_torch(int threads);

}  // namespace bench
