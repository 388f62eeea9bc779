// Fixtures for synchronized batch norm (BatchNormOptions::all_reduce):
// - FakeGroup: an in-process all-reduce among P threads, each standing for a
//   process, that records the size of every collective each one makes and
//   breaks (throws out of the hook) rather than hangs when the participants'
//   sequences of collectives disagree;
// - run_participants: runs one body per participant on its own thread, and
//   aborts the test program rather than hang;
// - SyncBatch and Participant: one global batch split along its leading axis
//   N among the processes, each process's tensors (its slice, its own running
//   statistics, its slice of the fused epilogue's tensors) and the double
//   reference of the whole batch;
// - the backward's error bounds (as backward_test.cpp derives them).
// Used by sync_test.cpp, sliced_test.cpp and mpi/mpi_sync_test.cpp.
#pragma once

#include "backward_bounds.h"
#include "test_util.h"

#include <hbn/batch_norm.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace hbn_test {

// Thrown out of a participant's hook when its round can never complete: the
// other participants finished their work without joining it, or the round
// waited longer than the group's timeout. It passes through hbn unchanged
// (an exception of the hook's own), so the threads finish and the test fails
// instead of hanging.
class CollectiveBroken : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

class FakeGroup {
public:
    explicit FakeGroup(int size, std::chrono::milliseconds round_timeout = std::chrono::seconds(20))
        : size_(size), round_timeout_(round_timeout), pending_(size), sizes_(size) {}

    int size() const { return size_; }

    // Participant `rank`'s all-reduce.
    hbn::AllReduce hook(int rank) {
        return [this, rank](double *values, std::size_t count) { all_reduce(rank, values, count); };
    }

    // Sums every participant's `count` doubles and hands each the total,
    // added up in rank order, so that every participant gets the same bits.
    // Participants that pass different counts (undefined under MPI) get the
    // sums of the first `count` positions, the missing ones counted as 0,
    // and the round is counted in mismatched_rounds().
    void all_reduce(int rank, double *values, std::size_t count) {
        std::unique_lock<std::mutex> lock(mutex_);
        sizes_[rank].push_back(count);
        if (broken_) {
            throw CollectiveBroken("fake collective: broken earlier: " + reason_);
        }
        const uint64_t generation = generation_;
        pending_[rank] = {values, count};
        arrived_++;
        if (arrived_ + departed_ == size_) {
            if (departed_ > 0) {
                break_round("participant " + std::to_string(rank) +
                            " called an all-reduce that others, having finished, never joined");
                throw CollectiveBroken("fake collective: " + reason_);
            }
            complete_round();
            return;
        }
        const auto deadline = std::chrono::steady_clock::now() + round_timeout_;
        while (generation_ == generation && !broken_) {
            if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && generation_ == generation &&
                !broken_) {
                break_round("a round waited longer than " + std::to_string(round_timeout_.count()) +
                            " ms for the other participants");
            }
        }
        if (generation_ == generation) {
            throw CollectiveBroken("fake collective: " + reason_);
        }
    }

    // Participant `rank` has finished its work: a round still waiting for it
    // can never complete.
    void depart(int /*rank*/) {
        std::lock_guard<std::mutex> lock(mutex_);
        departed_++;
        if (arrived_ > 0 && arrived_ + departed_ == size_) {
            break_round("participants finished while others waited in an all-reduce");
        }
    }

    // Before a new run: everyone present again, nothing broken. The records
    // of collective sizes stay until clear_records().
    void begin() {
        std::lock_guard<std::mutex> lock(mutex_);
        departed_ = 0;
        arrived_ = 0;
        broken_ = false;
        reason_.clear();
    }

    void clear_records() {
        std::lock_guard<std::mutex> lock(mutex_);
        for (auto &s : sizes_) {
            s.clear();
        }
        mismatched_rounds_ = 0;
        rounds_ = 0;
    }

    // The count of each all-reduce participant `rank` made, in order.
    std::vector<std::size_t> sizes(int rank) const {
        std::lock_guard<std::mutex> lock(mutex_);
        return sizes_[rank];
    }
    int mismatched_rounds() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return mismatched_rounds_;
    }
    int rounds() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return rounds_;
    }
    bool broken() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return broken_;
    }
    std::string broken_reason() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return reason_;
    }

