"""Synchronized batch norm (SyncBN): the all_reduce hook of hbn.batch_norm,
batch_norm_training and batch_norm_backward, hbn.torch.batch_norm's, and
hbn.torch.SyncBatchNorm over torch.distributed.

Processes are played by threads sharing a fake process group (FakeGroup), and
once by real torch.distributed processes over gloo. The reference is always
torch's float64 batch norm on the concatenated global batch, restricted to a
rank's rows where a result is per rank. hbn is compared with itself only
across ranks: every rank must hold bitwise the same running statistics.
"""

import threading
import time
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import hbn
import hbn.torch as ht
from conftest import (DATA_FORMATS, DTYPES, assert_close, assert_kind, dtype_id, float64_tensor,
                      random_case, reference_backward, reference_forward, to_channels_first,
                      to_numpy)

MOMENTUM = 0.25  # not torch's default, so that a mixed-up momentum shows
EPS = 1e-5
TIMEOUT = 10.0  # seconds a rank waits for the others before the group breaks
KINDS = ("numpy", "torch")


def seed_of(*parts):
    """A seed that depends on the test case only (str hashes vary by process)."""
    return zlib.crc32(repr(parts).encode())


# ---------------------------------------------------------------------------
# A process group of threads.

class FakeGroup:
    """All-reduce among `size` threads: rank r's hook publishes a copy of its
    array, waits for every rank, sums all copies in rank order (so that every
    rank gets the same bits), waits again (so that nobody publishes its next
    array before all have summed) and writes the sum back. It records the size
    and dtype of each call, per rank."""

    def __init__(self, size):
        self.size = size
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=TIMEOUT)
        self.calls = [[] for _ in range(size)]

    def hook(self, rank):
        def all_reduce(values):
            try:
                self.calls[rank].append((values.size, values.dtype))
                self.slots[rank] = np.array(values, dtype=np.float64)
                self.barrier.wait()
                total = np.zeros(values.shape, np.float64)
                for slot in self.slots:
                    total += slot
                self.barrier.wait()
                values[...] = total
            except BaseException:
                self.barrier.abort()  # the other ranks fail now instead of at the timeout
                raise
        return all_reduce

    def assert_calls(self, sizes):
        """Every rank made exactly these all-reduces, of float64 arrays."""
        for rank, calls in enumerate(self.calls):
            assert [size for size, _ in calls] == sizes, f"rank {rank} all-reduce sizes"
            assert all(dtype == np.float64 for _, dtype in calls), f"rank {rank} dtypes"


def run_ranks(size, work):
    """work(rank) on `size` threads at once: [(result, error)] in rank order."""
    outcomes = [None] * size

    def target(rank):
        try:
            outcomes[rank] = (work(rank), None)
        except BaseException as error:  # handed to the test's thread
            outcomes[rank] = (None, error)

    threads = [threading.Thread(target=target, args=(rank,), daemon=True) for rank in range(size)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 3 * TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a rank hung"
    return outcomes


def results_of(outcomes):
    """Each rank's result, re-raising the first rank's error if any failed."""
    for result, error in outcomes:
        if error is not None:
            raise error
    return [result for result, _ in outcomes]


def row_bounds(split):
    """[(lo, hi)] of each rank's rows of the global batch, for rows per rank `split`."""
    ends = np.cumsum((0, *split))
    return [(int(lo), int(hi)) for lo, hi in zip(ends[:-1], ends[1:])]


def rank_arguments(case, bounds, kind):
    """A rank's batch_norm arguments: its rows of input_x and its own copies of
    the running statistics, weight and bias."""
    x, *per_channel = case.arrays(kind)
    lo, hi = bounds
    return [x[lo:hi], *per_channel]


def as_kind(array, kind):
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array.copy()) if kind == "torch" else array.copy()


