// The dispatch wrapper: validate, view the tensor as the pipeline's buffers,
// pick the generated function, turn Halide errors into hbn::Error, and commit
// the running-statistics update only after the pipeline succeeded.
#include "hbn/batch_norm.h"

#include "HalideRuntime.h"
#include "backend.h"
#include "float16.h"
#include "halide_call.h"
#include "hbn_kernels.h"
#include "validation.h"

#ifdef HBN_BACKEND_OPENCL
#include "HalideRuntimeOpenCL.h"
#endif
#ifdef __SSE2__
#include <immintrin.h>
#endif
#ifdef HBN_BACKEND_CUDA
#include "HalideRuntimeCuda.h"
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>

namespace hbn {

Error::Error(ErrorKind kind, std::string message) : kind_(kind), message_(std::move(message)) {}

namespace {

using internal::DataView;

// ---------------------------------------------------------------------------
// Halide buffers over the caller's memory.

// Every kernel takes float16 data as its bits (see generators/float16_conversions.h).
halide_type_t halide_type_of(DType dtype) {
    if (dtype == DType::Float16) {
        return {halide_type_uint, 16, 1};
    }
    return {halide_type_float, 32, 1};
}

struct HalideBuffer {
    halide_buffer_t buffer{};
    std::array<halide_dimension_t, 3> dims{};

    // A data tensor; device memory is attached by GpuCall.
    HalideBuffer(const Tensor &t, const DataView &v) {
        if (t.memory == Memory::Host) {
            buffer.host = static_cast<uint8_t *>(t.data);
        }
        buffer.type = halide_type_of(t.dtype);
        const auto c = static_cast<int32_t>(v.channels);
        if (v.nchw) {
            const auto inner = static_cast<int32_t>(v.inner);
            dims[0] = {0, inner, 1, 0};
            dims[1] = {0, c, inner, 0};
            dims[2] = {0, static_cast<int32_t>(v.outer), inner * c, 0};
            buffer.dimensions = 3;
        } else {
            dims[0] = {0, c, 1, 0};
            dims[1] = {0, static_cast<int32_t>(v.outer), c, 0};
            buffer.dimensions = 2;
        }
    }

    HalideBuffer(float *data, int64_t channels) {
        buffer.host = reinterpret_cast<uint8_t *>(data);
        buffer.type = halide_type_of(DType::Float32);
        dims[0] = {0, static_cast<int32_t>(channels), 1, 0};
        buffer.dimensions = 1;
    }

    HalideBuffer() = default;

    // The dimension array lives inside this object, so point at it here
    // rather than at construction: copies stay valid.
    halide_buffer_t *get() {
        buffer.dim = dims.data();
        return &buffer;
    }
};

// A per-channel parameter as float32: the caller's memory when it already is,
// a converted copy when it is float16.
class ChannelFloats {
public:
    ChannelFloats(const Tensor &t, int64_t channels) {
        if (t.dtype == DType::Float32) {
            data_ = static_cast<float *>(t.data);
        } else {
            const auto *half = static_cast<const float16 *>(t.data);
            copy_.assign(half, half + channels);
            data_ = copy_.data();
        }
        buffer_ = HalideBuffer(data_, channels);
    }
    float operator[](int64_t c) const { return data_[c]; }
    halide_buffer_t *buffer() { return buffer_.get(); }

private:
    std::vector<float> copy_;
    float *data_ = nullptr;
    HalideBuffer buffer_;
};

// ---------------------------------------------------------------------------
// A call on a GPU backend. Host buffers are marked host-dirty, so that the
// pipeline copies them in, and its results are copied back; device memory is
// wrapped and used in place. Whatever happens, the device allocations are
// freed and the wraps undone.

// A buffer of the call, and the caller's data tensor behind it (null for the
// per-channel ones, which are always host memory).
struct CallBuffer {
    halide_buffer_t *buffer;
    const Tensor *tensor = nullptr;
};

class GpuCall {
public:
    GpuCall(Device device, internal::CallContext &context) : device_(device), context_(context) {}
    GpuCall(const GpuCall &) = delete;
    GpuCall &operator=(const GpuCall &) = delete;

