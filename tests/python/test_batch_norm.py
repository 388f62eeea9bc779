"""hbn.batch_norm, batch_norm_training and batch_norm_backward against
PyTorch's F.batch_norm (and its autograd) in float64."""

import json
import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch

import hbn
from conftest import (DATA_FORMATS, DTYPES, SHAPES, assert_close, assert_kind, channels_of,
                      dtype_id, random_case, reference_backward, reference_forward, shape_id,
                      to_numpy)

KINDS = ("numpy", "torch")

shapes = pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
param_dtypes = pytest.mark.parametrize("param_dtype", DTYPES,
                                       ids=lambda d: "params_" + dtype_id(d))
data_formats = pytest.mark.parametrize("data_format", DATA_FORMATS)
kinds = pytest.mark.parametrize("kind", KINDS)
modes = pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])


def full_matrix(test):
    """Every shape, dtype pair, layout, mode and array kind."""
    for mark in (kinds, modes, data_formats, param_dtypes, dtypes, shapes):
        test = mark(test)
    return test


def seed_of(*parts):
    """A seed that differs per parametrization but is stable between runs."""
    return zlib.crc32(repr(parts).encode())


# Forward ---------------------------------------------------------------------

@full_matrix
def test_forward_matches_torch(shape, dtype, param_dtype, data_format, training, kind):
    case = random_case(seed_of(shape, dtype, param_dtype, data_format), shape, dtype, param_dtype,
                       data_format)
    x, running_mean, running_var, weight, bias = case.arrays(kind)
    expected = reference_forward(case, training)

    y = hbn.batch_norm(x, running_mean, running_var, weight, bias, training=training,
                       data_format=data_format)

    assert_kind(y, kind, dtype, case.x.shape)
    assert_close(y, expected.y, dtype, "output")
    # input_x is only read.
    assert np.array_equal(to_numpy(x), case.x)
    # Running statistics: updated in place in training (in their own
    # dtype), left bit-identical in inference.
    assert to_numpy(running_mean).dtype == np.dtype(param_dtype)
    if training:
        assert_close(running_mean, expected.running_mean, param_dtype, "running_mean")
        assert_close(running_var, expected.running_var, param_dtype, "running_var")
    else:
        assert np.array_equal(to_numpy(running_mean), case.running_mean)
        assert np.array_equal(to_numpy(running_var), case.running_var)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
@param_dtypes
@data_formats
@kinds
def test_running_stats_update(momentum, param_dtype, data_format, kind):
    shape = (6, 5, 4, 3)
    case = random_case(seed_of(momentum, param_dtype, data_format), shape, np.float32,
                       param_dtype, data_format)
    x, running_mean, running_var, weight, bias = case.arrays(kind)
    expected = reference_forward(case, training=True, momentum=momentum)

    hbn.batch_norm(x, running_mean, running_var, weight, bias, training=True, momentum=momentum,
                   data_format=data_format)

    # In place: the caller's own arrays hold the new statistics.
    if momentum == 0.0:
        # (1 - 0) * running + 0 * batch: exactly the old values.
        assert np.array_equal(to_numpy(running_mean), case.running_mean)
        assert np.array_equal(to_numpy(running_var), case.running_var)
    else:
        assert not np.array_equal(to_numpy(running_var), case.running_var)
    assert_close(running_mean, expected.running_mean, param_dtype, "running_mean")
    assert_close(running_var, expected.running_var, param_dtype, "running_var")


@pytest.mark.parametrize("shape", SHAPES[::2], ids=shape_id)
@dtypes
@param_dtypes
@data_formats
@kinds
def test_batch_norm_training_saved_stats(shape, dtype, param_dtype, data_format, kind):
    case = random_case(seed_of("saved", shape, dtype, param_dtype, data_format), shape, dtype,
                       param_dtype, data_format)
    x, running_mean, running_var, weight, bias = case.arrays(kind)
    expected = reference_forward(case, training=True, momentum=0.1, eps=1e-3)

    y, saved_mean, saved_inv_std = hbn.batch_norm_training(
        x, running_mean, running_var, weight, bias, momentum=0.1, eps=1e-3,
        data_format=data_format)

    channels = channels_of(case.x.shape, data_format)
    assert_kind(y, kind, dtype, case.x.shape)
    assert_kind(saved_mean, kind, np.float32, (channels,))
    assert_kind(saved_inv_std, kind, np.float32, (channels,))
    assert_close(y, expected.y, dtype, "output")
    # The statistics are computed in float32 or wider whatever the dtypes.
    assert_close(saved_mean, expected.saved_mean, np.float32, "saved_mean")
    assert_close(saved_inv_std, expected.saved_inv_std, np.float32, "saved_inv_std")
    assert_close(running_mean, expected.running_mean, param_dtype, "running_mean")
    assert_close(running_var, expected.running_var, param_dtype, "running_var")