def local_sums(x, grad_output, mean, inv_std):
    """(grad_weight, grad_bias) of one rank: sum(dy * xhat) and sum(dy) over its
    rows only, xhat with the global batch's mean and inv_std. Float64 tensors,
    channels on axis 1."""
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    xhat = (x - mean.view(per_channel)) * inv_std.view(per_channel)
    axes = [axis for axis in range(x.dim()) if axis != 1]
    return (grad_output * xhat).sum(axes), grad_output.sum(axes)


def case_local_sums(case, grad_output, bounds, expected):
    """local_sums for a Case's rows `bounds`, with the reference's statistics."""
    lo, hi = bounds
    x = to_channels_first(float64_tensor(case.x), case.data_format)[lo:hi]
    dy = to_channels_first(float64_tensor(grad_output), case.data_format)[lo:hi]
    grad_weight, grad_bias = local_sums(x, dy, torch.from_numpy(expected.saved_mean),
                                        torch.from_numpy(expected.saved_inv_std))
    return grad_weight.numpy(), grad_bias.numpy()


def assert_same_on_ranks(arrays, name):
    """Bitwise the same array on every rank (dtype, shape and bytes)."""
    first = to_numpy(arrays[0])
    for rank, array in enumerate(arrays[1:], start=1):
        other = to_numpy(array)
        assert other.dtype == first.dtype and other.shape == first.shape, f"{name} on rank {rank}"
        assert other.tobytes() == first.tobytes(), f"{name} differs between rank 0 and rank {rank}"


# Rows per rank, and the global batch's shape (channels first). Uneven splits,
# empty ranks, and ranks holding one value per channel (rank-2 input or 1x1
# spatial extents); (1, 1) makes the global M exactly 2.
SPLIT_CASES = [
    ((6,), (6, 3, 4, 5)),
    ((3, 4), (7, 5, 3, 2)),
    ((0, 5), (5, 4, 2, 3)),
    ((2, 0, 5), (7, 6, 5)),
    ((1, 1, 9), (11, 7)),
    ((1, 1), (2, 3, 1, 1)),
    ((2, 3), (5, 3, 2, 2, 3)),
]
SPLIT_IDS = ["+".join(map(str, split)) + "_" + "x".join(map(str, shape))
             for split, shape in SPLIT_CASES]

split_cases = pytest.mark.parametrize("split,shape", SPLIT_CASES, ids=SPLIT_IDS)
data_formats = pytest.mark.parametrize("data_format", DATA_FORMATS)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
kinds = pytest.mark.parametrize("kind", KINDS)


def sync_matrix(test):
    """Every split of the batch, layout, dtype and array kind."""
    for mark in (split_cases, data_formats, dtypes, kinds):
        test = mark(test)
    return test


def sync_case(split, shape, dtype, data_format, *tags):
    case = random_case(seed_of(split, shape, np.dtype(dtype).name, data_format, *tags), shape,
                       dtype, data_format=data_format)
    grad_output = np.random.default_rng(seed_of(split, "dy")).standard_normal(
        case.x.shape).astype(dtype)
    return case, grad_output


# ---------------------------------------------------------------------------
# 1. Threads sharing a fake group against torch on the whole batch.

@sync_matrix
def test_forward_normalizes_with_global_statistics(split, shape, data_format, dtype, kind):
    case, _ = sync_case(split, shape, dtype, data_format, "forward")
    channels = shape[1]
    expected = reference_forward(case, training=True, momentum=MOMENTUM, eps=EPS)
    bounds = row_bounds(split)
    group = FakeGroup(len(split))

    def work(rank):
        x, running_mean, running_var, weight, bias = rank_arguments(case, bounds[rank], kind)
        y = hbn.batch_norm(x, running_mean, running_var, weight, bias, True, MOMENTUM, EPS,
                           data_format=data_format, all_reduce=group.hook(rank))
        return y, running_mean, running_var

    results = results_of(run_ranks(len(split), work))

    for rank, ((lo, hi), (y, _, _)) in enumerate(zip(bounds, results)):
        assert_kind(y, kind, dtype, case.x[lo:hi].shape)
        assert_close(y, expected.y[lo:hi], dtype, f"rank {rank} output")
    for index, name in ((1, "running_mean"), (2, "running_var")):
        statistics = [result[index] for result in results]
        assert_same_on_ranks(statistics, name)
        # Unbiased with the global M: a rank's own M would show here.
        assert_close(statistics[0], getattr(expected, name), np.float32, name)
    group.assert_calls([6, channels + 1, channels, 1])


