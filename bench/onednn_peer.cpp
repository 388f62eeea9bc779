// oneDNN 2.6 peer on plain nchw / nhwc memory: batch_normalization_forward,
// and batch_normalization_backward (prop_kind::backward: diff_src,
// diff_scale and diff_shift), with use_scale | use_shift (and
// use_global_stats in inference). Data in the case's dtype (f32, f16, bf16);
// statistics, scale and shift float32. oneDNN 2.6 has bf16 batch
// normalization on CPUs with avx512_core, and f16 on none: where it has no
// implementation for the case, the case is unavailable.
#include "bench_case.h"

#include <oneapi/dnnl/dnnl.hpp>

#include <unordered_map>

namespace bench {
namespace {

struct OnednnRunner : Runner {
    dnnl::stream stream;
    dnnl::primitive primitive;
    std::unordered_map<int, dnnl::memory> args;

    void run() override {
        primitive.execute(stream, args);
        stream.wait();
    }
};

dnnl::memory::data_type data_type(hbn::DType dtype) {
    switch (dtype) {
    case hbn::DType::Float16: return dnnl::memory::data_type::f16;
    case hbn::DType::BFloat16: return dnnl::memory::data_type::bf16;
    default: return dnnl::memory::data_type::f32;
    }
}

Unavailable unavailable(const Case &c, const char *what) {
    return Unavailable("oneDNN " + std::to_string(dnnl::version()->major) + "." +
                       std::to_string(dnnl::version()->minor) + " has no " + c.dtype_name() + " " +
                       what + " for this CPU");
}

}  // namespace

std::unique_ptr<Runner> make_onednn(const Case &c, Data &d) {
    using dnnl::memory;
    static dnnl::engine engine(dnnl::engine::kind::cpu, 0);

    const memory::format_tag tag = c.dims.size() == 2               ? memory::format_tag::nc
                                   : c.layout == hbn::Layout::NCHW ? memory::format_tag::nchw
                                                                   : memory::format_tag::nhwc;
    const memory::desc md(c.dims, data_type(c.dtype), tag);
    const bool training = c.mode == Mode::Training, backward = c.pass == Pass::Backward;
    auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
    if (!training) flags |= dnnl::normalization_flags::use_global_stats;
    // The forward, or the backward's hint: a forward_training of the same flags.
    const dnnl::batch_normalization_forward::desc fwd_desc(
        training || backward ? dnnl::prop_kind::forward_training
                             : dnnl::prop_kind::forward_inference,
        md, static_cast<float>(kEps), flags);
    const dnnl::batch_normalization_forward::primitive_desc fwd(fwd_desc, engine,
                                                                 /*allow_empty=*/true);
    if (!fwd) throw unavailable(c, "batch normalization");

    auto r = std::make_unique<OnednnRunner>();
    r->stream = dnnl::stream(engine);
    auto wrap = [&](const memory::desc &m, void *p) { return memory(m, engine, p); };
    if (!backward) {
        r->label = fwd.impl_info_str();
        r->primitive = dnnl::batch_normalization_forward(fwd);
        // Inference reads the running statistics; training writes the batch ones.
        float *mean = training ? d.saved_mean.data() : d.running_mean.data();
        float *var = training ? d.saved_var.data() : d.running_var.data();
        r->args = {{DNNL_ARG_SRC, wrap(md, d.x.get())},
                   {DNNL_ARG_DST, wrap(md, d.y.get())},
                   {DNNL_ARG_MEAN, wrap(fwd.mean_desc(), mean)},
                   {DNNL_ARG_VARIANCE, wrap(fwd.variance_desc(), var)},
                   {DNNL_ARG_SCALE, wrap(fwd.weights_desc(), d.weight.data())},
                   {DNNL_ARG_SHIFT, wrap(fwd.weights_desc(), d.bias.data())}};
        return r;
    }

    const dnnl::batch_normalization_backward::desc bwd_desc(
        dnnl::prop_kind::backward, /*diff_data_desc=*/md, /*data_desc=*/md,
        static_cast<float>(kEps), flags);
    const dnnl::batch_normalization_backward::primitive_desc bwd(bwd_desc, engine, fwd,
                                                                  /*allow_empty=*/true);
    if (!bwd) throw unavailable(c, "batch normalization backward");
    r->label = bwd.impl_info_str();
    r->primitive = dnnl::batch_normalization_backward(bwd);
    // Training: the batch statistics (variance, not inv_std; converted on
    // the host once); inference: the running ones.
    float *mean = training ? d.batch_mean.data() : d.running_mean.data();
    float *var = training ? d.batch_var.data() : d.running_var.data();
    r->args = {{DNNL_ARG_SRC, wrap(md, d.x.get())},
               {DNNL_ARG_DIFF_DST, wrap(md, d.dy.get())},
               {DNNL_ARG_MEAN, wrap(bwd.mean_desc(), mean)},
               {DNNL_ARG_VARIANCE, wrap(bwd.variance_desc(), var)},
               {DNNL_ARG_SCALE, wrap(bwd.weights_desc(), d.weight.data())},
               {DNNL_ARG_SHIFT, wrap(bwd.weights_desc(), d.bias.data())},
               {DNNL_ARG_DIFF_SRC, wrap(md, d.y.get())},
               {DNNL_ARG_DIFF_SCALE, wrap(bwd.diff_weights_desc(), d.grad_weight.data())},
               {DNNL_ARG_DIFF_SHIFT, wrap(bwd.diff_weights_desc(), d.grad_bias.data())}};
    return r;
}

}  // namespace bench
