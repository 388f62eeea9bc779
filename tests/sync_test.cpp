// Synchronized batch norm (BatchNormOptions::all_reduce) through an
// in-process fake collective: P threads, each a "process" with its own slice
// of a global batch (split along N) and its own running statistics, against
// the double reference of the concatenated batch, through the fused epilogues
// too (each process with its slice of the residual, the forward's output and
// grad_residual). The collectives' number and sizes (only C and the direction
// decide them), inference ignoring the hook, and failures: every participant
// throws, none hangs, none commits.
#include "fake_collective.h"

#include <atomic>
#include <cctype>
#include <memory>

namespace hbn_test {
namespace {

using hbn::DType;
using hbn::ErrorKind;
using hbn::Layout;

// A global batch shape, and how its N images are split among 1, 2 and 3
// participants (index P - 1): uneven, with an empty participant, and in the
// rank-2 case with participants of one value per channel.
struct SplitCase {
    const char *name;
    std::vector<int64_t> shape;
    Layout layout;
    std::vector<std::vector<int64_t>> splits;
};

const std::vector<SplitCase> &split_cases() {
    static const std::vector<SplitCase> cases = {
        {"nchw", {7, 5, 3, 4}, Layout::NCHW, {{7}, {2, 5}, {4, 0, 3}}},
        {"nhwc", {7, 3, 4, 5}, Layout::NHWC, {{7}, {5, 2}, {3, 0, 4}}},
        {"nc", {9, 6}, Layout::NCHW, {{9}, {1, 8}, {1, 0, 8}}},
    };
    return cases;
}

struct DTypes {
    DType x, param;
};

std::vector<DTypes> dtypes_for(const SplitCase &c) {
    std::vector<DTypes> d;
    for (DType x : all_dtypes) {
        d.push_back({x, DType::Float32});
    }
    if (std::string(c.name) == "nchw") {
        for (DType param : {DType::Float16, DType::BFloat16}) {
            d.push_back({DType::Float32, param});
            d.push_back({param, param});
        }
    }
    return d;
}

// The fused epilogues a dtype pair runs with, in both directions: none and
// add + ReLU (every tensor of the epilogue at once) with every pair, ReLU
// alone and the add alone with float32 only (the dtypes' rounding of the
// epilogue is the unsynchronized tests' business; here it is the slicing).
std::vector<Epilogue> epilogues_for(DTypes d) {
    if (d.x == DType::Float32 && d.param == DType::Float32) {
        return all_epilogues;
    }
    return {Epilogue::None, Epilogue::AddReLU};
}

std::string label(const SplitCase &c, DTypes d, size_t p) {
    return std::string(c.name) + " x" + dtype_tag(d.x) + " p" + dtype_tag(d.param) +
           " P=" + std::to_string(p) + ": ";
}

// The participants of a batch, each with the group's hook.
std::vector<Participant> participants_of(const SyncBatch &batch, FakeGroup &group) {
    std::vector<Participant> parts;
    for (int r = 0; r < batch.processes(); r++) {
        parts.push_back(batch.participant(r));
        parts.back().options.all_reduce = group.hook(r);
    }
    return parts;
}

void expect_ok(const std::vector<Outcome> &outcomes, const std::string &what) {
    for (size_t r = 0; r < outcomes.size(); r++) {
        EXPECT_TRUE(outcomes[r].ok()) << what << "participant " << r << ": " << describe(outcomes[r]);
    }
}

// Every participant's running statistics (and saved statistics, after
// batch_norm_training) are bitwise participant 0's.
void expect_identical_statistics(const std::vector<Participant> &parts, bool saved, const std::string &what) {
    for (size_t r = 1; r < parts.size(); r++) {
        EXPECT_EQ(parts[r].running_mean.bytes(), parts[0].running_mean.bytes()) << what << "running_mean of " << r;
        EXPECT_EQ(parts[r].running_var.bytes(), parts[0].running_var.bytes()) << what << "running_var of " << r;
        if (saved) {
            EXPECT_EQ(parts[r].saved_mean.bytes(), parts[0].saved_mean.bytes()) << what << "saved_mean of " << r;
            EXPECT_EQ(parts[r].saved_inv_std.bytes(), parts[0].saved_inv_std.bytes())
                << what << "saved_inv_std of " << r;
        }
    }
}

// One synced forward on every participant, checked against the reference of
// the concatenated batch.
void check_forward(const SyncBatch &batch, Entry entry, const std::string &what) {
    FakeGroup group(batch.processes());
    std::vector<Participant> parts = participants_of(batch, group);
    const ReferenceResult expected = batch.forward_reference();
    std::vector<Outcome> outcomes(parts.size());
    run_participants(group, [&](int r) { outcomes[r] = capture([&] { parts[r].forward(entry); }); });
    expect_ok(outcomes, what);
    expect_collectives(group, forward_collectives(batch.channels()), what);
    for (int r = 0; r < batch.processes(); r++) {
        const std::string who = what + "participant " + std::to_string(r) + " ";
        expect_close(parts[r].output.values(), batch.part(expected.output, r), output_tolerance(batch.x_dtype),
                     who + "output");
        expect_close(parts[r].running_mean.values(), expected.running_mean, parameter_tolerance(batch.param_dtype),
                     who + "running_mean");
        expect_close(parts[r].running_var.values(), expected.running_var, parameter_tolerance(batch.param_dtype),
                     who + "running_var");
        if (entry == Entry::BatchNormTraining) {
            expect_close(parts[r].saved_mean.values(), expected.batch_mean, 1e-6, who + "saved_mean");
            expect_close(parts[r].saved_inv_std.values(), expected.inv_std, 2e-6, who + "saved_inv_std");
        }
    }
    expect_identical_statistics(parts, entry == Entry::BatchNormTraining, what);
}

TEST(SyncForward, MatchesConcatenatedBatchReference) {
    for (const SplitCase &c : split_cases()) {
        for (DTypes d : dtypes_for(c)) {
            for (size_t p = 1; p <= c.splits.size(); p++) {
                for (Epilogue epilogue : epilogues_for(d)) {
                    for (Entry entry : {Entry::BatchNorm, Entry::BatchNormTraining}) {
                        SyncBatch batch(c.shape, c.layout, d.x, d.param, c.splits[p - 1], 7);
                        batch.set_epilogue(epilogue);
                        check_forward(batch, entry, label(c, d, p) + epilogue_name(epilogue) + entry_name(entry) + " ");
                    }
                }
            }
        }
    }
}

// Three training steps in a row: the running statistics stay bitwise the
// same on every participant, and follow the reference step by step.
TEST(SyncForward, RunningStatisticsStayIdenticalOverSteps) {
    const SyncBatch batch({6, 4, 3, 5}, Layout::NHWC, DType::Float32, DType::Float32, {1, 0, 2, 3}, 31);
    FakeGroup group(batch.processes());
    std::vector<Participant> parts = participants_of(batch, group);
    std::vector<double> mean = batch.whole.running_mean.values(), var = batch.whole.running_var.values();
    std::vector<Outcome> outcomes(parts.size());
    run_participants(group, [&](int r) {
        outcomes[r] = capture([&] {
            for (int step = 0; step < 3; step++) {
                parts[r].forward(step == 1 ? Entry::BatchNormTraining : Entry::BatchNorm);
            }
        });
    });
    expect_ok(outcomes, "");
    expect_collectives(group, repeated(forward_collectives(batch.channels()), 3), "three steps");
    for (int step = 0; step < 3; step++) {
        const ReferenceResult r =
            reference_batch_norm(batch.whole.x.values(), batch.whole.shape, Layout::NHWC, mean, var,
                                 batch.whole.weight.values(), batch.whole.bias.values(), true, 0.1, 1e-5);
        mean = r.running_mean;
        var = r.running_var;
    }
    for (size_t r = 0; r < parts.size(); r++) {
        expect_close(parts[r].running_mean.values(), mean, 4e-6, "running_mean after 3 steps");
        expect_close(parts[r].running_var.values(), var, 4e-6, "running_var after 3 steps");
    }
    expect_identical_statistics(parts, true, "three steps: ");
}

// batch_norm_training, then the training backward, on every participant;
// both must succeed everywhere.
void train_step(FakeGroup &group, std::vector<Participant> &parts, const std::string &what) {
    std::vector<Outcome> forward(parts.size()), backward(parts.size());
    run_participants(group, [&](int r) {
        forward[r] = capture([&] { parts[r].forward(Entry::BatchNormTraining); });
        backward[r] = capture([&] { parts[r].backward(); });
    });
    expect_ok(forward, what + "forward: ");
    expect_ok(backward, what + "backward: ");
}

// batch_norm_training on every participant, then the training backward:
// grad_input is the whole batch's (its slice of it), grad_weight and
// grad_bias the participant's own sums with the global statistics, adding up
// to the whole batch's; through an epilogue with a residual, grad_residual is
// exactly its slice of the masked grad_output.
void check_backward(const SyncBatch &batch, const std::string &what) {
    FakeGroup group(batch.processes());
    std::vector<Participant> parts = participants_of(batch, group);
    train_step(group, parts, what);
    const int64_t channels = batch.channels();
    expect_collectives(group, joined(forward_collectives(channels), backward_collectives(channels)), what);
    expect_identical_statistics(parts, true, what);
    // The reference with hbn's own saved statistics (identical everywhere).
    const std::vector<double> mean = parts[0].saved_mean.values(), inv_std = parts[0].saved_inv_std.values();
    const ReferenceResult forward_expected = batch.forward_reference();
    expect_close(mean, forward_expected.batch_mean, 1e-6, what + "saved_mean");
    expect_close(inv_std, forward_expected.inv_std, 2e-6, what + "saved_inv_std");
    const ReferenceBackward expected = batch.backward_reference(mean, inv_std);
    const std::vector<double> input_bounds = grad_input_bounds(expected, batch.x_dtype);
    const std::vector<double> expected_dz = batch.normalized_gradient();
    std::vector<double> weight_sum(channels, 0.0), bias_sum(channels, 0.0), weight_bound(channels, 0.0),
        bias_bound(channels, 0.0);
    for (int r = 0; r < batch.processes(); r++) {
        const std::string who = what + "participant " + std::to_string(r) + " ";
        expect_within(parts[r].grad_input.values(), batch.part(expected.grad_input, r), batch.part(input_bounds, r),
                      who + "grad_input");
        if (adds_residual(batch.epilogue())) {
            expect_close(parts[r].grad_residual.values(), batch.part(expected_dz, r), 0, who + "grad_residual");
        }
        const ReferenceBackward local = batch.local_backward_reference(r, mean, inv_std);
        const std::vector<double> wb = grad_weight_bounds(local, batch.param_dtype),
                                  bb = grad_bias_bounds(local, batch.param_dtype);
        expect_within(parts[r].grad_weight.values(), local.grad_weight, wb, who + "grad_weight (own slice)");
        expect_within(parts[r].grad_bias.values(), local.grad_bias, bb, who + "grad_bias (own slice)");
        weight_sum = plus(weight_sum, parts[r].grad_weight.values());
        bias_sum = plus(bias_sum, parts[r].grad_bias.values());
        weight_bound = plus(weight_bound, wb);
        bias_bound = plus(bias_bound, bb);
    }
    // What the data-parallel step's all-reduce of the parameter gradients
    // gives: the whole batch's (the two double sums differ in order only).
    expect_within(weight_sum, expected.grad_weight,
                  plus(weight_bound, sum_bounds(expected.grad_weight, expected.grad_weight_terms, 1e-12, DType::Float32)),
                  what + "sum of grad_weight");
    expect_within(bias_sum, expected.grad_bias,
                  plus(bias_bound, sum_bounds(expected.grad_bias, expected.grad_bias_terms, 1e-12, DType::Float32)),
                  what + "sum of grad_bias");
}

TEST(SyncBackward, GradInputIsWholeBatchsAndParameterGradientsOwn) {
    for (const SplitCase &c : split_cases()) {
        for (DTypes d : dtypes_for(c)) {
            for (size_t p = 1; p <= c.splits.size(); p++) {
                for (Epilogue epilogue : epilogues_for(d)) {
                    SyncBatch batch(c.shape, c.layout, d.x, d.param, c.splits[p - 1], 11);
                    batch.set_epilogue(epilogue);
                    check_backward(batch, label(c, d, p) + epilogue_name(epilogue));
                }
            }
        }
    }
}

// The number and sizes of the all-reduces depend only on C and the
// direction: the same for data of other sizes, splits and layouts, on every
// participant, an empty one included.
TEST(SyncCollectives, DependOnlyOnChannelsAndDirection) {
    for (int64_t channels : {1, 4}) {
        for (const auto &[shape, layout, split] :
             {std::tuple{std::vector<int64_t>{3, channels, 2, 3}, Layout::NCHW, std::vector<int64_t>{2, 0, 1}},
              std::tuple{std::vector<int64_t>{5, 7, channels}, Layout::NHWC, std::vector<int64_t>{0, 5, 0}},
              std::tuple{std::vector<int64_t>{4, channels}, Layout::NHWC, std::vector<int64_t>{1, 1, 2}}}) {
            const SyncBatch batch(shape, layout, DType::Float32, DType::Float32, split, 3);
            FakeGroup group(batch.processes());
            std::vector<Participant> parts = participants_of(batch, group);
            std::vector<Outcome> outcomes(parts.size());
            run_participants(group, [&](int r) {
                outcomes[r] = capture([&] {
                    parts[r].forward(Entry::BatchNorm);
                    parts[r].forward(Entry::BatchNormTraining);
                    parts[r].backward();
                });
            });
            const std::string what = "C=" + std::to_string(channels) + " " + shape_name(shape) + ": ";
            expect_ok(outcomes, what);
            expect_collectives(group,
                               joined(repeated(forward_collectives(channels), 2), backward_collectives(channels)),
                               what);
        }
    }
}

// Inference (either direction) never calls the hook, and gives what an
// unsynchronized call gives.
TEST(SyncInference, IgnoresTheHook) {
    std::atomic<int> calls{0};
    const hbn::AllReduce counting = [&calls](double *, std::size_t) { calls++; };
    for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
        for (DType dtype : all_dtypes) {
            BatchNormCase synced({3, 5, 4, 6}, layout, dtype, DType::Float32, false, 13);
            BatchNormCase plain = synced;
            synced.options.all_reduce = counting;
            synced.run();
            plain.run();
            EXPECT_EQ(synced.output.bytes(), plain.output.bytes()) << "forward output";
            EXPECT_EQ(synced.running_mean.bytes(), plain.running_mean.bytes());
            EXPECT_EQ(synced.running_var.bytes(), plain.running_var.bytes());

            BackwardCase synced_backward({3, 5, 4, 6}, layout, dtype, DType::Float32, false, 17);
            BackwardCase plain_backward = synced_backward;
            synced_backward.forward.options.all_reduce = counting;
            synced_backward.run();
            plain_backward.run();
            EXPECT_EQ(synced_backward.grad_input.bytes(), plain_backward.grad_input.bytes()) << "grad_input";
            EXPECT_EQ(synced_backward.grad_weight.bytes(), plain_backward.grad_weight.bytes()) << "grad_weight";
            EXPECT_EQ(synced_backward.grad_bias.bytes(), plain_backward.grad_bias.bytes()) << "grad_bias";
        }
    }
    EXPECT_EQ(calls.load(), 0) << "inference called the all-reduce hook";
}

// x = 1e4 + N(0, 1), 9600 values per channel over three participants
// (1600, 4800 and 3200): the synchronized statistics are as exact as one
// process's. momentum 1 makes running_var the unbiased batch variance.
TEST(SyncNumerics, LargeOffsetKeepsSingleProcessAccuracy) {
    for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
        const std::vector<int64_t> shape =
            layout == Layout::NCHW ? std::vector<int64_t>{6, 2, 40, 40} : std::vector<int64_t>{6, 40, 40, 2};
        SyncBatch batch(shape, layout, DType::Float32, DType::Float32, {1, 3, 2}, 23, 1e4, 1.0);
        batch.whole.options.momentum = 1;
        const std::string what = layout == Layout::NCHW ? "NCHW mean/std 1e4: " : "NHWC mean/std 1e4: ";
        FakeGroup group(batch.processes());
        std::vector<Participant> parts = participants_of(batch, group);
        train_step(group, parts, what);
        expect_identical_statistics(parts, true, what);

        // One process on the concatenated batch, unsynchronized.
        BatchNormCase single = batch.whole;
        const BatchNormCase::SavedStatistics single_saved = single.run_training();
        const ReferenceResult expected = batch.forward_reference();
        const auto m = static_cast<double>(Geometry(shape, layout).values_per_channel);
        for (int64_t c = 0; c < batch.channels(); c++) {
            const double inv_std = parts[0].saved_inv_std.get(c);
            const double var = 1 / (inv_std * inv_std) - batch.whole.options.eps;
            const double single_inv_std = single_saved.inv_std.get(c);
            const double single_var = 1 / (single_inv_std * single_inv_std) - batch.whole.options.eps;
            const double ref_var = expected.batch_var[c];
            std::printf("%schannel %lld: variance %.9g, one process %.9g, reference %.9g\n", what.c_str(),
                        static_cast<long long>(c), var, single_var, ref_var);
            EXPECT_LE(std::abs(var - ref_var) / ref_var, 1e-6) << what << "variance, channel " << c;
            EXPECT_LE(std::abs(var - single_var) / ref_var, 1e-6) << what << "variance vs one process, channel " << c;
            const double unbiased = ref_var * m / (m - 1);
            EXPECT_LE(std::abs(parts[0].running_var.get(c) - unbiased) / unbiased, 1e-6)
                << what << "running_var, channel " << c;
            const double mean_ulp = 2 * unit_roundoff32 * std::abs(expected.batch_mean[c]);
            EXPECT_NEAR(parts[0].saved_mean.get(c), expected.batch_mean[c], mean_ulp) << what << "channel " << c;
            EXPECT_NEAR(parts[0].saved_mean.get(c), single_saved.mean.get(c), mean_ulp) << what << "channel " << c;
            EXPECT_NEAR(parts[0].running_mean.get(c), expected.batch_mean[c], mean_ulp) << what << "channel " << c;
        }
        // As numerics_test: y at the scale of half an ulp of x.
        const double x_ulp_in_std = 1e4 * 6e-8 * expected.inv_std[0];
        const std::vector<double> mean = parts[0].saved_mean.values(), inv_std = parts[0].saved_inv_std.values();
        const ReferenceBackward backward_expected = batch.backward_reference(mean, inv_std);
        const std::vector<double> bounds = grad_input_bounds(backward_expected, DType::Float32);
        for (int r = 0; r < batch.processes(); r++) {
            const std::string who = what + "participant " + std::to_string(r) + " ";
            expect_close(parts[r].output.values(), batch.part(expected.output, r), 4 * x_ulp_in_std + 2e-6,
                         who + "output");
            expect_within(parts[r].grad_input.values(), batch.part(backward_expected.grad_input, r),
                          batch.part(bounds, r), who + "grad_input");
            const ReferenceBackward local = batch.local_backward_reference(r, mean, inv_std);
            expect_within(parts[r].grad_weight.values(), local.grad_weight, grad_weight_bounds(local, DType::Float32),
                          who + "grad_weight");
        }
    }
}