@sync_matrix
def test_training_and_backward_use_global_sums(split, shape, data_format, dtype, kind):
    case, grad_output = sync_case(split, shape, dtype, data_format, "backward")
    channels = shape[1]
    expected = reference_forward(case, training=True, momentum=MOMENTUM, eps=EPS)
    expected_grads = reference_backward(case, grad_output, training=True, eps=EPS)
    bounds = row_bounds(split)
    forward_group, backward_group = FakeGroup(len(split)), FakeGroup(len(split))

    def work(rank):
        x, running_mean, running_var, weight, bias = rank_arguments(case, bounds[rank], kind)
        lo, hi = bounds[rank]
        dy = as_kind(grad_output[lo:hi], kind)
        y, saved_mean, saved_inv_std = hbn.batch_norm_training(
            x, running_mean, running_var, weight, bias, MOMENTUM, EPS, data_format=data_format,
            all_reduce=forward_group.hook(rank))
        grads = hbn.batch_norm_backward(dy, x, weight, saved_mean=saved_mean,
                                        saved_inv_std=saved_inv_std, training=True, eps=EPS,
                                        data_format=data_format,
                                        all_reduce=backward_group.hook(rank))
        return dict(y=y, saved_mean=saved_mean, saved_inv_std=saved_inv_std,
                    running_mean=running_mean, running_var=running_var, grad_input=grads[0],
                    grad_weight=grads[1], grad_bias=grads[2])

    results = results_of(run_ranks(len(split), work))

    for name in ("saved_mean", "saved_inv_std", "running_mean", "running_var"):
        statistics = [result[name] for result in results]
        assert_same_on_ranks(statistics, name)
        assert_close(statistics[0], getattr(expected, name), np.float32, name)
    total_weight, total_bias = np.zeros(channels), np.zeros(channels)
    for rank, (rows, result) in enumerate(zip(bounds, results)):
        lo, hi = rows
        assert_kind(result["y"], kind, dtype, case.x[lo:hi].shape)
        assert_close(result["y"], expected.y[lo:hi], dtype, f"rank {rank} output")
        assert_kind(result["grad_input"], kind, dtype, case.x[lo:hi].shape)
        assert_close(result["grad_input"], expected_grads[0][lo:hi], dtype,
                     f"rank {rank} grad_input")
        # grad_weight and grad_bias: this rank's rows only, not the global sums.
        local_weight, local_bias = case_local_sums(case, grad_output, rows, expected)
        assert_close(result["grad_weight"], local_weight, np.float32, f"rank {rank} grad_weight")
        assert_close(result["grad_bias"], local_bias, np.float32, f"rank {rank} grad_bias")
        total_weight += to_numpy(result["grad_weight"])
        total_bias += to_numpy(result["grad_bias"])
    # What the data-parallel gradient all-reduce then makes of them.
    assert_close(total_weight, expected_grads[1], np.float32, "summed grad_weight")
    assert_close(total_bias, expected_grads[2], np.float32, "summed grad_bias")
    forward_group.assert_calls([6, channels + 1, channels, 1])
    backward_group.assert_calls([6, 2 * channels + 1, 1])


