"""PyTorch drop-ins whose forward and backward run on hbn.

``batch_norm`` has the signature of ``torch.nn.functional.batch_norm``, and
``BatchNorm1d``, ``BatchNorm2d`` and ``BatchNorm3d`` subclass torch's own
modules (same parameters, buffers, state_dict and isinstance checks), replacing
only ``forward``. Both take hbn's fused epilogue as an option: ReLU
(``activation="relu"``), after adding a residual (``batch_norm``'s keyword
``residual``, the modules' ``forward(input, residual)``), in the same pass
over the data. Gradients come from hbn's backward through
``torch.autograd.Function`` (first order only). Inputs are CPU tensors of
float16, float32 or bfloat16; contiguous and channels-last tensors are read in place,
any other layout is copied to contiguous first, and the output keeps the
input's memory format.
"""

import torch
from torch.autograd.function import once_differentiable

from . import _hbn

__all__ = ["batch_norm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
           "convert_batch_norm"]

_DEVICE = "auto"  # where hbn runs: see hbn.batch_norm


def _hbn_view(tensor):
    """(view, data_format, order): tensor as hbn reads it, dense and row-major.

    A channels-last tensor (channels innermost, as torch.channels_last and
    channels_last_3d lay them out) is read as NHWC through its permuted view;
    order is that permutation, which _torch_order undoes.
    """
    if tensor.is_contiguous():
        return tensor, "NCHW", None
    if tensor.dim() > 2:
        order = (0, *range(2, tensor.dim()), 1)
        channels_last = tensor.permute(order)
        if channels_last.is_contiguous():
            return channels_last, "NHWC", order
    return tensor.contiguous(), "NCHW", None


def _torch_order(view, order):
    """The tensor of torch's axis order (N, C, ...) behind an hbn view."""
    if order is None:
        return view
    return view.permute(0, view.dim() - 1, *range(1, view.dim() - 1))


def _like_view(tensor, order):
    """tensor (of torch's axis order) in the layout of an hbn view with that order, dense:
    a tensor that hbn reads alongside it, whatever memory format it arrived in."""
    return (tensor.permute(order) if order else tensor).contiguous()


class _BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, training,
                momentum, eps, activation, all_reduce):
        x, data_format, order = _hbn_view(input)
        r = None if residual is None else _like_view(residual, order)
        if training:
            y, saved_mean, saved_inv_std = _hbn.batch_norm_training(
                x, running_mean, running_var, weight, bias, momentum, eps, data_format, _DEVICE,
                all_reduce, activation, r)
            statistics = (saved_mean, saved_inv_std)
        else:
            y = _hbn.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps,
                                data_format, _DEVICE, None, activation, r)
            statistics = (running_mean, running_var)
        # The view hbn read (a copy where input had another layout), so that the
        # backward reads the same without copying again; and the output, the
        # ReLU's mask, in that layout (it is the output returned, or a view of it).
        ctx.save_for_backward(x, weight, *statistics, None if activation is None else y)
        ctx.data_format, ctx.order = data_format, order
        ctx.training = training
        ctx.eps = eps
        ctx.activation = activation
        ctx.all_reduce = all_reduce
        return _torch_order(y, order)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight, mean, spread, y = ctx.saved_tensors
        data_format, order = ctx.data_format, ctx.order
        dy = _like_view(grad_output, order)
        statistics = (None, None, mean, spread) if ctx.training else (mean, spread, None, None)
        # The residual's gradient is grad_output itself without an activation.
        masks_residual = ctx.activation is not None and ctx.needs_input_grad[3]
        grad_input, grad_weight, grad_bias, *masked = _hbn.batch_norm_backward(
            dy, x, weight, *statistics, ctx.training, ctx.eps, data_format, _DEVICE,
            ctx.all_reduce, ctx.activation, y, masks_residual)
        grad_residual = _torch_order(masked[0], order) if masks_residual else grad_output
        return (_torch_order(grad_input, order), grad_weight, grad_bias,
                grad_residual if ctx.needs_input_grad[3] else None,
                None, None, None, None, None, None, None)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-05, *, all_reduce=None, activation=None, residual=None):
    """torch.nn.functional.batch_norm on hbn, differentiable in input, weight, bias and residual.

    As in torch: training normalizes with the batch statistics and, where running_mean and
    running_var are given, updates them in place; inference needs them. weight and bias
    default to 1 and 0. all_reduce: synchronized statistics in training, as in
    hbn.batch_norm (the forward's and the backward's sums across processes).

    Fused epilogue, in the same pass: activation=None or "relu", and residual=None or a tensor
    of input's dtype and shape (any memory format), added before the activation: with both,
    F.relu(F.batch_norm(...) + residual). The backward masks with the saved output, as
    torch's ReLU does.
    """
    if input.dim() < 2:
        raise ValueError(f"input must have rank >= 2 (N, C, ...), got shape {tuple(input.shape)}")
    channels = input.shape[1]
    if running_mean is None or running_var is None:
        if not training:
            raise ValueError("running_mean and running_var are required when training=False")
        # Statistics to update that nobody keeps: hbn's training always updates some.
        running_mean = torch.zeros(channels, dtype=torch.float32)
        running_var = torch.ones(channels, dtype=torch.float32)
    if input.numel() == 0 and all_reduce is None:
        training = False  # as torch: an empty output, and the statistics left alone
    per_channel_dtype = running_mean.dtype
    weight = torch.ones(channels, dtype=per_channel_dtype) if weight is None else weight.contiguous()
    bias = torch.zeros(channels, dtype=per_channel_dtype) if bias is None else bias.contiguous()
    # hbn updates dense statistics in place: a strided one through a dense copy.
    mean, var = running_mean.contiguous(), running_var.contiguous()
    output = _BatchNormFunction.apply(input, weight, bias, residual, mean, var, bool(training),
                                      float(momentum), float(eps), activation, all_reduce)
    for statistic, updated in ((running_mean, mean), (running_var, var)):
        if updated is not statistic:
            statistic.copy_(updated)
    return output