private:
    struct Contribution {
        double *values = nullptr;
        std::size_t count = 0;
    };

    void complete_round() {  // under the lock, every participant arrived
        std::size_t longest = 0;
        bool mismatched = false;
        for (const Contribution &c : pending_) {
            mismatched |= c.count != pending_[0].count;
            longest = std::max(longest, c.count);
        }
        std::vector<double> total(longest, 0.0);
        for (const Contribution &c : pending_) {  // rank order: the same bits for all
            for (std::size_t i = 0; i < c.count; i++) {
                total[i] += c.values[i];
            }
        }
        for (const Contribution &c : pending_) {
            std::copy(total.begin(), total.begin() + static_cast<std::ptrdiff_t>(c.count), c.values);
        }
        mismatched_rounds_ += mismatched;
        rounds_++;
        arrived_ = 0;
        generation_++;
        cv_.notify_all();
    }

    void break_round(const std::string &why) {  // under the lock
        if (!broken_) {
            reason_ = why;
        }
        broken_ = true;
        arrived_ = 0;
        cv_.notify_all();
    }

    const int size_;
    const std::chrono::milliseconds round_timeout_;
    mutable std::mutex mutex_;
    std::condition_variable cv_;
    std::vector<Contribution> pending_;
    std::vector<std::vector<std::size_t>> sizes_;
    uint64_t generation_ = 0;
    int arrived_ = 0, departed_ = 0, mismatched_rounds_ = 0, rounds_ = 0;
    bool broken_ = false;
    std::string reason_;
};

// What a call threw, if anything.
struct Outcome {
    enum class Thrown { Nothing, HbnError, Other };
    Thrown thrown = Thrown::Nothing;
    hbn::ErrorKind kind = hbn::ErrorKind::RuntimeError;  // for HbnError
    std::string message;
    bool collective_broken = false;  // the fake collective gave up (see CollectiveBroken)

    bool ok() const { return thrown == Thrown::Nothing; }
    bool hbn_error() const { return thrown == Thrown::HbnError; }
};

inline const char *kind_name(hbn::ErrorKind kind) {
    switch (kind) {
    case hbn::ErrorKind::TypeError:
        return "TypeError";
    case hbn::ErrorKind::ValueError:
        return "ValueError";
    case hbn::ErrorKind::RuntimeError:
        return "RuntimeError";
    }
    return "?";
}

inline std::string describe(const Outcome &o) {
    switch (o.thrown) {
    case Outcome::Thrown::Nothing:
        return "returned normally";
    case Outcome::Thrown::HbnError:
        return std::string("hbn::Error ") + kind_name(o.kind) + ": " + o.message;
    case Outcome::Thrown::Other:
        return std::string(o.collective_broken ? "fake collective broke: " : "other exception: ") + o.message;
    }
    return "?";
}

template <class F>
Outcome capture(F &&f) {
    Outcome o;
    try {
        f();
    } catch (const hbn::Error &e) {
        o.thrown = Outcome::Thrown::HbnError;
        o.kind = e.kind();
        o.message = e.what();
    } catch (const CollectiveBroken &e) {
        o.thrown = Outcome::Thrown::Other;
        o.collective_broken = true;
        o.message = e.what();
    } catch (const std::exception &e) {
        o.thrown = Outcome::Thrown::Other;
        o.message = e.what();
    } catch (...) {
        o.thrown = Outcome::Thrown::Other;
        o.message = "an exception of unknown type";
    }
    return o;
}