@sync_matrix
def test_inference_never_calls_the_hook(split, shape, data_format, dtype, kind):
    case, grad_output = sync_case(split, shape, dtype, data_format, "inference")
    expected = reference_forward(case, training=False, eps=EPS)
    expected_grads = reference_backward(case, grad_output, training=False, eps=EPS)
    calls = []

    def hook(values):  # a group of one: leaves values as they are
        calls.append(values.size)

    # Each rank's rows on this thread: inference needs nobody else.
    for rank, rows in enumerate(row_bounds(split)):
        lo, hi = rows
        x, running_mean, running_var, weight, bias = rank_arguments(case, rows, kind)
        y = hbn.batch_norm(x, running_mean, running_var, weight, bias, False, MOMENTUM, EPS,
                           data_format=data_format, all_reduce=hook)
        grad_input, _, _ = hbn.batch_norm_backward(
            as_kind(grad_output[lo:hi], kind), x, weight, running_mean, running_var,
            training=False, eps=EPS, data_format=data_format, all_reduce=hook)
        assert_close(y, expected.y[lo:hi], dtype, f"rank {rank} output")
        assert_close(grad_input, expected_grads[0][lo:hi], dtype, f"rank {rank} grad_input")
        assert to_numpy(running_mean).tobytes() == case.running_mean.tobytes()
        assert to_numpy(running_var).tobytes() == case.running_var.tobytes()
    assert calls == []


# ---------------------------------------------------------------------------
# 2. Errors.

def forward_call(function, arguments, **options):
    """hbn.batch_norm (training) or hbn.batch_norm_training on the arguments."""
    if function == "batch_norm":
        return hbn.batch_norm(*arguments, True, MOMENTUM, EPS, **options)
    return hbn.batch_norm_training(*arguments, MOMENTUM, EPS, **options)


def backward_call(arguments, **options):
    """hbn.batch_norm_backward in training, with the running statistics standing
    in for the saved ones (valid float32 arrays are all that it takes here)."""
    x, running_mean, running_var, weight, _ = arguments
    saved_inv_std = (1 / np.sqrt(running_var + EPS)).astype(np.float32)
    return hbn.batch_norm_backward(np.ones_like(x), x, weight, saved_mean=running_mean.copy(),
                                   saved_inv_std=saved_inv_std, training=True, eps=EPS,
                                   **options)


FUNCTIONS = ("batch_norm", "batch_norm_training", "batch_norm_backward")


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("value", [1, "sum", [np.sum]], ids=["int", "str", "list"])
@pytest.mark.parametrize("function", FUNCTIONS)
def test_non_callable_all_reduce_is_type_error(function, value, training):
    arguments = random_case(1, (4, 3, 5)).arrays("numpy")
    running_mean, running_var = arguments[1].copy(), arguments[2].copy()
    with pytest.raises(TypeError, match="all_reduce"):
        if function == "batch_norm":
            hbn.batch_norm(*arguments, training, all_reduce=value)
        elif function == "batch_norm_training":
            hbn.batch_norm_training(*arguments, all_reduce=value)
        else:
            x, mean, var, weight, _ = arguments
            hbn.batch_norm_backward(x, x, weight, mean, var, mean, 1 / np.sqrt(var + EPS),
                                    training=training, all_reduce=value)
    assert arguments[1].tobytes() == running_mean.tobytes()
    assert arguments[2].tobytes() == running_var.tobytes()


def failing_hook(fail_at, error):
    """A group of one that raises `error` on call number `fail_at`; it records
    its calls."""
    calls = []

    def hook(values):
        calls.append(values.size)
        if len(calls) == fail_at + 1:
            raise error
    return hook, calls


@pytest.mark.parametrize("fail_at", range(4))
@pytest.mark.parametrize("function", FUNCTIONS[:2])
def test_hook_error_in_forward_propagates_unchanged(function, fail_at):
    arguments = random_case(2, (4, 3, 5)).arrays("numpy")
    running_mean, running_var = arguments[1].copy(), arguments[2].copy()
    error = KeyError("from the hook")
    hook, calls = failing_hook(fail_at, error)
    with pytest.raises(KeyError) as raised:
        forward_call(function, arguments, all_reduce=hook)
    assert raised.value is error
    assert len(calls) == fail_at + 1, "all-reduces after the hook failed"
    # Even at the last all-reduce, nothing is committed yet.
    assert arguments[1].tobytes() == running_mean.tobytes()
    assert arguments[2].tobytes() == running_var.tobytes()


