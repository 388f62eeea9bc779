// hbn_gpu_bench: every CUDA kernel of hbn on device-resident tensors, at a
// size that fills the GPU, against a device-to-device copy of the same bytes.
// Plain C++: no CUDA headers, no Google Benchmark. The few driver entry points
// it needs are declared here and taken from libcuda.so with dlopen, as hbn's
// own probe does (runtime/backend.cpp).
//
// For each dtype (float32, float16, bfloat16) and layout (NCHW, NHWC) it
// times, with options.device = Device::CUDA and input_x, output, grad_output,
// grad_input in Memory::CUDA (the per-channel tensors are host memory, as hbn
// requires):
//   inference               batch_norm, inference
//   training                batch_norm_training (the fused training kernel)
//   backward_training       batch_norm_backward, training (backward kernel)
//   backward_inference      batch_norm_backward, inference
//   sync_training           batch_norm_training with a no-op all_reduce: a
//                           one-process SyncBN (statistics kernel, then
//                           the inference kernel normalizes)
//   sync_backward_training  batch_norm_backward, training, with the no-op
//                           all_reduce (sums, then batch_norm_grad_input)
// and, per dtype, cuMemcpyDtoD of half the bytes a forward (x read, y
// written: 2 tensors) or a backward (x and dy read, dx written: 3 tensors)
// moves, so that the copy reads and writes exactly those bytes.
//
// Timing: 3 warm-up calls, then the median of 20. Each call is timed by the
// wall clock (hbn's CUDA calls synchronize before they return; the copy is
// followed by cuCtxSynchronize) and by CUDA events recorded on the legacy
// default stream, the one Halide 14's runtime launches on, around it (the
// GPU timeline from the call's first operation to its last). GB/s counts
// bytes_moved over the event time (the wall time where events are missing).
//
// Output, on stdout: '#' comment lines (device, sizes), then CSV with a
// header line:
//   case,impl,dtype,layout,pass,mode,n,c,h,w,elements,bytes_moved,
//   wall_ms,gpu_ms,gbps,reps,status
// impl is hbn or copy; status is ok, "error: ..." or "skipped: ...". Each line
// is flushed as soon as it is measured, so a run cut short keeps what it has.
// bench/gpu_peer.py reads it and adds PyTorch's cuDNN batch norm.
//
// Usage: hbn_gpu_bench [--scale S] [--reps R] [--warmup W] [--budget SECONDS]
//                      [--filter SUBSTRING]
//   --scale S    N = round(256 * S), at least 2 (C = 256, 56x56): S = 1 is
//                205,520,896 elements, 822 MB per float32 tensor; the
//                device holds 4 such tensors at once (3.3 GB).
//   --budget T   start no case after T seconds (the rest are reported as
//                skipped); each case also cuts its repetitions to fit ~5 s.
//   --filter F   only the cases whose name contains F (copies always run).
// Exits 77, after printing "CUDA benchmark skipped: <why>", where hbn's CUDA
// backend is not usable; 1 if any case failed; else 0.
#include "bench_case.h"  // uniform, kDTypes
#include "dtypes.h"      // store_channel_value

#include <hbn/batch_norm.h>

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using bench::DTypeInfo;
using bench::kDTypes;
using bench::uniform;

// ---- The CUDA driver API, as far as it is used ----
using CUresult = int;
using CUdeviceptr = unsigned long long;
using CUcontext = void *;
using CUstream = void *;
using CUevent = void *;
using CUdevice = int;

struct Driver {
    CUresult (*init)(unsigned) = nullptr;
    CUresult (*driver_get_version)(int *) = nullptr;
    CUresult (*ctx_set_current)(CUcontext) = nullptr;
    CUresult (*ctx_synchronize)() = nullptr;
    CUresult (*ctx_get_device)(CUdevice *) = nullptr;
    CUresult (*device_get_name)(char *, int, CUdevice) = nullptr;
    CUresult (*mem_get_info)(size_t *, size_t *) = nullptr;
    CUresult (*mem_alloc)(CUdeviceptr *, size_t) = nullptr;
    CUresult (*mem_free)(CUdeviceptr) = nullptr;
    CUresult (*memcpy_dtod)(CUdeviceptr, CUdeviceptr, size_t) = nullptr;
    CUresult (*memcpy_htod)(CUdeviceptr, const void *, size_t) = nullptr;
    CUresult (*event_create)(CUevent *, unsigned) = nullptr;
    CUresult (*event_record)(CUevent, CUstream) = nullptr;
    CUresult (*event_synchronize)(CUevent) = nullptr;
    CUresult (*event_elapsed_time)(float *, CUevent, CUevent) = nullptr;
    CUresult (*event_destroy)(CUevent) = nullptr;
    CUresult (*get_error_string)(CUresult, const char **) = nullptr;
    bool has_events = false;
};