// Runs body(rank) for every participant of `group`, each on its own thread,
// and waits for them all. The bodies should only call hbn (through capture)
// and store what they saw: the test checks it on the main thread afterwards.
// A participant that never finishes (a hang outside the hook, which the
// group's round timeout cannot break) aborts the program after `timeout`,
// saying so, rather than hanging the suite. Returns false, with a failure
// added, when a body let an exception escape.
inline bool run_participants(FakeGroup &group, const std::function<void(int)> &body,
                             std::chrono::seconds timeout = std::chrono::seconds(30)) {
    group.begin();
    const int p = group.size();
    std::mutex mutex;
    std::condition_variable cv;
    int finished = 0;
    std::vector<std::string> escaped(p);
    std::vector<std::thread> threads;
    for (int rank = 0; rank < p; rank++) {
        threads.emplace_back([&, rank] {
            try {
                body(rank);
            } catch (const std::exception &e) {
                escaped[rank] = e.what();
            } catch (...) {
                escaped[rank] = "an exception of unknown type";
            }
            group.depart(rank);
            std::lock_guard<std::mutex> lock(mutex);
            finished++;
            cv.notify_all();
        });
    }
    {
        std::unique_lock<std::mutex> lock(mutex);
        if (!cv.wait_for(lock, timeout, [&] { return finished == p; })) {
            std::fprintf(stderr,
                         "FATAL: %d of %d participants of a synchronized batch norm did not finish within %lld s "
                         "(a hang); aborting the test program\n",
                         p - finished, p, static_cast<long long>(timeout.count()));
            std::fflush(stderr);
            std::abort();
        }
    }
    for (auto &t : threads) {
        t.join();
    }
    bool clean = true;
    for (int rank = 0; rank < p; rank++) {
        if (!escaped[rank].empty()) {
            ADD_FAILURE() << "participant " << rank << ": exception escaped the body: " << escaped[rank];
            clean = false;
        }
    }
    return clean;
}

// The documented sequences of all-reduce counts of one call.
inline std::vector<std::size_t> forward_collectives(int64_t channels) {
    const auto c = static_cast<std::size_t>(channels);
    return {6, c + 1, c, 1};
}
inline std::vector<std::size_t> backward_collectives(int64_t channels) {
    const auto c = static_cast<std::size_t>(channels);
    return {6, 2 * c + 1, 1};
}
inline std::vector<std::size_t> repeated(const std::vector<std::size_t> &sequence, int times) {
    std::vector<std::size_t> out;
    for (int i = 0; i < times; i++) {
        out.insert(out.end(), sequence.begin(), sequence.end());
    }
    return out;
}
inline std::vector<std::size_t> joined(std::vector<std::size_t> a, const std::vector<std::size_t> &b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
}

inline std::string sizes_text(const std::vector<std::size_t> &sizes) {
    std::string s = "{";
    for (std::size_t i = 0; i < sizes.size(); i++) {
        s += (i ? ", " : "") + std::to_string(sizes[i]);
    }
    return s + "}";
}

// Every participant made exactly `expected` all-reduces, and the group never
// broke nor saw participants pass different counts.
inline void expect_collectives(const FakeGroup &group, const std::vector<std::size_t> &expected,
                               const std::string &what) {
    EXPECT_FALSE(group.broken()) << what << ": " << group.broken_reason();
    EXPECT_EQ(group.mismatched_rounds(), 0) << what << ": participants passed different counts to one all-reduce";
    for (int r = 0; r < group.size(); r++) {
        EXPECT_EQ(sizes_text(group.sizes(r)), sizes_text(expected)) << what << ": participant " << r;
    }
}

enum class Entry { BatchNorm, BatchNormTraining };

inline const char *entry_name(Entry e) {
    return e == Entry::BatchNorm ? "batch_norm" : "batch_norm_training";
}

inline int64_t product(const std::vector<int64_t> &v, size_t from = 0) {
    int64_t p = 1;
    for (size_t i = from; i < v.size(); i++) {
        p *= v[i];
    }
    return p;
}

inline std::vector<double> constant(std::size_t count, double value) {
    return std::vector<double>(count, value);
}

// One process's tensors for a synchronized call: its slice of the batch (and
// of grad_output, and of the fused epilogue's tensors), its own copies of the
// per-channel tensors, outputs filled with a sentinel. options: training, the
// layout, the activation; the test sets all_reduce.
struct Participant {
    static constexpr double sentinel = 10000;  // exact in float16 too

    std::vector<int64_t> shape;
    hbn::BatchNormOptions options;  // but the epilogue's tensors, passed from the members below
    HostTensor x, output, running_mean, running_var, weight, bias, saved_mean, saved_inv_std;
    HostTensor dy, grad_input, grad_weight, grad_bias;
    // The fused epilogue's, where it has them (else rank 0: none): the
    // forward's residual, the backward's mask and grad_residual.
    HostTensor residual, forward_output, grad_residual;

