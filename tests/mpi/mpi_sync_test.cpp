// Synchronized batch norm over MPI (hbn::mpi_all_reduce), run by ctest under
// mpirun with 1 to 4 processes. Every rank builds the same global batch (the
// same seed), takes its slice along N (uneven, some ranks empty or with one
// value per channel), runs hbn synchronized, and checks its part against the
// double reference of the concatenated batch computed here: both layouts
// and dtypes, the forward (batch_norm, batch_norm_training) and backward,
// large offsets, the global M below 2, and a failing rank (every rank throws
// hbn::Error, none changes its statistics, none hangs).
//
// Every rank runs every test through the same calls, collectives included:
// checks are EXPECT_* only (an ASSERT_* that returned early on one rank would
// leave the others waiting in an all-reduce), and exceptions are caught.
// Rank 0 prints gtest's usual output; the other ranks print their failures
// only. The exit status is nonzero on every rank when any rank failed.
#include "fake_collective.h"

#include <hbn/mpi.h>
#include <mpi.h>

#include <cstdio>

namespace hbn_test {
namespace {

using hbn::DType;
using hbn::ErrorKind;
using hbn::Layout;

int world_rank = 0, world_size = 1;

std::string rank_label() {
    return "rank " + std::to_string(world_rank) + " of " + std::to_string(world_size) + ": ";
}

// Images per rank: rank r holds r + 1.
std::vector<int64_t> uneven_counts() {
    std::vector<int64_t> counts(world_size);
    for (int r = 0; r < world_size; r++) {
        counts[r] = r + 1;
    }
    return counts;
}

// As uneven, but the last rank empty (with more than one rank).
std::vector<int64_t> last_empty_counts() {
    std::vector<int64_t> counts = uneven_counts();
    if (world_size > 1) {
        counts.back() = 0;
    }
    return counts;
}

// One image (in a rank-2 batch, one value per channel) on even ranks, none
// on odd ones; at least two in all.
std::vector<int64_t> one_value_counts() {
    std::vector<int64_t> counts(world_size);
    int64_t total = 0;
    for (int r = 0; r < world_size; r++) {
        total += counts[r] = r % 2 == 0 ? 1 : 0;
    }
    if (total < 2) {
        counts[0] += 2 - total;
    }
    return counts;
}

int64_t sum(const std::vector<int64_t> &counts) {
    return std::accumulate(counts.begin(), counts.end(), int64_t(0));
}

std::string counts_text(const std::vector<int64_t> &counts) {
    std::string s;
    for (int64_t n : counts) {
        s += (s.empty() ? "" : ",") + std::to_string(n);
    }
    return "{" + s + "}";
}

// Every rank's `values` (each rank passes as many), rank by rank.
std::vector<std::vector<double>> all_gather(const std::vector<double> &values) {
    std::vector<double> flat(values.size() * world_size);
    MPI_Allgather(values.data(), static_cast<int>(values.size()), MPI_DOUBLE, flat.data(),
                  static_cast<int>(values.size()), MPI_DOUBLE, MPI_COMM_WORLD);
    std::vector<std::vector<double>> out;
    for (int r = 0; r < world_size; r++) {
        out.emplace_back(flat.begin() + r * values.size(), flat.begin() + (r + 1) * values.size());
    }
    return out;
}

std::vector<double> all_sum(std::vector<double> values) {
    MPI_Allreduce(MPI_IN_PLACE, values.data(), static_cast<int>(values.size()), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    return values;
}

// This rank's values of a per-channel tensor are bitwise every rank's
// (compared as doubles, which float32 and float16 values convert to
// exactly; NaN compares by its being NaN).
void expect_same_on_every_rank(const std::vector<double> &values, const std::string &what) {
    const auto everyone = all_gather(values);
    for (int r = 0; r < world_size; r++) {
        bool same = everyone[r].size() == values.size();
        for (size_t i = 0; same && i < values.size(); i++) {
            same = everyone[r][i] == values[i] || (std::isnan(everyone[r][i]) && std::isnan(values[i]));
        }
        EXPECT_TRUE(same) << rank_label() << what << " differs from rank " << r << "'s";
    }
}

Participant participant_of(const SyncBatch &batch) {
    Participant p = batch.participant(world_rank);
    p.options.all_reduce = hbn::mpi_all_reduce(MPI_COMM_WORLD);
    return p;
}

std::vector<int64_t> image_shape(Layout layout, int64_t n) {
    return layout == Layout::NCHW ? std::vector<int64_t>{n, 5, 3, 4} : std::vector<int64_t>{n, 3, 4, 5};
}

std::string case_label(Layout layout, DType x_dtype, DType param_dtype, const std::vector<int64_t> &counts) {
    return rank_label() + (layout == Layout::NCHW ? "NCHW" : "NHWC") + (x_dtype == DType::Float32 ? " x32" : " x16") +
           (param_dtype == DType::Float32 ? " p32" : " p16") + " counts " + counts_text(counts) + " ";
}

void check_forward(const SyncBatch &batch, Entry entry, const std::string &what) {
    Participant p = participant_of(batch);
    const Outcome outcome = capture([&] { p.forward(entry); });
    EXPECT_TRUE(outcome.ok()) << what << describe(outcome);
    const ReferenceResult expected = batch.forward_reference();
    expect_close(p.output.values(), batch.part(expected.output, world_rank), output_tolerance(batch.x_dtype),
                 what + "output");
    expect_close(p.running_mean.values(), expected.running_mean, parameter_tolerance(batch.param_dtype),
                 what + "running_mean");
    expect_close(p.running_var.values(), expected.running_var, parameter_tolerance(batch.param_dtype),
                 what + "running_var");
    expect_same_on_every_rank(p.running_mean.values(), what + "running_mean");
    expect_same_on_every_rank(p.running_var.values(), what + "running_var");
    if (entry == Entry::BatchNormTraining) {
        expect_close(p.saved_mean.values(), expected.batch_mean, 1e-6, what + "saved_mean");
        expect_close(p.saved_inv_std.values(), expected.inv_std, 2e-6, what + "saved_inv_std");
        expect_same_on_every_rank(p.saved_mean.values(), what + "saved_mean");
        expect_same_on_every_rank(p.saved_inv_std.values(), what + "saved_inv_std");
    }
}

TEST(MpiSync, ForwardMatchesConcatenatedBatch) {
    for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
        for (const auto &[x_dtype, param_dtype] : {std::pair{DType::Float32, DType::Float32},
                                                   std::pair{DType::Float16, DType::Float32},
                                                   std::pair{DType::Float32, DType::Float16}}) {
            for (const std::vector<int64_t> &counts : {uneven_counts(), last_empty_counts()}) {
                for (Entry entry : {Entry::BatchNorm, Entry::BatchNormTraining}) {
                    const SyncBatch batch(image_shape(layout, sum(counts)), layout, x_dtype, param_dtype, counts, 7);
                    check_forward(batch, entry,
                                  case_label(layout, x_dtype, param_dtype, counts) + entry_name(entry) + ": ");
                }
            }
        }
    }
}

// batch_norm_training then the training backward: grad_input is the whole
// batch's, grad_weight and grad_bias this rank's own sums, which add up (as
// the data-parallel step's all-reduce adds them) to the whole batch's.
void check_backward(const SyncBatch &batch, const std::string &what) {
    Participant p = participant_of(batch);
    const Outcome forward = capture([&] { p.forward(Entry::BatchNormTraining); });
    const Outcome backward = capture([&] { p.backward(); });
    EXPECT_TRUE(forward.ok()) << what << "forward: " << describe(forward);
    EXPECT_TRUE(backward.ok()) << what << "backward: " << describe(backward);
    const std::vector<double> mean = p.saved_mean.values(), inv_std = p.saved_inv_std.values();
    expect_same_on_every_rank(mean, what + "saved_mean");
    expect_same_on_every_rank(inv_std, what + "saved_inv_std");
    const ReferenceResult forward_expected = batch.forward_reference();
    expect_close(mean, forward_expected.batch_mean, 1e-6, what + "saved_mean");
    expect_close(inv_std, forward_expected.inv_std, 2e-6, what + "saved_inv_std");
    const ReferenceBackward expected = batch.backward_reference(mean, inv_std);
    expect_within(p.grad_input.values(), batch.part(expected.grad_input, world_rank),
                  batch.part(grad_input_bounds(expected, batch.x_dtype), world_rank), what + "grad_input");
    const ReferenceBackward local = batch.local_backward_reference(world_rank, mean, inv_std);
    const std::vector<double> weight_bounds = grad_weight_bounds(local, batch.param_dtype),
                              bias_bounds = grad_bias_bounds(local, batch.param_dtype);
    expect_within(p.grad_weight.values(), local.grad_weight, weight_bounds, what + "grad_weight (own slice)");
    expect_within(p.grad_bias.values(), local.grad_bias, bias_bounds, what + "grad_bias (own slice)");
    expect_within(all_sum(p.grad_weight.values()), expected.grad_weight,
                  plus(all_sum(weight_bounds),
                       sum_bounds(expected.grad_weight, expected.grad_weight_terms, 1e-12, DType::Float32)),
                  what + "grad_weight summed over the ranks");
    expect_within(all_sum(p.grad_bias.values()), expected.grad_bias,
                  plus(all_sum(bias_bounds), sum_bounds(expected.grad_bias, expected.grad_bias_terms, 1e-12, DType::Float32)),
                  what + "grad_bias summed over the ranks");
}

TEST(MpiSync, BackwardMatchesConcatenatedBatch) {
    for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
        for (const auto &[x_dtype, param_dtype] : {std::pair{DType::Float32, DType::Float32},
                                                   std::pair{DType::Float16, DType::Float32},
                                                   std::pair{DType::Float32, DType::Float16}}) {
            for (const std::vector<int64_t> &counts : {uneven_counts(), last_empty_counts()}) {
                const SyncBatch batch(image_shape(layout, sum(counts)), layout, x_dtype, param_dtype, counts, 11);
                check_backward(batch, case_label(layout, x_dtype, param_dtype, counts));
            }
        }
    }
}

// A rank-2 batch (N, C): ranks with one value per channel, or none.
TEST(MpiSync, OneValuePerChannelAndEmptyRanks) {
    const std::vector<int64_t> counts = one_value_counts();
    for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
        for (DType x_dtype : {DType::Float32, DType::Float16}) {
            const SyncBatch batch({sum(counts), 6}, layout, x_dtype, DType::Float32, counts, 13);
            const std::string what = case_label(layout, x_dtype, DType::Float32, counts) + "(N, C) ";
            check_forward(batch, Entry::BatchNorm, what + "batch_norm: ");
            check_forward(batch, Entry::BatchNormTraining, what + "batch_norm_training: ");
            check_backward(batch, what);
        }
    }
}