Driver cu;

template<typename Fn>
void load(void *library, Fn &fn, const char *name) {
    fn = reinterpret_cast<Fn>(dlsym(library, name));
}

std::string error_text(CUresult result) {
    const char *text = nullptr;
    if (cu.get_error_string) cu.get_error_string(result, &text);
    return "CUresult " + std::to_string(result) + (text ? std::string(" (") + text + ")" : "");
}

[[noreturn]] void fatal(const std::string &message) {
    std::fflush(stdout);
    std::fprintf(stderr, "hbn_gpu_bench: %s\n", message.c_str());
    std::exit(1);
}

void check(CUresult result, const char *what) {
    if (result != 0) fatal(std::string(what) + " failed: " + error_text(result));
}

// Returns what is missing, or "".
std::string load_driver() {
    void *library = dlopen("libcuda.so", RTLD_LAZY | RTLD_LOCAL);
    if (library == nullptr) library = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
    if (library == nullptr) return "cannot open libcuda.so";
    // The _v2 names are the ones current drivers export for these calls.
    load(library, cu.init, "cuInit");
    load(library, cu.driver_get_version, "cuDriverGetVersion");
    load(library, cu.ctx_set_current, "cuCtxSetCurrent");
    load(library, cu.ctx_synchronize, "cuCtxSynchronize");
    load(library, cu.ctx_get_device, "cuCtxGetDevice");
    load(library, cu.device_get_name, "cuDeviceGetName");
    load(library, cu.mem_get_info, "cuMemGetInfo_v2");
    load(library, cu.mem_alloc, "cuMemAlloc_v2");
    load(library, cu.mem_free, "cuMemFree_v2");
    load(library, cu.memcpy_dtod, "cuMemcpyDtoD_v2");
    load(library, cu.memcpy_htod, "cuMemcpyHtoD_v2");
    load(library, cu.event_create, "cuEventCreate");
    load(library, cu.event_record, "cuEventRecord");
    load(library, cu.event_synchronize, "cuEventSynchronize");
    load(library, cu.event_elapsed_time, "cuEventElapsedTime");
    load(library, cu.event_destroy, "cuEventDestroy_v2");
    load(library, cu.get_error_string, "cuGetErrorString");
    if (!cu.init || !cu.ctx_set_current || !cu.ctx_synchronize || !cu.mem_alloc || !cu.mem_free ||
        !cu.memcpy_dtod || !cu.memcpy_htod) {
        return "libcuda.so lacks a driver API entry point this benchmark needs";
    }
    cu.has_events = cu.event_create && cu.event_record && cu.event_synchronize && cu.event_elapsed_time &&
                    cu.event_destroy;
    return "";
}

// ---- Options ----
struct Options {
    double scale = 1.0;
    int reps = 20;
    int warmup = 3;
    double budget_s = 0;  // 0: none
    std::string filter;
    double case_budget_s = 5;  // the repetitions of one case, roughly
};

[[noreturn]] void usage(const char *message) {
    std::fprintf(stderr,
                 "hbn_gpu_bench: %s\nusage: hbn_gpu_bench [--scale S] [--reps R] [--warmup W] "
                 "[--budget SECONDS] [--filter SUBSTRING]\n",
                 message);
    std::exit(2);
}

