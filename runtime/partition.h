// Tensors too large for one kernel call, and the statistics of their parts.
// A Halide buffer's extents and strides are 32-bit, so input_x's view runs in
// slices (boxes of it) whose extents and strides fit (below
// default_slice_extent_limit); the per-channel
// statistics of the slices, and of the processes of a synchronized batch
// norm, are merged in double as Chan et al. combine partial variances.
#pragma once

#include "HalideRuntime.h"
#include "collective.h"
#include "validation.h"

#include <array>
#include <cstdint>
#include <vector>

namespace hbn::internal {

// A box of input_x's view that one kernel call covers, as buffer dimensions:
// NCHW (inner, c, n), NHWC (c, m), every min 0. Its channels are
// first_channel onwards: per-channel buffers are cropped to them (see
// HalideBuffer), so that channel 0 of the call is first_channel.
struct Slice {
    std::array<halide_dimension_t, 3> dims{};
    int dimensions = 0;
    int64_t offset = 0;  // elements from input_x's first to the slice's first
    int64_t first_channel = 0, channels = 0;
    int64_t values_per_channel = 0;

    bool nchw() const { return dimensions == 3; }
    int64_t elements() const { return values_per_channel * channels; }
};

// A non-empty view's slices: one when the whole view fits a buffer.
std::vector<Slice> slices_of(const DataView &view);

// Whether the view needs more than one slice.
bool needs_slices(const DataView &view);

// One slice's per-channel mean and biased variance, from the training
// kernel, over its values_per_channel values.
struct SliceStatistics {
    int64_t first_channel = 0;
    double count = 0;
    std::vector<double> mean, var;

    explicit SliceStatistics(const Slice &s)
        : first_channel(s.first_channel), count(static_cast<double>(s.values_per_channel)), mean(s.channels),
          var(s.channels) {}
};

// The statistics of this process's slices, merged with every other
// process's in two all-reduces: first M and sum(count * mean) (C + 1
// values), then the squared deviations about the global mean (C values),
// each part's M2 plus count * (its mean - the global mean)^2. In double, and
// about the global mean, so that a large offset or more than 2^24 values
// per channel keep the accuracy of one call (a sum of raw squares would
// not).
class PartialStatistics {
public:
    PartialStatistics() = default;
    // `values_per_channel`: this process's M, the sum of its slices' counts.
    PartialStatistics(int64_t channels, int64_t values_per_channel)
        : channels_(channels), values_per_channel_(values_per_channel) {}

    void add(SliceStatistics part) { parts_.push_back(std::move(part)); }

    // The mean and biased variance of every value on every process, and
    // their count M. Throws ValueError (on every process alike) when M < 2.
    void merge(const Collective &collective, std::vector<double> &mean, std::vector<double> &var,
               double &count) const;

private:
    int64_t channels_ = 0, values_per_channel_ = 0;
    std::vector<SliceStatistics> parts_;
};

// The largest extent or stride of a slice. A Halide buffer holds up to
// 2^31 - 1, but the schedules' splits round an extent up to a multiple of
// their factor in 32-bit arithmetic: NHWC training, which reduces blocks of
// 512 rows, ran out of memory on an overflowed allocation from 2^31 - 511
// rows on. 2^30 leaves room for any factor up to 2^30.
constexpr int64_t default_slice_extent_limit = int64_t(1) << 30;

// Sets the limit (tests lower it to run the sliced path at small sizes), and
// returns the previous one. Not thread-safe: set it while no call runs.
int64_t set_slice_extent_limit(int64_t limit);

}  // namespace hbn::internal
