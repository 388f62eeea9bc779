"""The fused epilogue (activation="relu", residual=...) of hbn.batch_norm,
batch_norm_training, batch_norm_backward and hbn.torch, against PyTorch in
float64: F.relu(F.batch_norm(x) + residual) and its autograd.

As in test_bfloat16.py (whose helpers and tolerances this reuses), the
reference sees the exact stored float32, float16 or bfloat16 values, and
bfloat16 results must be rounded to nearest: the sum bn(x) + residual is
formed in float32 and rounded once. The backward's gradient reaching batch
norm and the residual is grad_output masked where the forward's output is <= 0
(NaN passes), torch's threshold_backward; hbn.batch_norm_backward is checked
against the float64 backward of that masked gradient, with the mask of the
forward_output it was given.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hbn
import hbn.torch as ht
from conftest import (DATA_FORMATS, SHAPES, random_case, reference_backward, reference_forward,
                      shape_id, to_channels_first)
from test_bfloat16 import (BF16, as_dtypes, backward_statistics, bits, check, grad_input_scale,
                           seed_of)

DTYPES = (torch.float32, torch.float16, BF16)
# (activation, whether a residual is added)
EPILOGUES = {"relu": ("relu", False), "add_relu": ("relu", True), "add": (None, True)}

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
data_formats = pytest.mark.parametrize("data_format", DATA_FORMATS)
modes = pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
epilogues = pytest.mark.parametrize("epilogue", list(EPILOGUES))
few_shapes = pytest.mark.parametrize("shape", SHAPES[::2], ids=shape_id)  # ranks 2 to 5


def epilogue_case(seed, shape, dtype, data_format="NCHW", param_dtype=torch.float32):
    """(tensors, residual, exact): batch_norm's five arguments as torch tensors
    (input_x of dtype, in data_format), a residual like input_x of normal
    values (so that the sum changes sign often), and the exact float64 Case."""
    tensors, exact = as_dtypes(random_case(seed, shape, np.float32, np.float32, data_format),
                               dtype, param_dtype)
    residual = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal(
        exact.x.shape)).to(dtype)
    return tensors, residual, exact


def relu_mask(forward_output):
    """Where the ReLU's backward passes the gradient: output > 0 or NaN."""
    return ~(forward_output <= 0)


def apply_epilogue(y, activation, residual):
    """The reference epilogue, in float64, on NumPy arrays (NaN stays NaN)."""
    if residual is not None:
        y = y + residual
    return np.where(relu_mask(y), y, 0.0) if activation == "relu" else y


def exact(tensor):
    return tensor.detach().double().numpy()


# Forward ---------------------------------------------------------------------

@epilogues
@modes
@data_formats
@dtypes
@few_shapes
def test_forward_matches_torch(shape, dtype, data_format, training, epilogue):
    activation, adds = EPILOGUES[epilogue]
    (x, running_mean, running_var, weight, bias), residual, case = epilogue_case(
        seed_of("forward", shape, dtype, data_format), shape, dtype, data_format)
    residual = residual if adds else None
    plain_mean, plain_var = running_mean.clone(), running_var.clone()
    before = [bits(x)] + ([bits(residual)] if adds else [])
    reference = reference_forward(case, training)
    expected = apply_epilogue(reference.y, activation, exact(residual) if adds else None)

    y = hbn.batch_norm(x, running_mean, running_var, weight, bias, training=training,
                       data_format=data_format, activation=activation, residual=residual)
    hbn.batch_norm(x, plain_mean, plain_var, weight, bias, training=training,
                   data_format=data_format)

    check(y, expected, dtype, "output")
    if activation == "relu":
        assert not (y < 0).any()
    assert [bits(x)] + ([bits(residual)] if adds else []) == before  # only read
    check(running_mean, reference.running_mean, torch.float32, "running_mean")
    check(running_var, reference.running_var, torch.float32, "running_var")
    # The statistics are input_x's alone: the running ones as without the epilogue.
    assert [bits(running_mean), bits(running_var)] == [bits(plain_mean), bits(plain_var)]


