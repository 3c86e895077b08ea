'''Modules that fused networks are made of, and the construction of a fused layer from a layer and its BatchNorms.'''
import copy

import torch

from .fold import batch_norm_affine, fold_into_next, fold_into_previous, relu_fold


FOLDABLE_LAYER_TYPES = (
    torch.nn.Linear,
    torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
    torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d,
)


class BiasMapConvMixin:
    '''Convolution whose bias depends on the output position: ``conv(x, weight) + bias[c, *position]``.

    This is the exact fold of a BatchNorm into the zero-padded convolution after it: taps that fall on the padding
    read 0 instead of the BatchNorm's shift, so the bias near the border differs from the interior. The bias map is
    ``base_bias + conv(ones, border_kernel)`` with this layer's stride, padding, dilation and groups. It is computed
    once per input size and held as the Parameter ``bias`` of shape ``(C_out, *output_size)``, so every LRP rule
    (Zennit's parameter modifiers, Captum's rules) treats it like an ordinary bias.

    Attributes
    ----------
    border_kernel: :py:obj:`torch.Tensor`
        Buffer ``(C_out, 1, *kernel)``: the shift's contribution per output channel and kernel tap.
    base_bias: :py:obj:`torch.Tensor`
        Buffer ``(C_out,)``: the part of the bias that does not depend on the position.
    '''
    def forward(self, input):
        '''Convolve without bias and add the bias map for this input size, building it on first use.'''
        size = tuple(input.shape[2:])
        if size != getattr(self, 'bias_map_input_size', None):
            self.build_bias_map(size)
        return self._conv_forward(input, self.weight, None) + self.bias

    def build_bias_map(self, input_size):
        '''Compute the bias map for inputs of spatial size ``input_size`` and store it as ``self.bias``.

        Parameters
        ----------
        input_size: tuple[int]
            Spatial size of the input, without batch and channel dims.
        '''
        with torch.no_grad():
            ones = torch.ones((1, self.groups, *input_size), dtype=torch.float64, device=self.border_kernel.device)
            border = self._conv_forward(ones, self.border_kernel.double(), None)[0]
            bias_map = border + self.base_bias.double().reshape(-1, *(1,) * len(input_size))
        self.bias = torch.nn.Parameter(bias_map.to(self.weight.dtype))
        self.bias_map_input_size = tuple(input_size)


class BiasMapConv1d(BiasMapConvMixin, torch.nn.Conv1d):
    '''Conv1d with a position-dependent bias; see :py:class:`BiasMapConvMixin`.'''


class BiasMapConv2d(BiasMapConvMixin, torch.nn.Conv2d):
    '''Conv2d with a position-dependent bias; see :py:class:`BiasMapConvMixin`.'''


class BiasMapConv3d(BiasMapConvMixin, torch.nn.Conv3d):
    '''Conv3d with a position-dependent bias; see :py:class:`BiasMapConvMixin`.'''


BIAS_MAP_TYPES = {
    torch.nn.Conv1d: BiasMapConv1d,
    torch.nn.Conv2d: BiasMapConv2d,
    torch.nn.Conv3d: BiasMapConv3d,
}


class ThresholdReLU(torch.nn.ReLU):
    '''Per-channel thresholded ReLU ``relu(sign_c * x_c + threshold_c)`` over channel dim 1.

    This is what remains of ``BatchNorm -> ReLU`` once the BatchNorm's scale magnitude has moved into the next layer
    (see :py:func:`zennit_bnfuse.fold.relu_fold`). It subclasses :py:class:`torch.nn.ReLU` so that LRP treats it as
    an activation (Zennit's composites give it their activation rule, ``Pass``).

    Parameters
    ----------
    sign: :py:obj:`torch.Tensor`
        Shape ``(C,)`` with entries -1, 0 or 1.
    threshold: :py:obj:`torch.Tensor`
        Shape ``(C,)``.
    '''
    def __init__(self, sign, threshold):
        super().__init__()
        self.register_buffer('sign', sign.detach().clone())
        self.register_buffer('threshold', threshold.detach().clone())

    def forward(self, input):
        '''Apply ``relu(sign * input + threshold)`` per channel (dim 1).'''
        shape = (1, -1) + (1,) * (input.ndim - 2)
        # clamp saves its input for backward, not its output, so an in-place ReLU after this one (DenseNet's
        # F.relu(inplace=True)) keeps autograd intact
        return (input * self.sign.reshape(shape) + self.threshold.reshape(shape)).clamp(min=0)

    def extra_repr(self):
        return f'{self.sign.numel()}'


