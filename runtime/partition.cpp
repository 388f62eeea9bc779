#include "partition.h"

#include <utility>

namespace hbn::internal {
namespace {

int64_t slice_extent_limit = default_slice_extent_limit;

// The view as dense buffer dimensions, innermost first, and its channel axis.
struct Dense {
    std::array<int64_t, 3> extents{}, strides{};
    int dimensions = 0, channel_axis = 0;

    explicit Dense(const DataView &view) {
        if (view.nchw) {
            extents = {view.inner, view.channels, view.outer};
            dimensions = 3;
            channel_axis = 1;
        } else {
            extents = {view.channels, view.outer, 1};
            dimensions = 2;
        }
        int64_t stride = 1;
        for (int i = 0; i < dimensions; i++) {
            strides[i] = stride;
            stride *= extents[i];
        }
    }

    // A slice's extent along dimension i: a dimension whose stride does not
    // fit runs one index at a time, one whose extent does not fit in pieces
    // of the limit.
    int64_t piece(int i) const {
        if (strides[i] > slice_extent_limit) {
            return 1;
        }
        return std::min(extents[i], slice_extent_limit);
    }
};

}  // namespace

bool needs_slices(const DataView &view) {
    const Dense dense(view);
    for (int i = 0; i < dense.dimensions; i++) {
        if (dense.piece(i) < dense.extents[i]) {
            return true;
        }
    }
    return false;
}

std::vector<Slice> slices_of(const DataView &view) {
    const Dense dense(view);
    std::vector<Slice> slices;
    std::array<int64_t, 3> start{};  // of the next slice, as an odometer
    while (true) {
        Slice s;
        s.dimensions = dense.dimensions;
        s.values_per_channel = 1;
        for (int i = 0; i < dense.dimensions; i++) {
            const int64_t extent = std::min(dense.piece(i), dense.extents[i] - start[i]);
            const bool channel = i == dense.channel_axis;
            // A stride that does not fit only occurs with extent 1, where it
            // is never used.
            const int64_t stride = dense.strides[i] > slice_extent_limit ? 0 : dense.strides[i];
            s.dims[i] = {0, static_cast<int32_t>(extent), static_cast<int32_t>(stride), 0};
            s.offset += start[i] * dense.strides[i];
            if (channel) {
                s.first_channel = start[i];
                s.channels = extent;
            } else {
                s.values_per_channel *= extent;
            }
        }
        slices.push_back(s);
        int i = 0;
        for (; i < dense.dimensions; i++) {
            start[i] += s.dims[i].extent;
            if (start[i] < dense.extents[i]) {
                break;
            }
            start[i] = 0;
        }
        if (i == dense.dimensions) {
            return slices;
        }
    }
}

void PartialStatistics::merge(const Collective &collective, std::vector<double> &mean, std::vector<double> &var,
                              double &count) const {
    std::vector<double> weighted(channels_ + 1, 0.0);  // M, then sum(count * mean) per channel
    weighted[0] = static_cast<double>(values_per_channel_);
    for (const SliceStatistics &part : parts_) {
        for (size_t c = 0; c < part.mean.size(); c++) {
            weighted[1 + part.first_channel + c] += part.count * part.mean[c];
        }
    }
    collective.sum(weighted);
    count = weighted[0];
    check_global_values_per_channel(count);
    mean.assign(weighted.begin() + 1, weighted.end());
    for (double &m : mean) {
        m /= count;
    }
    var.assign(channels_, 0.0);  // M2 about the global mean, then the variance
    for (const SliceStatistics &part : parts_) {
        for (size_t c = 0; c < part.mean.size(); c++) {
            const double deviation = part.mean[c] - mean[part.first_channel + c];
            var[part.first_channel + c] += part.count * (part.var[c] + deviation * deviation);
        }
    }
    collective.sum(var);
    for (double &v : var) {
        v /= count;
    }
}

int64_t set_slice_extent_limit(int64_t limit) {
    const int64_t previous = slice_extent_limit;
    slice_extent_limit = limit;
    return previous;
}

}  // namespace hbn::internal
