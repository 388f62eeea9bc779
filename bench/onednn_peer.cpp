// oneDNN 2.6 peer on plain nchw / nhwc memory: batch_normalization_forward,
// and batch_normalization_backward (prop_kind::backward: diff_src,
// diff_scale and diff_shift), with use_scale | use_shift (and
// use_global_stats in inference), and fuse_norm_relu for the ReLU epilogue
// (oneDNN 2.6 has no fuse_norm_add_relu: add_relu cases are unavailable).
// Data in the case's dtype (f32, f16, bf16); statistics, scale and shift
// float32. oneDNN 2.6 has bf16 batch normalization on CPUs with avx512_core,
// and f16 on none: where it has no implementation for the case, the case is
// unavailable.
//
// Also hbn_unfused's separate elementwise pass (make_onednn_epilogue), with
// eltwise and binary primitives in the case's dtype.
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

std::string version() {
    return "oneDNN " + std::to_string(dnnl::version()->major) + "." +
           std::to_string(dnnl::version()->minor);
}

Unavailable unavailable(const Case &c, const char *what) {
    return Unavailable(version() + " has no " + c.dtype_name() + " " + what + " for this CPU");
}

dnnl::engine &engine() {
    static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
    return engine;
}

// The case's data tensors, dense in its layout.
dnnl::memory::desc data_desc(const Case &c) {
    using tag = dnnl::memory::format_tag;
    return {c.dims, data_type(c.dtype),
            c.dims.size() == 2 ? tag::nc : c.layout == hbn::Layout::NCHW ? tag::nchw : tag::nhwc};
}

dnnl::memory wrap(const dnnl::memory::desc &m, void *p) { return dnnl::memory(m, engine(), p); }

}  // namespace

std::unique_ptr<Runner> make_onednn(const Case &c, Data &d) {
    using dnnl::memory;
    if (c.add())
        throw Unavailable(version() + " has no fuse_norm_add_relu (batch normalization fused "
                          "with add and ReLU)");
    const memory::desc md = data_desc(c);
    const bool training = c.mode == Mode::Training, backward = c.pass == Pass::Backward;
    auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
    if (!training) flags |= dnnl::normalization_flags::use_global_stats;
    if (c.relu()) flags |= dnnl::normalization_flags::fuse_norm_relu;
    // The forward, or the backward's hint: a forward_training of the same flags.
    const dnnl::batch_normalization_forward::desc fwd_desc(
        training || backward ? dnnl::prop_kind::forward_training
                             : dnnl::prop_kind::forward_inference,
        md, static_cast<float>(kEps), flags);
    const dnnl::batch_normalization_forward::primitive_desc fwd(fwd_desc, engine(),
                                                                 /*allow_empty=*/true);
    if (!fwd) throw unavailable(c, c.relu() ? "batch normalization with fuse_norm_relu"
                                            : "batch normalization");

    auto r = std::make_unique<OnednnRunner>();
    r->stream = dnnl::stream(engine());
    // Inference reads the running statistics; training writes the batch ones.
    float *fwd_mean = training ? d.saved_mean.data() : d.running_mean.data();
    float *fwd_var = training ? d.saved_var.data() : d.running_var.data();
    std::unordered_map<int, memory> fwd_args = {
        {DNNL_ARG_SRC, wrap(md, d.x.get())},
        {DNNL_ARG_DST, wrap(md, d.y.get())},
        {DNNL_ARG_MEAN, wrap(fwd.mean_desc(), fwd_mean)},
        {DNNL_ARG_VARIANCE, wrap(fwd.variance_desc(), fwd_var)},
        {DNNL_ARG_SCALE, wrap(fwd.weights_desc(), d.weight.data())},
        {DNNL_ARG_SHIFT, wrap(fwd.weights_desc(), d.bias.data())}};
    // fuse_norm_relu in training: the forward writes the ReLU's mask, which
    // the backward reads.
    if (fwd.workspace_desc().get_size() != 0)
        fwd_args[DNNL_ARG_WORKSPACE] = memory(fwd.workspace_desc(), engine());
    if (!backward) {
        r->label = fwd.impl_info_str();
        r->primitive = dnnl::batch_normalization_forward(fwd);
        r->args = fwd_args;
        return r;
    }

    const dnnl::batch_normalization_backward::desc bwd_desc(
        dnnl::prop_kind::backward, /*diff_data_desc=*/md, /*data_desc=*/md,
        static_cast<float>(kEps), flags);
    const dnnl::batch_normalization_backward::primitive_desc bwd(bwd_desc, engine(), fwd,
                                                                  /*allow_empty=*/true);
    if (!bwd) throw unavailable(c, c.relu() ? "batch normalization backward with fuse_norm_relu"
                                            : "batch normalization backward");
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
    // The backward of fuse_norm_relu reads the forward's mask: run the forward
    // once here (its y and statistics are scratch, overwritten before the
    // timed calls) for it.
    if (c.relu()) {
        dnnl::batch_normalization_forward(fwd).execute(r->stream, fwd_args);
        r->stream.wait();
        r->args[DNNL_ARG_WORKSPACE] = fwd_args.at(DNNL_ARG_WORKSPACE);
    }
    return r;
}

