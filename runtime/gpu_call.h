// A pipeline call, and on a GPU backend the buffers attached around it.
#pragma once

#include "HalideRuntime.h"
#include "halide_call.h"
#include "hbn/batch_norm.h"

#include <initializer_list>
#include <optional>
#include <vector>

namespace hbn::internal {

// A buffer of the call, and the caller's data tensor behind it (null for the
// per-channel ones, which are always host memory).
struct CallBuffer {
    halide_buffer_t *buffer;
    const Tensor *tensor = nullptr;
};

// A call on a GPU backend. Host buffers are marked host-dirty, so that the
// pipeline copies them in, and its results are copied back; device memory is
// wrapped and used in place. Whatever happens, the device allocations are
// freed and the wraps undone.
class GpuCall {
public:
    GpuCall(Device device, CallContext &context) : device_(device), context_(context) {}
    GpuCall(const GpuCall &) = delete;
    GpuCall &operator=(const GpuCall &) = delete;
    ~GpuCall();

    // Apart from the constructor, so that a failure here still runs the
    // destructor.
    void attach(std::initializer_list<CallBuffer> inputs, std::initializer_list<CallBuffer> outputs);
    // After the pipeline succeeded: results to the host, or finished in place.
    void finish();

private:
    struct Entry {
        halide_buffer_t *buffer;
        bool output, wrapped;
    };

    void add(const CallBuffer &b, bool output);
    int wrap(halide_buffer_t *buffer, void *memory);
    void detach(halide_buffer_t *buffer);

    Device device_;
    CallContext &context_;
    std::vector<Entry> entries_;
};

// Runs `pipeline(user_context)`, on a GPU backend with its buffers attached
// around it, and throws RuntimeError naming `what` if it fails.
template<typename Pipeline>
void call_pipeline(Device device, std::initializer_list<CallBuffer> inputs,
                   std::initializer_list<CallBuffer> outputs, const Pipeline &pipeline,
                   const char *what) {
    CallContext context;
    std::optional<GpuCall> gpu;
    if (device != Device::CPU) {
        gpu.emplace(device, context);
        gpu->attach(inputs, outputs);
    }
    check_status(pipeline(&context), context, what);
    if (gpu) {
        gpu->finish();
    }
}

}  // namespace hbn::internal