@pytest.mark.parametrize("fail_at", range(3))
def test_hook_error_in_backward_propagates_unchanged(fail_at):
    arguments = random_case(3, (4, 3, 5)).arrays("numpy")
    error = KeyError("from the hook")
    hook, calls = failing_hook(fail_at, error)
    with pytest.raises(KeyError) as raised:
        backward_call(arguments, all_reduce=hook)
    assert raised.value is error
    assert len(calls) == fail_at + 1, "all-reduces after the hook failed"


def assert_rank_errors(outcomes, failing, error_type, match):
    """The failing ranks raised error_type (matching `match`), every other rank
    RuntimeError."""
    for rank, (_, error) in enumerate(outcomes):
        expected_type = error_type if rank in failing else RuntimeError
        assert type(error) is expected_type, f"rank {rank} raised {error!r}"
        if rank in failing:
            assert match in str(error), f"rank {rank}: {error}"


@pytest.mark.parametrize("bad_rank", range(3))
@pytest.mark.parametrize("function", FUNCTIONS)
def test_bad_weight_on_one_rank_fails_every_rank(function, bad_rank):
    case = random_case(4, (9, 3, 2, 2))
    bounds = row_bounds((3, 2, 4))
    group = FakeGroup(3)
    originals = [case.running_mean.copy(), case.running_var.copy()]
    kept = []

    def work(rank):
        arguments = rank_arguments(case, bounds[rank], "numpy")
        if rank == bad_rank:
            arguments[3] = np.ones(4, np.float32)  # weight of C + 1 values
        kept.append(arguments)
        if function == "batch_norm_backward":
            return backward_call(arguments, all_reduce=group.hook(rank))
        return forward_call(function, arguments, all_reduce=group.hook(rank))

    outcomes = run_ranks(3, work)
    assert_rank_errors(outcomes, {bad_rank}, ValueError, "weight")
    for arguments in kept:
        assert arguments[1].tobytes() == originals[0].tobytes(), "running_mean changed"
        assert arguments[2].tobytes() == originals[1].tobytes(), "running_var changed"


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("split", [(1, 0), (0, 1, 0), (0, 0)], ids=["1+0", "0+1+0", "0+0"])
def test_global_batch_below_two_is_value_error_everywhere(split, function):
    # Rank-2 input: a row holds one value per channel, so the global M is sum(split).
    case = random_case(5, (sum(split), 3))
    bounds = row_bounds(split)
    group = FakeGroup(len(split))
    kept = []

    def work(rank):
        arguments = rank_arguments(case, bounds[rank], "numpy")
        kept.append(arguments)
        if function == "batch_norm_backward":
            x, _, _, weight, _ = arguments
            ones = np.ones(3, np.float32)
            return hbn.batch_norm_backward(np.ones_like(x), x, weight, saved_mean=ones,
                                           saved_inv_std=ones, training=True,
                                           all_reduce=group.hook(rank))
        return forward_call(function, arguments, all_reduce=group.hook(rank))

    outcomes = run_ranks(len(split), work)
    assert_rank_errors(outcomes, set(range(len(split))), ValueError, "more than one value")
    for arguments in kept:
        assert arguments[1].tobytes() == case.running_mean.tobytes(), "running_mean changed"
        assert arguments[2].tobytes() == case.running_var.tobytes(), "running_var changed"


