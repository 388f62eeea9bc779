// The all-reduces of a synchronized batch norm (BatchNormOptions::all_reduce),
// and how a call's processes agree that every one of them succeeded. Without
// a hook the same steps run on this process alone, as the sliced path of a
// large tensor uses them.
#pragma once

#include "hbn/batch_norm.h"

#include <cstdint>
#include <exception>
#include <vector>

namespace hbn::internal {

class Collective {
public:
    explicit Collective(const AllReduce &all_reduce) : all_reduce_(all_reduce) {}

    // Runs `step`, this process's part of the call up to its first
    // all-reduce, and returns what it threw (null: nothing).
    template<typename Step>
    static std::exception_ptr attempt(const Step &step) {
        try {
            step();
        } catch (...) {
            return std::current_exception();
        }
        return nullptr;
    }

    // The first all-reduce of a call (6 values): whether every process's
    // first step succeeded, and whether all passed the same C (`channels`,
    // unread when `failure` is set). Rethrows this process's failure; else
    // throws RuntimeError if another process failed, and ValueError if the
    // channel counts differ.
    void agree_on_start(const std::exception_ptr &failure, int64_t channels);
    // The last all-reduce (1 value): whether every process's last step
    // succeeded, with the same errors.
    void agree_on_finish(const std::exception_ptr &failure);
    // Sums `values` across the processes (a no-op without a hook).
    void sum(std::vector<double> &values) const;

private:
    void raise_if_any_failed(const std::exception_ptr &failure, double failures) const;

    const AllReduce &all_reduce_;
};

}  // namespace hbn::internal