# Backward --------------------------------------------------------------------

def backward_arguments(case, training, kind, eps):
    """batch_norm_backward's statistics: the reference's saved ones (rounded
    to float32, as hbn stores them) in training, the running ones otherwise.
    Taking them from the reference keeps a forward bug out of this test."""
    if not training:
        _, running_mean, running_var, _, _ = case.arrays(kind)
        return dict(running_mean=running_mean, running_var=running_var)
    expected = reference_forward(case, training=True, eps=eps)
    saved = [expected.saved_mean.astype(np.float32), expected.saved_inv_std.astype(np.float32)]
    if kind == "torch":
        saved = [torch.from_numpy(a) for a in saved]
    return dict(saved_mean=saved[0], saved_inv_std=saved[1])


@full_matrix
def test_backward_matches_torch_autograd(shape, dtype, param_dtype, data_format, training, kind):
    seed = seed_of("backward", shape, dtype, param_dtype, data_format)
    case = random_case(seed, shape, dtype, param_dtype, data_format)
    grad_output = np.random.default_rng(seed).standard_normal(case.x.shape).astype(dtype)
    x, _, _, weight, _ = case.arrays(kind)
    dy = torch.from_numpy(grad_output.copy()) if kind == "torch" else grad_output.copy()
    eps = 1e-4
    expected = reference_backward(case, grad_output, training, eps=eps)

    grads = hbn.batch_norm_backward(dy, x, weight, **backward_arguments(case, training, kind, eps),
                                    training=training, eps=eps, data_format=data_format)

    channels = channels_of(case.x.shape, data_format)
    grad_input, grad_weight, grad_bias = grads
    assert_kind(grad_input, kind, dtype, case.x.shape)
    assert_kind(grad_weight, kind, param_dtype, (channels,))
    assert_kind(grad_bias, kind, param_dtype, (channels,))
    assert_close(grad_input, expected[0], dtype, "grad_input")
    assert_close(grad_weight, expected[1], param_dtype, "grad_weight")
    assert_close(grad_bias, expected[2], param_dtype, "grad_bias")
    # grad_output and input_x are only read.
    assert np.array_equal(to_numpy(dy), grad_output)
    assert np.array_equal(to_numpy(x), case.x)


@data_formats
def test_backward_after_hbn_training_forward(data_format):
    """The usual chain: batch_norm_training's saved statistics feed the
    backward, which then matches autograd through the whole forward."""
    case = random_case(7, (8, 6, 5, 4), np.float32, np.float32, data_format)
    grad_output = np.random.default_rng(8).standard_normal(case.x.shape).astype(np.float32)
    x, running_mean, running_var, weight, bias = case.arrays("numpy")
    expected = reference_backward(case, grad_output, training=True)

    _, saved_mean, saved_inv_std = hbn.batch_norm_training(
        x, running_mean, running_var, weight, bias, data_format=data_format)
    grads = hbn.batch_norm_backward(grad_output, x, weight, saved_mean=saved_mean,
                                    saved_inv_std=saved_inv_std, training=True,
                                    data_format=data_format)

    for actual, wanted, name in zip(grads, expected, ["grad_input", "grad_weight", "grad_bias"]):
        assert_close(actual, wanted, np.float32, name)


# Numerics --------------------------------------------------------------------

@pytest.mark.parametrize("offset", [1e3, 1e4])
@data_formats
def test_large_offset_keeps_variance_accurate(offset, data_format):
    # E[x^2] - E[x]^2 in float32 would lose the unit variance entirely here.
    case = random_case(11, (16, 4, 8, 8), np.float32, np.float32, data_format, offset=offset)
    x, running_mean, running_var, weight, bias = case.arrays("numpy")
    expected = reference_forward(case, training=True, momentum=1.0)

    y, saved_mean, saved_inv_std = hbn.batch_norm_training(
        x, running_mean, running_var, weight, bias, momentum=1.0, data_format=data_format)

    # The statistics themselves are float32-exact: rounding only.
    np.testing.assert_allclose(saved_mean, expected.saved_mean, rtol=1e-7)
    np.testing.assert_allclose(saved_inv_std, expected.saved_inv_std, rtol=1e-6)
    # momentum 1: running_var is the batch's unbiased variance, around 1.
    np.testing.assert_allclose(running_var, expected.running_var, rtol=1e-6)
    # The output may carry the float32 mean's rounding (half a float32 ulp of
    # the offset), times weight * inv_std; no more.
    assert np.all(np.isfinite(y))
    gain = np.max(np.abs(case.weight) * expected.saved_inv_std)
    mean_rounding = 0.5 * np.spacing(np.float32(offset)) * gain
    np.testing.assert_allclose(y, expected.y, rtol=2e-5, atol=mean_rounding + 2e-5)