Options parse(int argc, char **argv) {
    Options o;
    for (int i = 1; i < argc; i++) {
        const std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) usage(("missing value after " + arg).c_str());
            return argv[++i];
        };
        try {
            if (arg == "--scale") {
                o.scale = std::stod(value());
            } else if (arg == "--reps") {
                o.reps = std::stoi(value());
            } else if (arg == "--warmup") {
                o.warmup = std::stoi(value());
            } else if (arg == "--budget") {
                o.budget_s = std::stod(value());
            } else if (arg == "--filter") {
                o.filter = value();
            } else if (arg == "-h" || arg == "--help") {
                usage("times hbn's CUDA kernels (see the comment at the top of bench/gpu_bench.cpp)");
            } else {
                usage(("unknown argument " + arg).c_str());
            }
        } catch (const std::logic_error &) {
            usage(("bad value for " + arg).c_str());
        }
    }
    if (!(o.scale > 0) || o.reps < 1 || o.warmup < 0 || o.budget_s < 0) usage("out-of-range value");
    return o;
}

// ---- Cases ----
enum class Kind { Inference, Training, BackwardTraining, BackwardInference, SyncTraining, SyncBackwardTraining };
const Kind kKinds[] = {Kind::Inference,         Kind::Training,     Kind::BackwardTraining,
                       Kind::BackwardInference, Kind::SyncTraining, Kind::SyncBackwardTraining};

const char *kind_name(Kind k) {
    switch (k) {
    case Kind::Inference: return "inference";
    case Kind::Training: return "training";
    case Kind::BackwardTraining: return "backward_training";
    case Kind::BackwardInference: return "backward_inference";
    case Kind::SyncTraining: return "sync_training";
    case Kind::SyncBackwardTraining: return "sync_backward_training";
    }
    return "?";
}
bool is_backward(Kind k) {
    return k == Kind::BackwardTraining || k == Kind::BackwardInference || k == Kind::SyncBackwardTraining;
}
// The CSV's mode column: inference, training, or sync (training with all_reduce).
const char *mode_name(Kind k) {
    switch (k) {
    case Kind::Inference:
    case Kind::BackwardInference: return "inference";
    case Kind::SyncTraining:
    case Kind::SyncBackwardTraining: return "sync";
    default: return "training";
    }
}

struct Dims {
    int64_t n, c, h, w;
    int64_t elements() const { return n * c * h * w; }
};

using Clock = std::chrono::steady_clock;
double ms_between(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
}