// Failures ---------------------------------------------------------------


std::vector<std::size_t> collectives_of(Call call, int64_t channels) {
    return call == Call::Backward ? backward_collectives(channels) : forward_collectives(channels);
}

// Every participant made the same all-reduces in this call, a non-empty
// prefix of the call's documented sequence (a call that fails may stop once
// every participant knows, from the first all-reduce, that one failed).
void expect_aligned_collectives(const FakeGroup &group, Call call, int64_t channels, const std::string &what) {
    EXPECT_FALSE(group.broken()) << what << group.broken_reason();
    EXPECT_EQ(group.mismatched_rounds(), 0) << what << "participants passed different counts to one all-reduce";
    const std::vector<std::size_t> documented = collectives_of(call, channels), first = group.sizes(0);
    EXPECT_FALSE(first.empty()) << what << "no all-reduce at all";
    EXPECT_LE(first.size(), documented.size()) << what << sizes_text(first);
    EXPECT_TRUE(std::equal(first.begin(), first.begin() + std::min(first.size(), documented.size()),
                           documented.begin()))
        << what << sizes_text(first) << " is not a prefix of " << sizes_text(documented);
    for (int r = 1; r < group.size(); r++) {
        EXPECT_EQ(sizes_text(group.sizes(r)), sizes_text(first)) << what << "participant " << r;
    }
}