@dtypes
@data_formats
def test_constant_channel_gives_exactly_bias(dtype, data_format):
    case = random_case(12, (9, 5, 7), dtype, np.float32, data_format)
    x = case.x.copy()
    constant = np.asarray(3.7, dtype)
    if data_format == "NCHW":
        x[:, 2] = constant
    else:
        x[..., 2] = constant
    case.x = x
    _, running_mean, running_var, weight, bias = case.arrays("numpy")

    y = hbn.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                       data_format=data_format)

    channel = y[:, 2] if data_format == "NCHW" else y[..., 2]
    assert np.all(channel == np.asarray(case.bias[2], dtype)), channel
    # The batch variance is 0, so the running variance shrinks by 1 - momentum.
    np.testing.assert_allclose(running_var[2], 0.9 * case.running_var[2], rtol=1e-6)
    assert_close(y, reference_forward(case, training=True).y, dtype, "output")


@modes
@data_formats
def test_nan_stays_in_its_channel(training, data_format):
    case = random_case(13, (6, 4, 5), np.float32, np.float32, data_format)
    x = case.x.copy()
    if data_format == "NCHW":
        x[3, 1, 2] = np.nan
    else:
        x[3, 2, 1] = np.nan
    case.x = x
    _, running_mean, running_var, weight, bias = case.arrays("numpy")
    expected = reference_forward(case, training)

    y = hbn.batch_norm(x, running_mean, running_var, weight, bias, training=training,
                       data_format=data_format)

    # Torch's NaNs (the whole channel in training, the one value in
    # inference) must be exactly hbn's; every other value finite and close.
    assert np.array_equal(np.isnan(y), np.isnan(expected.y))
    assert np.isnan(expected.y).any()
    assert_close(y, expected.y, np.float32, "output")
    assert np.array_equal(np.isnan(running_mean), np.isnan(expected.running_mean))
    assert np.array_equal(np.isnan(running_var), np.isnan(expected.running_var))


def mindspore_example():
    """MindSpore's documented 2x2 example (see /work/shared/semantics.md)."""
    return (np.array([[1, 2], [3, 4]], np.float32), np.array([0.5, 1.5], np.float32),
            np.array([0.1, 0.2], np.float32), np.array([2, 2], np.float32),
            np.array([-1, -1], np.float32))


def test_mindspore_example_inference():
    x, running_mean, running_var, weight, bias = mindspore_example()
    y = hbn.batch_norm(x, running_mean, running_var, weight, bias)
    np.testing.assert_allclose(y, [[2.1621194, 1.2360122], [14.810596, 10.180061]], rtol=2e-6)
    np.testing.assert_array_equal(running_mean, [0.5, 1.5])


def test_mindspore_example_training():
    x, running_mean, running_var, weight, bias = mindspore_example()
    y = hbn.batch_norm(x, running_mean, running_var, weight, bias, training=True)
    np.testing.assert_allclose(y, [[-2.99999, -2.99999], [0.99999, 0.99999]], rtol=2e-6)
    np.testing.assert_allclose(running_mean, [0.65, 1.65], rtol=1e-6)
    np.testing.assert_allclose(running_var, [0.29, 0.38], rtol=1e-6)


@modes
def test_tensors_that_require_grad_are_read(training):
    case = random_case(14, (5, 3, 4), np.float32, np.float32)
    x, running_mean, running_var, weight, bias = case.arrays("torch")
    for tensor in (x, weight, bias):
        tensor.requires_grad_(True)
    expected = reference_forward(case, training)

    y = hbn.batch_norm(x, running_mean, running_var, weight, bias, training=training)

    assert isinstance(y, torch.Tensor)
    assert_close(y, expected.y, np.float32, "output")
    assert_close(running_var, expected.running_var, np.float32, "running_var")


@kinds
@data_formats
def test_empty_batch_in_inference(kind, data_format):
    shape = (0, 3, 4) if data_format == "NCHW" else (0, 4, 3)
    x = np.zeros(shape, np.float32)
    params = [np.ones(3, np.float32) for _ in range(4)]
    if kind == "torch":
        x, params = torch.from_numpy(x), [torch.from_numpy(p) for p in params]

    y = hbn.batch_norm(x, *params, data_format=data_format)

    assert_kind(y, kind, np.float32, shape)


