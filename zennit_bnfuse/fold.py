'''The fusion math: a BatchNorm in eval mode as a per-channel affine map, folded into a neighbouring layer.

All functions here work on tensors only and compute in float64; callers cast the results back to the layer's dtype.
A BatchNorm with running statistics computes ``bn(x)_c = scale_c * x_c + shift_c`` with
``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``.
'''
import sys
from types import SimpleNamespace

import torch
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops.misc import FrozenBatchNorm2d


BATCH_NORM_TYPES = (torch.nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
# the types whose forward is exactly the affine map below; subclasses (e.g. timm's BatchNormAct2d, which also applies
# an activation) are BatchNorms but are not folded
FOLDABLE_BATCH_NORM_TYPES = (
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm, FrozenBatchNorm2d,
)


def timm_layers():
    '''This package's support for timm's layers, :py:mod:`zennit_bnfuse.timm_layers`, if timm is imported, else None.

    A model can only hold timm's modules once timm is imported, so timm is never imported here: the package works
    without it.
    '''
    if 'timm' not in sys.modules:
        return None
    from . import timm_layers as extension
    return extension


def is_frozen(batch_norm):
    '''Whether ``batch_norm`` always normalises by its fixed statistics (torchvision's FrozenBatchNorm2d, timm's
    FrozenBatchNormAct2d), whatever its training flag.'''
    extension = timm_layers()
    return isinstance(batch_norm, FrozenBatchNorm2d) or (
        extension is not None and isinstance(batch_norm, extension.FrozenBatchNormAct2d))


def is_batch_norm(module):
    '''Whether ``module`` is a BatchNorm of any dimension (including SyncBatchNorm, torchvision's
    FrozenBatchNorm2d, timm's norm-act layers and other subclasses).'''
    return isinstance(module, BATCH_NORM_TYPES) or is_frozen(module)


def has_running_stats(batch_norm):
    '''Whether ``batch_norm`` normalises by running statistics in eval mode, i.e. is a fixed affine map: it holds both
    buffers, whatever its ``track_running_stats`` flag says (torch's eval-mode forward reads the buffers where they
    exist; a flag set to False after training leaves them).'''
    if is_frozen(batch_norm):
        return True
    return batch_norm.running_mean is not None and batch_norm.running_var is not None


def check_batch_norm(name, batch_norm):
    '''Raise if ``batch_norm`` cannot be treated as a fixed map at all.

    Parameters
    ----------
    name: str
        Name of the module in its model, used in the message.
    batch_norm: :py:obj:`torch.nn.Module`
        A BatchNorm module.

    Raises
    ------
    ValueError
        If the module is in training mode (it normalises by batch statistics), its running statistics or affine
        parameters are not finite, or ``running_var + eps`` is not positive in some channel (its normalisation
        ``1 / sqrt(running_var + eps)`` is then infinite or not a number).
    '''
    if batch_norm.training and not is_frozen(batch_norm):
        raise ValueError(
            f'BatchNorm \'{name}\' is in training mode, where it normalises by batch statistics and cannot be fused. '
            'Call model.eval() before fusing or explaining the model.'
        )
    if not has_running_stats(batch_norm):
        return
    for key in ('running_mean', 'running_var', 'weight', 'bias'):
        tensor = getattr(batch_norm, key, None)
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f'BatchNorm \'{name}\' has non-finite values in \'{key}\'; fix or reload its '
                'statistics (for example by re-running a calibration pass) before fusing.'
            )
    # in the module's own dtype (what its forward computes) and in float64 (what the fold computes)
    variance, eps = batch_norm.running_var, batch_norm.eps
    channels = ((variance + eps <= 0) | (variance.double() + eps <= 0)).nonzero().flatten().tolist()
    if channels:
        raise ValueError(
            f'BatchNorm \'{name}\' has running_var + eps <= 0 in channel(s) {channels}, where it divides by the '
            'square root of a non-positive number; fix or reload its statistics (variances are never negative) '
            'before fusing.'
        )