// How a participant's tensors are made bad, and what it must then throw.
struct Spoil {
    const char *name;
    ErrorKind kind;
    std::vector<Call> calls;  // the calls it applies to
    std::function<void(Participant &)> apply;
};

std::vector<Spoil> spoils() {
    return {
        {"weight_wrong_shape", ErrorKind::ValueError, {Call::BatchNorm, Call::BatchNormTraining, Call::Backward},
         [](Participant &p) {
             const auto c = static_cast<int64_t>(p.weight.size());
             p.weight = HostTensor(DType::Float32, {c + 1}, constant(c + 1, 1.0));
         }},
        {"output_wrong_dtype", ErrorKind::TypeError, {Call::BatchNorm, Call::BatchNormTraining},
         [](Participant &p) { p.output = HostTensor(DType::Float16, p.shape, constant(p.output.size(), 0.0)); }},
        {"grad_input_wrong_dtype", ErrorKind::TypeError, {Call::Backward},
         [](Participant &p) { p.grad_input = HostTensor(DType::Float16, p.shape, constant(p.grad_input.size(), 0.0)); }},
        {"input_x_rank_one", ErrorKind::ValueError, {Call::BatchNorm, Call::BatchNormTraining, Call::Backward},
         [](Participant &p) {
             const auto n = static_cast<int64_t>(p.x.size());
             p.x = HostTensor(DType::Float32, {n}, p.x.values());
             p.output = HostTensor(DType::Float32, {n}, constant(p.output.size(), 0.0));
             p.dy = HostTensor(DType::Float32, {n}, p.dy.values());
             p.grad_input = HostTensor(DType::Float32, {n}, constant(p.grad_input.size(), 0.0));
         }},
        {"eps_zero", ErrorKind::ValueError, {Call::BatchNorm, Call::BatchNormTraining, Call::Backward},
         [](Participant &p) { p.options.eps = 0; }},
    };
}