@epilogues
@data_formats
@dtypes
def test_batch_norm_training_saves_the_statistics_of_input_x(dtype, data_format, epilogue):
    activation, adds = EPILOGUES[epilogue]
    shape = (5, 6, 4, 3)
    (x, running_mean, running_var, weight, bias), residual, case = epilogue_case(
        seed_of("saved", dtype, data_format), shape, dtype, data_format)
    residual = residual if adds else None
    plain = [t.clone() for t in (running_mean, running_var)]
    reference = reference_forward(case, training=True, momentum=0.2, eps=1e-3)

    y, saved_mean, saved_inv_std = hbn.batch_norm_training(
        x, running_mean, running_var, weight, bias, momentum=0.2, eps=1e-3,
        data_format=data_format, activation=activation, residual=residual)
    _, plain_mean, plain_inv_std = hbn.batch_norm_training(
        x, *plain, weight, bias, momentum=0.2, eps=1e-3, data_format=data_format)

    check(y, apply_epilogue(reference.y, activation, exact(residual) if adds else None), dtype,
          "output")
    check(saved_mean, reference.saved_mean, torch.float32, "saved_mean")
    check(saved_inv_std, reference.saved_inv_std, torch.float32, "saved_inv_std")
    assert [bits(saved_mean), bits(saved_inv_std)] == [bits(plain_mean), bits(plain_inv_std)]
    assert [bits(running_mean), bits(running_var)] == [bits(t) for t in plain]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
@modes
def test_numpy_arrays(dtype, training):
    # The epilogue takes NumPy arrays as the other arguments do; the output
    # is a NumPy array, and the residual may be input_x itself (both only read).
    case = random_case(seed_of("numpy", dtype), (6, 4, 5), dtype)
    x, running_mean, running_var, weight, bias = case.arrays("numpy")
    expected = apply_epilogue(reference_forward(case, training).y, "relu",
                              case.x.astype(np.float64))

    y = hbn.batch_norm(x, running_mean, running_var, weight, bias, training=training,
                       activation="relu", residual=x)

    assert isinstance(y, np.ndarray) and y.dtype == dtype
    check(torch.from_numpy(y), expected, torch.from_numpy(y).dtype, "output")
    assert np.array_equal(x, case.x)


@modes
@data_formats
def test_nan_stays_nan_through_add_and_relu(training, data_format):
    # relu(NaN) is NaN, as torch.relu's; a NaN in the residual stays in its element.
    (x, running_mean, running_var, weight, bias), residual, case = epilogue_case(
        seed_of("nan", data_format), (6, 4, 5), torch.float32, data_format)
    nan_x, nan_residual = ((3, 1, 2), (0, 2, 4)) if data_format == "NCHW" else ((3, 2, 1),
                                                                               (0, 4, 2))
    x[nan_x] = float("nan")
    residual[nan_residual] = float("nan")
    case.x = x.double().numpy()
    reference = reference_forward(case, training)
    expected = apply_epilogue(reference.y, "relu", exact(residual))

    y = hbn.batch_norm(x, running_mean, running_var, weight, bias, training=training,
                       data_format=data_format, activation="relu", residual=residual)

    nan = np.isnan(expected)
    assert nan.sum() > 1 and np.array_equal(torch.isnan(y).numpy(), nan)
    check(y, expected, torch.float32, "output")
    assert np.array_equal(torch.isnan(running_mean).numpy(), np.isnan(reference.running_mean))


# hbn.batch_norm_backward -----------------------------------------------------

def float32_statistics(case, training, eps):
    """backward_statistics with float32 running statistics, as the float32 parameters here."""
    return backward_statistics(case, training, eps,
                               *(torch.from_numpy(a.astype(np.float32))
                                 for a in (case.running_mean, case.running_var)))