    // Apart from the constructor, so that a failure here still runs the
    // destructor.
    void attach(std::initializer_list<CallBuffer> inputs, std::initializer_list<CallBuffer> outputs) {
        for (const CallBuffer &b : inputs) {
            add(b, false);
        }
        for (const CallBuffer &b : outputs) {
            add(b, true);
        }
    }

    // After the pipeline succeeded: results to the host, or finished in place.
    void finish() {
        for (const Entry &e : entries_) {
            if (e.output) {
                const int status = e.wrapped ? halide_device_sync(&context_, e.buffer)
                                             : halide_copy_to_host(&context_, e.buffer);
                internal::check_status(status, context_, "hbn::batch_norm: reading back the results");
            }
        }
    }

    ~GpuCall() {
        for (const Entry &e : entries_) {
            if (e.wrapped) {
                detach(e.buffer);
            } else if (e.buffer->device != 0) {
                halide_device_free(&context_, e.buffer);
            }
        }
    }

private:
    struct Entry {
        halide_buffer_t *buffer;
        bool output, wrapped;
    };

    void add(const CallBuffer &b, bool output) {
        const bool device_memory = b.tensor != nullptr && b.tensor->memory != Memory::Host;
        if (device_memory) {
            internal::check_status(wrap(b.buffer, b.tensor->data), context_,
                                   "hbn::batch_norm: attaching device memory");
        } else if (!output) {
            b.buffer->flags |= halide_buffer_flag_host_dirty;
        }
        entries_.push_back({b.buffer, output, device_memory});  // after a successful wrap
    }

    int wrap(halide_buffer_t *buffer, void *memory) {
        const auto handle = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(memory));
#ifdef HBN_BACKEND_OPENCL
        if (device_ == Device::OpenCL) {
            return halide_opencl_wrap_cl_mem(&context_, buffer, handle);
        }
#endif
#ifdef HBN_BACKEND_CUDA
        if (device_ == Device::CUDA) {
            return halide_cuda_wrap_device_ptr(&context_, buffer, handle);
        }
#endif
        (void)buffer, (void)handle;
        return -1;  // unreachable: validation matched the memory to a built backend
    }

    void detach(halide_buffer_t *buffer) {
#ifdef HBN_BACKEND_OPENCL
        if (device_ == Device::OpenCL) {
            halide_opencl_detach_cl_mem(&context_, buffer);
        }
#endif
#ifdef HBN_BACKEND_CUDA
        if (device_ == Device::CUDA) {
            halide_cuda_detach_device_ptr(&context_, buffer);
        }
#endif
        (void)buffer;
    }