def test_different_channel_counts_are_value_error_everywhere():
    cases = [random_case(6, (4, 3, 2)), random_case(7, (5, 4, 2))]  # C = 3 and C = 4
    group = FakeGroup(2)

    def work(rank):
        return forward_call("batch_norm", cases[rank].arrays("numpy"),
                            all_reduce=group.hook(rank))

    assert_rank_errors(run_ranks(2, work), {0, 1}, ValueError, "C")


# ---------------------------------------------------------------------------
# 3. hbn.torch.batch_norm: the hook through autograd.

def random_batch(shape, seed, dtype=torch.float32):
    """Input with its own mean and spread per channel, and a grad_output."""
    gen = torch.Generator().manual_seed(seed)
    per_channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    mean = torch.empty(per_channel, dtype=torch.float64).uniform_(-2, 2, generator=gen)
    spread = torch.empty(per_channel, dtype=torch.float64).uniform_(0.5, 2, generator=gen)
    x = (mean + spread * torch.randn(shape, dtype=torch.float64, generator=gen)).to(dtype)
    grad_output = torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)
    return x, grad_output


def random_parameters(channels, seed):
    """(weight, bias, running_mean, running_var), float32, away from 1 and 0."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (channels,), generator=gen) * 2 - 1
    weight = signs * torch.empty(channels).uniform_(0.5, 1.5, generator=gen)
    return (weight, torch.empty(channels).uniform_(-1, 1, generator=gen),
            torch.empty(channels).uniform_(-1, 1, generator=gen),
            torch.empty(channels).uniform_(0.5, 2, generator=gen))


# Rows per rank and the global shape; (1, 1): one value per channel on each rank.
TORCH_SPLIT_CASES = [((3, 4), (7, 4, 3, 2)), ((2, 0, 5), (7, 4, 3, 2)), ((1, 1), (2, 4, 1, 1))]


def torch_tolerance(dtype):
    return {torch.float32: np.float32, torch.float16: np.float16}[dtype]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("split,shape", TORCH_SPLIT_CASES, ids=[
    "+".join(map(str, split)) for split, _ in TORCH_SPLIT_CASES])
def test_torch_batch_norm_autograd_with_hook(split, shape, dtype, memory_format):
    channels = shape[1]
    x, grad_output = random_batch(shape, seed_of(split, str(dtype)), dtype)
    weight, bias, running_mean, running_var = random_parameters(channels, seed=6)
    # Reference: torch float64 on the whole batch.
    x64 = x.double().requires_grad_()
    weight64, bias64 = weight.double().requires_grad_(), bias.double().requires_grad_()
    mean64, var64 = running_mean.double(), running_var.double()
    y64 = F.batch_norm(x64, mean64, var64, weight64, bias64, True, MOMENTUM, EPS)
    y64.backward(grad_output.double())
    axes = (0, 2, 3)
    global_mean = x.double().mean(axes)
    global_inv_std = 1 / torch.sqrt(x.double().var(axes, unbiased=False) + EPS)
    bounds = row_bounds(split)
    group = FakeGroup(len(split))  # one hook for the forward and the backward

    def work(rank):
        lo, hi = bounds[rank]
        x_rank = x[lo:hi].contiguous(memory_format=memory_format).requires_grad_()
        weight_rank, bias_rank = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        mean_rank, var_rank = running_mean.clone(), running_var.clone()
        y = ht.batch_norm(x_rank, mean_rank, var_rank, weight_rank, bias_rank, training=True,
                          momentum=MOMENTUM, eps=EPS, all_reduce=group.hook(rank))
        y.backward(grad_output[lo:hi])
        return y, x_rank.grad, weight_rank.grad, bias_rank.grad, mean_rank, var_rank

    results = results_of(run_ranks(len(split), work))

    tolerance = torch_tolerance(dtype)
    for rank, ((lo, hi), (y, grad_input, grad_weight, grad_bias, _, _)) in enumerate(
            zip(bounds, results)):
        assert y.dtype == dtype and grad_input.dtype == dtype
        assert_close(y.detach(), y64[lo:hi].detach().numpy(), tolerance, f"rank {rank} output")
        assert_close(grad_input, x64.grad[lo:hi].numpy(), tolerance, f"rank {rank} grad_input")
        local_weight, local_bias = local_sums(x.double()[lo:hi], grad_output.double()[lo:hi],
                                              global_mean, global_inv_std)
        assert_close(grad_weight, local_weight.numpy(), np.float32, f"rank {rank} grad_weight")
        assert_close(grad_bias, local_bias.numpy(), np.float32, f"rank {rank} grad_bias")
    assert_close(sum(result[2] for result in results), weight64.grad.numpy(), np.float32,
                 "summed grad_weight")
    for index, name, expected in ((4, "running_mean", mean64), (5, "running_var", var64)):
        assert_same_on_ranks([result[index] for result in results], name)
        assert_close(results[0][index], expected.numpy(), np.float32, name)
    group.assert_calls([6, channels + 1, channels, 1, 6, 2 * channels + 1, 1])


# ---------------------------------------------------------------------------
# 4. hbn.torch.SyncBatchNorm over torch.distributed (gloo), and without it.

WORLD_SPLIT = (3, 2)  # rows per process: uneven, so a local M would show
WORLD_SHAPE = (5, 4, 3, 3)


def world_problem():
    """The fixed batch, grad_output and module state that every process and
    the parent's reference build from the same seeds."""
    x, grad_output = random_batch(WORLD_SHAPE, seed=7)
    weight, bias, running_mean, running_var = random_parameters(WORLD_SHAPE[1], seed=8)
    state = dict(weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                 num_batches_tracked=torch.tensor(0))
    return x, grad_output, state