def check_backward(grads, case, dy, forward_output, training, eps, dtype, data_format):
    """hbn's (grad_input, grad_weight, grad_bias, grad_residual) against the
    float64 backward of dy masked by forward_output (the gradient that reaches
    batch norm); grad_residual is that masked dy exactly."""
    masked = torch.ops.aten.threshold_backward(dy.double(), forward_output.double(), 0)
    expected = reference_backward(case, masked.numpy(), training, eps=eps)
    _, mean, inv_std = float32_statistics(case, training, eps)
    scale = grad_input_scale(*(to_channels_first(t, data_format)
                               for t in (torch.from_numpy(case.x), masked)),
                             *(torch.from_numpy(a) for a in (case.weight, mean, inv_std)),
                             training)
    grad_input, grad_weight, grad_bias, grad_residual = grads
    check(grad_input, expected[0], dtype, "grad_input",
          scale=max(scale, float(np.abs(expected[0]).max())))
    check(grad_weight, expected[1], torch.float32, "grad_weight")
    check(grad_bias, expected[2], torch.float32, "grad_bias")
    assert grad_residual.dtype == dtype
    assert np.array_equal(exact(grad_residual), masked.numpy(), equal_nan=True)


@modes
@data_formats
@dtypes
@few_shapes
def test_backward_with_forward_output(shape, dtype, data_format, training):
    seed = seed_of("backward", shape, dtype, data_format)
    (x, running_mean, running_var, weight, bias), residual, case = epilogue_case(
        seed, shape, dtype, data_format)
    dy = torch.from_numpy(np.random.default_rng(seed + 2).standard_normal(case.x.shape)).to(dtype)
    eps = 1e-4
    forward = hbn.batch_norm(x, running_mean, running_var, weight, bias, training=training,
                             eps=eps, data_format=data_format, activation="relu",
                             residual=residual)
    assert (forward > 0).any() and (forward == 0).any()  # the mask matters
    statistics, _, _ = float32_statistics(case, training, eps)
    before = [bits(dy), bits(x), bits(forward)]

    grads = hbn.batch_norm_backward(dy, x, weight, **statistics, training=training, eps=eps,
                                    data_format=data_format, activation="relu",
                                    forward_output=forward, return_grad_residual=True)

    check_backward(grads, case, dy, forward, training, eps, dtype, data_format)
    assert [bits(dy), bits(x), bits(forward)] == before  # only read


@modes
def test_nan_and_zero_in_forward_output(training):
    # The mask is threshold_backward's: a NaN output passes the gradient, 0,
    # -0 and negative outputs stop it; a NaN in grad_output goes where it passes.
    (x, _, _, weight, _), _, case = epilogue_case(seed_of("mask", training), (6, 4, 5),
                                                  torch.float32)
    rng = np.random.default_rng(3)
    forward_output = torch.from_numpy(rng.choice(
        np.array([np.nan, 0.0, -0.0, -1.5, 1e-30, 2.0], np.float32), case.x.shape))
    dy = torch.from_numpy(rng.standard_normal(case.x.shape).astype(np.float32))
    dy[0, 0, :] = float("nan")  # channel 0's sums are NaN, the others' finite
    statistics, _, _ = float32_statistics(case, training, 1e-5)

    grads = hbn.batch_norm_backward(dy, x, weight, **statistics, training=training,
                                    activation="relu", forward_output=forward_output,
                                    return_grad_residual=True)

    check_backward(grads, case, dy, forward_output, training, 1e-5, torch.float32, "NCHW")
    assert torch.isnan(grads[3]).any() and not torch.isnan(grads[3][:, 1:]).any()


@data_formats
def test_residual_gradient_without_activation_is_grad_output(data_format):
    (x, running_mean, running_var, weight, _), _, case = epilogue_case(
        seed_of("add", data_format), (4, 3, 5, 2), torch.float16, data_format)
    dy = torch.from_numpy(np.random.default_rng(4).standard_normal(case.x.shape)).half()
    # forward_output is not read without an activation.
    grads = hbn.batch_norm_backward(dy, x, weight, running_mean, running_var,
                                    data_format=data_format, return_grad_residual=True)
    check_backward(grads, case, dy, torch.ones_like(dy), False, 1e-5, torch.float16,
                   data_format)
    assert bits(grads[3]) == bits(dy)


