#include "streamed_output.h"

#include "buffers.h"

#ifdef __SSE2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <vector>

namespace hbn::internal {

#ifdef __SSE2__
namespace {

constexpr int64_t streaming_threshold_bytes = int64_t(64) << 20;
// Chunks of 128 KiB, 32 to a task: with the next chunk's input prefetched
// while a chunk is written out, both sit in L2 (2 MiB here) with room to spare.
// (Large inference, ms, NCHW/NHWC: 128 KiB 26.9-27.6/23.9-24.6, 256 KiB
// 26.4-27.7/26.4-26.6, 512 KiB 26.7-27.8/27.8-28.2; no prefetch 29.2/29.8.)
constexpr int64_t chunk_target_bytes = 128 << 10;
constexpr int32_t chunks_per_task = 32;

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
    uint8_t *residual, *output;
    bool add_residual, relu;
    halide_buffer_t *mean, *var, *weight, *bias;
    double eps;
    bool scale_in_double;
    int32_t rows_per_chunk, chunks_per_item, chunks;
    // Halide's thread pool hands the job to its workers, and their writes
    // back, through synchronization that Halide compiles and ThreadSanitizer
    // cannot see. These two atomics make both hand-offs visible to it, for
    // one atomic operation per task.
    std::atomic<bool> published{false};
    mutable std::atomic<int32_t> tasks_done{0};

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
        job.published.load(std::memory_order_acquire);
        const int status = job.run_chunks(user_context, task);
        job.tasks_done.fetch_add(1, std::memory_order_release);
        return status;
    }

    int run_chunks(void *user_context, int task) const {
        const size_t element_bytes = input.type.bytes();
        thread_local std::vector<uint8_t> scratch;
        const int32_t first = task * chunks_per_task;
        const int32_t last = std::min(first + chunks_per_task, chunks);
        for (int32_t c = first; c < last; c++) {
            Chunk chunk = chunk_at(c);
            scratch.resize(std::max(scratch.size(), chunk.bytes));
            // The residual has input's shape and layout, so its chunk too.
            halide_buffer_t chunk_input = input, chunk_residual = input, staged = input;
            chunk_input.dim = chunk_residual.dim = staged.dim = chunk.dims.data();
            chunk_input.host = input.host + chunk.offset * element_bytes;
            chunk_residual.host = residual + chunk.offset * element_bytes;
            staged.host = scratch.data();
            const int status = chunk_kernel(user_context, &chunk_input, &chunk_residual, add_residual, relu, mean,
                                            var, weight, bias, eps, scale_in_double, &staged);
            if (status != 0) {
                return status;
            }
            const Chunk next = c + 1 < last ? chunk_at(c + 1) : Chunk{};  // none: 0 bytes
            stream_copy(output + chunk.offset * element_bytes, scratch.data(), chunk.bytes,
                        input.host + next.offset * element_bytes, next.bytes);
        }
        return 0;
    }
};

}  // namespace

bool streams_output(DType dtype, const Slice &slice) {
    return slice.elements() * halide_type_of(dtype).bytes() >= streaming_threshold_bytes;
}

int run_streamed_inference(void *user_context, InferenceFn chunk_kernel, halide_buffer_t *input,
                           halide_buffer_t *residual, bool add_residual, bool relu, halide_buffer_t *mean,
                           halide_buffer_t *var, halide_buffer_t *weight, halide_buffer_t *bias, double eps,
                           bool scale_in_double, halide_buffer_t *output) {
    const halide_dimension_t &row = input->dim[0], &rows = input->dim[1];
    const int64_t row_bytes = int64_t(row.extent) * input->type.bytes();
    const auto rows_per_chunk = static_cast<int32_t>(
        std::clamp<int64_t>(chunk_target_bytes / row_bytes, 1, rows.extent));
    const int32_t chunks_per_item = (rows.extent + rows_per_chunk - 1) / rows_per_chunk;
    const int32_t items = input->dimensions == 3 ? input->dim[2].extent : 1;  // NCHW's N
    const int32_t chunks = chunks_per_item * items;
    StreamedInference job{chunk_kernel, *input, residual->host, output->host, add_residual, relu, mean, var,
                          weight, bias, eps, scale_in_double, rows_per_chunk, chunks_per_item, chunks};
    job.published.store(true, std::memory_order_release);
    const int status = halide_do_par_for(user_context, StreamedInference::run_task, 0,
                                         (chunks + chunks_per_task - 1) / chunks_per_task,
                                         reinterpret_cast<uint8_t *>(&job));
    job.tasks_done.load(std::memory_order_acquire);
    return status;
}
#else
bool streams_output(DType, const Slice &) {
    return false;
}
int run_streamed_inference(void *, InferenceFn, halide_buffer_t *, halide_buffer_t *, bool, bool,
                           halide_buffer_t *, halide_buffer_t *, halide_buffer_t *, halide_buffer_t *, double,
                           bool, halide_buffer_t *) {
    return -1;  // unreachable: streams_output() is false
}
#endif

}  // namespace hbn::internal
