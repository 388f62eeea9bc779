"""hbn's errors: the class (TypeError for dtypes and argument types,
ValueError for values, RuntimeError for run failures), a message naming the
argument, and nothing written by a failed call."""

import numpy as np
import pytest
import torch

import hbn
from conftest import random_case

C = 3


def arguments(kind="numpy", shape=(4, C, 5), dtype=np.float32):
    """Valid batch_norm arguments (input_x, running_mean, running_var, weight,
    bias) of `kind`."""
    return random_case(1, shape, dtype).arrays(kind)


def replaced(position, value, kind="numpy", **case):
    """arguments() with the one at `position` replaced by `value`."""
    args = list(arguments(kind, **case))
    args[position] = value
    return args


NAMES = ("input_x", "running_mean", "running_var", "weight", "bias")


# TypeError -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.int16, np.bool_, np.complex64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("position", range(5), ids=NAMES)
def test_numpy_dtype_is_type_error(position, dtype):
    size = (4, C, 5) if position == 0 else (C,)
    args = replaced(position, np.ones(size, dtype))
    with pytest.raises(TypeError, match=NAMES[position]):
        hbn.batch_norm(*args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int16, torch.int32],
                         ids=str)
@pytest.mark.parametrize("position", [0, 3], ids=["input_x", "weight"])
def test_torch_dtype_is_type_error(position, dtype):
    size = (4, C, 5) if position == 0 else (C,)
    args = replaced(position, torch.ones(size, dtype=dtype), kind="torch")
    with pytest.raises(TypeError, match=NAMES[position]):
        hbn.batch_norm(*args)


@pytest.mark.parametrize("position", range(1, 5), ids=NAMES[1:])
def test_mixed_parameter_dtypes_are_type_error(position):
    # The four per-channel tensors share one dtype (here float32 but one).
    args = replaced(position, np.ones(C, np.float16))
    with pytest.raises(TypeError, match=NAMES[position]):
        hbn.batch_norm(*args)


@pytest.mark.parametrize("value", [[[1.0, 2.0, 3.0]] * 2, (1.0, 2.0), 3.0, None, "x"],
                         ids=["list", "tuple", "float", "None", "str"])
@pytest.mark.parametrize("position", [0, 3], ids=["input_x", "weight"])
def test_non_array_argument_is_type_error(position, value):
    args = replaced(position, value)
    with pytest.raises(TypeError, match=NAMES[position]):
        hbn.batch_norm(*args)


@pytest.mark.parametrize("value", [1, 0, "yes", None, 1.0], ids=repr)
def test_training_not_bool_is_type_error(value):
    with pytest.raises(TypeError, match="training"):
        hbn.batch_norm(*arguments(), training=value)


@pytest.mark.parametrize("argument", ["momentum", "eps"])
@pytest.mark.parametrize("value", ["0.1", None, True, [0.1], 1j], ids=repr)
def test_momentum_and_eps_not_real_are_type_error(argument, value):
    with pytest.raises(TypeError, match=argument):
        hbn.batch_norm(*arguments(), training=True, **{argument: value})


@pytest.mark.parametrize("argument", ["data_format", "device"])
@pytest.mark.parametrize("value", [0, None, b"NCHW"], ids=repr)
def test_data_format_and_device_not_str_are_type_error(argument, value):
    with pytest.raises(TypeError, match=argument):
        hbn.batch_norm(*arguments(), **{argument: value})


def test_backward_dtype_is_type_error():
    x, running_mean, running_var, weight, _ = arguments()
    with pytest.raises(TypeError, match="grad_output"):
        hbn.batch_norm_backward(x.astype(np.float64), x, weight, running_mean, running_var)
    # Inference statistics must have weight's dtype.
    with pytest.raises(TypeError, match="running_var"):
        hbn.batch_norm_backward(x, x, weight, running_mean, running_var.astype(np.float16))


def test_backward_saved_statistics_must_be_float32():
    x, running_mean, running_var, weight, bias = arguments()
    _, saved_mean, saved_inv_std = hbn.batch_norm_training(x, running_mean, running_var, weight,
                                                           bias)
    with pytest.raises(TypeError, match="saved_mean"):
        hbn.batch_norm_backward(x, x, weight, saved_mean=saved_mean.astype(np.float16),
                                saved_inv_std=saved_inv_std, training=True)


# ValueError ------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, -1e-5, 1.5, 2.0, float("nan"), float("inf")], ids=repr)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_eps_outside_range_is_value_error(eps, training):
    with pytest.raises(ValueError, match="eps"):
        hbn.batch_norm(*arguments(), training=training, eps=eps)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan"), float("-inf")], ids=repr)
def test_momentum_outside_range_is_value_error(momentum):
    with pytest.raises(ValueError, match="momentum"):
        hbn.batch_norm(*arguments(), training=True, momentum=momentum)