# hbn.torch -------------------------------------------------------------------

CL = torch.channels_last
# name: (input's memory format, residual's)
MEMORY_FORMATS = {"contiguous": (torch.contiguous_format, torch.contiguous_format),
                  "channels_last": (CL, CL),
                  "channels_last_residual_contiguous": (CL, torch.contiguous_format)}


def reference_output(x, running_mean, running_var, weight, bias, training, activation,
                     residual):
    """torch's own unfused ops, on whatever dtype the tensors have."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training=training)
    if residual is not None:
        y = y + residual
    return F.relu(y) if activation == "relu" else y


def leaf(tensor, dtype, memory_format=torch.contiguous_format):
    return tensor.to(dtype).contiguous(memory_format=memory_format).requires_grad_()


@pytest.mark.parametrize("memory_format", list(MEMORY_FORMATS))
@epilogues
@modes
@dtypes
def test_autograd_matches_torch(dtype, training, epilogue, memory_format):
    activation, adds = EPILOGUES[epilogue]
    x_format, residual_format = MEMORY_FORMATS[memory_format]
    shape = (4, 5, 6, 3)
    (x, running_mean, running_var, weight, bias), residual, _ = epilogue_case(
        seed_of("autograd", dtype), shape, dtype)
    dy = torch.from_numpy(np.random.default_rng(5).standard_normal(shape)).to(dtype)
    inputs = (leaf(x, dtype, x_format), leaf(weight, torch.float32), leaf(bias, torch.float32),
              leaf(residual, dtype, residual_format))
    references = [leaf(t.detach(), torch.float64, form) for t, form in
                  zip(inputs, (x_format, torch.contiguous_format, torch.contiguous_format,
                               residual_format))]
    mean, var = running_mean.clone(), running_var.clone()
    ref_mean, ref_var = running_mean.double(), running_var.double()
    # The residual is an input of the graph either way; without adds it is
    # unused and gets no gradient.
    used = inputs[3] if adds else None

    y = ht.batch_norm(inputs[0], mean, var, inputs[1], inputs[2], training=training,
                      activation=activation, residual=used)
    expected = reference_output(references[0], ref_mean, ref_var, references[1], references[2],
                                training, activation, references[3] if adds else None)
    y.backward(dy)
    expected.backward(dy.double())

    assert y.dtype == dtype and y.is_contiguous(memory_format=x_format)
    check(y, exact(expected), dtype, "output")
    check(mean, ref_mean.numpy(), torch.float32, "running_mean")
    check(var, ref_var.numpy(), torch.float32, "running_var")
    masked = dy.double() * (expected.detach() > 0) if activation else dy.double()
    if training:
        axes = [0, 2, 3]
        batch_mean = references[0].detach().mean(axes)
        inv_std = 1 / torch.sqrt(references[0].detach().var(axes, unbiased=False) + 1e-5)
    else:
        batch_mean, inv_std = ref_mean, 1 / torch.sqrt(ref_var + 1e-5)
    scale = grad_input_scale(references[0].detach(), masked, references[1].detach(), batch_mean,
                             inv_std, training)
    check(inputs[0].grad, exact(references[0].grad), dtype, "grad_input", scale=scale)
    check(inputs[1].grad, exact(references[1].grad), torch.float32, "grad_weight")
    check(inputs[2].grad, exact(references[2].grad), torch.float32, "grad_bias")
    if adds:
        check(inputs[3].grad, exact(references[3].grad), dtype, "grad_residual")
    else:
        assert inputs[3].grad is None


def test_residual_that_needs_no_gradient():
    # Only the gradients asked for: a constant residual gets none, the others flow.
    (x, running_mean, running_var, weight, bias), residual, _ = epilogue_case(
        seed_of("constant residual"), (4, 3, 5), torch.float32)
    x.requires_grad_()
    y = ht.batch_norm(x, running_mean, running_var, weight, bias, activation="relu",
                      residual=residual)
    ref_x = x.detach().double().requires_grad_()
    expected = F.relu(F.batch_norm(ref_x, running_mean.double(), running_var.double(),
                                   weight.double(), bias.double()) + residual.double())
    y.sum().backward()
    expected.sum().backward()
    check(x.grad, exact(ref_x.grad), torch.float32, "grad_input")


def test_gradcheck_through_add_relu():
    # Finite differences of the float32 function, as test_torch.py's gradcheck
    # (atol=rtol=1e-3 against quotients good to a few 1e-4); |bn + residual|
    # stays above the step so that no value crosses the ReLU's kink.
    gen = torch.Generator().manual_seed(22)
    shape = (3, 2, 2, 3)
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    weight = torch.empty(2, dtype=torch.float64).uniform_(0.5, 1.5, generator=gen)
    bias = torch.empty(2, dtype=torch.float64).uniform_(-1, 1, generator=gen)
    with torch.no_grad():
        y = F.batch_norm(x, None, None, weight, bias, training=True)
    sign = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    residual = sign * torch.empty(shape, dtype=torch.float64).uniform_(0.2, 1, generator=gen) - y
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias, residual))

    def function(x, weight, bias, residual):
        return ht.batch_norm(x.float(), None, None, weight.float(), bias.float(), training=True,
                             activation="relu", residual=residual.float()).double()

    assert torch.autograd.gradcheck(function, inputs, eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_option_matches_torch(training):
    # ht.BatchNorm2d(C, activation="relu") as torch's BatchNorm2d then ReLU,
    # module(x, residual) as BatchNorm2d, add, then ReLU.
    gen = torch.Generator().manual_seed(23)
    module = ht.BatchNorm2d(5, activation="relu")
    reference = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        module.weight.uniform_(-1.5, 1.5, generator=gen)
        module.bias.uniform_(-1, 1, generator=gen)
        module.running_var.uniform_(0.5, 2, generator=gen)
    reference.load_state_dict(module.state_dict())
    module.train(training)
    reference.train(training)
    assert "activation='relu'" in repr(module)
    x = torch.randn((4, 5, 3, 6), generator=gen).contiguous(memory_format=CL).requires_grad_()
    residual = torch.randn((4, 5, 3, 6), generator=gen).requires_grad_()
    ref_x, ref_residual = (t.detach().double().requires_grad_() for t in (x, residual))

    # Without, then with the residual: gradients and running statistics
    # accumulate over both calls, in both modules.
    for adds in (False, True):
        y = module(x, residual) if adds else module(x)
        expected = reference(ref_x) + ref_residual if adds else reference(ref_x)
        expected = F.relu(expected)
        y.square().sum().backward()
        expected.square().sum().backward()
        check(y, exact(expected), torch.float32, "output")
    check(x.grad, exact(ref_x.grad), torch.float32, "grad_input")
    check(residual.grad, exact(ref_residual.grad), torch.float32, "grad_residual")
    check(module.weight.grad, exact(reference.weight.grad), torch.float32, "grad_weight")
    check(module.running_var, exact(reference.running_var), torch.float32, "running_var")
    assert ht.BatchNorm2d(5).activation is None


# Errors ----------------------------------------------------------------------

def arguments(kind="torch", dtype=np.float32):
    return random_case(1, (4, 3, 5), dtype).arrays(kind)


BAD_ACTIVATIONS = {"'gelu'": ("gelu", ValueError), "'ReLU'": ("ReLU", ValueError),
                   "''": ("", ValueError), "'relu '": ("relu ", ValueError),
                   "1": (1, TypeError), "True": (True, TypeError), "F.relu": (F.relu, TypeError)}


@pytest.mark.parametrize("value,error", list(BAD_ACTIVATIONS.values()), ids=list(BAD_ACTIVATIONS))
@pytest.mark.parametrize("function", ["batch_norm", "batch_norm_training", "batch_norm_backward"])
def test_bad_activation(function, value, error):
    x, running_mean, running_var, weight, bias = arguments()
    before = [bits(running_mean), bits(running_var)]
    with pytest.raises(error, match="^activation must be None or"):
        if function == "batch_norm_backward":
            hbn.batch_norm_backward(x, x, weight, running_mean, running_var, activation=value,
                                    forward_output=x)
        else:
            options = dict(training=True) if function == "batch_norm" else {}
            getattr(hbn, function)(x, running_mean, running_var, weight, bias, **options,
                                   activation=value)
    assert [bits(running_mean), bits(running_var)] == before


BAD_RESIDUALS = {
    "float16": (lambda x: x.half(), TypeError, "residual dtype Float16 differs from input_x"),
    "bfloat16": (lambda x: x.to(BF16), TypeError, "residual dtype BFloat16 differs"),
    "float64": (lambda x: x.double(), TypeError, "residual must be float16, float32"),
    "shape": (lambda x: x[:, :, :4].contiguous(), ValueError,
              r"residual shape \[4, 3, 4\] differs from input_x shape \[4, 3, 5\]"),
    "transposed": (lambda x: x.transpose(0, 2), ValueError, "residual is not contiguous"),
    "list": (lambda x: x.tolist(), TypeError, "residual must be a NumPy array"),
    "numpy_float16": (lambda x: x.numpy().astype(np.float16), TypeError, "residual dtype"),
}


@pytest.mark.parametrize("bad", list(BAD_RESIDUALS))
@pytest.mark.parametrize("function", ["batch_norm", "batch_norm_training"])
def test_bad_residual_leaves_running_stats(function, bad):
    make, error, message = BAD_RESIDUALS[bad]
    x, running_mean, running_var, weight, bias = arguments()
    running_mean[1] = float("nan")  # bit patterns, NaN included
    before = [bits(running_mean), bits(running_var)]
    options = dict(training=True) if function == "batch_norm" else {}

    with pytest.raises(error, match=message):
        getattr(hbn, function)(x, running_mean, running_var, weight, bias, **options,
                               activation="relu", residual=make(x))

    assert [bits(running_mean), bits(running_var)] == before


def test_bad_residual_in_hbn_torch_leaves_running_stats():
    x, running_mean, running_var, weight, bias = arguments()
    before = [bits(running_mean), bits(running_var)]
    with pytest.raises(ValueError, match="residual shape"):
        ht.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                      activation="relu", residual=x[:2])
    with pytest.raises(ValueError, match="activation"):
        ht.BatchNorm1d(3, activation="tanh")(x)
    assert [bits(running_mean), bits(running_var)] == before


@pytest.mark.parametrize("bad,error,message", [
    (None, ValueError, "activation is ReLU, so the backward needs options.forward_output"),
    (lambda x: x.half(), TypeError, "forward_output dtype Float16 differs from input_x"),
    (lambda x: x[:2].contiguous(), ValueError, "forward_output shape"),
    (lambda x: "x", TypeError, "forward_output must be a NumPy array"),
], ids=["missing", "float16", "shape", "str"])
def test_bad_forward_output(bad, error, message):
    x, running_mean, running_var, weight, _ = arguments()
    with pytest.raises(error, match=message):
        hbn.batch_norm_backward(x, x, weight, running_mean, running_var, activation="relu",
                                forward_output=None if bad is None else bad(x))


@pytest.mark.parametrize("value", [1, None, "yes"], ids=repr)
def test_return_grad_residual_not_bool(value):
    x, running_mean, running_var, weight, _ = arguments()
    with pytest.raises(TypeError, match="return_grad_residual must be a bool"):
        hbn.batch_norm_backward(x, x, weight, running_mean, running_var,
                                return_grad_residual=value)
