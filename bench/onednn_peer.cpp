// oneDNN 2.6 peer: batch_normalization_forward on plain nchw / nhwc memory.
#include "bench_case.h"

#include <oneapi/dnnl/dnnl.hpp>

#include <unordered_map>

namespace bench {
namespace {

struct OnednnRunner : Runner {
    dnnl::stream stream;
    dnnl::batch_normalization_forward primitive;
    std::unordered_map<int, dnnl::memory> args;
    std::vector<float> scale_shift;  // 2 x C: the weights, then the biases

    void run() override {
        primitive.execute(stream, args);
        stream.wait();
    }
};

}  // namespace

std::unique_ptr<Runner> make_onednn(const Case &c, Data &d) {
    using dnnl::memory;
    static dnnl::engine engine(dnnl::engine::kind::cpu, 0);

    const memory::format_tag tag = c.dims.size() == 2               ? memory::format_tag::nc
                                   : c.layout == hbn::Layout::NCHW ? memory::format_tag::nchw
                                                                   : memory::format_tag::nhwc;
    const memory::desc md(c.dims,
                          c.dtype == hbn::DType::Float16 ? memory::data_type::f16
                                                         : memory::data_type::f32,
                          tag);
    const bool training = c.mode == Mode::Training;
    auto flags = dnnl::normalization_flags::use_scale_shift;
    if (!training) flags |= dnnl::normalization_flags::use_global_stats;
    const dnnl::batch_normalization_forward::desc desc(
        training ? dnnl::prop_kind::forward_training : dnnl::prop_kind::forward_inference, md,
        static_cast<float>(kEps), flags);
    const dnnl::batch_normalization_forward::primitive_desc pd(desc, engine,
                                                                /*allow_empty=*/true);
    if (!pd)
        throw Unavailable("oneDNN " + std::to_string(dnnl::version()->major) + "." +
                          std::to_string(dnnl::version()->minor) + " has no " + c.dtype_name() +
                          " batch normalization for this CPU");

    auto r = std::make_unique<OnednnRunner>();
    r->label = pd.impl_info_str();
    r->stream = dnnl::stream(engine);
    r->primitive = dnnl::batch_normalization_forward(pd);
    r->scale_shift = d.weight;
    r->scale_shift.insert(r->scale_shift.end(), d.bias.begin(), d.bias.end());
    // Inference reads the running statistics; training writes the batch ones.
    float *mean = training ? d.saved_mean.data() : d.running_mean.data();
    float *var = training ? d.saved_var.data() : d.running_var.data();
    r->args = {{DNNL_ARG_SRC, memory(md, engine, d.x.get())},
               {DNNL_ARG_DST, memory(md, engine, d.y.get())},
               {DNNL_ARG_MEAN, memory(pd.mean_desc(), engine, mean)},
               {DNNL_ARG_VARIANCE, memory(pd.variance_desc(), engine, var)},
               {DNNL_ARG_SCALE_SHIFT, memory(pd.weights_desc(), engine, r->scale_shift.data())}};
    return r;
}

}  // namespace bench