    void forward(Entry entry) {
        hbn::BatchNormOptions o = options;
        o.residual = residual.view();
        if (entry == Entry::BatchNorm) {
            hbn::batch_norm(x.view(), running_mean.view(), running_var.view(), weight.view(), bias.view(),
                            output.view(), o);
        } else {
            hbn::batch_norm_training(x.view(), running_mean.view(), running_var.view(), weight.view(), bias.view(),
                                     output.view(), saved_mean.view(), saved_inv_std.view(), o);
        }
    }

    // Training backward with the saved statistics (of a forward run first).
    void backward() {
        hbn::BatchNormOptions o = options;
        o.training = true;
        o.forward_output = forward_output.view();
        o.grad_residual = grad_residual.view();
        hbn::batch_norm_backward(dy.view(), x.view(), weight.view(), hbn::Tensor{}, hbn::Tensor{}, saved_mean.view(),
                                 saved_inv_std.view(), grad_input.view(), grad_weight.view(), grad_bias.view(), o);
    }

    // The bytes a failed call must leave as they were.
    std::vector<std::vector<unsigned char>> committed() const {
        return {running_mean.bytes(), running_var.bytes(), saved_mean.bytes(),
                saved_inv_std.bytes(), grad_weight.bytes(), grad_bias.bytes()};
    }
};

// The call a test makes on every participant.
enum class Call { BatchNorm, BatchNormTraining, Backward };

inline const char *call_name(Call call) {
    return call == Call::BatchNorm ? "batch_norm" : call == Call::BatchNormTraining ? "batch_norm_training"
                                                                                    : "batch_norm_backward";
}

inline void invoke(Participant &p, Call call) {
    if (call == Call::Backward) {
        p.backward();
    } else {
        p.forward(call == Call::BatchNorm ? Entry::BatchNorm : Entry::BatchNormTraining);
    }
}

inline const char *committed_name(size_t i) {
    static const char *names[] = {"running_mean", "running_var", "saved_mean",
                                  "saved_inv_std", "grad_weight", "grad_bias"};
    return names[i];
}

// A global batch (the concatenation of every process's), split along its
// leading axis N (in both layouts: NCHW (N, C, ...), NHWC (N, ..., C)), so
// that process r holds images [first_image(r), first_image(r) + counts[r]),
// a contiguous range of elements. Built the same on every process (same
// seed), with grad_output for the backward, and the fused epilogue's tensors
// when one is asked for (set_epilogue).
struct SyncBatch {
    BatchNormCase whole;  // training, with the residual; its reference is the concatenated batch's
    HostTensor dy;
    HostTensor forward_output;  // with ReLU: the backward's mask
    std::vector<int64_t> counts;
    hbn::DType x_dtype, param_dtype;

    SyncBatch(std::vector<int64_t> shape, hbn::Layout layout, hbn::DType x_dtype_, hbn::DType param_dtype_,
              std::vector<int64_t> counts_, uint32_t seed = 1, double mean = 0.5, double spread = 2.0)
        : whole(shape, layout, x_dtype_, param_dtype_, true, seed, mean, spread),
          counts(std::move(counts_)),
          x_dtype(x_dtype_),
          param_dtype(param_dtype_) {
        if (std::accumulate(counts.begin(), counts.end(), int64_t(0)) != shape[0]) {
            throw std::logic_error("SyncBatch: the counts do not add up to N");
        }
        dy = HostTensor(x_dtype, shape, random_values(whole.x.size(), 0, 1, seed + 5));
    }

    // Asks for a fused epilogue, in both directions (before participant()):
    // the forward adds whole's residual; with ReLU, the backward's mask is
    // the forward's output on the concatenated batch, the reference's in x's
    // dtype (exact zeros where the ReLU cut), so that the two directions
    // chain.
    void set_epilogue(Epilogue e) {
        whole.set_epilogue(e);
        forward_output = rectifies(e) ? HostTensor(x_dtype, whole.shape, forward_reference().output) : HostTensor{};
    }
    Epilogue epilogue() const { return whole.epilogue; }