std::unique_ptr<Runner> make_onednn_epilogue(const Case &c, Data &d) {
    using dnnl::algorithm;
    const dnnl::memory::desc md = data_desc(c);
    auto r = std::make_unique<OnednnRunner>();
    r->stream = dnnl::stream(engine());
    auto done = [&](const auto &pd, const char *what) {
        if (!pd) throw unavailable(c, what);
        r->label = pd.impl_info_str();
        r->primitive = dnnl::primitive(pd);
    };
    if (c.pass == Pass::Backward) {
        // The ReLU's backward from its output, the forward's y: dz = dy where
        // y > 0, else 0, into grad_residual's buffer, which hbn's plain
        // backward then reads as its dy.
        const dnnl::eltwise_forward::primitive_desc hint(
            {dnnl::prop_kind::forward_training, algorithm::eltwise_relu_use_dst_for_bwd, md, 0.f},
            engine(), /*allow_empty=*/true);
        if (!hint) throw unavailable(c, "ReLU backward");
        done(dnnl::eltwise_backward::primitive_desc(
                 {algorithm::eltwise_relu_use_dst_for_bwd, md, md, 0.f}, engine(), hint,
                 /*allow_empty=*/true),
             "ReLU backward");
        r->args = {{DNNL_ARG_DIFF_DST, wrap(md, d.dy.get())},
                   {DNNL_ARG_DST, wrap(md, d.forward_output.get())},
                   {DNNL_ARG_DIFF_SRC, wrap(md, d.grad_residual.get())}};
    } else if (!c.add()) {
        // y = relu(y), in place.
        done(dnnl::eltwise_forward::primitive_desc(
                 {dnnl::prop_kind::forward_inference, algorithm::eltwise_relu, md, 0.f}, engine(),
                 /*allow_empty=*/true),
             "ReLU");
        r->args = {{DNNL_ARG_SRC, wrap(md, d.y.get())}, {DNNL_ARG_DST, wrap(md, d.y.get())}};
    } else {
        // y = relu(y + residual), in place over y: a binary add with a ReLU
        // post-op.
        dnnl::post_ops relu;
        relu.append_eltwise(1.f, algorithm::eltwise_relu, 0.f, 0.f);
        dnnl::primitive_attr attr;
        attr.set_post_ops(relu);
        done(dnnl::binary::primitive_desc({algorithm::binary_add, md, md, md}, attr, engine(),
                                          /*allow_empty=*/true),
             "add with a ReLU post-op");
        r->args = {{DNNL_ARG_SRC_0, wrap(md, d.y.get())},
                   {DNNL_ARG_SRC_1, wrap(md, d.residual.get())},
                   {DNNL_ARG_DST, wrap(md, d.y.get())}};
    }
    return r;
}

}  // namespace bench
