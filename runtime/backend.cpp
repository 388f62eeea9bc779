// Backends: each probed once per process, Device::Auto's choice, and the
// contexts in which users create device memory.
//
// The probes ask the drivers what Halide's runtime will find, through the
// library names it loads (dlopen, as it does), so that "usable" means the
// kernels will find the device that was reported.
#include "backend.h"

#include "halide_call.h"
#include "hbn_kernels.h"  // HBN_BACKEND_OPENCL, HBN_BACKEND_CUDA, HBN_CUDA_CAPABILITY

#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#ifdef HBN_BACKEND_OPENCL
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>
#endif

// Context hooks of the Halide runtime's OpenCL and CUDA modules, and their
// device syncs, which (given no buffer) load the library and create the
// context. None of these is in Halide 14's public headers.
extern "C" {
int halide_opencl_device_sync(void *user_context, struct halide_buffer_t *buffer);
int halide_cuda_device_sync(void *user_context, struct halide_buffer_t *buffer);
int halide_acquire_cl_context(void *user_context, void **context, void **queue, bool create);
int halide_release_cl_context(void *user_context);
int halide_cuda_acquire_context(void *user_context, void **context, bool create);
int halide_cuda_release_context(void *user_context);
}

namespace hbn {
namespace {

// What Device::Auto needs beyond each backend's status.
struct Probe {
    BackendStatus status;
    bool is_gpu = false;  // OpenCL: the device is a GPU or an accelerator
};

template<typename Fn>
Fn symbol(void *library, const char *name) {
    return reinterpret_cast<Fn>(dlsym(library, name));
}

std::string not_built(const char *backend) {
    return std::string(backend) + " is not built into this hbn (CMake HBN_BACKENDS)";
}

Probe probe_opencl() {
    Probe probe;
#ifndef HBN_BACKEND_OPENCL
    probe.status.detail = not_built("OpenCL");
#else
    probe.status.built = true;
    // Halide 14's runtime opens this name only.
    void *library = dlopen("libOpenCL.so", RTLD_LAZY | RTLD_LOCAL);
    if (library == nullptr) {
        probe.status.detail = "no libOpenCL.so, the OpenCL loader that Halide's runtime opens "
                              "(Debian: ocl-icd-opencl-dev)";
        return probe;
    }
    auto get_platform_ids = symbol<decltype(&clGetPlatformIDs)>(library, "clGetPlatformIDs");
    auto get_platform_info = symbol<decltype(&clGetPlatformInfo)>(library, "clGetPlatformInfo");
    auto get_device_ids = symbol<decltype(&clGetDeviceIDs)>(library, "clGetDeviceIDs");
    auto get_device_info = symbol<decltype(&clGetDeviceInfo)>(library, "clGetDeviceInfo");
    if (!get_platform_ids || !get_platform_info || !get_device_ids || !get_device_info) {
        probe.status.detail = "libOpenCL.so lacks the OpenCL 1.2 API";
        return probe;
    }

    // The platform Halide's runtime takes: the first whose name contains
    // HL_OCL_PLATFORM_NAME, else the first.
    cl_platform_id platforms[4];
    cl_uint platform_count = 0;
    if (get_platform_ids(4, platforms, &platform_count) != CL_SUCCESS || platform_count == 0) {
        probe.status.detail = "no OpenCL platform (no ICD installed, e.g. Debian's pocl-opencl-icd)";
        return probe;
    }
    platform_count = std::min<cl_uint>(platform_count, 4);
    cl_platform_id platform = platforms[0];
    if (const char *wanted = std::getenv("HL_OCL_PLATFORM_NAME")) {
        platform = nullptr;
        for (cl_uint i = 0; i < platform_count && platform == nullptr; i++) {
            char name[256] = "";
            get_platform_info(platforms[i], CL_PLATFORM_NAME, sizeof(name), name, nullptr);
            if (std::strstr(name, wanted)) {
                platform = platforms[i];
            }
        }
        if (platform == nullptr) {
            probe.status.detail = std::string("no OpenCL platform named like HL_OCL_PLATFORM_NAME=") + wanted;
            return probe;
        }
    }

    // Its devices of the types in HL_OCL_DEVICE_TYPE (else all), and of
    // those the one HL_GPU_DEVICE names, else the one with most compute
    // units (the last of equals).
    cl_device_type types = 0;
    if (const char *wanted = std::getenv("HL_OCL_DEVICE_TYPE")) {
        types |= std::strstr(wanted, "cpu") ? CL_DEVICE_TYPE_CPU : 0;
        types |= std::strstr(wanted, "gpu") ? CL_DEVICE_TYPE_GPU : 0;
        types |= std::strstr(wanted, "acc") ? CL_DEVICE_TYPE_ACCELERATOR : 0;
    }
    cl_device_id devices[128];
    cl_uint device_count = 0;
    if (get_device_ids(platform, types ? types : CL_DEVICE_TYPE_ALL, 128, devices, &device_count) !=
            CL_SUCCESS ||
        device_count == 0) {
        probe.status.detail = "no OpenCL device of the requested type on the platform";
        return probe;
    }
    device_count = std::min<cl_uint>(device_count, 128);
    int chosen = 0;
    if (const char *index = std::getenv("HL_GPU_DEVICE")) {
        chosen = std::atoi(index);
    } else {
        cl_uint most_units = 0;
        for (cl_uint i = 0; i < device_count; i++) {
            cl_uint units = 0;
            get_device_info(devices[i], CL_DEVICE_MAX_COMPUTE_UNITS, sizeof(units), &units, nullptr);
            if (units >= most_units) {
                most_units = units;
                chosen = static_cast<int>(i);
            }
        }
    }
    if (chosen < 0 || chosen >= static_cast<int>(device_count)) {
        probe.status.detail = "HL_GPU_DEVICE names no OpenCL device";
        return probe;
    }
    const cl_device_id device = devices[chosen];
    char name[256] = "";
    get_device_info(device, CL_DEVICE_NAME, sizeof(name), name, nullptr);
    cl_device_type type = 0;
    get_device_info(device, CL_DEVICE_TYPE, sizeof(type), &type, nullptr);
    size_t extensions_size = 0;
    get_device_info(device, CL_DEVICE_EXTENSIONS, 0, nullptr, &extensions_size);
    std::string extensions(extensions_size, '\0');
    get_device_info(device, CL_DEVICE_EXTENSIONS, extensions_size, extensions.data(), nullptr);

    probe.is_gpu = (type & (CL_DEVICE_TYPE_GPU | CL_DEVICE_TYPE_ACCELERATOR)) != 0;
    probe.status.detail = std::string(name) + (probe.is_gpu ? " (GPU or accelerator)" : " (CPU device)");
    // The statistics are accumulated in double, as on the CPU.
    if (extensions.find("cl_khr_fp64") == std::string::npos) {
        probe.status.detail += " lacks cl_khr_fp64, which hbn's statistics need";
        return probe;
    }
    probe.status.usable = true;
#endif
    return probe;
}

Probe probe_cuda() {
    Probe probe;
#ifndef HBN_BACKEND_CUDA
    probe.status.detail = not_built("CUDA");
#else
    probe.status.built = true;
    // Halide 14's runtime opens this name only.
    void *library = dlopen("libcuda.so", RTLD_LAZY | RTLD_LOCAL);
    if (library == nullptr) {
        probe.status.detail = "no libcuda.so (no NVIDIA driver installed)";
        return probe;
    }
    // The few driver API entry points needed, declared here since the CUDA
    // headers are not a Debian main package (CUresult is int, CUdevice int).
    auto init = symbol<int (*)(unsigned)>(library, "cuInit");
    auto device_count = symbol<int (*)(int *)>(library, "cuDeviceGetCount");
    auto device_get = symbol<int (*)(int *, int)>(library, "cuDeviceGet");
    auto device_name = symbol<int (*)(char *, int, int)>(library, "cuDeviceGetName");
    auto device_attribute = symbol<int (*)(int *, int, int)>(library, "cuDeviceGetAttribute");
    if (!init || !device_count || !device_get || !device_name || !device_attribute) {
        probe.status.detail = "libcuda.so lacks the CUDA driver API";
        return probe;
    }
    int count = 0;
    if (const int result = init(0); result != 0) {
        probe.status.detail = "cuInit failed (CUresult " + std::to_string(result) + "): no usable GPU";
        return probe;
    }
    if (device_count(&count) != 0 || count == 0) {
        probe.status.detail = "no CUDA device";
        return probe;
    }
    // Halide's runtime takes HL_GPU_DEVICE, else device 0.
    const char *index = std::getenv("HL_GPU_DEVICE");
    int device = 0;
    if (device_get(&device, index ? std::atoi(index) : 0) != 0) {
        probe.status.detail = "HL_GPU_DEVICE names no CUDA device";
        return probe;
    }
    char name[256] = "";
    device_name(name, sizeof(name), device);
    int major = 0, minor = 0;
    constexpr int major_attribute = 75, minor_attribute = 76;  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_*
    device_attribute(&major, major_attribute, device);
    device_attribute(&minor, minor_attribute, device);
    probe.status.detail = std::string(name) + " (compute capability " + std::to_string(major) + "." +
                          std::to_string(minor) + ")";
    if (major * 10 + minor < HBN_CUDA_CAPABILITY) {
        probe.status.detail += ", below the " + std::to_string(HBN_CUDA_CAPABILITY / 10) + "." +
                               std::to_string(HBN_CUDA_CAPABILITY % 10) +
                               " that hbn's kernels are built for (CMake HBN_CUDA_TARGET)";
        return probe;
    }
    probe.status.usable = true;
#endif
    return probe;
}

// Each backend is probed once, on first need, and only then: a call never
// loads a driver it does not run on (PoCL, for one, loads LLVM, which takes
// over the process's signal handlers). Device::Auto without HBN_DEVICE probes
// CUDA and OpenCL to choose.
const Probe &probe_of(Device device) {
    static const Probe cpu{{true, true, "the host CPU"}};
    if (device == Device::CUDA) {
        static const Probe cuda = probe_cuda();
        return cuda;
    }
    if (device == Device::OpenCL) {
        static const Probe opencl = probe_opencl();
        return opencl;
    }
    return cpu;
}

struct AutoChoice {
    Device device = Device::CPU;
    std::string override_error;  // a bad HBN_DEVICE
};

AutoChoice choose_auto() {
    AutoChoice choice;
    const char *forced = std::getenv("HBN_DEVICE");
    if (forced && *forced) {
        const std::string name = forced;
        if (name == "cpu") {
            choice.device = Device::CPU;
        } else if (name == "opencl") {
            choice.device = Device::OpenCL;
        } else if (name == "cuda") {
            choice.device = Device::CUDA;
        } else {
            choice.override_error = "HBN_DEVICE is '" + name + "'; it takes cpu, opencl or cuda";
        }
    } else if (probe_of(Device::CUDA).status.usable) {
        choice.device = Device::CUDA;
    } else if (const Probe &opencl = probe_of(Device::OpenCL); opencl.status.usable && opencl.is_gpu) {
        choice.device = Device::OpenCL;
    }
    if (const char *log = std::getenv("HBN_LOG_DEVICE"); log && *log && std::strcmp(log, "0") != 0) {
        std::fprintf(stderr, "hbn: Device::Auto runs on %s%s\n", device_name(choice.device),
                     forced && *forced ? " (HBN_DEVICE)" : "");
        // The backends the choice probed; under HBN_DEVICE, the chosen one.
        for (Device device : {Device::CUDA, Device::OpenCL, Device::CPU}) {
            if (forced && *forced && device != choice.device) {
                continue;
            }
            const BackendStatus &status = probe_of(device).status;
            std::fprintf(stderr, "hbn:   %-6s %s: %s\n", device_name(device),
                         status.usable ? "usable" : "not usable", status.detail.c_str());
        }
    }
    return choice;
}

const AutoChoice &auto_choice() {
    static const AutoChoice choice = choose_auto();  // once, thread-safe
    return choice;
}

void require_usable(Device device, const char *what) {
    const BackendStatus &status = probe_of(device).status;
    if (!status.usable) {
        throw Error(ErrorKind::RuntimeError, std::string(what) + ": " + device_name(device) +
                                                 " is not usable: " + status.detail);
    }
}

}  // namespace

const char *device_name(Device device) {
    switch (device) {
    case Device::Auto: return "Auto";
    case Device::CPU: return "CPU";
    case Device::OpenCL: return "OpenCL";
    case Device::CUDA: return "CUDA";
    }
    return "an unknown device";
}

BackendStatus backend_status(Device device) {
    return probe_of(device == Device::Auto ? auto_device() : device).status;
}

Device auto_device() {
    const AutoChoice &choice = auto_choice();
    if (!choice.override_error.empty()) {
        throw Error(ErrorKind::ValueError, "hbn: " + choice.override_error);
    }
    return choice.device;
}

OpenCLContext opencl_context() {
    require_usable(Device::OpenCL, "hbn::opencl_context");
    OpenCLContext result;
#ifdef HBN_BACKEND_OPENCL
    internal::install_error_handler();
    internal::CallContext context;
    // The acquire hook alone neither loads the library nor creates the context.
    internal::check_status(halide_opencl_device_sync(&context, nullptr), context,
                           "hbn::opencl_context: creating the OpenCL context");
    halide_acquire_cl_context(&context, &result.context, &result.queue, false);
    halide_release_cl_context(&context);
#endif
    return result;
}

void *cuda_context() {
    require_usable(Device::CUDA, "hbn::cuda_context");
    void *result = nullptr;
#ifdef HBN_BACKEND_CUDA
    internal::install_error_handler();
    internal::CallContext context;
    internal::check_status(halide_cuda_device_sync(&context, nullptr), context,
                           "hbn::cuda_context: creating the CUDA context");
    halide_cuda_acquire_context(&context, &result, false);
    halide_cuda_release_context(&context);
#endif
    return result;
}

namespace internal {

Device backend_for_call(Device requested, Memory data_memory) {
    const Device memory_device = data_memory == Memory::OpenCL ? Device::OpenCL
                                 : data_memory == Memory::CUDA ? Device::CUDA
                                                               : Device::CPU;
    Device device = requested;
    if (requested == Device::Auto) {
        device = data_memory == Memory::Host ? auto_device() : memory_device;
    } else if (data_memory != Memory::Host && requested != memory_device) {
        fail(ErrorKind::ValueError, std::string("input_x is ") + device_name(memory_device) +
                                        " memory, but options.device is " + device_name(requested));
    }
    require_usable(device, "hbn::batch_norm: options.device");
    return device;
}

}  // namespace internal
}  // namespace hbn