@pytest.mark.parametrize("eps, momentum", [(1.0, 0.0), (1, 1), (1e-12, 0.5)])
def test_range_bounds_are_accepted(eps, momentum):
    # eps = 1 and momentum in {0, 1} are inside the ranges, ints included.
    hbn.batch_norm(*arguments(), training=True, eps=eps, momentum=momentum)


@pytest.mark.parametrize("data_format", ["nchw", "NCW", "NCHW ", "", "NDHWC"])
def test_bad_data_format_is_value_error(data_format):
    with pytest.raises(ValueError, match="data_format"):
        hbn.batch_norm(*arguments(), data_format=data_format)


@pytest.mark.parametrize("device", ["gpu", "CPU", "", "cuda:0"])
def test_bad_device_is_value_error(device):
    with pytest.raises(ValueError, match="device"):
        hbn.batch_norm(*arguments(), device=device)
    with pytest.raises(ValueError, match="device"):
        hbn.backend_status(device)


@pytest.mark.parametrize("shape", [(C,), ()], ids=["rank1", "rank0"])
@pytest.mark.parametrize("function", ["batch_norm", "batch_norm_training", "batch_norm_backward"])
def test_rank_below_two_is_value_error(function, shape):
    x = np.ones(shape, np.float32)
    _, running_mean, running_var, weight, bias = arguments()
    with pytest.raises(ValueError, match="input_x|grad_output"):
        if function == "batch_norm_backward":
            hbn.batch_norm_backward(x, x, weight, running_mean, running_var)
        else:
            getattr(hbn, function)(x, running_mean, running_var, weight, bias)


@pytest.mark.parametrize("size", [C - 1, C + 1, 0])
@pytest.mark.parametrize("position", range(1, 5), ids=NAMES[1:])
def test_parameter_length_is_value_error(position, size):
    args = replaced(position, np.ones(size, np.float32))
    with pytest.raises(ValueError, match=NAMES[position]):
        hbn.batch_norm(*args)


def test_parameter_rank_is_value_error():
    args = replaced(3, np.ones((1, C), np.float32))
    with pytest.raises(ValueError, match="weight"):
        hbn.batch_norm(*args)


def test_channels_follow_data_format():
    # (4, C, 5) in NHWC has 5 channels, not C.
    with pytest.raises(ValueError, match="running_mean"):
        hbn.batch_norm(*arguments(), data_format="NHWC")


def test_backward_parameter_length_is_value_error():
    x, running_mean, running_var, weight, _ = arguments()
    with pytest.raises(ValueError, match="weight"):
        hbn.batch_norm_backward(x, x, weight[:2].copy(), running_mean, running_var)
    with pytest.raises(ValueError, match="input_x"):
        hbn.batch_norm_backward(x, x[:2].copy(), weight, running_mean, running_var)


@pytest.mark.parametrize("training, missing", [(False, "running_var"), (True, "saved_inv_std")])
def test_backward_missing_statistic_is_value_error(training, missing):
    x, running_mean, _, weight, _ = arguments()
    saved_mean = np.zeros(C, np.float32)
    with pytest.raises(ValueError, match=missing):
        hbn.batch_norm_backward(x, x, weight, running_mean=running_mean, saved_mean=saved_mean,
                                training=training)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("function", ["batch_norm", "batch_norm_training", "batch_norm_backward"])
def test_non_contiguous_input_is_value_error(kind, function):
    x, running_mean, running_var, weight, bias = arguments(kind, shape=(5, C, 4))
    transposed = x.T if kind == "numpy" else x.permute(2, 1, 0)  # (4, C, 5), a strided view
    with pytest.raises(ValueError, match="input_x.*contiguous"):
        if function == "batch_norm_backward":
            hbn.batch_norm_backward(transposed.contiguous() if kind == "torch" else
                                    np.ascontiguousarray(transposed), transposed, weight,
                                    running_mean, running_var)
        else:
            getattr(hbn, function)(transposed, running_mean, running_var, weight, bias)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_non_contiguous_parameter_is_value_error(kind):
    x, running_mean, running_var, weight, bias = arguments(kind)
    strided = (np.ones(2 * C, np.float32) if kind == "numpy" else torch.ones(2 * C))[::2]
    with pytest.raises(ValueError, match="weight.*contiguous"):
        hbn.batch_norm(x, running_mean, running_var, strided, bias)


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_read_only_running_stat_in_training_is_value_error(name):
    x, running_mean, running_var, weight, bias = arguments()
    stats = {"running_mean": running_mean, "running_var": running_var}
    stats[name].flags.writeable = False
    before = {key: value.copy() for key, value in stats.items()}

    with pytest.raises(ValueError, match=name):
        hbn.batch_norm(x, stats["running_mean"], stats["running_var"], weight, bias,
                       training=True)
    with pytest.raises(ValueError, match=name):
        hbn.batch_norm_training(x, stats["running_mean"], stats["running_var"], weight, bias)

    # Neither statistic was written, the writable one included.
    for key, value in stats.items():
        assert np.array_equal(value, before[key])
    # Inference only reads them: read-only is fine there.
    y = hbn.batch_norm(x, stats["running_mean"], stats["running_var"], weight, bias)
    assert y.shape == x.shape