// x = 1e4 + N(0, 1), 900 values per channel per image: the synchronized
// statistics are as exact as one process's on the concatenated batch (run
// here too). momentum 1 makes running_var the unbiased batch variance.
TEST(MpiSync, LargeOffsetKeepsSingleProcessAccuracy) {
    const std::vector<int64_t> counts = uneven_counts();
    for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
        const int64_t n = sum(counts);
        const std::vector<int64_t> shape =
            layout == Layout::NCHW ? std::vector<int64_t>{n, 2, 30, 30} : std::vector<int64_t>{n, 30, 30, 2};
        SyncBatch batch(shape, layout, DType::Float32, DType::Float32, counts, 23, 1e4, 1.0);
        batch.whole.options.momentum = 1;
        const std::string what = case_label(layout, DType::Float32, DType::Float32, counts) + "mean/std 1e4: ";
        Participant p = participant_of(batch);
        const Outcome forward = capture([&] { p.forward(Entry::BatchNormTraining); });
        const Outcome backward = capture([&] { p.backward(); });
        EXPECT_TRUE(forward.ok()) << what << describe(forward);
        EXPECT_TRUE(backward.ok()) << what << describe(backward);

        BatchNormCase single = batch.whole;  // one process, unsynchronized
        BatchNormCase::SavedStatistics single_saved;
        const Outcome single_outcome = capture([&] { single_saved = single.run_training(); });
        EXPECT_TRUE(single_outcome.ok()) << what << "one process: " << describe(single_outcome);
        const ReferenceResult expected = batch.forward_reference();
        const auto m = static_cast<double>(Geometry(shape, layout).values_per_channel);
        const double eps = batch.whole.options.eps;
        for (int64_t c = 0; c < batch.channels() && single_outcome.ok(); c++) {
            const double inv_std = p.saved_inv_std.get(c), var = 1 / (inv_std * inv_std) - eps;
            const double single_inv_std = single_saved.inv_std.get(c);
            const double single_var = 1 / (single_inv_std * single_inv_std) - eps;
            const double ref_var = expected.batch_var[c], unbiased = ref_var * m / (m - 1);
            if (world_rank == 0) {
                std::printf("%schannel %lld: variance %.9g, one process %.9g, reference %.9g\n", what.c_str(),
                            static_cast<long long>(c), var, single_var, ref_var);
            }
            EXPECT_LE(std::abs(var - ref_var) / ref_var, 1e-6) << what << "variance, channel " << c;
            EXPECT_LE(std::abs(var - single_var) / ref_var, 1e-6) << what << "variance vs one process, channel " << c;
            EXPECT_LE(std::abs(p.running_var.get(c) - unbiased) / unbiased, 1e-6) << what << "running_var, channel " << c;
            const double mean_ulp = 2 * unit_roundoff32 * std::abs(expected.batch_mean[c]);
            EXPECT_NEAR(p.saved_mean.get(c), expected.batch_mean[c], mean_ulp) << what << "saved_mean, channel " << c;
            EXPECT_NEAR(p.saved_mean.get(c), single_saved.mean.get(c), mean_ulp) << what << "vs one process, channel " << c;
        }
        const double x_ulp_in_std = 1e4 * 6e-8 * expected.inv_std[0];
        expect_close(p.output.values(), batch.part(expected.output, world_rank), 4 * x_ulp_in_std + 2e-6,
                     what + "output");
        const std::vector<double> mean = p.saved_mean.values(), inv_std = p.saved_inv_std.values();
        const ReferenceBackward backward_expected = batch.backward_reference(mean, inv_std);
        expect_within(p.grad_input.values(), batch.part(backward_expected.grad_input, world_rank),
                      batch.part(grad_input_bounds(backward_expected, DType::Float32), world_rank), what + "grad_input");
        const ReferenceBackward local = batch.local_backward_reference(world_rank, mean, inv_std);
        expect_within(p.grad_weight.values(), local.grad_weight, grad_weight_bounds(local, DType::Float32),
                      what + "grad_weight");
    }
}