def needs_bias_map(layer):
    '''Whether a shift folded into the input of ``layer`` needs a position-dependent bias (zero-padded conv).'''
    if not isinstance(layer, torch.nn.modules.conv._ConvNd) or layer.padding_mode != 'zeros':
        return False
    if isinstance(layer.padding, str):
        return layer.padding == 'same' and any(size > 1 for size in layer.kernel_size)
    return any(pad > 0 for pad in layer.padding)


def detached_copy(module):
    '''Copy ``module`` without copying its own parameters (they are set to None) and without any hooks.

    Parameters
    ----------
    module: :py:obj:`torch.nn.Module`
        A leaf module.

    Returns
    -------
    :py:obj:`torch.nn.Module`
        A new module of the same type and configuration that shares nothing mutable with ``module``.
    '''
    memo = {id(param): None for param in module.parameters(recurse=False)}
    new = copy.deepcopy(module, memo)
    for key, value in vars(new).items():
        if key.endswith('hooks') and isinstance(value, dict):
            value.clear()
    return new


def folded_layer(layer, before=None, after=None):
    '''Build the fused replacement of ``layer`` with BatchNorms or scales folded into its input and output.

    The fold is computed in float64 and cast to the layer's dtype and device; ``layer`` is not changed.

    Parameters
    ----------
    layer: :py:obj:`torch.nn.Module`
        A Linear, Conv or ConvTranspose module (exact torch types).
    before: tuple[:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`] or None
        ``(scale, shift)`` per input feature of ``layer`` (float64) applied before it, or None.
    after: :py:obj:`torch.nn.Module` or None
        A BatchNorm applied to the output of ``layer``, or None.

    Returns
    -------
    :py:obj:`torch.nn.Module`
        The fused layer: the same type as ``layer``, or a :py:class:`BiasMapConvMixin` subclass where a shift meets
        zero padding.

    Raises
    ------
    TypeError
        If a shift is folded into the input of a transposed convolution.
    '''
    transposed = getattr(layer, 'transposed', False)
    groups = getattr(layer, 'groups', 1)
    weight = layer.weight.detach().double()
    bias = None if layer.bias is None else layer.bias.detach().double()

    if after is not None:
        weight, bias = fold_into_previous(weight, bias, after, transposed, groups)

    border_kernel = None
    base_bias = bias
    if before is not None:
        if transposed:
            raise TypeError(f'Cannot fold into the input of a transposed convolution: {layer}')
        scale, shift = before
        weight, bias, border_kernel = fold_into_next(weight, bias, scale, shift, groups)
        if not needs_bias_map(layer) or not bool(shift.any()):
            border_kernel = None

    new = detached_copy(layer)
    dtype = layer.weight.dtype
    requires_grad = layer.weight.requires_grad
    new.weight = torch.nn.Parameter(weight.to(dtype), requires_grad)
    if border_kernel is None:
        new.bias = None if bias is None else torch.nn.Parameter(bias.to(dtype), requires_grad)
        return new

    new.__class__ = BIAS_MAP_TYPES[type(layer)]
    new.bias = None
    if base_bias is None:
        base_bias = torch.zeros_like(bias)
    new.register_buffer('border_kernel', border_kernel.to(dtype))
    new.register_buffer('base_bias', base_bias.to(dtype))
    new.bias_map_input_size = None
    return new


def threshold_relu_for(batch_norm):
    '''The :py:class:`ThresholdReLU` and next-layer input scale that replace ``batch_norm -> ReLU``.

    Parameters
    ----------
    batch_norm: :py:obj:`torch.nn.Module`
        A BatchNorm with running statistics.

    Returns
    -------
    tuple[:py:class:`ThresholdReLU`, :py:obj:`torch.Tensor`]
        The activation (in the BatchNorm's dtype and device) and the float64 scale ``(C,)`` for the next layer.
    '''
    sign, threshold, next_scale = relu_fold(*batch_norm_affine(batch_norm))
    dtype = batch_norm.running_mean.dtype
    activation = ThresholdReLU(sign.to(dtype), threshold.to(dtype))
    activation.train(batch_norm.training)
    return activation, next_scale