// One participant's bad input: every participant throws hbn::Error (the
// failing one its own kind, the others RuntimeError), none hangs, none
// changes its running or saved statistics or parameter gradients, and the
// participants' collectives stay aligned: a good call right after works.
TEST(SyncErrors, FailingParticipantRaisesEverywhereAndCommitsNothing) {
    const std::vector<int64_t> shape = {7, 3, 4, 5};
    for (const Spoil &spoil : spoils()) {
        for (Call call : spoil.calls) {
            for (int failing : {0, 2}) {
                const std::string what = std::string(spoil.name) + ", " + call_name(call) + ", participant " +
                                         std::to_string(failing) + " fails: ";
                const SyncBatch batch(shape, Layout::NCHW, DType::Float32, DType::Float32, {2, 2, 3}, 5);
                FakeGroup group(batch.processes());
                std::vector<Participant> parts = participants_of(batch, group);
                // The backward needs the forward's saved statistics first.
                if (call == Call::Backward) {
                    std::vector<Outcome> ok(parts.size());
                    run_participants(group,
                                     [&](int r) { ok[r] = capture([&] { parts[r].forward(Entry::BatchNormTraining); }); });
                    expect_ok(ok, what + "forward first: ");
                }
                std::vector<Participant> good = parts;  // to retry with after the failure
                spoil.apply(parts[failing]);
                std::vector<std::vector<std::vector<unsigned char>>> before;
                for (const Participant &p : parts) {
                    before.push_back(p.committed());
                }
                group.clear_records();
                std::vector<Outcome> outcomes(parts.size());
                run_participants(group, [&](int r) { outcomes[r] = capture([&] { invoke(parts[r], call); }); });
                for (int r = 0; r < batch.processes(); r++) {
                    const std::string who = what + "participant " + std::to_string(r) + " ";
                    EXPECT_TRUE(outcomes[r].hbn_error()) << who << describe(outcomes[r]);
                    if (outcomes[r].hbn_error()) {
                        const ErrorKind kind = r == failing ? spoil.kind : ErrorKind::RuntimeError;
                        EXPECT_EQ(kind_name(outcomes[r].kind), std::string(kind_name(kind))) << who << outcomes[r].message;
                    }
                    const auto after = parts[r].committed();
                    for (size_t i = 0; i < after.size(); i++) {
                        EXPECT_EQ(after[i], before[r][i]) << who << committed_name(i) << " changed";
                    }
                }
                expect_aligned_collectives(group, call, batch.channels(), what);

                // The same group, every participant good now: the call works.
                for (int r = 0; r < batch.processes(); r++) {
                    good[r].options.all_reduce = group.hook(r);
                }
                group.clear_records();
                std::vector<Outcome> retried(parts.size());
                run_participants(group, [&](int r) { retried[r] = capture([&] { invoke(good[r], call); }); });
                expect_ok(retried, what + "retry: ");
                expect_collectives(group, collectives_of(call, batch.channels()), what + "retry");
                if (call != Call::Backward) {
                    const ReferenceResult expected = batch.forward_reference();
                    for (int r = 0; r < batch.processes(); r++) {
                        expect_close(good[r].output.values(), batch.part(expected.output, r),
                                     output_tolerance(DType::Float32), what + "retry output");
                        expect_close(good[r].running_var.values(), expected.running_var, 2e-6,
                                     what + "retry running_var");
                    }
                }
            }
        }
    }
}

