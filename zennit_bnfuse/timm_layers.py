'''What the fusion engine knows about timm's layers (imported only once timm is; see
:py:func:`zennit_bnfuse.fold.timm_layers`).

- Norm-act layers: timm's BatchNorm-based layers that normalise and then apply a ``drop`` and an ``act`` module in
  one forward (:py:class:`~timm.layers.BatchNormAct2d` and its sync, frozen and split variants). Their BatchNorm part
  folds like any BatchNorm; the ``drop`` and ``act`` stay as modules (:py:func:`norm_act_remainder`).
- Conv variants: :py:class:`~timm.layers.Conv2dSame` (TensorFlow-like 'same' padding computed from the input size in
  forward), the weight-standardised convolutions (:py:class:`~timm.layers.StdConv2d`,
  :py:class:`~timm.layers.StdConv2dSame`, :py:class:`~timm.layers.ScaledStdConv2d`,
  :py:class:`~timm.layers.ScaledStdConv2dSame`) and :py:class:`timm.layers.Linear`, whose forwards are a plain
  convolution or linear map with a weight computed from their parameters.
'''
import copy
from collections import OrderedDict

import timm.layers
import torch
from timm.layers import (
    BatchNormAct2d, CondConv2d, Conv2dSame, FrozenBatchNormAct2d, ScaledStdConv2d, ScaledStdConv2dSame,
    SplitBatchNorm2d, StdConv2d, StdConv2dSame, SyncBatchNormAct,
)
from timm.layers import Linear as TimmLinear
from timm.layers._fx import get_notrace_functions, get_notrace_modules
from timm.layers.conv2d_same import conv2d_same
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

from .layers import BiasMapConvMixin, FoldedLayerMixin, FoldedLinear


# norm-act type -> whether its forward always applies both `drop` and `act` (False: only those it has as attributes)
NORM_ACT_TYPES = {
    BatchNormAct2d: True,
    FrozenBatchNormAct2d: True,
    SyncBatchNormAct: False,
    SplitBatchNorm2d: False,
}
TAIL_NAMES = ('drop', 'act')
# norm-act types that take 4-D inputs only without subclassing torch.nn.BatchNorm2d
FROZEN_2D_TYPES = (FrozenBatchNormAct2d,)

# layers whose forward convolves with a standardised copy of their weight
STANDARDIZED_CONV_TYPES = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)
# layers a fold goes into: timm's Linear computes F.linear(input, weight, bias) outside TorchScript, Conv2dSame pads
# and convolves with its own weight and bias
FOLDABLE_VARIANT_TYPES = (Conv2dSame, TimmLinear, *STANDARDIZED_CONV_TYPES)
# pooling a non-negative per-channel scale moves through: zero padding for the average, -inf for the maximum
SCALE_COMMUTING_MODULES = (AvgPool2dSame, MaxPool2dSame)
# of those, the one an affine map with a non-negative scale moves through (its padding is -inf), and the one it does
# not (it averages the zeros it pads with into the border outputs, which leaves the shift out there)
MAX_POOL_TYPES = (MaxPool2dSame,)
ZERO_PADDING_POOL_TYPES = (AvgPool2dSame,)
# timm's normalisation layers that are not subclasses of torch's (their subclasses, the Fp32 and Act variants, are
# instances): they normalise by statistics of their input, like those in zennit_bnfuse.pairs.OTHER_NORM_TYPES
OTHER_NORM_TYPES = tuple(getattr(timm.layers, name) for name in (
    'EvoNorm2dB0', 'EvoNorm2dB1', 'EvoNorm2dB2', 'EvoNorm2dS0', 'EvoNorm2dS1', 'EvoNorm2dS2',
    'FilterResponseNormAct2d', 'FilterResponseNormTlu2d', 'RmsNorm', 'RmsNorm2d', 'RmsNormFp32', 'RmsNorm2dFp32',
    'SimpleNorm', 'SimpleNorm2d', 'SimpleNormFp32', 'SimpleNorm2dFp32') if hasattr(timm.layers, name))

# timm's own elementwise activation modules (not subclasses of torch's), which LRP passes relevance through as it does
# torch's activations
ACTIVATION_TYPES = tuple(getattr(timm.layers.activations, name) for name in (
    'GELU', 'GELUTanh', 'HardMish', 'HardSigmoid', 'HardSwish', 'Mish', 'PReLU', 'QuickGELU', 'Sigmoid', 'Swish',
    'Tanh') if hasattr(timm.layers.activations, name))

REFUSED_LAYER_REASONS = {
    CondConv2d: 'mixes its expert kernels and biases per example with routing weights that need not sum to 1, so a '
                'BatchNorm\'s shift has no place in its parameters',
}


def norm_act_tail(module):
    '''The modules timm's norm-act layer ``module`` applies after normalising, in forward order.

    Parameters
    ----------
    module: :py:obj:`torch.nn.Module`

    Returns
    -------
    list[tuple[str, object]] or None
        ``(attribute name, value)`` for ``drop`` and ``act`` where the forward applies them, or None if ``module``
        is not exactly one of the norm-act types in :py:data:`NORM_ACT_TYPES`.
    '''
    always = NORM_ACT_TYPES.get(type(module))
    if always is None:
        return None
    return [(key, getattr(module, key, None)) for key in TAIL_NAMES if always or hasattr(module, key)]