    Device device_;
    internal::CallContext &context_;
    std::vector<Entry> entries_;
};

// Runs `pipeline(user_context)`, on a GPU backend with its buffers attached
// around it, and throws RuntimeError naming `what` if it fails.
template<typename Pipeline>
void call_pipeline(Device device, std::initializer_list<CallBuffer> inputs,
                   std::initializer_list<CallBuffer> outputs, const Pipeline &pipeline,
                   const char *what) {
    internal::CallContext context;
    std::optional<GpuCall> gpu;
    if (device != Device::CPU) {
        gpu.emplace(device, context);
        gpu->attach(inputs, outputs);
    }
    internal::check_status(pipeline(&context), context, what);
    if (gpu) {
        gpu->finish();
    }
}

// ---------------------------------------------------------------------------
// The generated functions.

using InferenceFn = int (*)(const void *, halide_buffer_t *, halide_buffer_t *, halide_buffer_t *,
                            halide_buffer_t *, halide_buffer_t *, double, bool, halide_buffer_t *);
using TrainingFn = int (*)(const void *, halide_buffer_t *, halide_buffer_t *, halide_buffer_t *,
                           double, bool, halide_buffer_t *, halide_buffer_t *, halide_buffer_t *,
                           halide_buffer_t *);

// CPU kernels, indexed by [dtype][nchw][parallel].
#define HBN_CPU_KERNELS(pipeline, type)                                                         \
    {                                                                                           \
        {hbn_batch_norm_##pipeline##_##type##_nhwc_serial,                                      \
         hbn_batch_norm_##pipeline##_##type##_nhwc_parallel},                                   \
        {hbn_batch_norm_##pipeline##_##type##_nchw_serial,                                      \
         hbn_batch_norm_##pipeline##_##type##_nchw_parallel},                                   \
    }
constexpr InferenceFn cpu_inference_fns[2][2][2] = {HBN_CPU_KERNELS(inference, float16),
                                                    HBN_CPU_KERNELS(inference, float32)};
constexpr TrainingFn cpu_training_fns[2][2][2] = {HBN_CPU_KERNELS(training, float16),
                                                  HBN_CPU_KERNELS(training, float32)};
#undef HBN_CPU_KERNELS

// GPU kernels of a backend, indexed by [dtype][nchw].
#define HBN_GPU_KERNELS(pipeline, backend)                                                      \
    {                                                                                           \
        {hbn_batch_norm_##pipeline##_float16_nhwc_##backend,                                    \
         hbn_batch_norm_##pipeline##_float16_nchw_##backend},                                   \
        {hbn_batch_norm_##pipeline##_float32_nhwc_##backend,                                    \
         hbn_batch_norm_##pipeline##_float32_nchw_##backend},                                   \
    }
#ifdef HBN_BACKEND_OPENCL
constexpr InferenceFn opencl_inference_fns[2][2] = HBN_GPU_KERNELS(inference, opencl);
constexpr TrainingFn opencl_training_fns[2][2] = HBN_GPU_KERNELS(training, opencl);
#endif
#ifdef HBN_BACKEND_CUDA
constexpr InferenceFn cuda_inference_fns[2][2] = HBN_GPU_KERNELS(inference, cuda);
constexpr TrainingFn cuda_training_fns[2][2] = HBN_GPU_KERNELS(training, cuda);
#endif
#undef HBN_GPU_KERNELS

// Below this many elements a CPU call runs on the serial kernels: waking the
// thread pool costs more than the work.
constexpr int64_t serial_threshold = 16 * 1024;

// ---------------------------------------------------------------------------
// Large outputs on x86: streaming stores. Halide 14 emits none, and a plain
// store to a line that is not in cache first reads it (a read-for-ownership),
// which caps an elementwise pass near 2/3 of copy speed once the tensor is in
// DRAM. So a large output (of inference, and of training once its statistics
// are done) is written by the serial inference kernel chunk by chunk, in
// parallel on Halide's thread pool, into scratch that stays in the core's L2
// cache, and each chunk is streamed out with non-temporal stores while the
// next chunk's input is prefetched.

#ifdef __SSE2__
constexpr int64_t streaming_threshold_bytes = int64_t(64) << 20;
// Chunks of 128 KiB, 32 to a task: with the next chunk's input prefetched
// while a chunk is written out, both sit in L2 (2 MiB here) with room to spare.
// (Large inference, ms, NCHW/NHWC: 128 KiB 26.9-27.6/23.9-24.6, 256 KiB
// 26.4-27.7/26.4-26.6, 512 KiB 26.7-27.8/27.8-28.2; no prefetch 29.2/29.8.)
constexpr int64_t chunk_target_bytes = 128 << 10;
constexpr int32_t chunks_per_task = 32;

bool streams_output(DType dtype, const DataView &view) {
    return view.values_per_channel() * view.channels * halide_type_of(dtype).bytes() >=
           streaming_threshold_bytes;
}

// Copies with streaming stores, and meanwhile prefetches up to `bytes` of
// `next` (the input of the task's next chunk) into L2, so that DRAM reads
// overlap the writes rather than alternate with them.
void stream_copy(uint8_t *dst, const uint8_t *src, size_t bytes, const uint8_t *next,
                 size_t next_bytes) {
    const size_t head = std::min(bytes, (16 - reinterpret_cast<uintptr_t>(dst) % 16) % 16);
    std::memcpy(dst, src, head);
    size_t i = head;
    for (; i + 64 <= bytes; i += 64) {
        if (i < next_bytes) {
            _mm_prefetch(reinterpret_cast<const char *>(next + i), _MM_HINT_T1);
        }
        for (size_t k = 0; k < 64; k += 16) {
            _mm_stream_si128(reinterpret_cast<__m128i *>(dst + i + k),
                             _mm_loadu_si128(reinterpret_cast<const __m128i *>(src + i + k)));
        }
    }
    std::memcpy(dst + i, src + i, bytes - i);
    _mm_sfence();  // streaming stores are weakly ordered: publish before the task ends
}

// One streamed call. Chunks are runs of rows along the view's dimension 1
// (NCHW: channels of one batch item; NHWC: positions), which are contiguous
// in input_x and output alike. Each task takes consecutive chunks, so that it
// knows which input to prefetch.
struct StreamedInference {
    InferenceFn chunk_kernel;
    halide_buffer_t input;  // whole-tensor views, as the kernel would get them
    uint8_t *output;
    halide_buffer_t *mean, *var, *weight, *bias;
    double eps;
    bool scale_in_double;
    int32_t rows_per_chunk, chunks_per_item, chunks;

    struct Chunk {
        std::array<halide_dimension_t, 3> dims;
        int64_t offset;  // elements from the start of the tensor
        size_t bytes;
    };
    Chunk chunk_at(int32_t chunk) const {
        Chunk at{};
        std::copy(input.dim, input.dim + input.dimensions, at.dims.begin());
        const int32_t first_row = (chunk % chunks_per_item) * rows_per_chunk;
        at.dims[1].min = first_row;
        at.dims[1].extent = std::min(rows_per_chunk, at.dims[1].extent - first_row);
        at.offset = int64_t(first_row) * at.dims[1].stride;
        if (input.dimensions == 3) {
            at.dims[2].min = chunk / chunks_per_item;
            at.dims[2].extent = 1;
            at.offset += int64_t(at.dims[2].min) * at.dims[2].stride;
        }
        at.bytes = size_t(at.dims[0].extent) * at.dims[1].extent * input.type.bytes();
        return at;
    }

    static int run_task(void *user_context, int task, uint8_t *closure) {
        const auto &job = *reinterpret_cast<const StreamedInference *>(closure);
        const size_t element_bytes = job.input.type.bytes();
        thread_local std::vector<uint8_t> scratch;
        const int32_t first = task * chunks_per_task;
        const int32_t last = std::min(first + chunks_per_task, job.chunks);
        for (int32_t c = first; c < last; c++) {
            Chunk chunk = job.chunk_at(c);
            scratch.resize(std::max(scratch.size(), chunk.bytes));
            halide_buffer_t input = job.input, staged = job.input;
            input.dim = staged.dim = chunk.dims.data();
            input.host = job.input.host + chunk.offset * element_bytes;
            staged.host = scratch.data();
            const int status = job.chunk_kernel(user_context, &input, job.mean, job.var, job.weight,
                                                job.bias, job.eps, job.scale_in_double, &staged);
            if (status != 0) {
                return status;
            }
            const Chunk next = c + 1 < last ? job.chunk_at(c + 1) : Chunk{};  // none: 0 bytes
            stream_copy(job.output + chunk.offset * element_bytes, scratch.data(), chunk.bytes,
                        job.input.host + next.offset * element_bytes, next.bytes);
        }
        return 0;
    }
};

// Writes `output` = the inference pipeline of `input`, through `chunk_kernel`
// (a serial inference kernel) and streaming stores.
int run_streamed_inference(void *user_context, InferenceFn chunk_kernel, halide_buffer_t *input,
                           halide_buffer_t *mean, halide_buffer_t *var, halide_buffer_t *weight,
                           halide_buffer_t *bias, double eps, bool scale_in_double,
                           halide_buffer_t *output) {
    const halide_dimension_t &row = input->dim[0], &rows = input->dim[1];
    const int64_t row_bytes = int64_t(row.extent) * input->type.bytes();
    const auto rows_per_chunk = static_cast<int32_t>(
        std::clamp<int64_t>(chunk_target_bytes / row_bytes, 1, rows.extent));
    const int32_t chunks_per_item = (rows.extent + rows_per_chunk - 1) / rows_per_chunk;
    const int32_t items = input->dimensions == 3 ? input->dim[2].extent : 1;  // NCHW's N
    const int32_t chunks = chunks_per_item * items;
    StreamedInference job{chunk_kernel, *input, output->host, mean, var, weight, bias, eps, scale_in_double,
                          rows_per_chunk, chunks_per_item, chunks};
    return halide_do_par_for(user_context, StreamedInference::run_task, 0,
                             (chunks + chunks_per_task - 1) / chunks_per_task,
                             reinterpret_cast<uint8_t *>(&job));
}
#else
bool streams_output(DType, const DataView &) {
    return false;
}
int run_streamed_inference(void *, InferenceFn, halide_buffer_t *, halide_buffer_t *,
                           halide_buffer_t *, halide_buffer_t *, halide_buffer_t *, double, bool,
                           halide_buffer_t *) {
    return -1;  // unreachable: streams_output() is false
}
#endif

struct Kernels {
    InferenceFn inference = nullptr;
    TrainingFn training = nullptr;
    // Set when the output is streamed: the serial inference kernel that
    // writes each chunk.
    InferenceFn streamed_chunk = nullptr;
};

Kernels kernels_for(Device device, DType dtype, const DataView &view) {
    const int type = dtype == DType::Float32 ? 1 : 0;
    const bool nchw = view.nchw;
#ifdef HBN_BACKEND_OPENCL
    if (device == Device::OpenCL) {
        return {opencl_inference_fns[type][nchw], opencl_training_fns[type][nchw]};
    }
#endif
#ifdef HBN_BACKEND_CUDA
    if (device == Device::CUDA) {
        return {cuda_inference_fns[type][nchw], cuda_training_fns[type][nchw]};
    }
#endif
    const bool parallel = view.values_per_channel() * view.channels >= serial_threshold;
    Kernels kernels{cpu_inference_fns[type][nchw][parallel], cpu_training_fns[type][nchw][parallel]};
    if (streams_output(dtype, view)) {
        kernels.streamed_chunk = cpu_inference_fns[type][nchw][false];
    }
    return kernels;
}

template<typename T>
void store_channel(void *data, int64_t c, double value) {
    static_cast<T *>(data)[c] = static_cast<T>(value);
}

void store_channel(const Tensor &t, int64_t c, double value) {
    if (t.dtype == DType::Float32) {
        store_channel<float>(t.data, c, value);
    } else {
        store_channel<float16>(t.data, c, value);
    }
}

void run(const Tensor &x, const Tensor &running_mean, const Tensor &running_var,
         const Tensor &weight, const Tensor &bias, const Tensor &output,
         const Tensor *saved_mean, const Tensor *saved_inv_std,
         const BatchNormOptions &options, bool training) {
    const DataView view = internal::validate_forward(
        {x, running_mean, running_var, weight, bias, output, saved_mean, saved_inv_std}, options, training);
    const Device device = internal::backend_for_call(options.device, x.memory);
    if (view.empty()) {
        return;  // nothing to normalize, nothing to learn
    }
    const int64_t channels = view.channels;
    internal::install_error_handler();

    HalideBuffer input_buffer(x, view);
    HalideBuffer output_buffer(output, view);
    ChannelFloats weight_f32(weight, channels), bias_f32(bias, channels);
    const double eps = options.eps;
    // Whether some channel's weight / sqrt(var + eps) may leave float's
    // range, so that the kernels normalize in double (see
    // generators/batch_norm_common.h). NaN weights take the double path too.
    float largest_weight = 0;
    for (int64_t c = 0; c < channels; c++) {
        largest_weight = std::max(largest_weight, std::abs(weight_f32[c]));
    }
    const bool scale_in_double =
        !(largest_weight / std::sqrt(eps) <= std::numeric_limits<float>::max());
    const Kernels kernels = kernels_for(device, x.dtype, view);

    if (!training) {
        ChannelFloats mean_f32(running_mean, channels), var_f32(running_var, channels);
        call_pipeline(
            device,
            {{input_buffer.get(), &x}, {mean_f32.buffer()}, {var_f32.buffer()}, {weight_f32.buffer()},
             {bias_f32.buffer()}},
            {{output_buffer.get(), &output}},
            [&](void *context) {
                if (kernels.streamed_chunk) {
                    return run_streamed_inference(context, kernels.streamed_chunk,
                                                  input_buffer.get(), mean_f32.buffer(),
                                                  var_f32.buffer(), weight_f32.buffer(),
                                                  bias_f32.buffer(), eps, scale_in_double, output_buffer.get());
                }
                return kernels.inference(context, input_buffer.get(), mean_f32.buffer(),
                                         var_f32.buffer(), weight_f32.buffer(), bias_f32.buffer(),
                                         eps, scale_in_double, output_buffer.get());
            },
            "hbn::batch_norm: inference pipeline");
        return;
    }

    // Batch statistics land in scratch (or the caller's saved_* tensors) and
    // reach the running statistics only once the pipeline has succeeded.
    std::vector<float> scratch(static_cast<size_t>(channels) * 3);
    float *mean = saved_mean ? static_cast<float *>(saved_mean->data) : scratch.data();
    float *inv_std = saved_inv_std ? static_cast<float *>(saved_inv_std->data) : scratch.data() + channels;
    float *var = scratch.data() + 2 * channels;
    HalideBuffer mean_buffer(mean, channels), var_buffer(var, channels),
        inv_std_buffer(inv_std, channels);
    call_pipeline(
        device, {{input_buffer.get(), &x}, {weight_f32.buffer()}, {bias_f32.buffer()}},
        {{output_buffer.get(), &output}, {mean_buffer.get()}, {var_buffer.get()}, {inv_std_buffer.get()}},
        [&](void *context) {
            if (!kernels.streamed_chunk) {
                return kernels.training(context, input_buffer.get(), weight_f32.buffer(),
                                        bias_f32.buffer(), eps, scale_in_double, output_buffer.get(),
                                        mean_buffer.get(), var_buffer.get(), inv_std_buffer.get());
            }
            // A large output is streamed: the training kernel computes only
            // the statistics (asked for no rows of output, it still reduces
            // all of input_x), and the streamed inference pass normalizes
            // with them.
            HalideBuffer no_rows = output_buffer;
            no_rows.dims[no_rows.buffer.dimensions - 1].extent = 0;
            const int status = kernels.training(context, input_buffer.get(), weight_f32.buffer(),
                                                bias_f32.buffer(), eps, scale_in_double, no_rows.get(),
                                                mean_buffer.get(), var_buffer.get(),
                                                inv_std_buffer.get());
            return status != 0 ? status
                               : run_streamed_inference(context, kernels.streamed_chunk,
                                                        input_buffer.get(), mean_buffer.get(),
                                                        var_buffer.get(), weight_f32.buffer(),
                                                        bias_f32.buffer(), eps, scale_in_double, output_buffer.get());
        },
        "hbn::batch_norm: training pipeline");

    const ChannelFloats old_mean(running_mean, channels), old_var(running_var, channels);
    const double momentum = options.momentum;
    const auto count = static_cast<double>(view.values_per_channel());
    const double unbias = count / (count - 1);
    for (int64_t c = 0; c < channels; c++) {
        store_channel(running_mean, c, (1 - momentum) * old_mean[c] + momentum * mean[c]);
        store_channel(running_var, c, (1 - momentum) * old_var[c] + momentum * var[c] * unbias);
    }
}

}  // namespace

void batch_norm(const Tensor &input_x, const Tensor &running_mean, const Tensor &running_var,
                const Tensor &weight, const Tensor &bias, const Tensor &output,
                const BatchNormOptions &options) {
    run(input_x, running_mean, running_var, weight, bias, output, nullptr, nullptr, options,
        options.training);
}

void batch_norm_training(const Tensor &input_x, const Tensor &running_mean,
                         const Tensor &running_var, const Tensor &weight, const Tensor &bias,
                         const Tensor &output, const Tensor &saved_mean,
                         const Tensor &saved_inv_std, const BatchNormOptions &options) {
    run(input_x, running_mean, running_var, weight, bias, output, &saved_mean, &saved_inv_std,
        options, true);
}

}  // namespace hbn