// The global M below 2 (every participant empty, or one value per channel
// in all): every participant raises ValueError, and nothing changes.
TEST(SyncErrors, GlobalCountBelowTwoIsValueErrorEverywhere) {
    for (const auto &[shape, layout, split] :
         {std::tuple{std::vector<int64_t>{1, 4}, Layout::NCHW, std::vector<int64_t>{0, 0, 1}},
          std::tuple{std::vector<int64_t>{1, 4}, Layout::NHWC, std::vector<int64_t>{1, 0, 0}},
          std::tuple{std::vector<int64_t>{0, 4, 3}, Layout::NCHW, std::vector<int64_t>{0, 0, 0}},
          std::tuple{std::vector<int64_t>{0, 2, 3, 4}, Layout::NHWC, std::vector<int64_t>{0, 0}}}) {
        for (Call call : {Call::BatchNorm, Call::BatchNormTraining, Call::Backward}) {
            const SyncBatch batch(shape, layout, DType::Float32, DType::Float32, split, 9);
            std::string what = shape_name(shape) + " split";
            for (int64_t n : split) {
                what += " " + std::to_string(n);
            }
            what += std::string(", ") + call_name(call) + ": ";
            FakeGroup group(batch.processes());
            std::vector<Participant> parts = participants_of(batch, group);
            for (Participant &p : parts) {  // statistics for the backward (not computable here)
                const auto c = static_cast<size_t>(batch.channels());
                p.saved_mean = HostTensor(DType::Float32, {batch.channels()}, constant(c, 0.0));
                p.saved_inv_std = HostTensor(DType::Float32, {batch.channels()}, constant(c, 1.0));
            }
            std::vector<std::vector<std::vector<unsigned char>>> before;
            for (const Participant &p : parts) {
                before.push_back(p.committed());
            }
            std::vector<Outcome> outcomes(parts.size());
            run_participants(group, [&](int r) { outcomes[r] = capture([&] { invoke(parts[r], call); }); });
            for (int r = 0; r < batch.processes(); r++) {
                const std::string who = what + "participant " + std::to_string(r) + " ";
                EXPECT_TRUE(outcomes[r].hbn_error()) << who << describe(outcomes[r]);
                if (outcomes[r].hbn_error()) {
                    EXPECT_EQ(kind_name(outcomes[r].kind), std::string("ValueError")) << who << outcomes[r].message;
                }
                const auto after = parts[r].committed();
                for (size_t i = 0; i < after.size(); i++) {
                    EXPECT_EQ(after[i], before[r][i]) << who << committed_name(i) << " changed";
                }
            }
            expect_aligned_collectives(group, call, batch.channels(), what);
        }
    }
}