    // The gradient that reaches batch norm, which grad_residual receives: dy
    // through the ReLU's mask.
    std::vector<double> normalized_gradient() const {
        return rectifies(epilogue()) ? reference_relu_gradient(dy.values(), forward_output.values()) : dy.values();
    }

    int processes() const { return static_cast<int>(counts.size()); }
    int64_t channels() const { return Geometry(whole.shape, whole.layout).channels; }
    int64_t per_image() const { return product(whole.shape, 1); }
    int64_t first_image(int r) const { return std::accumulate(counts.begin(), counts.begin() + r, int64_t(0)); }
    std::vector<int64_t> shape_of(int r) const {
        std::vector<int64_t> s = whole.shape;
        s[0] = counts[r];
        return s;
    }

    // Process r's part of a whole-batch array of values.
    std::vector<double> part(const std::vector<double> &values, int r) const {
        const auto first = static_cast<std::ptrdiff_t>(first_image(r) * per_image());
        const auto count = static_cast<std::ptrdiff_t>(counts[r] * per_image());
        return std::vector<double>(values.begin() + first, values.begin() + first + count);
    }

    Participant participant(int r) const {
        Participant p;
        p.shape = shape_of(r);
        p.options = whole.options;
        p.options.training = true;
        const auto n = static_cast<size_t>(counts[r] * per_image());
        const auto c = static_cast<size_t>(channels());
        p.x = HostTensor(x_dtype, p.shape, part(whole.x.values(), r));
        p.output = HostTensor(x_dtype, p.shape, constant(n, Participant::sentinel));
        p.dy = HostTensor(x_dtype, p.shape, part(dy.values(), r));
        p.grad_input = HostTensor(x_dtype, p.shape, constant(n, Participant::sentinel));
        p.running_mean = whole.running_mean;
        p.running_var = whole.running_var;
        p.weight = whole.weight;
        p.bias = whole.bias;
        p.saved_mean = HostTensor(hbn::DType::Float32, {channels()}, constant(c, Participant::sentinel));
        p.saved_inv_std = HostTensor(hbn::DType::Float32, {channels()}, constant(c, Participant::sentinel));
        p.grad_weight = HostTensor(param_dtype, {channels()}, constant(c, Participant::sentinel));
        p.grad_bias = HostTensor(param_dtype, {channels()}, constant(c, Participant::sentinel));
        if (adds_residual(epilogue())) {
            p.residual = HostTensor(x_dtype, p.shape, part(whole.residual.values(), r));
            p.grad_residual = HostTensor(x_dtype, p.shape, constant(n, Participant::sentinel));
        }
        if (rectifies(epilogue())) {
            p.forward_output = HostTensor(x_dtype, p.shape, part(forward_output.values(), r));
        }
        return p;
    }

    // The forward reference on the concatenated batch, with whole's options
    // (momentum, eps) and epilogue.
    ReferenceResult forward_reference() const { return whole.reference(); }

    // The training backward reference on the concatenated batch, with the
    // given (hbn's saved) statistics, through the epilogue's mask.
    ReferenceBackward backward_reference(const std::vector<double> &mean, const std::vector<double> &inv_std) const {
        return reference_batch_norm_backward(normalized_gradient(), whole.x.values(), whole.shape, whole.layout,
                                             whole.weight.values(), mean, inv_std, true);
    }

    // The sums over process r's slice alone, with the given (global)
    // statistics: its grad_weight and grad_bias. (The grad_input of this
    // reference is the slice's own, not used.)
    ReferenceBackward local_backward_reference(int r, const std::vector<double> &mean,
                                               const std::vector<double> &inv_std) const {
        return reference_batch_norm_backward(part(normalized_gradient(), r), part(whole.x.values(), r), shape_of(r),
                                             whole.layout, whole.weight.values(), mean, inv_std, true);
    }
};

inline std::vector<double> plus(std::vector<double> a, const std::vector<double> &b) {
    for (size_t i = 0; i < a.size(); i++) {
        a[i] += b[i];
    }
    return a;
}

}  // namespace hbn_test