def distributed_worker(rank, store, out_dir):
    """One process of the world: SyncBatchNorm forward and backward on its rows;
    its results (or its traceback) go to out_dir."""
    out_dir = Path(out_dir)
    try:
        torch.set_num_threads(1)  # two processes on a small machine
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=len(WORLD_SPLIT))
        try:
            x, grad_output, state = world_problem()
            lo, hi = row_bounds(WORLD_SPLIT)[rank]
            module = ht.SyncBatchNorm(WORLD_SHAPE[1], momentum=MOMENTUM, eps=EPS)
            module.load_state_dict(state)
            x_rank = x[lo:hi].clone().requires_grad_()
            y = module(x_rank)
            y.backward(grad_output[lo:hi])
            torch.save(dict(y=y.detach(), grad_input=x_rank.grad,
                            grad_weight=module.weight.grad, grad_bias=module.bias.grad,
                            running_mean=module.running_mean, running_var=module.running_var,
                            num_batches_tracked=module.num_batches_tracked),
                       out_dir / f"rank{rank}.pt")
        finally:
            dist.destroy_process_group()
    except BaseException:
        (out_dir / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def run_world(tmp_path, timeout=60.0):
    """Runs distributed_worker on spawned processes: each one's results."""
    context = torch.multiprocessing.get_context("spawn")
    processes = [context.Process(target=distributed_worker, daemon=True,
                                 args=(rank, str(tmp_path / "store"), str(tmp_path)))
                 for rank in range(len(WORLD_SPLIT))]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
    finally:
        hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
        for rank in hung:
            processes[rank].kill()
            processes[rank].join()
    assert not hung, f"ranks {hung} still running after {timeout} s: killed"
    for rank, process in enumerate(processes):
        error = tmp_path / f"rank{rank}.error"
        details = error.read_text() if error.exists() else "(no traceback)"
        assert process.exitcode == 0, f"rank {rank} exited with {process.exitcode}:\n{details}"
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(len(WORLD_SPLIT))]