def norm_act_problem(module):
    '''Why the eval-mode forward of the norm-act layer ``module`` cannot be read as "BatchNorm, then its ``drop``
    and ``act`` modules", or None.'''
    for key, value in norm_act_tail(module):
        if not isinstance(value, torch.nn.Module):
            return f'its forward applies `{key}`, which is {type(value).__name__}, not a module'
    return None


def norm_act_remainder(module, normalized):
    '''What stays of the norm-act layer ``module`` once its BatchNorm part is folded.

    Parameters
    ----------
    module: :py:obj:`torch.nn.Module`
        A norm-act layer (see :py:func:`norm_act_tail`).
    normalized: :py:obj:`torch.nn.Module`
        What replaces the BatchNorm part: :py:class:`torch.nn.Identity` or a
        :py:class:`~zennit_bnfuse.layers.ThresholdReLU`.

    Returns
    -------
    :py:obj:`torch.nn.Sequential`
        ``normalized`` under the name ``bn``, then copies of the layer's ``drop`` and ``act`` under their own names,
        so a rule set for ``<name>.act`` still finds the activation. The copies keep their training flags.
    '''
    children = [('bn', normalized)] + [(key, copy.deepcopy(value)) for key, value in norm_act_tail(module)]
    remainder = torch.nn.Sequential(OrderedDict(children))
    remainder.training = module.training
    return remainder


def notrace_modules():
    '''The module types timm marks as leaves for torch.fx (their forward does not trace).'''
    return tuple(get_notrace_modules())


def notrace_functions():
    '''The functions timm marks as leaves for torch.fx.'''
    return tuple(get_notrace_functions())


def has_dynamic_padding(layer):
    '''Whether ``layer`` pads its input by an amount computed from the input size in forward (timm's 'same'
    padding), which can be non-zero: any kernel larger than 1.'''
    dynamic = isinstance(layer, Conv2dSame) or getattr(layer, 'same_pad', False)
    return dynamic and any(size > 1 for size in layer.kernel_size)


def standardized_weight(layer):
    '''The weight a weight-standardised conv (:py:data:`STANDARDIZED_CONV_TYPES`) convolves with, in float64.

    Each output channel's weight is shifted to mean 0 and divided by ``sqrt(var + eps)`` (biased variance), then, for
    the scaled variants, multiplied by ``gain * scale``: what their forward computes with ``F.batch_norm``.

    Parameters
    ----------
    layer: :py:obj:`torch.nn.Module`

    Returns
    -------
    :py:obj:`torch.Tensor`
        Same shape as ``layer.weight``, float64.
    '''
    weight = layer.weight.detach().double().reshape(layer.out_channels, -1)
    mean = weight.mean(dim=1, keepdim=True)
    variance = weight.var(dim=1, unbiased=False, keepdim=True)
    weight = (weight - mean) * torch.rsqrt(variance + layer.eps)
    if isinstance(layer, (ScaledStdConv2d, ScaledStdConv2dSame)):
        weight = weight * (layer.gain.detach().double().reshape(-1, 1) * layer.scale)
    return weight.reshape(layer.weight.shape)


def plain_conv(layer):
    '''An empty convolution (weight and bias None) that computes what the weight-standardised ``layer`` computes
    once given its standardised weight: a :py:class:`torch.nn.Conv2d`, or a :py:class:`~timm.layers.Conv2dSame`
    where ``layer`` pads dynamically.'''
    kind = Conv2dSame if getattr(layer, 'same_pad', False) else torch.nn.Conv2d
    new = kind(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
               dilation=layer.dilation, groups=layer.groups, bias=False, device='meta')
    if kind is torch.nn.Conv2d:
        new.padding_mode = layer.padding_mode
    new.weight = None
    new.training = layer.training
    return new


class FoldedConv2dSame(FoldedLayerMixin, Conv2dSame):
    '''timm's :py:class:`~timm.layers.Conv2dSame` with BatchNorms folded into it; see
    :py:class:`~zennit_bnfuse.layers.FoldedLayerMixin`.'''


class BiasMapConv2dSame(FoldedLayerMixin, BiasMapConvMixin, Conv2dSame):
    '''timm's :py:class:`~timm.layers.Conv2dSame` with a position-dependent bias; see
    :py:class:`~zennit_bnfuse.layers.BiasMapConvMixin` and :py:class:`~zennit_bnfuse.layers.FoldedLayerMixin`. The
    bias map is built with the same dynamic padding.'''
    def _conv_forward(self, input, weight, bias):
        return conv2d_same(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


# timm's Linear computes F.linear(input, weight, bias) outside TorchScript, as torch's Linear does
FOLDED_TYPES = {Conv2dSame: FoldedConv2dSame, TimmLinear: FoldedLinear}
BIAS_MAP_TYPES = {Conv2dSame: BiasMapConv2dSame}