class _HbnBatchNorm:
    """forward of torch's _BatchNorm (momentum=None: cumulative average), on hbn, with
    batch_norm's fused epilogue: the keyword activation=None or "relu" of the constructor,
    and forward(input, residual=None)."""

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = activation

    def extra_repr(self):
        activation = "" if self.activation is None else f", activation={self.activation!r}"
        return super().extra_repr() + activation

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        uses_batch_statistics = self.training or (self.running_mean is None
                                                  and self.running_var is None)
        keeps_running = not self.training or self.track_running_stats
        return batch_norm(input,
                          self.running_mean if keeps_running else None,
                          self.running_var if keeps_running else None,
                          self.weight, self.bias, uses_batch_statistics, momentum, self.eps,
                          all_reduce=self._all_reduce() if self.training else None,
                          activation=self.activation, residual=residual)

    def _all_reduce(self):
        return None


class BatchNorm1d(_HbnBatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on hbn: input (N, C) or (N, C, L)."""


class BatchNorm2d(_HbnBatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on hbn: input (N, C, H, W), contiguous or channels_last."""


class BatchNorm3d(_HbnBatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on hbn: input (N, C, D, H, W), contiguous or channels_last_3d."""


class SyncBatchNorm(_HbnBatchNorm, torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm on hbn, for CPU tensors.

    In training, with torch.distributed initialized, the batch statistics (and the backward's
    sums) are those of every process in process_group (the default group when None), summed
    by torch.distributed.all_reduce on CPU tensors: a backend that reduces them (gloo, mpi).
    grad_weight and grad_bias stay each process's own, for DistributedDataParallel to sum.
    Otherwise it is BatchNorm of any rank >= 2.
    """

    def _all_reduce(self):
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        group = self.process_group
        return lambda values: torch.distributed.all_reduce(torch.from_numpy(values), group=group)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Every batch norm in module (torch's or hbn's) as hbn's SyncBatchNorm, sharing its
        parameters and buffers, as torch.nn.SyncBatchNorm.convert_sync_batchnorm does with
        torch's."""
        return _replace_batch_norms(module, lambda old: cls(
            old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats,
            process_group))


def _replace_batch_norms(module, make):
    """module with each batch norm in it (itself included) replaced by make(old), which then
    shares old's parameters and buffers."""
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        replacement = make(module)
        if module.affine:
            replacement.weight, replacement.bias = module.weight, module.bias
        replacement.running_mean = module.running_mean
        replacement.running_var = module.running_var
        replacement.num_batches_tracked = module.num_batches_tracked
        module = replacement
    for name, child in module.named_children():
        module.add_module(name, _replace_batch_norms(child, make))
    return module


def convert_batch_norm(module):
    """Every torch.nn.BatchNorm1d, 2d, 3d and SyncBatchNorm in module (itself included) as
    hbn's, sharing its parameters and buffers: a model's batch norms moved onto hbn in place."""
    def make(old):
        hbn_class = next(new for torch_class, new in _HBN_CLASSES if isinstance(old, torch_class))
        arguments = (old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats)
        if hbn_class is SyncBatchNorm:
            return SyncBatchNorm(*arguments, old.process_group)
        return hbn_class(*arguments)

    return _replace_batch_norms(module, make)


# torch's batch norms and hbn's, most derived first: hbn's subclass torch's, so an hbn
# module maps to its own class.
_HBN_CLASSES = [(torch.nn.SyncBatchNorm, SyncBatchNorm), (torch.nn.BatchNorm3d, BatchNorm3d),
                (torch.nn.BatchNorm2d, BatchNorm2d), (torch.nn.BatchNorm1d, BatchNorm1d)]
