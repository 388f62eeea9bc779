"""hbn.torch, the PyTorch drop-in, against PyTorch's own batch norm.

The reference is always torch itself in float64: torch.nn.BatchNorm*d copied to
double (same parameters and buffers) or F.batch_norm on the float64 values,
differentiated by torch's autograd. hbn runs on float32 (or float16) data and
computes in float32, so the comparisons carry float32 (or float16) tolerances,
stated where they are used. Nothing here compares hbn with its own output.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hbn.torch as ht

# hbn's module and torch's, by name.
MODULES = {
    "1d": (ht.BatchNorm1d, nn.BatchNorm1d),
    "2d": (ht.BatchNorm2d, nn.BatchNorm2d),
    "3d": (ht.BatchNorm3d, nn.BatchNorm3d),
}

# Tolerances against torch float64. float32 data computed in float32: errors of
# a few float32 ulps (~1e-7 relative) of values of order 1, so 1e-4 leaves a
# wide margin yet catches any real formula error. float16 results are rounded
# to float16 (2^-11 relative, half an ulp up to 2e-3 for |y| < 4).
FLOAT32 = 1e-4
FLOAT16 = 2e-3


def assert_close(actual, expected, tolerance, scaled=False, msg=""):
    """actual (hbn, any float dtype) against expected (torch float64).

    scaled: the absolute part grows with the largest |expected|, for sums over
    the batch such as grad_weight whose rounding grows with their size.
    """
    assert actual is not None and expected is not None, msg
    assert actual.shape == expected.shape, msg
    expected = expected.detach().double()
    atol = tolerance
    if scaled and expected.numel():
        atol *= max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.detach().double(), expected, rtol=tolerance, atol=atol,
                               msg=lambda default: f"{msg}\n{default}")


def random_input(shape, seed, dtype=torch.float32):
    """Contiguous input with its own mean (-2..2) and spread (0.5..2) per
    channel, so that a mix-up of channels or layouts shows."""
    gen = torch.Generator().manual_seed(seed)
    per_channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    mean = torch.empty(per_channel, dtype=torch.float64).uniform_(-2, 2, generator=gen)
    spread = torch.empty(per_channel, dtype=torch.float64).uniform_(0.5, 2, generator=gen)
    x = mean + spread * torch.randn(shape, dtype=torch.float64, generator=gen)
    return x.to(dtype)


def make_pair(kind, channels, seed=0, **kwargs):
    """(hbn module in float32, torch's module in float64) in identical state,
    with parameters and running statistics randomized away from 1 and 0."""
    hbn_class, torch_class = MODULES[kind]
    reference = torch_class(channels, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if reference.affine:
            signs = torch.randint(0, 2, (channels,), generator=gen) * 2 - 1
            reference.weight.copy_(signs * torch.empty(channels).uniform_(0.5, 1.5, generator=gen))
            reference.bias.uniform_(-1, 1, generator=gen)
        if reference.track_running_stats:
            reference.running_mean.uniform_(-1, 1, generator=gen)
            reference.running_var.uniform_(0.5, 2, generator=gen)
    module = hbn_class(channels, **kwargs)
    module.load_state_dict(reference.state_dict())
    return module, reference.double()


def assert_buffers_match(module, reference, msg=""):
    """running_mean, running_var (float32 against float64) and
    num_batches_tracked (exact) as torch keeps them."""
    for name in ("running_mean", "running_var"):
        actual, expected = getattr(module, name), getattr(reference, name)
        assert (actual is None) == (expected is None), f"{msg} {name}"
        if actual is not None:
            assert actual.dtype == torch.float32, f"{msg} {name}"
            assert_close(actual, expected, FLOAT32, msg=f"{msg} {name}")
    actual, expected = module.num_batches_tracked, reference.num_batches_tracked
    assert (actual is None) == (expected is None), msg
    if actual is not None:
        assert int(actual) == int(expected), f"{msg} num_batches_tracked"


# ---------------------------------------------------------------------------
# 1. Modules, forward and buffers, train then eval.

MODULE_CASES = [("1d", (16, 4)), ("1d", (4, 3, 6)), ("2d", (3, 4, 5, 6)),
                ("3d", (2, 3, 3, 4, 5))]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "no_track"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("kind,shape", MODULE_CASES,
                         ids=[f"{k}_{'x'.join(map(str, s))}" for k, s in MODULE_CASES])
def test_module_matches_torch(kind, shape, affine, track, momentum):
    module, reference = make_pair(kind, shape[1], affine=affine, track_running_stats=track,
                                  momentum=momentum)
    # Three training steps on different batches: the running statistics (with
    # momentum=None, a cumulative average over the steps) must follow torch's.
    for step in range(3):
        x = random_input(shape, seed=step)
        y = module(x)
        assert y.dtype == torch.float32 and y.shape == x.shape
        assert_close(y, reference(x.double()), FLOAT32, msg=f"train step {step} output")
        assert_buffers_match(module, reference, msg=f"train step {step}")
    # Eval: running statistics where tracked (torch falls back to the batch's
    # without them), and the buffers must stay as they are.
    module.eval()
    reference.eval()
    x = random_input(shape, seed=3)
    assert_close(module(x), reference(x.double()), FLOAT32, msg="eval output")
    assert_buffers_match(module, reference, msg="after eval")


# Inference without running statistics is an error: test_eval_without_running_stats.
@pytest.mark.parametrize("training,running", [(True, True), (True, False), (False, True)],
                         ids=["train", "train_no_running", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["weight_bias", "no_weight_bias"])
def test_functional_matches_torch(training, affine, running):
    # Non-default momentum and eps (eps=0.05 against variances of 0.25..4):
    # forward and backward must both use the eps passed.
    shape = (4, 3, 5, 2)
    source = random_input(shape, seed=7)
    grad_output = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(8)
    weight = torch.empty(3).uniform_(0.5, 1.5, generator=gen) if affine else None
    bias = torch.empty(3).uniform_(-1, 1, generator=gen) if affine else None
    mean = torch.empty(3).uniform_(-1, 1, generator=gen) if running else None
    var = torch.empty(3).uniform_(0.5, 2, generator=gen) if running else None

    def leaf(t, dtype):
        return None if t is None else t.to(dtype, copy=True).requires_grad_()

    x, ref_x = leaf(source, torch.float32), leaf(source, torch.float64)
    weight, ref_weight = leaf(weight, torch.float32), leaf(weight, torch.float64)
    bias, ref_bias = leaf(bias, torch.float32), leaf(bias, torch.float64)
    ref_mean = None if mean is None else mean.double()
    ref_var = None if var is None else var.double()
    expected = F.batch_norm(ref_x, ref_mean, ref_var, ref_weight, ref_bias, training=training,
                            momentum=0.3, eps=0.05)
    y = ht.batch_norm(x, mean, var, weight, bias, training=training, momentum=0.3, eps=0.05)
    assert_close(y, expected, FLOAT32, msg="output")
    if running:  # updated in place in training, untouched in inference, as torch does
        assert_close(mean, ref_mean, FLOAT32, msg="running_mean")
        assert_close(var, ref_var, FLOAT32, msg="running_var")
    y.backward(grad_output)
    expected.backward(grad_output.double())
    assert_close(x.grad, ref_x.grad, FLOAT32, scaled=True, msg="grad_input")
    if affine:
        assert_close(weight.grad, ref_weight.grad, FLOAT32, scaled=True, msg="grad_weight")
        assert_close(bias.grad, ref_bias.grad, FLOAT32, scaled=True, msg="grad_bias")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_running_stats_kept_but_not_tracked(training):
    # track_running_stats switched off after construction: torch then trains
    # on batch statistics without updating the buffers it still has, and
    # evaluates with those buffers.
    module, reference = make_pair("2d", 3, seed=4)
    for m in (module, reference):
        m.track_running_stats = False
        m.train(training)
    for step in range(2):
        x = random_input((3, 3, 4, 4), seed=70 + step)
        assert_close(module(x), reference(x.double()), FLOAT32, msg=f"step {step} output")
        assert_buffers_match(module, reference, msg=f"step {step}")


# ---------------------------------------------------------------------------
# 2. Gradients of input, weight and bias, in many layouts.

CL, CL3 = torch.channels_last, torch.channels_last_3d


def _contiguous(t):
    return t.contiguous()


def _cl(t):
    return t.contiguous(memory_format=CL)


def _cl3(t):
    return t.contiguous(memory_format=CL3)


def _nlc(t):  # (N, C, L) viewing an (N, L, C)-contiguous tensor
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _sliced(t):  # every other row and column of a bigger tensor: neither layout
    n, c, h, w = t.shape
    big = torch.zeros((n, c, 2 * h, w + 1), dtype=t.dtype)
    view = big[:, :, ::2, 1:]
    view.copy_(t)
    return view


def _channel_sliced(t):  # every other channel of a channels-last tensor
    n, c, h, w = t.shape
    big = torch.zeros((n, 2 * c, h, w), dtype=t.dtype).contiguous(memory_format=CL)
    view = big[:, ::2]
    view.copy_(t)
    return view


def _is_nlc(t):
    return t.transpose(1, 2).is_contiguous()


# name: (module kind, shape, input layout, grad_output layout, check of y's layout)
LAYOUTS = {
    "2d_input": ("1d", (16, 4), _contiguous, _contiguous, torch.Tensor.is_contiguous),
    "1d_contiguous": ("1d", (3, 4, 7), _contiguous, _contiguous, torch.Tensor.is_contiguous),
    "1d_nlc": ("1d", (3, 4, 7), _nlc, _nlc, _is_nlc),
    "1d_nlc_grad_contiguous": ("1d", (3, 4, 7), _nlc, _contiguous, _is_nlc),
    "2d_contiguous": ("2d", (3, 4, 5, 6), _contiguous, _contiguous, torch.Tensor.is_contiguous),
    "2d_channels_last": ("2d", (3, 4, 5, 6), _cl, _cl, lambda y: y.is_contiguous(memory_format=CL)),
    "2d_channels_last_grad_contiguous": ("2d", (3, 4, 5, 6), _cl, _contiguous,
                                         lambda y: y.is_contiguous(memory_format=CL)),
    "2d_contiguous_grad_channels_last": ("2d", (3, 4, 5, 6), _contiguous, _cl,
                                         torch.Tensor.is_contiguous),
    "2d_sliced": ("2d", (3, 4, 5, 6), _sliced, _contiguous, None),
    "2d_sliced_grad_sliced": ("2d", (3, 4, 5, 6), _contiguous, _sliced, None),
    "2d_channel_sliced": ("2d", (3, 4, 5, 6), _channel_sliced, _cl, None),
    "3d_contiguous": ("3d", (2, 3, 3, 4, 5), _contiguous, _contiguous,
                      torch.Tensor.is_contiguous),
    "3d_channels_last_3d": ("3d", (2, 3, 3, 4, 5), _cl3, _cl3,
                            lambda y: y.is_contiguous(memory_format=CL3)),
    "3d_channels_last_3d_grad_contiguous": ("3d", (2, 3, 3, 4, 5), _cl3, _contiguous,
                                            lambda y: y.is_contiguous(memory_format=CL3)),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradients_match_torch(layout, training):
    kind, shape, arrange, arrange_grad, has_layout = LAYOUTS[layout]
    module, reference = make_pair(kind, shape[1], seed=1)
    module.train(training)
    reference.train(training)
    source = random_input(shape, seed=11)
    grad_output = torch.randn(shape, generator=torch.Generator().manual_seed(12))

    # The same layout in both; detach keeps the strides, so the leaf itself is
    # channels-last, sliced, ... and its gradient is what hbn's backward gives.
    x = arrange(source).detach().requires_grad_()
    x_ref = arrange(source.double()).detach().requires_grad_()
    y = module(x)
    y_ref = reference(x_ref)
    if has_layout is not None:
        assert has_layout(x), "test setup: input not in the intended layout"
        assert has_layout(y), f"output lost the input's layout: strides {y.stride()}"
    assert y.grad_fn is not None and "BatchNormFunction" in type(y.grad_fn).__name__
    y.backward(arrange_grad(grad_output))
    y_ref.backward(arrange_grad(grad_output.double()))

    assert_close(y, y_ref, FLOAT32, msg="output")
    assert_close(x.grad, x_ref.grad, FLOAT32, scaled=True, msg="grad_input")
    assert_close(module.weight.grad, reference.weight.grad, FLOAT32, scaled=True,
                 msg="grad_weight")
    assert_close(module.bias.grad, reference.bias.grad, FLOAT32, scaled=True, msg="grad_bias")
    if training:
        assert_buffers_match(module, reference)


# ---------------------------------------------------------------------------
# 3. gradcheck, and hbn's analytic Jacobian against torch float64's.

GRADCHECK_SHAPE = (3, 2, 2, 3)


def _gradcheck_arguments(layout):
    gen = torch.Generator().manual_seed(21)
    x = random_input(GRADCHECK_SHAPE, seed=20, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    weight = torch.empty(2, dtype=torch.float64).uniform_(0.5, 1.5, generator=gen)
    bias = torch.empty(2, dtype=torch.float64).uniform_(-1, 1, generator=gen)
    mean = torch.empty(2, dtype=torch.float64).uniform_(-1, 1, generator=gen)
    var = torch.empty(2, dtype=torch.float64).uniform_(0.5, 2, generator=gen)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    return inputs, mean, var


def _hbn_float32(training, mean, var):
    """Double in, double out; hbn in float32 in between."""
    def function(x, weight, bias):
        running = (None, None) if training else (mean.float(), var.float())
        y = ht.batch_norm(x.float(), *running, weight.float(), bias.float(),
                          training=training)
        return y.double()
    return function


def _torch_float64(training, mean, var):
    def function(x, weight, bias):
        running = (None, None) if training else (mean, var)
        return F.batch_norm(x, *running, weight, bias, training=training)
    return function


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(training, layout):
    inputs, mean, var = _gradcheck_arguments(layout)
    # Finite differences of a float32 function: a step of 1e-3 against output
    # rounding of ~1e-7 gives quotients good to a few 1e-4 (2.6e-4 at worst
    # here), so atol=rtol=1e-3. Still far below the Jacobian's own entries (the
    # 1/M terms of the training backward are ~0.06 here), so a wrong term fails.
    assert torch.autograd.gradcheck(_hbn_float32(training, mean, var), inputs, eps=1e-3,
                                    atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_analytic_jacobian_matches_torch(training, layout):
    # The double check: gradcheck's finite differences are only good to float32
    # over 1e-3, so also compare hbn's analytic Jacobian (its backward, one
    # output element at a time) with torch float64 autograd's, to 1e-4.
    inputs, mean, var = _gradcheck_arguments(layout)
    actual = torch.autograd.functional.jacobian(_hbn_float32(training, mean, var), inputs)
    expected = torch.autograd.functional.jacobian(_torch_float64(training, mean, var), inputs)
    for name, a, e in zip(("input", "weight", "bias"), actual, expected):
        assert_close(a, e, FLOAT32, msg=f"d output / d {name}")


# ---------------------------------------------------------------------------
# 4. float16 input, float32 parameters (mixed precision).

@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float16_input(training, memory_format):
    shape = (4, 3, 5, 6)
    module, reference = make_pair("2d", 3, seed=2)
    module.train(training)
    reference.train(training)
    # The reference sees exactly the float16 values, converted.
    x16 = random_input(shape, seed=30, dtype=torch.float16).contiguous(
        memory_format=memory_format)
    dy16 = torch.randn(shape, generator=torch.Generator().manual_seed(31)).half()
    x = x16.detach().requires_grad_()
    x_ref = x16.double().requires_grad_()
    y = module(x)
    y_ref = reference(x_ref)
    assert y.dtype == torch.float16
    assert y.is_contiguous(memory_format=memory_format)
    y.backward(dy16)
    y_ref.backward(dy16.double())
    # Results rounded to float16 carry float16 tolerances; the float32 running
    # statistics and parameter gradients are float32 sums of float16 values.
    assert_close(y, y_ref, FLOAT16, msg="output")
    assert x.grad.dtype == torch.float16
    assert_close(x.grad, x_ref.grad, FLOAT16, scaled=True, msg="grad_input")
    assert module.weight.grad.dtype == torch.float32
    assert_close(module.weight.grad, reference.weight.grad, FLOAT32, scaled=True,
                 msg="grad_weight")
    assert_close(module.bias.grad, reference.bias.grad, FLOAT32, scaled=True, msg="grad_bias")
    assert_buffers_match(module, reference)


# ---------------------------------------------------------------------------
# 5. The drop-in in a small training loop.

def _net(batch_norm):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), batch_norm, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _train(net, x, labels, steps=20):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        losses.append(F.cross_entropy(net(x), labels).item())  # eval: running statistics
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL],
                         ids=["contiguous", "channels_last"])
def test_training_loop_matches_torch(memory_format):
    torch.manual_seed(40)
    expected_net = _net(nn.BatchNorm2d(8)).to(memory_format=memory_format)
    net = _net(ht.BatchNorm2d(8)).to(memory_format=memory_format)
    net.load_state_dict(expected_net.state_dict())  # identical initial weights
    gen = torch.Generator().manual_seed(41)
    x = torch.randn((32, 3, 8, 8), generator=gen).contiguous(memory_format=memory_format)
    # Labels the net can learn (a linear function of the channel means), so
    # that the loss falls well within 20 steps.
    labels = (x.mean((2, 3)) @ torch.randn(3, 4, generator=gen)).argmax(1)

    # Both in float32: torch's BatchNorm2d and hbn's differ by float32
    # rounding only, and 20 SGD steps on this small net keep the losses within
    # ~1e-7 relative (one float32 ulp), so rtol=1e-5 keeps a 100x margin while
    # a gradient off by 0.1% (2e-5 in the losses) fails.
    expected = _train(expected_net, x, labels)
    losses = _train(net, x, labels)
    assert isinstance(net[1], ht.BatchNorm2d)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=0)
    assert losses[19] < losses[0]
    assert int(net[1].num_batches_tracked) == 20
    for name, value in expected_net.state_dict().items():
        torch.testing.assert_close(net.state_dict()[name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda default, name=name: f"{name}: {default}")


# ---------------------------------------------------------------------------
# 6. Errors and torch compatibility.

def test_eval_without_running_stats():
    x = random_input((4, 3), seed=50)
    with pytest.raises(ValueError, match="running_mean"):
        ht.batch_norm(x, None, None, training=False)
    # torch refuses too (a RuntimeError there).
    with pytest.raises(RuntimeError):
        F.batch_norm(x.double(), None, None, training=False)


@pytest.mark.parametrize("kind,shape", [("1d", (4, 3)), ("2d", (2, 3, 4, 5)),
                                        ("3d", (2, 3, 2, 2, 2))])
def test_float64_input_is_a_type_error(kind, shape):
    module = MODULES[kind][0](3)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(TypeError, match="input_x"):
        module(torch.randn(shape, dtype=torch.float64))
    # The failed call changed no running statistic (num_batches_tracked is
    # counted before the call, as torch counts it before its own checks).
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(module.state_dict()[name], state[name], rtol=0, atol=0)


@pytest.mark.parametrize("kind,shape", [("1d", (1, 3)), ("1d", (1, 3, 1)),
                                        ("2d", (1, 3, 1, 1)), ("3d", (1, 3, 1, 1, 1))])
def test_one_value_per_channel_in_training(kind, shape):
    module, reference = make_pair(kind, 3)
    x = random_input(shape, seed=51)
    with pytest.raises(ValueError):
        reference(x.double())
    with pytest.raises(ValueError):
        module(x)
    assert_buffers_match(module, reference, msg="after the failed call")
    # Eval needs no batch variance: one value per channel is fine there.
    module.eval()
    reference.eval()
    assert_close(module(x), reference(x.double()), FLOAT32, msg="eval output")


def test_wrong_rank_like_torch():
    for kind, shape in [("1d", (2, 3, 4, 5)), ("2d", (2, 3, 4)), ("3d", (2, 3, 4, 5))]:
        hbn_class, torch_class = MODULES[kind]
        x = torch.randn(shape)
        with pytest.raises(ValueError):
            torch_class(3)(x)
        with pytest.raises(ValueError):
            hbn_class(3)(x)


def test_state_dict_round_trip():
    module, _ = make_pair("2d", 3, seed=3)
    for step in range(2):
        module(random_input((4, 3, 5, 5), seed=60 + step))
    # hbn -> torch: the same keys, and torch's module computes the same thing.
    theirs = nn.BatchNorm2d(3)
    theirs.load_state_dict(module.state_dict())
    assert list(theirs.state_dict()) == list(module.state_dict())
    x = random_input((4, 3, 5, 5), seed=62)
    module.eval()
    theirs.eval()
    assert_close(module(x), theirs.double()(x.double()), FLOAT32, msg="hbn -> torch")
    # torch -> hbn, strict.
    source = nn.BatchNorm2d(3)
    source(random_input((4, 3, 5, 5), seed=63))
    ours = ht.BatchNorm2d(3)
    ours.load_state_dict(source.state_dict(), strict=True)
    source.eval()
    ours.eval()
    assert_close(ours(x), source.double()(x.double()), FLOAT32, msg="torch -> hbn")
    assert int(ours.num_batches_tracked) == 1


def test_isinstance_of_torch_modules():
    assert isinstance(ht.BatchNorm1d(3), nn.BatchNorm1d)
    assert isinstance(ht.BatchNorm2d(3), nn.BatchNorm2d)
    assert isinstance(ht.BatchNorm3d(3), nn.BatchNorm3d)
    assert isinstance(ht.BatchNorm2d(3), nn.modules.batchnorm._BatchNorm)


# Where torch's own behaviour is unusual: an empty training batch, and strided
# per-channel tensors (F.batch_norm updates a strided running_mean in place).

def test_empty_training_batch_like_torch():
    module, reference = make_pair("2d", 3)
    x = torch.zeros((0, 3, 5, 5), requires_grad=True)
    x_ref = torch.zeros((0, 3, 5, 5), dtype=torch.float64, requires_grad=True)
    reference(x_ref).sum().backward()
    y = module(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert_buffers_match(module, reference)
    assert_close(module.weight.grad, reference.weight.grad, FLOAT32)


def test_strided_per_channel_tensors_like_torch():
    x = random_input((4, 3, 2, 2), seed=80)
    weight, bias = torch.linspace(0.5, 1.5, 6)[::2], torch.linspace(-1, 1, 6)[::2]
    mean, var = torch.zeros(6)[::2], torch.ones(6)[::2]
    ref_mean, ref_var = mean.double(), var.double()
    expected = F.batch_norm(x.double(), ref_mean, ref_var, weight.double(), bias.double(),
                            training=True)
    y = ht.batch_norm(x, mean, var, weight, bias, training=True)
    assert_close(y, expected, FLOAT32, msg="output")
    assert_close(mean, ref_mean, FLOAT32, msg="running_mean")
    assert_close(var, ref_var, FLOAT32, msg="running_var")


def test_convert_sync_batchnorm_makes_hbn_modules_sharing_state():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                          nn.Sequential(ht.BatchNorm2d(4, momentum=0.3)))
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                              nn.Sequential(nn.BatchNorm2d(4, momentum=0.3)))
    reference.load_state_dict(model.state_dict())
    reference.double()
    batch_norms = [model[1], model[2][0]]
    converted = ht.SyncBatchNorm.convert_sync_batchnorm(model)
    synced = [converted[1], converted[2][0]]
    assert all(type(m) is ht.SyncBatchNorm for m in synced)
    for before, after in zip(batch_norms, synced):
        assert after.weight is before.weight and after.running_var is before.running_var
        assert after.momentum == before.momentum
    # Without torch.distributed initialized, a SyncBatchNorm is plain batch norm.
    x = random_input((4, 3, 6, 6), seed=90)
    assert_close(converted(x), reference(x.double()), FLOAT32, msg="output")
    assert_buffers_match(synced[1], reference[2][0])


def test_convert_batch_norm_moves_every_batch_norm_onto_hbn():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None),
                          nn.Sequential(nn.BatchNorm2d(4, affine=False), nn.SyncBatchNorm(4)),
                          nn.Flatten(2), nn.BatchNorm1d(4))
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None),
                              nn.Sequential(nn.BatchNorm2d(4, affine=False), nn.BatchNorm2d(4)),
                              nn.Flatten(2), nn.BatchNorm1d(4))
    reference.load_state_dict(model.state_dict())
    reference.double()
    before = [model[1], model[2][0], model[2][1], model[4]]
    converted = ht.convert_batch_norm(model)
    after = [converted[1], converted[2][0], converted[2][1], converted[4]]
    assert [type(m) for m in after] == [ht.BatchNorm2d, ht.BatchNorm2d, ht.SyncBatchNorm,
                                        ht.BatchNorm1d]
    for old, new in zip(before, after):
        assert new.weight is old.weight and new.running_mean is old.running_mean
        assert (new.momentum, new.affine, new.eps) == (old.momentum, old.affine, old.eps)
    for step in range(2):
        x = random_input((4, 3, 6, 6), seed=100 + step)
        assert_close(converted(x), reference(x.double()), FLOAT32, msg=f"step {step}")
    for new, old in zip(after, [reference[1], reference[2][0], reference[2][1], reference[4]]):
        assert_buffers_match(new, old)