void expect_nothing_committed(const Participant &p, const std::vector<std::vector<unsigned char>> &before,
                              const std::string &what) {
    const auto after = p.committed();
    for (size_t i = 0; i < after.size(); i++) {
        EXPECT_EQ(after[i], before[i]) << what << committed_name(i) << " changed";
    }
}

// The last rank passes a bad tensor: every rank throws hbn::Error (the last
// its own kind, the others RuntimeError), none changes its statistics, and
// a good call right after works on every rank (the ranks' all-reduces
// stayed matched).
TEST(MpiSync, FailingRankRaisesEverywhereAndCommitsNothing) {
    const std::vector<int64_t> counts = uneven_counts();
    const int failing = world_size - 1;
    struct Bad {
        const char *name;
        ErrorKind kind;
        bool backward_only, forward_only;
        std::function<void(Participant &)> spoil;
    };
    const std::vector<Bad> bads = {
        {"weight of C + 1", ErrorKind::ValueError, false, false,
         [](Participant &p) {
             const auto c = static_cast<int64_t>(p.weight.size());
             p.weight = HostTensor(DType::Float32, {c + 1}, constant(c + 1, 1.0));
         }},
        {"float16 output", ErrorKind::TypeError, false, true,
         [](Participant &p) { p.output = HostTensor(DType::Float16, p.shape, constant(p.output.size(), 0.0)); }},
        {"float16 grad_input", ErrorKind::TypeError, true, false,
         [](Participant &p) { p.grad_input = HostTensor(DType::Float16, p.shape, constant(p.grad_input.size(), 0.0)); }},
    };
    for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
        for (const Bad &bad : bads) {
            for (Call call : {Call::BatchNorm, Call::BatchNormTraining, Call::Backward}) {
                if ((bad.backward_only && call != Call::Backward) || (bad.forward_only && call == Call::Backward)) {
                    continue;
                }
                const std::string what = case_label(layout, DType::Float32, DType::Float32, counts) + call_name(call) +
                                         ", rank " + std::to_string(failing) + " passes " + bad.name + ": ";
                const SyncBatch batch(image_shape(layout, sum(counts)), layout, DType::Float32, DType::Float32, counts,
                                      5);
                Participant p = participant_of(batch);
                if (call == Call::Backward) {
                    const Outcome first = capture([&] { p.forward(Entry::BatchNormTraining); });
                    EXPECT_TRUE(first.ok()) << what << "forward first: " << describe(first);
                }
                Participant good = p;
                if (world_rank == failing) {
                    bad.spoil(p);
                }
                const auto before = p.committed();
                const Outcome outcome = capture([&] { invoke(p, call); });
                EXPECT_TRUE(outcome.hbn_error()) << what << describe(outcome);
                if (outcome.hbn_error()) {
                    const ErrorKind kind = world_rank == failing ? bad.kind : ErrorKind::RuntimeError;
                    EXPECT_EQ(std::string(kind_name(outcome.kind)), kind_name(kind)) << what << outcome.message;
                }
                expect_nothing_committed(p, before, what);

                const Outcome retried = capture([&] { invoke(good, call); });
                EXPECT_TRUE(retried.ok()) << what << "retry: " << describe(retried);
                if (call != Call::Backward) {
                    const ReferenceResult expected = batch.forward_reference();
                    expect_close(good.output.values(), batch.part(expected.output, world_rank),
                                 output_tolerance(DType::Float32), what + "retry output");
                    expect_close(good.running_var.values(), expected.running_var, 2e-6, what + "retry running_var");
                }
            }
        }
    }
}