def batch_norm_affine(batch_norm):
    '''The per-channel affine map an eval-mode BatchNorm computes.

    Parameters
    ----------
    batch_norm: :py:obj:`torch.nn.Module`
        A BatchNorm (1d/2d/3d, Sync, or torchvision's FrozenBatchNorm2d) with running statistics.

    Returns
    -------
    tuple[:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`]
        ``(scale, shift)``, each of shape ``(C,)`` in float64 on the module's device.
    '''
    mean = batch_norm.running_mean.detach().double()
    scale = torch.rsqrt(batch_norm.running_var.detach().double() + batch_norm.eps)
    if batch_norm.weight is not None:  # detached: a fused layer's tensors carry no graph of the BatchNorm's
        scale = scale * batch_norm.weight.detach().double()
    shift = -mean * scale
    if batch_norm.bias is not None:
        shift = shift + batch_norm.bias.detach().double()
    return scale, shift


def channel_range(batch_norm, start, stop):
    '''The statistics and affine parameters of channels ``start:stop`` of ``batch_norm``, as an object with the
    attributes :py:func:`fold_into_previous` reads (for a BatchNorm after a ``torch.cat`` of layer outputs).'''
    def part(tensor):
        return None if tensor is None else tensor[start:stop]
    return SimpleNamespace(
        running_mean=part(batch_norm.running_mean), running_var=part(batch_norm.running_var), eps=batch_norm.eps,
        weight=part(batch_norm.weight), bias=part(batch_norm.bias),
    )


