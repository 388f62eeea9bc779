#include "gpu_call.h"

#include "hbn_kernels.h"  // HBN_BACKEND_OPENCL, HBN_BACKEND_CUDA

#ifdef HBN_BACKEND_OPENCL
#include "HalideRuntimeOpenCL.h"
#endif
#ifdef HBN_BACKEND_CUDA
#include "HalideRuntimeCuda.h"
#endif

namespace hbn::internal {

void GpuCall::attach(std::initializer_list<CallBuffer> inputs, std::initializer_list<CallBuffer> outputs) {
    for (const CallBuffer &b : inputs) {
        add(b, false);
    }
    for (const CallBuffer &b : outputs) {
        add(b, true);
    }
}

void GpuCall::finish() {
    for (const Entry &e : entries_) {
        if (e.output) {
            const int status = e.wrapped ? halide_device_sync(&context_, e.buffer)
                                         : halide_copy_to_host(&context_, e.buffer);
            check_status(status, context_, "hbn::batch_norm: reading back the results");
        }
    }
}

GpuCall::~GpuCall() {
    for (const Entry &e : entries_) {
        if (e.wrapped) {
            detach(e.buffer);
        } else if (e.buffer->device != 0) {
            halide_device_free(&context_, e.buffer);
        }
    }
}

void GpuCall::add(const CallBuffer &b, bool output) {
    // A buffer that stands for two inputs (see DataInput) is attached once.
    for (const Entry &e : entries_) {
        if (e.buffer == b.buffer) {
            return;
        }
    }
    const bool device_memory = b.tensor != nullptr && b.tensor->memory != Memory::Host;
    if (device_memory) {
        check_status(wrap(b.buffer, b.tensor->data), context_, "hbn::batch_norm: attaching device memory");
    } else if (!output) {
        b.buffer->flags |= halide_buffer_flag_host_dirty;
    }
    entries_.push_back({b.buffer, output, device_memory});  // after a successful wrap
}

int GpuCall::wrap(halide_buffer_t *buffer, void *memory) {
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

void GpuCall::detach(halide_buffer_t *buffer) {
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

}  // namespace hbn::internal