// The global M below 2: one value per channel in all (on rank 0), or no
// value at all. Every rank raises ValueError and changes nothing.
TEST(MpiSync, GlobalCountBelowTwoIsValueErrorEverywhere) {
    for (int64_t total : {1, 0}) {
        std::vector<int64_t> counts(world_size, 0);
        counts[0] = total;
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            for (Call call : {Call::BatchNorm, Call::BatchNormTraining, Call::Backward}) {
                const std::string what = case_label(layout, DType::Float32, DType::Float32, counts) + "(N, C) " +
                                         call_name(call) + ": ";
                const SyncBatch batch({total, 4}, layout, DType::Float32, DType::Float32, counts, 9);
                Participant p = participant_of(batch);
                p.saved_mean = HostTensor(DType::Float32, {4}, constant(4, 0.0));
                p.saved_inv_std = HostTensor(DType::Float32, {4}, constant(4, 1.0));
                const auto before = p.committed();
                const Outcome outcome = capture([&] { invoke(p, call); });
                EXPECT_TRUE(outcome.hbn_error()) << what << describe(outcome);
                if (outcome.hbn_error()) {
                    EXPECT_EQ(std::string(kind_name(outcome.kind)), "ValueError") << what << outcome.message;
                }
                expect_nothing_committed(p, before, what);
            }
        }
    }
}

