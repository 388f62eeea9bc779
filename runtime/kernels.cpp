#include "kernels.h"

#include "hbn_kernels.h"
#include "streamed_output.h"

namespace hbn::internal {
namespace {

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
constexpr BackwardFn cpu_backward_fns[2][2][2] = {HBN_CPU_KERNELS(backward, float16),
                                                  HBN_CPU_KERNELS(backward, float32)};
constexpr GradInputFn cpu_grad_input_fns[2][2][2] = {HBN_CPU_KERNELS(grad_input, float16),
                                                     HBN_CPU_KERNELS(grad_input, float32)};
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
constexpr BackwardFn opencl_backward_fns[2][2] = HBN_GPU_KERNELS(backward, opencl);
constexpr GradInputFn opencl_grad_input_fns[2][2] = HBN_GPU_KERNELS(grad_input, opencl);
#endif
#ifdef HBN_BACKEND_CUDA
constexpr InferenceFn cuda_inference_fns[2][2] = HBN_GPU_KERNELS(inference, cuda);
constexpr TrainingFn cuda_training_fns[2][2] = HBN_GPU_KERNELS(training, cuda);
constexpr BackwardFn cuda_backward_fns[2][2] = HBN_GPU_KERNELS(backward, cuda);
constexpr GradInputFn cuda_grad_input_fns[2][2] = HBN_GPU_KERNELS(grad_input, cuda);
#endif
#undef HBN_GPU_KERNELS

// Below this many elements a CPU call runs on the serial kernels: waking the
// thread pool costs more than the work.
constexpr int64_t serial_threshold = 16 * 1024;

}  // namespace

Kernels kernels_for(Device device, DType dtype, const Slice &slice) {
    const int type = dtype == DType::Float32 ? 1 : 0;
    const bool nchw = slice.nchw();
#ifdef HBN_BACKEND_OPENCL
    if (device == Device::OpenCL) {
        return {opencl_inference_fns[type][nchw], opencl_training_fns[type][nchw], opencl_backward_fns[type][nchw],
                opencl_grad_input_fns[type][nchw]};
    }
#endif
#ifdef HBN_BACKEND_CUDA
    if (device == Device::CUDA) {
        return {cuda_inference_fns[type][nchw], cuda_training_fns[type][nchw], cuda_backward_fns[type][nchw],
                cuda_grad_input_fns[type][nchw]};
    }
#endif
    const bool parallel = slice.elements() >= serial_threshold;
    Kernels kernels{cpu_inference_fns[type][nchw][parallel], cpu_training_fns[type][nchw][parallel],
                    cpu_backward_fns[type][nchw][parallel], cpu_grad_input_fns[type][nchw][parallel]};
    if (streams_output(dtype, slice)) {
        kernels.streamed_chunk = cpu_inference_fns[type][nchw][false];
    }
    return kernels;
}

}  // namespace hbn::internal