def test_read_only_inputs_are_fine():
    # input_x, weight and bias are only read, even in training.
    x, running_mean, running_var, weight, bias = arguments()
    for array in (x, weight, bias):
        array.flags.writeable = False
    hbn.batch_norm(x, running_mean, running_var, weight, bias, training=True)


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1), (0, C, 4)],
                         ids=["1xC", "1xCx1", "1xCx1x1", "empty"])
def test_training_with_fewer_than_two_values_per_channel_is_value_error(shape):
    x, running_mean, running_var, weight, bias = arguments(shape=shape)
    with pytest.raises(ValueError, match="input_x"):
        hbn.batch_norm(x, running_mean, running_var, weight, bias, training=True)
    with pytest.raises(ValueError, match="input_x"):
        hbn.batch_norm_training(x, running_mean, running_var, weight, bias)
    saved = np.ones(C, np.float32)
    with pytest.raises(ValueError, match="input_x"):
        hbn.batch_norm_backward(x, x, weight, saved_mean=saved, saved_inv_std=saved,
                                training=True)


def test_written_statistics_may_not_alias():
    # Training writes running_mean and running_var, so they may share no
    # memory; arguments that are only read may.
    x, running_mean, _, weight, bias = arguments()
    before = running_mean.copy()
    with pytest.raises(ValueError, match="running_mean and running_var"):
        hbn.batch_norm(x, running_mean, running_mean, weight, bias, training=True)
    with pytest.raises(ValueError, match="running_mean and bias"):
        hbn.batch_norm(x, running_mean, running_mean[::-1].copy(), weight, running_mean,
                       training=True)
    assert np.array_equal(running_mean, before)
    hbn.batch_norm(x, running_mean, running_mean, weight, weight)  # inference: all read


# RuntimeError ----------------------------------------------------------------

def test_unusable_cuda_is_runtime_error():
    built, usable, detail = hbn.backend_status("cuda")
    if usable:
        pytest.skip("CUDA is usable here: " + detail)
    x, running_mean, running_var, weight, bias = arguments()
    with pytest.raises(RuntimeError):
        hbn.batch_norm(x, running_mean, running_var, weight, bias, training=True, device="cuda")
    assert isinstance(detail, str) and detail


# A failed call changes nothing -----------------------------------------------

def failing_training_calls():
    """(id, arguments, keyword arguments, error class) of training calls that
    must fail before writing anything."""
    calls = [
        ("weight_length", dict(weight=np.ones(C + 1, np.float32)), {}, ValueError),
        ("bias_dtype", dict(bias=np.ones(C, np.float16)), {}, TypeError),
        ("input_float64", dict(x=np.ones((4, C, 5))), {}, TypeError),
        ("eps_2", {}, dict(eps=2.0), ValueError),
        ("momentum_1.5", {}, dict(momentum=1.5), ValueError),
        ("M_is_1", dict(x=np.ones((1, C), np.float32)), {}, ValueError),
        ("bad_data_format", {}, dict(data_format="NWHC"), ValueError),
        ("non_contiguous", dict(x=np.ones((5, C, 4), np.float32).T), {}, ValueError),
    ]
    return pytest.mark.parametrize("replacements, options, error", [c[1:] for c in calls],
                                   ids=[c[0] for c in calls])


@failing_training_calls()
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("function", ["batch_norm", "batch_norm_training"])
def test_failed_training_call_leaves_running_stats(function, kind, replacements, options, error):
    x, running_mean, running_var, weight, bias = arguments()
    args = {**dict(x=x, weight=weight, bias=bias), **replacements}
    if kind == "torch":
        # The same arrays as tensors, the transposed one as a transposed tensor.
        args = {key: torch.from_numpy(value.copy()) if value.flags.c_contiguous
                else torch.from_numpy(value.T.copy()).permute(2, 1, 0)
                for key, value in args.items()}
        running_mean, running_var = torch.from_numpy(running_mean), torch.from_numpy(running_var)
    before_mean = np.array(running_mean, copy=True)
    before_var = np.array(running_var, copy=True)
    call = getattr(hbn, function)
    if function == "batch_norm":
        options = dict(options, training=True)

    with pytest.raises(error):
        call(args["x"], running_mean, running_var, args["weight"], args["bias"], **options)

    # Bit-identical, NaN patterns included.
    assert np.array_equal(np.asarray(running_mean), before_mean)
    assert np.array_equal(np.asarray(running_var), before_var)
    assert np.asarray(running_mean).tobytes() == before_mean.tobytes()
    assert np.asarray(running_var).tobytes() == before_var.tobytes()
