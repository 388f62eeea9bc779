"""bfloat16 (PyTorch tensors only) in hbn.batch_norm, batch_norm_training,
batch_norm_backward and hbn.torch, against PyTorch in float64.

The reference always sees the exact stored bfloat16 (or float16, float32)
values, converted to float64: conftest's reference_forward and
reference_backward on a Case of float64 arrays. hbn computes in float32 and
rounds bfloat16 results to nearest even (8 significant bits, unit roundoff
2^-8), so bfloat16 results get a relative tolerance of 2^-7 (twice the
rounding) plus a small absolute part for the float32 arithmetic before it,
scaled as conftest's assert_close scales it; and each must lie within half a
bfloat16 ulp (plus that absolute part) of the exact value: rounded to nearest.
"""

import zlib

import numpy as np
import pytest
import torch
from torch import nn

import hbn
import hbn.torch as ht
from conftest import (DATA_FORMATS, SHAPES, TOLERANCE, Case, DLPackOnly, assert_close,
                      channels_of, random_case, reference_backward, reference_forward, shape_id,
                      to_channels_first)

BF16 = torch.bfloat16
BF16_RTOL = 2.0 ** -7
BF16_ATOL = TOLERANCE[np.dtype(np.float32)]  # float32 arithmetic before the rounding
NUMPY = {torch.float16: np.float16, torch.float32: np.float32}

# (input_x dtype, per-channel dtype): bfloat16 on at least one side.
DTYPE_PAIRS = [(BF16, BF16), (BF16, torch.float32), (BF16, torch.float16),
               (torch.float32, BF16), (torch.float16, BF16)]

shapes = pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
few_shapes = pytest.mark.parametrize("shape", SHAPES[::2], ids=shape_id)  # ranks 2 to 5
data_formats = pytest.mark.parametrize("data_format", DATA_FORMATS)
modes = pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
dtype_pairs = pytest.mark.parametrize(
    "x_dtype,param_dtype", DTYPE_PAIRS,
    ids=[f"x_{str(x)[6:]}-params_{str(p)[6:]}" for x, p in DTYPE_PAIRS])


def seed_of(*parts):
    return zlib.crc32(repr(parts).encode())


def as_dtypes(case, x_dtype, param_dtype):
    """(tensors, exact): the case's five arrays as torch tensors of x_dtype and
    param_dtype, and a Case of float64 arrays holding exactly their values."""
    dtypes = [x_dtype] + [param_dtype] * 4
    tensors = [torch.from_numpy(a).to(d) for a, d in zip(case.arrays("numpy"), dtypes)]
    exact = Case(*(t.double().numpy() for t in tensors), data_format=case.data_format)
    return tensors, exact


def bf16_case(seed, shape, x_dtype=BF16, param_dtype=BF16, data_format="NCHW"):
    return as_dtypes(random_case(seed, shape, np.float32, np.float32, data_format), x_dtype,
                     param_dtype)


def bits(tensor):
    tensor = tensor.detach()
    integer = {2: torch.int16, 4: torch.int32}[tensor.element_size()]
    return tensor.view(integer).numpy().tobytes()


def check(actual, expected, dtype, msg, scale=None):
    """actual: a torch tensor of `dtype`, against the float64 `expected`.
    bfloat16 here, float16/float32 with conftest's tolerances. scale: the
    magnitude the absolute tolerance grows with (default max(1, |expected|))."""
    assert isinstance(actual, torch.Tensor), msg
    assert actual.dtype == dtype, f"{msg}: {actual.dtype}"
    expected = np.asarray(expected, dtype=np.float64)
    assert tuple(actual.shape) == expected.shape, msg
    if dtype != BF16:
        return assert_close(actual, expected, NUMPY[dtype], msg)
    if scale is None:
        finite = np.abs(expected[np.isfinite(expected)])
        scale = max(1.0, float(finite.max())) if finite.size else 1.0
    actual = actual.detach().double().numpy()
    np.testing.assert_allclose(actual, expected, rtol=BF16_RTOL, atol=BF16_ATOL * scale,
                               equal_nan=True, err_msg=msg)
    # Rounded to nearest: within half a bfloat16 ulp of the exact value (up to
    # the float32 arithmetic before the rounding), not merely within one ulp.
    finite = np.isfinite(expected)
    _, exponent = np.frexp(actual[finite])  # |actual| in [2^(exponent-1), 2^exponent)
    half_ulp = np.where(actual[finite] != 0, np.ldexp(0.5, exponent - 8), 0.0)
    excess = np.abs(actual[finite] - expected[finite]) - half_ulp - BF16_ATOL * scale
    assert np.all(excess <= 0), f"{msg}: not rounded to nearest, {np.sum(excess > 0)} values"