double median(std::vector<double> v) {
    if (v.empty()) return NAN;
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// No commas or newlines in a CSV field.
std::string field(std::string s) {
    for (char &ch : s) {
        if (ch == ',' || ch == '\n' || ch == '\r') ch = ch == ',' ? ';' : ' ';
    }
    return s;
}

struct Row {
    std::string name, impl, dtype, layout, pass, mode;
    Dims dims{};
    int64_t bytes_moved = 0;
    double wall_ms = NAN, gpu_ms = NAN;
    int reps = 0;
    std::string status = "ok";
};

void print_header() {
    std::printf("case,impl,dtype,layout,pass,mode,n,c,h,w,elements,bytes_moved,wall_ms,gpu_ms,gbps,reps,status\n");
    std::fflush(stdout);
}

void print_row(const Row &r) {
    const double ms = std::isnan(r.gpu_ms) ? r.wall_ms : r.gpu_ms;
    const double gbps = std::isnan(ms) || ms <= 0 ? NAN : r.bytes_moved / (ms * 1e-3) / 1e9;
    auto number = [](double v, const char *format) {
        if (std::isnan(v)) return std::string();
        char text[64];
        std::snprintf(text, sizeof(text), format, v);
        return std::string(text);
    };
    std::printf("%s,%s,%s,%s,%s,%s,%lld,%lld,%lld,%lld,%lld,%lld,%s,%s,%s,%d,%s\n", r.name.c_str(),
                r.impl.c_str(), r.dtype.c_str(), r.layout.c_str(), r.pass.c_str(), r.mode.c_str(),
                static_cast<long long>(r.dims.n), static_cast<long long>(r.dims.c),
                static_cast<long long>(r.dims.h), static_cast<long long>(r.dims.w),
                static_cast<long long>(r.dims.elements()), static_cast<long long>(r.bytes_moved),
                number(r.wall_ms, "%.6f").c_str(), number(r.gpu_ms, "%.6f").c_str(),
                number(gbps, "%.2f").c_str(), r.reps, field(r.status).c_str());
    std::fflush(stdout);
}

// Times `call` (which returns only when its GPU work is done): warm-ups,
// then up to opts.reps repetitions, fewer where they would take more than
// opts.case_budget_s. Fills wall_ms, gpu_ms and reps.
template<typename Call>
void measure(const Options &opts, Row &row, CUevent start, CUevent stop, Call &&call) {
    double last_ms = 0;
    for (int i = 0; i < opts.warmup; i++) {
        const auto t0 = Clock::now();
        call();
        last_ms = ms_between(t0, Clock::now());
    }
    int reps = opts.reps;
    if (last_ms > 0) {
        reps = std::max(1, std::min(reps, static_cast<int>(opts.case_budget_s * 1e3 / last_ms)));
    }
    std::vector<double> wall, gpu;
    for (int i = 0; i < reps; i++) {
        const auto t0 = Clock::now();
        if (cu.has_events) check(cu.event_record(start, nullptr), "cuEventRecord");
        call();
        if (cu.has_events) check(cu.event_record(stop, nullptr), "cuEventRecord");
        const auto t1 = Clock::now();
        wall.push_back(ms_between(t0, t1));
        if (cu.has_events) {
            check(cu.event_synchronize(stop), "cuEventSynchronize");
            float ms = 0;
            check(cu.event_elapsed_time(&ms, start, stop), "cuEventElapsedTime");
            gpu.push_back(ms);
        }
    }
    row.wall_ms = median(wall);
    row.gpu_ms = median(gpu);
    row.reps = reps;
}

// Fills `bytes` of device memory at `dst` with uniform [lo, hi) values of
// the dtype: a 16 MiB random pattern, repeated.
void fill(CUdeviceptr dst, size_t bytes, hbn::DType dtype, uint64_t seed, float lo, float hi) {
    constexpr size_t kPattern = 16u << 20;
    std::vector<unsigned char> pattern(kPattern);
    uint64_t s = seed;
    for (size_t i = 0; i < kPattern / bench::dtype_info(dtype).bytes; i++) {
        hbn::internal::store_channel_value(dtype, pattern.data(), static_cast<int64_t>(i), uniform(s, lo, hi));
    }
    for (size_t done = 0; done < bytes; done += kPattern) {
        check(cu.memcpy_htod(dst + done, pattern.data(), std::min(kPattern, bytes - done)), "cuMemcpyHtoD");
    }
}

std::string device_description() {
    std::string text = hbn::backend_status(hbn::Device::CUDA).detail;
    int version = 0;
    if (cu.driver_get_version && cu.driver_get_version(&version) == 0) {
        text += "; CUDA driver API " + std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
    }
    size_t free_bytes = 0, total_bytes = 0;
    if (cu.mem_get_info && cu.mem_get_info(&free_bytes, &total_bytes) == 0) {
        char memory[96];
        std::snprintf(memory, sizeof(memory), "; %.1f GiB free of %.1f GiB", free_bytes / 1073741824.0,
                      total_bytes / 1073741824.0);
        text += memory;
    }
    return text;
}

}  // namespace