def output_channels_first(weight, transposed, groups):
    '''View a layer weight with the output channel in dim 0.

    Conv and Linear weights already have this layout, ``(C_out, C_in / groups, *kernel)``. ConvTranspose weights are
    ``(C_in, C_out / groups, *kernel)`` and are regrouped to ``(C_out, C_in / groups, *kernel)``.

    Parameters
    ----------
    weight: :py:obj:`torch.Tensor`
        The layer's weight.
    transposed: bool
        Whether the layer is a transposed convolution.
    groups: int
        The layer's number of groups (1 for Linear).

    Returns
    -------
    :py:obj:`torch.Tensor`
        The weight with output channels in dim 0; :py:func:`output_channels_last` inverts this.
    '''
    if not transposed:
        return weight
    in_channels, out_per_group, *kernel = weight.shape
    grouped = weight.reshape(groups, in_channels // groups, out_per_group, *kernel)
    return grouped.transpose(1, 2).reshape(groups * out_per_group, in_channels // groups, *kernel)


def output_channels_last(weight, transposed, groups):
    '''Invert :py:func:`output_channels_first`.'''
    if not transposed:
        return weight
    out_channels, in_per_group, *kernel = weight.shape
    grouped = weight.reshape(groups, out_channels // groups, in_per_group, *kernel)
    return grouped.transpose(1, 2).reshape(groups * in_per_group, out_channels // groups, *kernel)


def fold_into_previous(weight, bias, batch_norm, transposed=False, groups=1):
    '''Fold a BatchNorm into the layer before it (``layer -> bn``).

    Uses :py:func:`torch.nn.utils.fusion.fuse_conv_bn_weights` on the output-channel-first view of the weight, so
    Linear, Conv and grouped ConvTranspose layers share one code path.

    Parameters
    ----------
    weight: :py:obj:`torch.Tensor`
        The layer's weight in its own layout, float64.
    bias: :py:obj:`torch.Tensor` or None
        The layer's bias of shape ``(C_out,)``, float64, or None.
    batch_norm: :py:obj:`torch.nn.Module`
        The BatchNorm after the layer, with ``C_out`` channels.
    transposed: bool
        Whether the layer is a transposed convolution.
    groups: int
        The layer's groups.

    Returns
    -------
    tuple[:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`]
        The fused ``(weight, bias)`` in float64, weight in the layer's own layout.
    '''
    def double(tensor):
        return None if tensor is None else tensor.detach().double()

    fused_weight, fused_bias = fuse_conv_bn_weights(
        output_channels_first(weight, transposed, groups),
        bias,
        double(batch_norm.running_mean),
        double(batch_norm.running_var),
        batch_norm.eps,
        double(batch_norm.weight),
        double(batch_norm.bias),
    )
    return output_channels_last(fused_weight.data, transposed, groups), fused_bias.data


def per_weight_input_channels(values, weight_shape, groups):
    '''Spread a per-input-channel vector over the first two dims of a (grouped) weight.

    Parameters
    ----------
    values: :py:obj:`torch.Tensor`
        Shape ``(C_in,)``.
    weight_shape: torch.Size
        ``(C_out, C_in / groups, *kernel)`` (Conv) or ``(C_out, C_in)`` (Linear).
    groups: int
        The layer's groups.

    Returns
    -------
    :py:obj:`torch.Tensor`
        Shape ``(C_out, C_in / groups, 1, ...)``, broadcastable against the weight: entry ``[o, i]`` is the value of
        the input channel that weight ``[o, i]`` reads.
    '''
    out_channels, in_per_group = weight_shape[:2]
    grouped = values.reshape(groups, in_per_group).repeat_interleave(out_channels // groups, dim=0)
    return grouped.reshape(out_channels, in_per_group, *(1,) * (len(weight_shape) - 2))


def fold_into_next(weight, bias, scale, shift, groups=1):
    '''Fold a per-channel affine map into the layer after it (``affine -> layer``).

    ``layer(scale * x + shift) = layer'(x)`` with ``W'[:, i] = W[:, i] * scale_i``. The shift becomes bias: its
    contribution per output channel and kernel tap is the *border kernel*
    ``K[o, 0, taps] = sum_i W[o, i, taps] * shift_i``. Where every tap reads a real input, the bias is
    ``b + K.sum(taps)``; near a zero-padded border only the taps inside the image count, which the caller handles
    with ``K`` (see :py:class:`zennit_bnfuse.layers.BiasMapConvMixin`).

    Parameters
    ----------
    weight: :py:obj:`torch.Tensor`
        Layer weight of shape ``(C_out, C_in / groups, *kernel)`` or ``(C_out, C_in)``, float64.
    bias: :py:obj:`torch.Tensor` or None
        Layer bias ``(C_out,)`` or None.
    scale, shift: :py:obj:`torch.Tensor`
        The affine map, each ``(C_in,)``, float64.
    groups: int
        The layer's groups.

    Returns
    -------
    tuple[:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`]
        ``(weight, constant_bias, border_kernel)``: the fused weight, the bias where no tap reads padding, and ``K``
        of shape ``(C_out, 1, *kernel)`` (``(C_out, 1)`` for Linear).
    '''
    fused_weight = weight * per_weight_input_channels(scale, weight.shape, groups)
    border_kernel = (weight * per_weight_input_channels(shift, weight.shape, groups)).sum(dim=1, keepdim=True)
    constant_bias = border_kernel.flatten(start_dim=1).sum(dim=1)
    if bias is not None:
        constant_bias = constant_bias + bias
    return fused_weight, constant_bias, border_kernel


def relu_fold(scale, shift):
    '''Split ``relu(scale * x + shift)`` into a thresholded ReLU and a non-negative scale for the next layer.

    ``relu(s x + t) = |s| * relu(sign(s) x + t / |s|)`` for ``s != 0``; for ``s = 0`` the channel is the constant
    ``relu(t) = 1 * relu(0 * x + t)``.

    Parameters
    ----------
    scale, shift: :py:obj:`torch.Tensor`
        The BatchNorm's affine map, each ``(C,)``, float64.

    Returns
    -------
    tuple[:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`]
        ``(sign, threshold, next_scale)``, each ``(C,)``: the activation is ``relu(sign * x + threshold)`` and the
        next layer's input channels are multiplied by ``next_scale`` (``> 0``).
    '''
    magnitude = scale.abs()
    zero = magnitude == 0
    next_scale = torch.where(zero, torch.ones_like(magnitude), magnitude)
    return scale.sign(), shift / next_scale, next_scale
