#include "kernels.h"

#include "dtypes.h"
#include "hbn_kernels.h"

#include <array>

namespace hbn::internal {
namespace {

// The four kernels of one data type, layout and variant, and of both
// layouts, indexed by [nchw].
#define HBN_KERNELS(type, layout, variant)                                                      \
    Kernels {                                                                                   \
        hbn_batch_norm_inference_##type##_##layout##_##variant,                                 \
            hbn_batch_norm_training_##type##_##layout##_##variant,                              \
            hbn_batch_norm_backward_##type##_##layout##_##variant,                              \
            hbn_batch_norm_grad_input_##type##_##layout##_##variant                             \
    }
using ByLayout = std::array<Kernels, 2>;
#define HBN_BY_LAYOUT(type, variant) ByLayout{HBN_KERNELS(type, nhwc, variant), HBN_KERNELS(type, nchw, variant)}

// Every kernel of one data type, by variant.
struct DataTypeKernels {
    ByLayout serial, parallel;
#ifdef HBN_BACKEND_OPENCL
    ByLayout opencl;
#define HBN_OPENCL_KERNELS(type, entry) entry.opencl = HBN_BY_LAYOUT(type, opencl);
#else
#define HBN_OPENCL_KERNELS(type, entry)
#endif
#ifdef HBN_BACKEND_CUDA
    ByLayout cuda;
#define HBN_CUDA_KERNELS(type, entry) entry.cuda = HBN_BY_LAYOUT(type, cuda);
#else
#define HBN_CUDA_KERNELS(type, entry)
#endif
};

// Indexed by DType: the build's data types (HBN_DATA_TYPES) fill it.
constexpr auto kernels_by_dtype = [] {
    std::array<DataTypeKernels, dtype_infos.size()> table{};
#define HBN_DATA_TYPE(type, dtype)                                                              \
    {                                                                                           \
        DataTypeKernels &entry = table[dtype_index(DType::dtype)];                              \
        entry.serial = HBN_BY_LAYOUT(type, serial);                                             \
        entry.parallel = HBN_BY_LAYOUT(type, parallel);                                         \
        HBN_OPENCL_KERNELS(type, entry)                                                         \
        HBN_CUDA_KERNELS(type, entry)                                                           \
    }
    HBN_FOR_EACH_DATA_TYPE(HBN_DATA_TYPE)
#undef HBN_DATA_TYPE
    return table;
}();
#undef HBN_CUDA_KERNELS
#undef HBN_OPENCL_KERNELS
#undef HBN_BY_LAYOUT
#undef HBN_KERNELS

// Below this many elements a CPU call runs on the serial kernels: waking the
// thread pool costs more than the work.
constexpr int64_t serial_threshold = 16 * 1024;

// From this output size on, the CPU writes with streaming stores: an output
// this large would not stay in cache for its consumer anyway.
constexpr int64_t streaming_threshold_bytes = int64_t(64) << 20;

}  // namespace

Kernels kernels_for(Device device, DType dtype, const Slice &slice) {
    const DataTypeKernels &of_dtype = kernels_by_dtype[dtype_index(dtype)];
    const bool nchw = slice.nchw();
#ifdef HBN_BACKEND_OPENCL
    if (device == Device::OpenCL) {
        return of_dtype.opencl[nchw];
    }
#endif
#ifdef HBN_BACKEND_CUDA
    if (device == Device::CUDA) {
        return of_dtype.cuda[nchw];
    }
#endif
    Kernels kernels = slice.elements() >= serial_threshold ? of_dtype.parallel[nchw] : of_dtype.serial[nchw];
#ifdef __x86_64__  // only the x86 kernels have streaming stores
    kernels.stream_output = slice.elements() * halide_type_of(dtype).bytes() >= streaming_threshold_bytes;
#endif
    return kernels;
}

}  // namespace hbn::internal