@data_formats
def test_one_value_per_channel_in_inference(data_format):
    # M == 1 is an error only in training: inference needs no batch variance.
    case = random_case(15, (1, 6), np.float32, np.float32, data_format)
    x, running_mean, running_var, weight, bias = case.arrays("numpy")
    y = hbn.batch_norm(x, running_mean, running_var, weight, bias, data_format=data_format)
    assert_close(y, reference_forward(case, training=False).y, np.float32, "output")


@kinds
def test_views_are_read_at_their_offset(kind):
    # A contiguous slice starts past its base's first element (a buffer
    # pointer, a DLPack byte_offset); the values before it must not be read.
    case = random_case(20, (6, 4, 5), np.float32, np.float32)
    padded = np.concatenate([np.full((2, 4, 5), 1e6, np.float32), case.x])
    x = torch.from_numpy(padded)[2:] if kind == "torch" else padded[2:]
    _, running_mean, running_var, weight, bias = case.arrays(kind)
    expected = reference_forward(case, training=True)

    y = hbn.batch_norm(x, running_mean, running_var, weight, bias, training=True)

    assert_close(y, expected.y, np.float32, "output")
    assert_close(running_var, expected.running_var, np.float32, "running_var")


def test_output_kind_follows_input_x():
    # A NumPy input with torch parameters gives a NumPy output, and the
    # torch running statistics are still updated in place.
    case = random_case(16, (4, 3, 5), np.float32, np.float32)
    x = case.x.copy()
    _, running_mean, running_var, weight, bias = case.arrays("torch")
    expected = reference_forward(case, training=True)

    y = hbn.batch_norm(x, running_mean, running_var, weight, bias, training=True)

    assert_kind(y, "numpy", np.float32, x.shape)
    assert_close(y, expected.y, np.float32, "output")
    assert_close(running_mean, expected.running_mean, np.float32, "running_mean")


# Devices ---------------------------------------------------------------------

@modes
@data_formats
def test_explicit_cpu_device(training, data_format):
    case = random_case(17, (4, 5, 3, 6), np.float16, np.float32, data_format)
    x, running_mean, running_var, weight, bias = case.arrays("numpy")
    expected = reference_forward(case, training)
    grad_output = np.random.default_rng(18).standard_normal(x.shape).astype(np.float16)
    expected_grads = reference_backward(case, grad_output, training)

    y = hbn.batch_norm(x, running_mean, running_var, weight, bias, training=training,
                       data_format=data_format, device="cpu")
    statistics = backward_arguments(case, training, "numpy", eps=1e-5)
    grads = hbn.batch_norm_backward(grad_output, x, weight, **statistics, training=training,
                                    data_format=data_format, device="cpu")

    assert_close(y, expected.y, np.float16, "output")
    assert_close(running_var, expected.running_var, np.float32, "running_var")
    for actual, wanted, name in zip(grads, expected_grads, ["grad_input", "grad_weight",
                                                            "grad_bias"]):
        assert_close(actual, wanted, np.float16 if name == "grad_input" else np.float32, name)


def child_environment():
    """This process's environment, with the hbn it imported first on the path."""
    environment = dict(os.environ)
    package = os.path.dirname(os.path.dirname(hbn.__file__))
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [package, environment.get("PYTHONPATH")]))
    return environment


# OpenCL runs in a child process: probing it loads PoCL, whose LLVM installs
# signal handlers that pytest's process should not inherit. The child reads
# the cases from an .npz, runs them on device="opencl" and writes the results.
OPENCL_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import hbn

    built, usable, detail = hbn.backend_status("opencl")
    if not usable:
        print(json.dumps({"usable": False, "detail": detail}))
        sys.exit(0)
    cases = np.load(sys.argv[1])
    results = {}
    for name in sorted({key.split("/")[0] for key in cases.files}):
        a = {key.split("/")[1]: cases[key].copy() for key in cases.files
             if key.startswith(name + "/")}
        data_format = str(a["data_format"])
        # Copies: training updates the running statistics in place, and the
        # inference backward below needs the original ones.
        params = [a[key].copy() for key in ("running_mean", "running_var", "weight", "bias")]
        results[name + "/inference"] = hbn.batch_norm(
            a["x"], *params, data_format=data_format, device="opencl")
        y, saved_mean, saved_inv_std = hbn.batch_norm_training(
            a["x"], *params, data_format=data_format, device="opencl")
        results.update({name + "/training": y, name + "/saved_mean": saved_mean,
                        name + "/saved_inv_std": saved_inv_std,
                        name + "/running_mean": params[0], name + "/running_var": params[1]})
        for mode, statistics in [
                ("inference", dict(running_mean=a["running_mean"], running_var=a["running_var"])),
                ("training", dict(saved_mean=saved_mean, saved_inv_std=saved_inv_std))]:
            grads = hbn.batch_norm_backward(a["grad_output"], a["x"], a["weight"], **statistics,
                                            training=mode == "training", data_format=data_format,
                                            device="opencl")
            for gradient, value in zip(["grad_input", "grad_weight", "grad_bias"], grads):
                results[name + "/" + mode + "_" + gradient] = value
    np.savez(sys.argv[2], **results)
    print(json.dumps({"usable": True, "detail": detail}))