def test_sync_batch_norm_over_gloo(tmp_path):
    results = run_world(tmp_path)

    x, grad_output, state = world_problem()
    reference = torch.nn.BatchNorm2d(WORLD_SHAPE[1], momentum=MOMENTUM, eps=EPS)
    reference.load_state_dict(state)
    reference.double()
    x64 = x.double().requires_grad_()
    y64 = reference(x64)
    y64.backward(grad_output.double())
    axes = (0, 2, 3)
    global_mean = x.double().mean(axes)
    global_inv_std = 1 / torch.sqrt(x.double().var(axes, unbiased=False) + EPS)

    for rank, ((lo, hi), result) in enumerate(zip(row_bounds(WORLD_SPLIT), results)):
        assert_close(result["y"], y64[lo:hi].detach().numpy(), np.float32, f"rank {rank} output")
        assert_close(result["grad_input"], x64.grad[lo:hi].numpy(), np.float32,
                     f"rank {rank} grad_input")
        local_weight, local_bias = local_sums(x.double()[lo:hi], grad_output.double()[lo:hi],
                                              global_mean, global_inv_std)
        assert_close(result["grad_weight"], local_weight.numpy(), np.float32,
                     f"rank {rank} grad_weight")
        assert_close(result["grad_bias"], local_bias.numpy(), np.float32, f"rank {rank} grad_bias")
        assert int(result["num_batches_tracked"]) == 1
    for name in ("grad_weight", "grad_bias"):
        summed = sum(result[name] for result in results)
        expected = getattr(reference, name.replace("grad_", "")).grad
        assert_close(summed, expected.numpy(), np.float32, f"summed {name}")
    for name in ("running_mean", "running_var"):
        assert_same_on_ranks([result[name] for result in results], name)
        assert_close(results[0][name], getattr(reference, name).numpy(), np.float32, name)


def eval_pair(channels, seed):
    """SyncBatchNorm in eval mode with random state, and an input that needs
    grad, with torch's float64 inference output and input gradient."""
    x, grad_output = random_batch((4, channels, 3, 2), seed)
    weight, bias, running_mean, running_var = random_parameters(channels, seed)
    module = ht.SyncBatchNorm(channels, momentum=MOMENTUM, eps=EPS).eval()
    module.load_state_dict(dict(weight=weight, bias=bias, running_mean=running_mean,
                                running_var=running_var, num_batches_tracked=torch.tensor(0)))
    x64 = x.double().requires_grad_()
    y64 = F.batch_norm(x64, running_mean.double(), running_var.double(), weight.double(),
                       bias.double(), False, MOMENTUM, EPS)
    y64.backward(grad_output.double())
    return module, x.requires_grad_(), grad_output, y64.detach().numpy(), x64.grad.numpy()


def test_sync_batch_norm_eval_without_process_group():
    assert not dist.is_initialized()
    module, x, grad_output, y_expected, grad_expected = eval_pair(5, seed=9)
    y = module(x)
    y.backward(grad_output)
    assert_close(y.detach(), y_expected, np.float32, "output")
    assert_close(x.grad, grad_expected, np.float32, "grad_input")


def test_sync_batch_norm_all_reduces_in_training_only(monkeypatch):
    """With torch.distributed seemingly initialized (a world of one), eval
    makes no all-reduce, and training makes the hook's, on module's group."""
    calls = []

    def all_reduce(tensor, group=None, **_):
        calls.append((tensor.numel(), tensor.dtype, group))  # a world of one: the sum is itself

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    channels = 5
    module, x, grad_output, y_expected, grad_expected = eval_pair(channels, seed=10)
    group = object()  # stands for a process group; hbn only passes it on
    module.process_group = group

    y = module(x)
    y.backward(grad_output)
    assert calls == []
    assert_close(y.detach(), y_expected, np.float32, "eval output")
    assert_close(x.grad, grad_expected, np.float32, "eval grad_input")

    module.train()
    module(x).backward(grad_output)
    sizes = [6, channels + 1, channels, 1, 6, 2 * channels + 1, 1]
    assert [size for size, _, _ in calls] == sizes
    assert all(dtype == torch.float64 and used is group for _, dtype, used in calls)
