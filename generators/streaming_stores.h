// Streaming (non-temporal) stores of a pipeline's output, which Halide 14
// cannot emit. A plain store to a line that is not in cache first reads it
// (a read-for-ownership), which holds an elementwise pass near 2/3 of copy
// speed once its tensors are in DRAM; a streaming store skips that read. It
// also bypasses the cache, which only pays for an output too large to stay
// there, so whether a call streams is a run-time flag that the runtime sets
// (runtime/kernels.cpp).
//
// A lowering pass, run after Halide's own, gives each dense vector store into
// the outputs a streaming twin, taken where the flag holds: the vector in
// 16-byte parts, each stored by hbn_stream_store16 (streaming_stores.ll.in),
// non-temporally where its address is 16-byte aligned. The flag is loop
// invariant, so LLVM unswitches the loops on it and the plain loops stay as
// they were. Scalar stores, stores whose size is not a multiple of 16 bytes,
// and predicated stores (tails) stay plain. Each parallel task, and the
// pipeline, ends with a fence. The stored values are the same either way, so
// results cannot differ.
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

class StreamStores : public Internal::IRMutator {
public:
    StreamStores(std::vector<std::string> buffers, Expr stream)
        : buffers(std::move(buffers)), stream(std::move(stream)) {
    }

    // The pipeline's whole body: its stores, then a fence.
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
    bool in_body = false;

    Internal::Stmt fence() const {
        return Internal::IfThenElse::make(
            stream, Internal::Evaluate::make(Internal::Call::make(Int(32), "hbn_stream_fence", {}, Internal::Call::Extern)));
    }

    Internal::Stmt visit(const Internal::Store *store) override {
        const auto *ramp = store->index.as<Internal::Ramp>();
        const Type type = store->value.type();
        const bool output = std::find(buffers.begin(), buffers.end(), store->name) != buffers.end();
        if (!output || ramp == nullptr || !Internal::is_const_one(ramp->stride) ||
            !Internal::is_const_one(store->predicate) || type.bytes() * type.lanes() % 16 != 0) {
            return IRMutator::visit(store);
        }
        const std::string name = Internal::unique_name("stored");
        const Expr value = Internal::Variable::make(type, name);
        // After Halide's lowering, the buffer's name holds its host pointer.
        const Expr base = Internal::Variable::make(Handle(), store->name);
        const int part_lanes = 16 / type.bytes();
        std::vector<Internal::Stmt> parts;
        for (int first = 0; first < type.lanes(); first += part_lanes) {
            const Expr part = Internal::Shuffle::make_slice(value, first, 1, part_lanes);
            const Expr offset = (cast<int64_t>(ramp->base) + first) * type.bytes();
            parts.push_back(Internal::Evaluate::make(Internal::Call::make(
                Int(32), "hbn_stream_store16", {base, offset, reinterpret(UInt(8, 16), part)},
                Internal::Call::Extern)));
        }
        const Internal::Stmt plain = Internal::Store::make(store->name, value, store->index, store->param,
                                                           store->predicate, store->alignment);
        return Internal::LetStmt::make(name, store->value,
                                       Internal::IfThenElse::make(stream, Internal::Block::make(parts), plain));
    }

    Internal::Stmt visit(const Internal::For *loop) override {
        Internal::Stmt mutated = IRMutator::visit(loop);
        if (loop->for_type != Internal::ForType::Parallel) {
            return mutated;
        }
        const auto *task = mutated.as<Internal::For>();
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
    pipeline.add_custom_lowering_pass(new StreamStores(outputs, stream));
}

}  // namespace hbn_generators
