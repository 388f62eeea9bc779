"""Arrays that hbn can read only through DLPack (no buffer protocol, not a
PyTorch tensor): read and written in place, outputs returned as NumPy."""

import numpy as np
import pytest
import torch

import hbn
from conftest import DLPackOnly


def reference(x, mean, var, weight, bias, eps=1e-5):
    x = x.double()
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return ((x - mean.double().view(shape)) / torch.sqrt(var.double().view(shape) + eps)
            * weight.double().view(shape) + bias.double().view(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_training_through_dlpack_matches_torch_and_updates_running_stats(dtype):
    torch.manual_seed(1)
    x = (torch.randn(4, 3, 5) * 3 + 2).to(dtype)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    expected_mean, expected_var = running_mean.double().clone(), running_var.double().clone()
    torch.nn.functional.batch_norm(x.double(), expected_mean, expected_var, training=True,
                                   momentum=0.1)

    output = hbn.batch_norm(*(DLPackOnly(t) for t in (x, running_mean, running_var, weight, bias)),
                            training=True)

    assert isinstance(output, np.ndarray) and output.dtype == np.dtype(str(dtype)[6:])
    batch_mean = x.double().mean(dim=(0, 2))
    batch_var = x.double().var(dim=(0, 2), unbiased=False)
    tolerance = 2e-3 if dtype == torch.float16 else 1e-5
    np.testing.assert_allclose(output, reference(x, batch_mean, batch_var, weight, bias),
                               rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(running_var, expected_var, rtol=1e-5, atol=1e-6)


def test_non_contiguous_dlpack_tensor_is_a_value_error():
    x = DLPackOnly(torch.randn(3, 4).t())
    parameters = [torch.ones(3)] * 4
    with pytest.raises(ValueError, match="input_x is not contiguous"):
        hbn.batch_norm(x, *parameters)


def test_float64_dlpack_tensor_is_a_type_error():
    parameters = [DLPackOnly(torch.ones(2))] * 4
    with pytest.raises(TypeError, match=r"input_x must be float16, float32 or \(a PyTorch tensor\) bfloat16, got float64"):
        hbn.batch_norm(DLPackOnly(torch.ones(2, 2, dtype=torch.float64)), *parameters)