class HookFailure : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// A hook that throws (at its first, second, ... call): the exception passes
// through as it is, not as an hbn::Error, and nothing is committed.
TEST(SyncErrors, HookExceptionPassesThroughAndCommitsNothing) {
    for (Call call : {Call::BatchNorm, Call::BatchNormTraining, Call::Backward}) {
        const SyncBatch batch({4, 3, 5}, Layout::NCHW, DType::Float32, DType::Float32, {4}, 21);
        Participant p = batch.participant(0);
        if (call == Call::Backward) {
            p.forward(Entry::BatchNormTraining);  // unsynchronized: the saved statistics
        }
        const size_t collectives = collectives_of(call, batch.channels()).size();
        for (size_t failing_call = 1; failing_call <= collectives; failing_call++) {
            const std::string what = std::string(call_name(call)) + ", hook throws at call " +
                                     std::to_string(failing_call) + ": ";
            Participant q = p;
            size_t calls = 0;
            q.options.all_reduce = [&calls, failing_call](double *, std::size_t) {
                if (++calls == failing_call) {
                    throw HookFailure("the collective failed");
                }
            };
            const auto before = q.committed();
            bool passed_through = false;
            try {
                invoke(q, call);
                ADD_FAILURE() << what << "no exception";
            } catch (const HookFailure &e) {
                passed_through = std::string(e.what()) == "the collective failed";
            } catch (const hbn::Error &e) {
                ADD_FAILURE() << what << "became hbn::Error " << kind_name(e.kind()) << ": " << e.what();
            } catch (const std::exception &e) {
                ADD_FAILURE() << what << "another exception: " << e.what();
            }
            EXPECT_TRUE(passed_through) << what << "the hook's exception did not pass through unchanged";
            EXPECT_EQ(calls, failing_call) << what << "the hook was called again after it threw";
            const auto after = q.committed();
            for (size_t i = 0; i < after.size(); i++) {
                EXPECT_EQ(after[i], before[i]) << what << committed_name(i) << " changed";
            }
        }
        // A good hook afterwards (one process: the sum is its own values).
        Participant q = p;
        q.options.all_reduce = [](double *, std::size_t) {};
        EXPECT_NO_THROW(invoke(q, call)) << call_name(call) << " after the failures";
    }
}