// Prints a non-root rank's failures (its only output).
class FailurePrinter : public ::testing::EmptyTestEventListener {
public:
    void OnTestPartResult(const ::testing::TestPartResult &result) override {
        if (result.failed()) {
            std::printf("[rank %d] %s:%d: Failure\n%s\n", world_rank,
                        result.file_name() ? result.file_name() : "unknown file", result.line_number(),
                        result.summary());
            std::fflush(stdout);
        }
    }
    void OnTestEnd(const ::testing::TestInfo &info) override {
        if (info.result()->Failed()) {
            std::printf("[rank %d] [  FAILED  ] %s.%s\n", world_rank, info.test_suite_name(), info.name());
            std::fflush(stdout);
        }
    }
};

}  // namespace
}  // namespace hbn_test

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &hbn_test::world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &hbn_test::world_size);
    ::testing::InitGoogleTest(&argc, argv);
    if (hbn_test::world_rank != 0) {
        ::testing::TestEventListeners &listeners = ::testing::UnitTest::GetInstance()->listeners();
        delete listeners.Release(listeners.default_result_printer());
        listeners.Append(new hbn_test::FailurePrinter);
    }
    const int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
    int any_failed = 0;
    MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (hbn_test::world_rank == 0) {
        std::printf("mpi_sync_test, %d process(es): %s\n", hbn_test::world_size,
                    any_failed ? (failed ? "FAILED" : "FAILED on another rank (see its [rank N] lines)") : "passed");
    }
    MPI_Finalize();
    return any_failed;
}