""")

OPENCL_CASES = {
    "nchw_f32": ((4, 5, 6, 7), np.float32, np.float32, "NCHW"),
    "nhwc_f16": ((3, 6, 8, 8), np.float16, np.float32, "NHWC"),
    "rank2_f16params": ((37, 5), np.float32, np.float16, "NCHW"),
}


def opencl_case(name):
    shape, dtype, param_dtype, data_format = OPENCL_CASES[name]
    case = random_case(seed_of("opencl", name), shape, dtype, param_dtype, data_format)
    grad_output = np.random.default_rng(19).standard_normal(case.x.shape).astype(dtype)
    return case, grad_output


@pytest.fixture(scope="module")
def opencl_results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("opencl")
    arrays = {}
    for name in OPENCL_CASES:
        case, grad_output = opencl_case(name)
        for field in ("x", "running_mean", "running_var", "weight", "bias"):
            arrays[name + "/" + field] = getattr(case, field)
        arrays[name + "/data_format"] = np.array(case.data_format)
        arrays[name + "/grad_output"] = grad_output
    np.savez(directory / "cases.npz", **arrays)
    environment = child_environment()
    environment.pop("HBN_DEVICE", None)  # the child must really probe OpenCL
    child = subprocess.run(
        [sys.executable, "-c", OPENCL_CHILD, str(directory / "cases.npz"),
         str(directory / "results.npz")],
        env=environment, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, (f"OpenCL child failed (rc {child.returncode}):\n"
                                   f"{child.stdout}\n{child.stderr}")
    status = json.loads(child.stdout.strip().splitlines()[-1])
    if not status["usable"]:
        pytest.skip(f"OpenCL not usable: {status['detail']}")
    with np.load(directory / "results.npz") as results:
        return {key: results[key] for key in results.files}


@pytest.mark.parametrize("name", list(OPENCL_CASES))
def test_opencl_device(opencl_results, name):
    case, grad_output = opencl_case(name)
    dtype, param_dtype = case.x.dtype, case.weight.dtype
    inference = reference_forward(case, training=False)
    training = reference_forward(case, training=True)
    result = {key.split("/")[1]: value for key, value in opencl_results.items()
              if key.startswith(name + "/")}

    assert result["inference"].dtype == dtype
    assert_close(result["inference"], inference.y, dtype, "inference output")
    assert_close(result["training"], training.y, dtype, "training output")
    assert_close(result["saved_mean"], training.saved_mean, np.float32, "saved_mean")
    assert_close(result["saved_inv_std"], training.saved_inv_std, np.float32, "saved_inv_std")
    assert_close(result["running_mean"], training.running_mean, param_dtype, "running_mean")
    assert_close(result["running_var"], training.running_var, param_dtype, "running_var")
    for mode in ("inference", "training"):
        expected = reference_backward(case, grad_output, training=mode == "training")
        for gradient, wanted in zip(["grad_input", "grad_weight", "grad_bias"], expected):
            assert_close(result[mode + "_" + gradient], wanted,
                         dtype if gradient == "grad_input" else param_dtype, mode + " " + gradient)


def test_cpu_backend_status():
    built, usable, detail = hbn.backend_status("cpu")
    assert (built, usable) == (True, True)
    assert isinstance(detail, str) and detail


@pytest.mark.parametrize("device", ["cpu", "opencl", "cuda"])
def test_hbn_device_chooses_auto_device(device):
    # HBN_DEVICE makes the choice without probing; a child process keeps
    # this one's environment (and its signal handlers) as they are.
    environment = dict(child_environment(), HBN_DEVICE=device)
    child = subprocess.run([sys.executable, "-c", "import hbn; print(hbn.auto_device())"],
                           env=environment, capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == device