int main(int argc, char **argv) {
    const Options opts = parse(argc, argv);

    const hbn::BackendStatus status = hbn::backend_status(hbn::Device::CUDA);
    if (!status.usable) {
        std::printf("CUDA benchmark skipped: %s\n", status.detail.c_str());
        return 77;
    }
    if (const std::string missing = load_driver(); !missing.empty()) {
        std::printf("CUDA benchmark skipped: %s\n", missing.c_str());
        return 77;
    }

    CUcontext context = nullptr;
    try {
        context = hbn::cuda_context();
    } catch (const hbn::Error &e) {
        fatal(std::string("hbn::cuda_context: ") + e.what());
    }
    check(cu.ctx_set_current(context), "cuCtxSetCurrent(hbn::cuda_context())");

    CUevent start = nullptr, stop = nullptr;
    if (cu.has_events) {
        check(cu.event_create(&start, 0), "cuEventCreate");
        check(cu.event_create(&stop, 0), "cuEventCreate");
    }

    const Dims dims{std::max<int64_t>(2, std::llround(256 * opts.scale)), 256, 56, 56};
    const int64_t C = dims.c;
    const size_t max_tensor_bytes = static_cast<size_t>(dims.elements()) * 4;
    // Four tensor slots, each padded to 64 KiB: x, dy, y (also dx), and room
    // for the backward copy's 1.5 tensors at slot 2.
    const size_t slot = (max_tensor_bytes + 65535) / 65536 * 65536;
    std::printf("# hbn_gpu_bench: %s\n", device_description().c_str());
    std::printf("# dims (N, C, H, W) = (%lld, %lld, %lld, %lld): %lld elements; warm-up %d, median of up to %d\n",
                static_cast<long long>(dims.n), static_cast<long long>(dims.c), static_cast<long long>(dims.h),
                static_cast<long long>(dims.w), static_cast<long long>(dims.elements()), opts.warmup, opts.reps);
    std::printf("# events: %s\n", cu.has_events ? "gpu_ms from cuEventRecord on the legacy default stream"
                                                : "unavailable (gpu_ms empty; gbps from wall_ms)");
    std::fflush(stdout);

    CUdeviceptr slab = 0;
    if (const CUresult r = cu.mem_alloc(&slab, 4 * slot); r != 0) {
        fatal("cuMemAlloc of " + std::to_string(4 * slot) + " bytes failed: " + error_text(r) +
              "; try a smaller --scale");
    }
    const CUdeviceptr x_ptr = slab, dy_ptr = slab + slot, y_ptr = slab + 2 * slot;

    std::vector<float> running_mean(C), running_var(C), weight(C), bias(C), saved_mean(C), saved_inv_std(C),
        grad_weight(C), grad_bias(C);
    auto reset_parameters = [&] {
        uint64_t s = 42;
        for (int64_t i = 0; i < C; i++) {
            running_mean[i] = uniform(s, -0.5f, 0.5f);
            running_var[i] = uniform(s, 0.5f, 1.5f);
            weight[i] = uniform(s, 0.5f, 1.5f);
            bias[i] = uniform(s, -0.5f, 0.5f);
        }
    };
    auto param = [&](std::vector<float> &v) { return hbn::Tensor{v.data(), hbn::DType::Float32, {C}}; };

    const auto began = Clock::now();
    auto over_budget = [&] {
        return opts.budget_s > 0 && ms_between(began, Clock::now()) > opts.budget_s * 1e3;
    };
    bool any_failed = false;
    print_header();

    for (const DTypeInfo &info : kDTypes) {
        const hbn::DType dtype = info.dtype;
        const char *dtype_name = info.name;
        const size_t tensor_bytes = static_cast<size_t>(dims.elements()) * info.bytes;
        bool filled = false;
        // Whether `row` may run: within the budget (else it is printed as
        // skipped), with x and dy filled, once per dtype.
        auto ready = [&](Row &row) {
            if (over_budget()) {
                row.status = "skipped: budget spent";
                print_row(row);
                return false;
            }
            if (!filled) {
                fill(x_ptr, tensor_bytes, dtype, 0x1234, -2, 2);
                fill(dy_ptr, tensor_bytes, dtype, 0x5678, -1, 1);
                check(cu.ctx_synchronize(), "cuCtxSynchronize");
                filled = true;
            }
            return true;
        };

        // The copies: forward (2 tensors moved) and backward (3).
        for (int tensors : {2, 3}) {
            Row row;
            row.impl = "copy";
            row.dtype = dtype_name;
            row.layout = "any";
            row.pass = tensors == 2 ? "forward" : "backward";
            row.mode = "copy";
            row.name = std::string("copy_") + row.pass + "/" + dtype_name;
            row.dims = dims;
            row.bytes_moved = static_cast<int64_t>(tensors * tensor_bytes);
            if (!ready(row)) {
                continue;
            }
            // Reads and writes bytes_moved / 2 each: x (and dy) into slots 2-3.
            const size_t copy_bytes = static_cast<size_t>(row.bytes_moved / 2);
            measure(opts, row, start, stop, [&] {
                check(cu.memcpy_dtod(y_ptr, x_ptr, copy_bytes), "cuMemcpyDtoD");
                check(cu.ctx_synchronize(), "cuCtxSynchronize");
            });
            print_row(row);
        }

        for (hbn::Layout layout : {hbn::Layout::NCHW, hbn::Layout::NHWC}) {
            const char *layout_name = layout == hbn::Layout::NHWC ? "nhwc" : "nchw";
            const std::vector<int64_t> shape = layout == hbn::Layout::NCHW
                                                   ? std::vector<int64_t>{dims.n, dims.c, dims.h, dims.w}
                                                   : std::vector<int64_t>{dims.n, dims.h, dims.w, dims.c};
            auto device_tensor = [&](CUdeviceptr p) {
                return hbn::Tensor{reinterpret_cast<void *>(static_cast<uintptr_t>(p)), dtype, shape,
                                   hbn::Memory::CUDA};
            };
            const hbn::Tensor x = device_tensor(x_ptr), dy = device_tensor(dy_ptr), y = device_tensor(y_ptr);
            reset_parameters();
            bool have_saved = false;  // saved_mean and saved_inv_std of this x

            for (Kind kind : kKinds) {
                Row row;
                row.impl = "hbn";
                row.dtype = dtype_name;
                row.layout = layout_name;
                row.pass = is_backward(kind) ? "backward" : "forward";
                row.mode = mode_name(kind);
                row.name = std::string(kind_name(kind)) + "/" + dtype_name + "/" + layout_name;
                row.dims = dims;
                row.bytes_moved = static_cast<int64_t>((is_backward(kind) ? 3 : 2) * tensor_bytes);
                if (!opts.filter.empty() && row.name.find(opts.filter) == std::string::npos) continue;
                if (!ready(row)) {
                    continue;
                }

                hbn::BatchNormOptions options;
                options.device = hbn::Device::CUDA;
                options.layout = layout;
                options.momentum = 0.1;
                options.eps = 1e-5;
                options.training = kind != Kind::Inference && kind != Kind::BackwardInference;
                if (kind == Kind::SyncTraining || kind == Kind::SyncBackwardTraining) {
                    options.all_reduce = [](double *, std::size_t) {};  // one process: the sums are final
                }
                try {
                    if (is_backward(kind) && options.training && !have_saved) {
                        // The forward's saved statistics, which the training backward reads.
                        hbn::BatchNormOptions forward = options;
                        forward.all_reduce = nullptr;
                        hbn::batch_norm_training(x, param(running_mean), param(running_var), param(weight),
                                                 param(bias), y, param(saved_mean), param(saved_inv_std), forward);
                        have_saved = true;
                    }
                    switch (kind) {
                    case Kind::Inference:
                        measure(opts, row, start, stop, [&] {
                            hbn::batch_norm(x, param(running_mean), param(running_var), param(weight), param(bias),
                                            y, options);
                        });
                        break;
                    case Kind::Training:
                    case Kind::SyncTraining:
                        measure(opts, row, start, stop, [&] {
                            hbn::batch_norm_training(x, param(running_mean), param(running_var), param(weight),
                                                     param(bias), y, param(saved_mean), param(saved_inv_std),
                                                     options);
                        });
                        have_saved = true;
                        break;
                    case Kind::BackwardTraining:
                    case Kind::SyncBackwardTraining:
                        measure(opts, row, start, stop, [&] {
                            hbn::batch_norm_backward(dy, x, param(weight), hbn::Tensor{}, hbn::Tensor{},
                                                     param(saved_mean), param(saved_inv_std), y, param(grad_weight),
                                                     param(grad_bias), options);
                        });
                        break;
                    case Kind::BackwardInference:
                        measure(opts, row, start, stop, [&] {
                            hbn::batch_norm_backward(dy, x, param(weight), param(running_mean), param(running_var),
                                                     hbn::Tensor{}, hbn::Tensor{}, y, param(grad_weight),
                                                     param(grad_bias), options);
                        });
                        break;
                    }
                    // A sanity check of the per-channel results the call wrote
                    // on the host (grad_bias, or the training forward's
                    // saved_inv_std); the test suite checks the values.
                    if (kind != Kind::Inference) {
                        const std::vector<float> &probe = is_backward(kind) ? grad_bias : saved_inv_std;
                        if (!std::all_of(probe.begin(), probe.end(), [](float v) { return std::isfinite(v); })) {
                            row.status = "error: non-finite per-channel results";
                        }
                    }
                } catch (const std::exception &e) {
                    row.status = std::string("error: ") + e.what();
                    row.wall_ms = row.gpu_ms = NAN;
                }
                if (row.status != "ok") any_failed = true;
                print_row(row);
            }
        }
    }

    cu.ctx_synchronize();
    cu.mem_free(slab);
    if (cu.has_events) {
        cu.event_destroy(start);
        cu.event_destroy(stop);
    }
    return any_failed ? 1 : 0;
}