// Whether an error message speaks of the channels: "channel" in any case,
// or C as a word of its own ("C (3)", "C = 4").
bool mentions_channels(const std::string &message) {
    std::string lower = message;
    for (char &ch : lower) {
        ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    }
    if (lower.find("channel") != std::string::npos) {
        return true;
    }
    const auto word_char = [](char ch) { return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_'; };
    for (size_t i = 0; i < message.size(); i++) {
        if (message[i] == 'C' && (i == 0 || !word_char(message[i - 1])) &&
            (i + 1 == message.size() || !word_char(message[i + 1]))) {
            return true;
        }
    }
    return false;
}

// Participants that disagree on C (each call valid on its own): every one
// raises hbn::Error naming the channels, none hangs, and no all-reduce sees
// different counts (under MPI that would be undefined behaviour): the
// first, C-independent all-reduce must reveal the disagreement.
TEST(SyncErrors, MismatchedChannelsRaiseEverywhere) {
    for (Call call : {Call::BatchNorm, Call::BatchNormTraining, Call::Backward}) {
        for (Layout layout : {Layout::NCHW, Layout::NHWC}) {
            const std::string what = std::string(call_name(call)) + (layout == Layout::NCHW ? " NCHW: " : " NHWC: ");
            const auto shape_with = [layout](int64_t n, int64_t c) {
                return layout == Layout::NCHW ? std::vector<int64_t>{n, c, 4, 4} : std::vector<int64_t>{n, 4, 4, c};
            };
            const SyncBatch three(shape_with(2, 3), layout, DType::Float32, DType::Float32, {2}, 1),
                four(shape_with(3, 4), layout, DType::Float32, DType::Float32, {3}, 2);
            FakeGroup group(2);
            std::vector<Participant> parts = {three.participant(0), four.participant(0)};
            for (int r = 0; r < 2; r++) {
                parts[r].options.all_reduce = group.hook(r);
                if (call == Call::Backward) {  // saved statistics of a valid shape
                    const int64_t c = r == 0 ? 3 : 4;
                    parts[r].saved_mean = HostTensor(DType::Float32, {c}, constant(c, 0.0));
                    parts[r].saved_inv_std = HostTensor(DType::Float32, {c}, constant(c, 1.0));
                }
            }
            std::vector<std::vector<std::vector<unsigned char>>> before = {parts[0].committed(), parts[1].committed()};
            std::vector<Outcome> outcomes(2);
            run_participants(group, [&](int r) { outcomes[r] = capture([&] { invoke(parts[r], call); }); });
            for (int r = 0; r < 2; r++) {
                const std::string who = what + "participant " + std::to_string(r) + " ";
                EXPECT_TRUE(outcomes[r].hbn_error()) << who << describe(outcomes[r]);
                EXPECT_TRUE(mentions_channels(outcomes[r].message))
                    << who << "the message does not mention the channels: " << outcomes[r].message;
                const auto after = parts[r].committed();
                for (size_t i = 0; i < after.size(); i++) {
                    EXPECT_EQ(after[i], before[r][i]) << who << committed_name(i) << " changed";
                }
            }
            EXPECT_FALSE(group.broken()) << what << group.broken_reason();
            EXPECT_EQ(group.mismatched_rounds(), 0) << what << "an all-reduce got different counts: "
                                                    << sizes_text(group.sizes(0)) << " and "
                                                    << sizes_text(group.sizes(1));
        }
    }
}

}  // namespace
}  // namespace hbn_test
