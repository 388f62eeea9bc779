#include "collective.h"

#include "halide_call.h"  // fail

#include <string>

namespace hbn::internal {

void Collective::sum(std::vector<double> &values) const {
    if (all_reduce_) {
        all_reduce_(values.data(), values.size());
    }
}

void Collective::raise_if_any_failed(const std::exception_ptr &failure, double failures) const {
    if (failure) {
        std::rethrow_exception(failure);
    }
    if (failures != 0) {
        fail(ErrorKind::RuntimeError, "the call failed on " +
                                          std::to_string(static_cast<int64_t>(failures)) +
                                          " other process(es) of options.all_reduce; nothing was committed");
    }
}

void Collective::agree_on_start(const std::exception_ptr &failure, int64_t channels) {
    if (failure) {
        channels = 0;
    }
    // C as two 16-bit halves (C < 2^32): their sums and sums of squares
    // stay exact in double, and P * sum(h^2) == sum(h)^2 holds exactly when
    // every process's h is the same.
    const auto high = static_cast<double>(channels >> 16), low = static_cast<double>(channels & 0xffff);
    std::vector<double> start = {failure ? 1.0 : 0.0, 1, high, high * high, low, low * low};
    sum(start);
    raise_if_any_failed(failure, start[0]);
    const double processes = start[1];
    if (processes * start[3] != start[2] * start[2] || processes * start[5] != start[4] * start[4]) {
        fail(ErrorKind::ValueError, "the processes of options.all_reduce passed input_x with different "
                                    "channel counts C (this one: " +
                                        std::to_string(channels) + ")");
    }
}

void Collective::agree_on_finish(const std::exception_ptr &failure) {
    std::vector<double> finish = {failure ? 1.0 : 0.0};
    sum(finish);
    raise_if_any_failed(failure, finish[0]);
}

}  // namespace hbn::internal
