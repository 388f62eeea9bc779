// Streaming (non-temporal) stores of a pipeline's output, which Halide 14
// cannot emit. A plain store to a line that is not in cache first reads it
// (a read-for-ownership), which holds an elementwise pass near 2/3 of copy
// speed once its tensors are in DRAM; a streaming store skips that read. It
// also bypasses the cache, which only pays for an output too large to stay
// there, so whether a call streams is a run-time flag that the runtime sets
// (runtime/kernels.cpp).
//
// A lowering pass, run after Halide's own, gives each loop that stores into
// the outputs a streaming twin, taken where the flag holds, in which each
// dense vector store goes in parts of up to a vector register to
// hbn_stream_store<bytes> (streaming_stores.ll.in), which stores 16-byte
// pieces non-temporally where a piece's address is 16-byte aligned. The plain
// loops stay as they were. Scalar stores, stores whose size is not a multiple
// of 16 bytes, predicated stores (tails), and stores outside any loop stay
// plain. Each parallel task, and the pipeline, ends with a fence. The stored
// values are the same either way, so results cannot differ.
#pragma once

#include "Halide.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace hbn_generators {

using namespace Halide;

// streaming_stores.ll.in, assembled in the data layout of Halide's x86-64
// modules (cmake/hbn_bitcode.cmake).
extern const std::vector<uint8_t> streaming_stores_bitcode_x86_64;

// The dense vector stores into `buffers`, as calls to the streaming-store
// helpers; loops inside are left alone (StreamStores versions them itself).
class StreamingTwin : public Internal::IRMutator {
public:
    StreamingTwin(const std::vector<std::string> &buffers, int register_bytes)
        : buffers(buffers), register_bytes(register_bytes) {
    }

private:
    using IRMutator::visit;

    const std::vector<std::string> &buffers;
    int register_bytes;

    Internal::Stmt visit(const Internal::For *loop) override {
        return loop;
    }

    Internal::Stmt visit(const Internal::Store *store) override {
        const auto *ramp = store->index.as<Internal::Ramp>();
        const Type type = store->value.type();
        const int bytes = type.bytes() * type.lanes();
        const bool output = std::find(buffers.begin(), buffers.end(), store->name) != buffers.end();
        if (!output || ramp == nullptr || !Internal::is_const_one(ramp->stride) ||
            !Internal::is_const_one(store->predicate) || bytes % 16 != 0) {
            return store;
        }
        // Whole registers where the store spans them.
        int part_bytes = register_bytes;
        while (bytes % part_bytes != 0) {
            part_bytes /= 2;
        }
        const int part_lanes = part_bytes / type.bytes();
        const std::string helper = "hbn_stream_store" + std::to_string(part_bytes);
        const std::string name = Internal::unique_name("stored");
        const Expr value = Internal::Variable::make(type, name);
        // After Halide's lowering, the buffer's name holds its host pointer.
        const Expr base = Internal::Variable::make(Handle(), store->name);
        std::vector<Internal::Stmt> parts;
        for (int first = 0; first < type.lanes(); first += part_lanes) {
            const Expr part = Internal::Shuffle::make_slice(value, first, 1, part_lanes);
            const Expr offset = (cast<int64_t>(ramp->base) + first) * type.bytes();
            parts.push_back(Internal::Evaluate::make(Internal::Call::make(
                Int(32), helper, {base, offset, reinterpret(UInt(16, part_bytes / 2), part)},
                Internal::Call::Extern)));
        }
        return Internal::LetStmt::make(name, store->value, Internal::Block::make(parts));
    }
};

// Versions each loop that stores into the outputs: `if (stream)` its
// streaming twin, else the loop as it was. Versioning whole (innermost) loops
// rather than each store keeps each stored value in the block that computes
// it: a float16 vector live across blocks is one of `half`s, which LLVM 14's
// x86 backend takes apart element by element.
class StreamStores : public Internal::IRMutator {
public:
    // `register_bytes`: the target's vector register, 16, 32 or 64 bytes.
    StreamStores(std::vector<std::string> buffers, Expr stream, int register_bytes)
        : buffers(std::move(buffers)), stream(std::move(stream)), register_bytes(register_bytes) {
    }

    // The pipeline's whole body, then a fence.
    Internal::Stmt mutate(const Internal::Stmt &s) override {
        if (in_body) {
            return IRMutator::mutate(s);
        }
        in_body = true;
        const Internal::Stmt body = IRMutator::mutate(s);
        in_body = false;
        return Internal::Block::make(body, fence());
    }
    using IRMutator::mutate;

private:
    using IRMutator::visit;

    std::vector<std::string> buffers;
    Expr stream;
    int register_bytes;
    bool in_body = false;

    Internal::Stmt fence() const {
        return Internal::IfThenElse::make(
            stream, Internal::Evaluate::make(Internal::Call::make(Int(32), "hbn_stream_fence", {}, Internal::Call::Extern)));
    }

    Internal::Stmt visit(const Internal::For *loop) override {
        const Internal::Stmt mutated = IRMutator::visit(loop);  // inner loops versioned
        const auto *plain = mutated.as<Internal::For>();
        Internal::Stmt body = plain->body;
        const Internal::Stmt streaming_body = StreamingTwin(buffers, register_bytes).mutate(body);
        Internal::Stmt result = mutated;
        if (!streaming_body.same_as(body)) {
            result = Internal::IfThenElse::make(
                stream,
                Internal::For::make(plain->name, plain->min, plain->extent, plain->for_type, plain->device_api,
                                    streaming_body),
                mutated);
        }
        if (loop->for_type == Internal::ForType::Parallel) {
            // Each task ends with a fence: wrap the (versioned) loop's tasks.
            return add_task_fences(result);
        }
        return result;
    }

    // The parallel loops of `s` (itself, or both versions of it), each task
    // ending with a fence.
    Internal::Stmt add_task_fences(const Internal::Stmt &s) const {
        if (const auto *branch = s.as<Internal::IfThenElse>()) {
            return Internal::IfThenElse::make(branch->condition, add_task_fences(branch->then_case),
                                              add_task_fences(branch->else_case));
        }
        const auto *task = s.as<Internal::For>();
        return Internal::For::make(task->name, task->min, task->extent, task->for_type, task->device_api,
                                   Internal::Block::make(task->body, fence()));
    }
};

// Streams the stores into the `outputs` where `stream` holds at run time, on
// x86 CPUs; elsewhere the pipeline is left as it is.
inline void stream_stores(Pipeline pipeline, const std::vector<std::string> &outputs, const Expr &stream,
                          GeneratorContext::ExternsMap &externs, const Target &target) {
    if (target.arch != Target::X86 || target.has_gpu_feature()) {
        return;
    }
    const std::string name = "hbn_streaming_stores";
    externs.emplace(name, ExternalCode::bitcode_wrapper(target, streaming_stores_bitcode_x86_64, name));
    const int register_bytes = std::min(target.natural_vector_size<uint8_t>(), 64);
    pipeline.add_custom_lowering_pass(new StreamStores(outputs, stream, register_bytes));
}

}  // namespace hbn_generators
