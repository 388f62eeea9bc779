"""Shared helpers for hbn's Python tests: random cases, layout moves and the
independent reference, PyTorch's F.batch_norm (and its autograd) in float64.

Test modules import these helpers with ``from conftest import ...`` (pytest
puts this directory on sys.path when it loads this file).
"""

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

DATA_FORMATS = ("NCHW", "NHWC")
DTYPES = (np.float16, np.float32)


def random_shape(seed, rank, max_elements=2400):
    """A random shape of `rank` (channels on axis 1) with at least 2 values
    per channel and at most `max_elements` in all: small, for a fast suite."""
    rng = np.random.default_rng(seed)
    while True:
        # C up to 20: often not a multiple of a vector width.
        channels = int(rng.integers(1, 21))
        batch = int(rng.integers(2, 200 if rank == 2 else 9))  # N >= 2: M >= 2
        spatial = [int(rng.integers(1, 12)) for _ in range(rank - 2)]
        shape = (batch, channels, *spatial)
        if np.prod(shape) <= max_elements:
            return shape


# Three random shapes per rank 2..5, drawn once at collection time so that the
# shape shows in the test id.
SHAPES = [random_shape(100 * rank + k, rank) for rank in range(2, 6) for k in range(3)]


def shape_id(shape):
    return "x".join(map(str, shape))


def dtype_id(dtype):
    return np.dtype(dtype).name


class DLPackOnly:
    """Exports a PyTorch tensor's memory through DLPack and nothing else."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, stream=None):
        return self.tensor.__dlpack__()

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


# Layout moves. hbn takes NHWC as channels last; the reference (torch) wants
# channels on axis 1.
def to_channels_first(a, data_format):
    if data_format == "NCHW":
        return a
    if isinstance(a, torch.Tensor):
        return a.movedim(-1, 1)
    return np.moveaxis(a, -1, 1)


def from_channels_first(a, data_format):
    """The inverse of to_channels_first, made contiguous (hbn needs that)."""
    if data_format == "NCHW":
        return a
    if isinstance(a, torch.Tensor):
        return a.movedim(1, -1).contiguous()
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def channels_of(shape, data_format):
    return shape[1] if data_format == "NCHW" else shape[-1]


def to_numpy(a):
    """A NumPy view of hbn's result or an argument, whatever its kind."""
    if isinstance(a, torch.Tensor):
        return a.detach().numpy()
    return np.asarray(a)


def float64_tensor(a):
    return torch.from_numpy(np.array(to_numpy(a), dtype=np.float64))


@dataclass
class Case:
    """The arguments of one batch_norm call, as NumPy arrays."""

    x: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    data_format: str = "NCHW"

    def arrays(self, kind):
        """Fresh copies of the five arrays as `kind` ("numpy" or "torch"),
        so that a call's in-place updates never leak into the case."""
        names = [f.name for f in fields(self) if f.name != "data_format"]
        copies = [getattr(self, name).copy() for name in names]
        if kind == "torch":
            copies = [torch.from_numpy(a) for a in copies]
        return copies


def random_case(seed, shape, dtype=np.float32, param_dtype=np.float32, data_format="NCHW",
                offset=0.0, spread=1.0):
    """Random arguments for batch_norm. `shape` is channels-first; input_x is
    laid out in data_format. Each channel gets its own mean and spread (around
    `offset` and `spread`), so that a mix-up of channels or layouts shows."""
    rng = np.random.default_rng(seed)
    channels = shape[1]
    per_channel = (1, channels) + (1,) * (len(shape) - 2)
    means = offset + rng.uniform(-2, 2, channels).reshape(per_channel)
    spreads = spread * rng.uniform(0.5, 2, channels).reshape(per_channel)
    x = (means + spreads * rng.standard_normal(shape)).astype(dtype)
    signs = rng.choice([-1.0, 1.0], channels)
    return Case(
        x=from_channels_first(x, data_format),
        running_mean=rng.uniform(-1, 1, channels).astype(param_dtype),
        running_var=rng.uniform(0.5, 2, channels).astype(param_dtype),
        weight=(signs * rng.uniform(0.5, 1.5, channels)).astype(param_dtype),
        bias=rng.uniform(-1, 1, channels).astype(param_dtype),
        data_format=data_format,
    )


@dataclass
class Reference:
    """PyTorch's float64 results, as NumPy arrays in input_x's layout."""

    y: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    saved_mean: np.ndarray = None
    saved_inv_std: np.ndarray = None


def reference_forward(case, training, momentum=0.1, eps=1e-5):
    """F.batch_norm on the case converted to float64, with its running
    statistics updated as torch updates them (unbiased variance)."""
    x = to_channels_first(float64_tensor(case.x), case.data_format)
    running_mean = float64_tensor(case.running_mean)
    running_var = float64_tensor(case.running_var)
    y = F.batch_norm(x, running_mean, running_var, float64_tensor(case.weight),
                     float64_tensor(case.bias), training=training, momentum=momentum, eps=eps)
    reference = Reference(y=from_channels_first(y, case.data_format).numpy(),
                          running_mean=running_mean.numpy(), running_var=running_var.numpy())
    if training:
        axes = [axis for axis in range(x.dim()) if axis != 1]
        reference.saved_mean = x.mean(axes).numpy()
        variance = x.var(axes, unbiased=False)
        reference.saved_inv_std = (1.0 / torch.sqrt(variance + eps)).numpy()
    return reference


def reference_backward(case, grad_output, training, eps=1e-5):
    """(grad_input, grad_weight, grad_bias) from torch autograd through
    F.batch_norm in float64; grad_input in input_x's layout."""
    x = to_channels_first(float64_tensor(case.x), case.data_format).clone().requires_grad_()
    weight = float64_tensor(case.weight).requires_grad_()
    bias = float64_tensor(case.bias).requires_grad_()
    y = F.batch_norm(x, float64_tensor(case.running_mean), float64_tensor(case.running_var),
                     weight, bias, training=training, momentum=0.0, eps=eps)
    y.backward(to_channels_first(float64_tensor(grad_output), case.data_format))
    return (from_channels_first(x.grad, case.data_format).numpy(), weight.grad.numpy(),
            bias.grad.numpy())


# Tolerances. float32 data is computed in float32 with wide accumulation:
# errors of a few float32 ulps of the result's magnitude. float16 results are
# rounded to float16 (2^-11 relative) after float32 arithmetic.
TOLERANCE = {np.dtype(np.float32): 2e-5, np.dtype(np.float16): 2e-3}


def assert_close(actual, expected, dtype, err_msg=""):
    """Relative and absolute tolerance for `dtype`, the absolute part scaled to
    the magnitude of `expected` (sums such as grad_weight grow with M)."""
    tolerance = TOLERANCE[np.dtype(dtype)]
    finite = np.abs(expected[np.isfinite(expected)])
    scale = max(1.0, float(finite.max())) if finite.size else 1.0
    np.testing.assert_allclose(to_numpy(actual).astype(np.float64), expected, rtol=tolerance,
                               atol=tolerance * scale, equal_nan=True, err_msg=err_msg)


def assert_kind(result, kind, dtype, shape):
    """result is a new array of `kind` with `dtype` and `shape`."""
    if kind == "torch":
        assert isinstance(result, torch.Tensor)
        assert result.dtype == {np.dtype(np.float16): torch.float16,
                                np.dtype(np.float32): torch.float32}[np.dtype(dtype)]
        assert tuple(result.shape) == tuple(shape)
    else:
        assert isinstance(result, np.ndarray)
        assert result.dtype == np.dtype(dtype)
        assert result.shape == tuple(shape)