def grad_input_scale(x, dy, weight, mean, inv_std, training):
    """The largest term of grad_input = weight * inv_std * (dy - mean(dy) -
    xhat * mean(dy * xhat)) (training; weight * inv_std * dy in inference),
    float64 channels-first: float32 errors grow with it where the terms cancel."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    terms = dy.abs()
    if training:
        axes = [axis for axis in range(x.dim()) if axis != 1]
        xhat = (x - mean.view(view)) * inv_std.view(view)
        terms = (terms + dy.mean(axes).abs().view(view)
                 + xhat.abs() * (dy * xhat).mean(axes).abs().view(view))
    gain = (weight * inv_std).abs().view(view)
    return max(1.0, float((gain * terms).max()))


# hbn.batch_norm and batch_norm_training --------------------------------------

@dtype_pairs
@modes
@data_formats
@shapes
def test_forward_matches_torch(shape, data_format, training, x_dtype, param_dtype):
    (x, running_mean, running_var, weight, bias), case = bf16_case(
        seed_of(shape, data_format, x_dtype, param_dtype), shape, x_dtype, param_dtype,
        data_format)
    before = [bits(t) for t in (x, running_mean, running_var)]
    expected = reference_forward(case, training)

    y = hbn.batch_norm(x, running_mean, running_var, weight, bias, training=training,
                       data_format=data_format)

    check(y, expected.y, x_dtype, "output")
    assert bits(x) == before[0]  # only read
    assert running_mean.dtype == running_var.dtype == param_dtype
    if training:
        check(running_mean, expected.running_mean, param_dtype, "running_mean")
        check(running_var, expected.running_var, param_dtype, "running_var")
    else:
        assert [bits(running_mean), bits(running_var)] == before[1:]


@pytest.mark.parametrize("param_dtype", [BF16, torch.float32], ids=lambda d: str(d)[6:])
@data_formats
@few_shapes
def test_batch_norm_training_saved_stats(shape, data_format, param_dtype):
    (x, running_mean, running_var, weight, bias), case = bf16_case(
        seed_of("saved", shape, data_format, param_dtype), shape, BF16, param_dtype, data_format)
    expected = reference_forward(case, training=True, momentum=0.1, eps=1e-3)

    y, saved_mean, saved_inv_std = hbn.batch_norm_training(
        x, running_mean, running_var, weight, bias, momentum=0.1, eps=1e-3,
        data_format=data_format)

    check(y, expected.y, BF16, "output")
    check(saved_mean, expected.saved_mean, torch.float32, "saved_mean")
    check(saved_inv_std, expected.saved_inv_std, torch.float32, "saved_inv_std")
    assert saved_mean.shape == (channels_of(x.shape, data_format),)
    check(running_mean, expected.running_mean, param_dtype, "running_mean")
    check(running_var, expected.running_var, param_dtype, "running_var")


def test_numpy_parameters_with_bfloat16_input():
    # The output's kind and dtype follow input_x; NumPy statistics are updated in place.
    case = random_case(5, (6, 4, 5), np.float32, np.float16)
    (x, *_), exact = as_dtypes(case, BF16, torch.float16)
    running_mean, running_var, weight, bias = case.arrays("numpy")[1:]
    expected = reference_forward(exact, training=True)

    y = hbn.batch_norm(x, running_mean, running_var, weight, bias, training=True)

    check(y, expected.y, BF16, "output")
    assert_close(running_var, expected.running_var, np.float16, "running_var")
    grads = hbn.batch_norm_backward(y, x, weight, running_mean=running_mean,
                                    running_var=running_var)
    assert isinstance(grads[0], torch.Tensor) and grads[0].dtype == BF16
    assert isinstance(grads[1], np.ndarray) and grads[1].dtype == np.float16


# hbn.batch_norm_backward -----------------------------------------------------

def backward_statistics(case, training, eps, running_mean, running_var):
    """The backward's statistics as keyword arguments: in training the reference's saved ones,
    rounded to float32 as hbn saves them, in inference the given running ones (tensors of
    case's); and the float64 mean and inv_std that grad_input_scale needs."""
    if training:
        forward = reference_forward(case, training=True, eps=eps)
        mean, inv_std = forward.saved_mean, forward.saved_inv_std
        statistics = dict(saved_mean=torch.from_numpy(mean.astype(np.float32)),
                          saved_inv_std=torch.from_numpy(inv_std.astype(np.float32)))
    else:
        mean, inv_std = case.running_mean, 1.0 / np.sqrt(case.running_var + eps)
        statistics = dict(running_mean=running_mean, running_var=running_var)
    return statistics, mean, inv_std


@pytest.mark.parametrize("x_dtype,param_dtype", DTYPE_PAIRS[:4],
                         ids=[f"x_{str(x)[6:]}-params_{str(p)[6:]}" for x, p in DTYPE_PAIRS[:4]])
@modes
@data_formats
@few_shapes
def test_backward_matches_torch_autograd(shape, data_format, training, x_dtype, param_dtype):
    seed = seed_of("backward", shape, data_format, x_dtype, param_dtype)
    (x, running_mean, running_var, weight, _), case = bf16_case(seed, shape, x_dtype,
                                                                param_dtype, data_format)
    dy = torch.from_numpy(np.random.default_rng(seed).standard_normal(case.x.shape)).to(x_dtype)
    grad_output = dy.double().numpy()
    before = [bits(dy), bits(x)]
    eps = 1e-4
    expected = reference_backward(case, grad_output, training, eps=eps)
    statistics, mean, inv_std = backward_statistics(case, training, eps, running_mean, running_var)

    grad_input, grad_weight, grad_bias = hbn.batch_norm_backward(
        dy, x, weight, **statistics, training=training, eps=eps, data_format=data_format)

    scale = grad_input_scale(*(to_channels_first(torch.from_numpy(a), data_format)
                               for a in (case.x, grad_output)),
                             *(torch.from_numpy(a) for a in (case.weight, mean, inv_std)),
                             training)
    check(grad_input, expected[0], x_dtype, "grad_input",
          scale=max(scale, float(np.abs(expected[0]).max())))
    check(grad_weight, expected[1], param_dtype, "grad_weight")
    check(grad_bias, expected[2], param_dtype, "grad_bias")
    assert [bits(dy), bits(x)] == before  # only read


# hbn.torch modules -----------------------------------------------------------

MODULES = {"1d": (ht.BatchNorm1d, nn.BatchNorm1d), "2d": (ht.BatchNorm2d, nn.BatchNorm2d)}
MODULE_CASES = {"1d_NC": ("1d", (16, 4), torch.contiguous_format),
                "1d_NCL": ("1d", (4, 3, 6), torch.contiguous_format),
                "2d": ("2d", (3, 4, 5, 6), torch.contiguous_format),
                "2d_channels_last": ("2d", (3, 4, 5, 6), torch.channels_last)}


def module_pair(kind, channels, seed):
    """(hbn's module in bfloat16, torch's in float64) holding the same values."""
    hbn_class, torch_class = MODULES[kind]
    module = hbn_class(channels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        signs = torch.randint(0, 2, (channels,), generator=gen) * 2 - 1
        module.weight.copy_(signs * torch.empty(channels).uniform_(0.5, 1.5, generator=gen))
        module.bias.uniform_(-1, 1, generator=gen)
        module.running_mean.uniform_(-1, 1, generator=gen)
        module.running_var.uniform_(0.5, 2, generator=gen)
    module = module.to(BF16)
    reference = torch_class(channels).double()
    reference.load_state_dict(module.state_dict())
    return module, reference


@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_module_matches_torch(name):
    kind, shape, memory_format = MODULE_CASES[name]
    module, reference = module_pair(kind, shape[1], seed=seed_of(name))
    gen = torch.Generator().manual_seed(seed_of("data", name))
    per_channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    # Three training steps, then eval; forward and backward each time.
    for step, training in enumerate([True, True, True, False]):
        module.train(training)
        reference.train(training)
        before = [bits(module.running_mean), bits(module.running_var)]
        offset = torch.empty(per_channel, dtype=torch.float64).uniform_(-2, 2, generator=gen)
        source = offset + torch.randn(shape, dtype=torch.float64, generator=gen)
        x = source.to(BF16).contiguous(memory_format=memory_format).requires_grad_()
        x_ref = x.detach().double().contiguous(memory_format=memory_format).requires_grad_()
        dy = torch.randn(shape, generator=gen).to(BF16)
        y, y_ref = module(x), reference(x_ref)
        y.backward(dy)
        y_ref.backward(dy.double())

        msg = f"step {step}"
        assert y.is_contiguous(memory_format=memory_format), msg
        check(y, y_ref.detach().numpy(), BF16, f"{msg} output")
        if training:
            axes = [axis for axis in range(len(shape)) if axis != 1]
            mean = x_ref.detach().mean(axes)
            inv_std = 1 / torch.sqrt(x_ref.detach().var(axes, unbiased=False) + module.eps)
        else:
            mean = reference.running_mean
            inv_std = 1 / torch.sqrt(reference.running_var + module.eps)
        scale = grad_input_scale(x_ref.detach(), dy.double(), reference.weight.detach(), mean,
                                 inv_std, training)
        check(x.grad, x_ref.grad.numpy(), BF16, f"{msg} grad_input", scale=scale)
        check(module.weight.grad, reference.weight.grad.numpy(), BF16, f"{msg} grad_weight")
        check(module.bias.grad, reference.bias.grad.numpy(), BF16, f"{msg} grad_bias")
        for buffer in ("running_mean", "running_var"):
            check(getattr(module, buffer), getattr(reference, buffer).numpy(), BF16,
                  f"{msg} {buffer}")
        if not training:
            assert [bits(module.running_mean), bits(module.running_var)] == before, msg
        assert int(module.num_batches_tracked) == int(reference.num_batches_tracked)
        # The next step starts from the same stored statistics in both.
        reference.load_state_dict(module.state_dict())
        module.zero_grad()
        reference.zero_grad()


# NaN and errors --------------------------------------------------------------

@modes
@data_formats
def test_nan_stays_in_its_channel(training, data_format):
    case = random_case(13, (6, 4, 5), np.float32, np.float32, data_format)
    case.x[(3, 1, 2) if data_format == "NCHW" else (3, 2, 1)] = np.nan
    (x, running_mean, running_var, weight, bias), exact = as_dtypes(case, BF16, BF16)
    expected = reference_forward(exact, training)

    y = hbn.batch_norm(x, running_mean, running_var, weight, bias, training=training,
                       data_format=data_format)

    nan = np.isnan(expected.y)
    assert nan.any() and np.array_equal(torch.isnan(y).numpy(), nan)
    check(y, expected.y, BF16, "output")
    assert np.array_equal(torch.isnan(running_mean).numpy(), np.isnan(expected.running_mean))
    assert np.array_equal(torch.isnan(running_var).numpy(), np.isnan(expected.running_var))


@pytest.mark.parametrize("name", ["input_x", "running_mean", "grad_output"])
def test_bfloat16_through_dlpack_is_a_type_error(name):
    x, running_mean, running_var, weight, bias = random_case(3, (4, 3, 5)).arrays("torch")
    message = f"{name} must be float16, float32 or \\(a PyTorch tensor\\) bfloat16, got bfloat16"
    with pytest.raises(TypeError, match=message):
        if name == "grad_output":
            hbn.batch_norm_backward(DLPackOnly(x.to(BF16)), x, weight, running_mean=running_mean,
                                    running_var=running_var)
        elif name == "input_x":
            hbn.batch_norm(DLPackOnly(x.to(BF16)), running_mean, running_var, weight, bias)
        else:
            hbn.batch_norm(x, DLPackOnly(running_mean.to(BF16)), running_var, weight, bias)


FAILING_CALLS = {
    "weight_length": (dict(weight=torch.ones(4, dtype=BF16)), {}, ValueError),
    "bias_float32": (dict(bias=torch.ones(3)), {}, TypeError),
    "input_float64": (dict(x=torch.ones(4, 3, 5, dtype=torch.float64)), {}, TypeError),
    "input_through_dlpack": (dict(x=DLPackOnly(torch.ones(4, 3, 5, dtype=BF16))), {}, TypeError),
    "M_is_1": (dict(x=torch.ones(1, 3, dtype=BF16)), {}, ValueError),
    "eps_2": ({}, dict(eps=2.0), ValueError),
    "non_contiguous": (dict(x=torch.ones(5, 3, 4, dtype=BF16).transpose(0, 2)), {}, ValueError),
}


@pytest.mark.parametrize("call", list(FAILING_CALLS))
@pytest.mark.parametrize("function", ["batch_norm", "batch_norm_training"])
def test_failed_training_call_leaves_bfloat16_running_stats(function, call):
    replacements, options, error = FAILING_CALLS[call]
    (x, running_mean, running_var, weight, bias), _ = bf16_case(4, (4, 3, 5))
    running_mean[1] = float("nan")  # bit patterns, NaN included
    args = {**dict(x=x, weight=weight, bias=bias), **replacements}
    before = [bits(running_mean), bits(running_var)]
    if function == "batch_norm":
        options = dict(options, training=True)

    with pytest.raises(error):
        getattr(hbn, function)(args["x"], running_mean, running_var, args["weight"],
                               args["bias"], **options)

    assert [bits(running_mean), bits(running_var)] == before
