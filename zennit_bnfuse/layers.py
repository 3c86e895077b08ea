'''Modules that fused networks are made of, and the construction of a fused layer from a layer and its BatchNorms.'''
import copy

import torch
import torch.fx
from torch.nn.utils import parametrize

from .fold import batch_norm_affine, fold_into_next, fold_into_previous, relu_fold, timm_layers


FOLDABLE_LAYER_TYPES = (
    torch.nn.Linear,
    torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
    torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d,
)


class FoldedTrainingError(RuntimeError):
    '''A layer with BatchNorms folded into it was called in training mode, where those BatchNorms normalise by each
    batch's statistics, which no fixed layer can.'''


class FoldedInputError(ValueError):
    '''A layer with BatchNorms folded into it was called with an input on which the folds are not exact.

    Attributes
    ----------
    layer: str
        The layer's name in its model.
    shape: tuple[int, ...]
        The shape of the input it got.
    '''
    def __init__(self, message, layer='', shape=()):
        super().__init__(message)
        self.layer = layer
        self.shape = shape


class FoldedLayerMixin:
    '''A Linear/Conv/ConvTranspose layer with BatchNorms folded into it, which checks on every call that its input
    is laid out as the folds assume.

    A BatchNorm acts on dim 1 of its input. Folded into a layer, its per-channel map acts on the layer's features
    instead: the last dim of a Linear's input, dim 1 of a batched convolution input, dim 0 of an unbatched one. These
    are the same dim exactly when the input has a batch dim and the features on dim 1, i.e. ``input.ndim ==
    weight.ndim``: ``(N, features)`` for a Linear, ``(N, C, *spatial)`` for a convolution. On any other input the
    fused layer computes something else than the BatchNorm and the layer did (a Linear on ``(N, L, C)``: the
    BatchNorm normalised the L positions, the fold scales the C features; a Conv1d on an unbatched ``(C, L)``: a
    BatchNorm1d took it as a batch of C rows of L features), so it raises instead. This is why the conv folds are
    checked too: convolutions take unbatched input and BatchNorm1d, SyncBatchNorm and FrozenBatchNorm2d accept
    inputs of more than one rank.

    The classes are subclasses of the torch layers, so Zennit's rules (which match types with ``isinstance``) and
    this package's Captum rules treat them as those layers; Captum's own :py:class:`captum.attr.LRP`, which looks
    rules up by exact type, needs a ``rule`` set on them.

    Attributes
    ----------
    folded_layer_name: str
        The layer's name in its model (empty if not known).
    folded_batch_norms: tuple[str, ...]
        Names of the BatchNorms folded into the layer.
    batch_norm_stand_ins: tuple[tuple[str, :py:obj:`torch.nn.Module`], ...]
        For each of those that normalises by each batch's statistics in training mode (not a frozen one), its name and
        the module left in its place (an ``Identity`` or a :py:class:`ThresholdReLU`), whose training flag follows
        ``model.train()`` and ``.eval()`` as the BatchNorm's would: where one is in training mode, the layer raises
        :py:class:`FoldedTrainingError`, as it cannot compute what the BatchNorm would.
    '''
    folded_layer_name = ''
    folded_batch_norms = ()
    batch_norm_stand_ins = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.base_name = next(kind for kind in FOLDABLE_LAYER_TYPES if issubclass(cls, kind)).__name__

    def forward(self, input):
        '''Run the layer on ``input`` after checking its rank (see the class docstring).

        Raises
        ------
        FoldedInputError
            If ``input.ndim`` is not ``weight.ndim``; the message names the layer, its BatchNorms and what to do.
        FoldedTrainingError
            If a BatchNorm folded into it is in training mode (its stand-in is) and not frozen.
        '''
        training = [name for name, stand_in in self.batch_norm_stand_ins if stand_in.training]
        if training:
            raise FoldedTrainingError(
                f'`{self.folded_layer_name or self.base_name}` ({self.base_name}) has BatchNorm '
                f'{", ".join(f"`{name}`" for name in training)} folded into it, which is in training mode, where it '
                'normalises by each batch\'s statistics; the folded layer holds the running statistics only, so it '
                'cannot compute what the model does. Call .eval() on the BatchNorms, or train the model itself '
                '(leave the FuseBatchNorm context first, or train the original rather than the fused copy).')
        check_folded_input(input, self.weight.ndim, self.base_name, self.folded_layer_name, self.folded_batch_norms)
        return super().forward(input)


def check_folded_input(input, rank, kind, layer, batch_norms):
    '''Raise unless ``input`` has the rank a layer with folded BatchNorms needs (see :py:class:`FoldedLayerMixin`).

    torch.fx keeps this call in the graph of a traced fused model (it is wrapped with :py:func:`torch.fx.wrap`), so
    the check also runs there.

    Parameters
    ----------
    input: :py:obj:`torch.Tensor`
        The layer's input.
    rank: int
        The rank it must have, the layer weight's.
    kind: str
        The layer's torch type name (``'Linear'``, ``'Conv2d'``, ...).
    layer: str
        The layer's name in its model.
    batch_norms: tuple[str, ...]
        The BatchNorms folded into it.

    Raises
    ------
    FoldedInputError
        If ``input.ndim != rank``; the message names the layer and its BatchNorms and says what to do.
    '''
    if input.ndim == rank:
        return
    layout = '(N, features)' if kind == 'Linear' else '(N, C, *spatial)'
    names = ', '.join(f'`{name}`' for name in batch_norms) or 'a'
    raise FoldedInputError(
        f'`{layer or kind}` ({kind}) has BatchNorm {names} folded into it, which is exact only for {rank}-D inputs '
        f'{layout} with the batch on dim 0 and the features on dim 1; it was called with an input of shape '
        f'{tuple(input.shape)}, on which the BatchNorm acted on another dim than the layer. Explain this model '
        'without fusing (handling=\'unfused\', or without FuseBatchNorm), or pass example_inputs of this shape to '
        'fuse()/FuseBatchNorm/FusedLRP/CompositeLRP, which then leave such folds unfused.',
        layer, tuple(input.shape))


torch.fx.wrap('check_folded_input')


class BiasMapConvMixin:
    '''Convolution whose bias depends on the output position: ``conv(x, weight) + bias[c, *position]``.

    This is the exact fold of a BatchNorm into the zero-padded convolution after it: taps that fall on the padding
    read 0 instead of the BatchNorm's shift, so the bias near the border differs from the interior. The bias map is
    ``base_bias + conv(ones, border_kernel)`` with this layer's stride, padding, dilation and groups. It is computed
    once per input size and held as the Parameter ``bias`` of shape ``(C_out, *output_size)``, so every LRP rule
    (Zennit's parameter modifiers, Captum's rules) treats it like an ordinary bias.

    The bias map is derived state: it is left out of the ``state_dict`` (whose keys are therefore the same before
    and after the first forward), and loading a ``state_dict`` drops it, so the next forward rebuilds it from the
    loaded buffers (this also undoes a rule that changed it in place and then restored the model with
    ``load_state_dict``, as Captum's LRP does). ``bias`` is None until the first forward and after a load.

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

    def drop_bias_map(self):
        '''Forget the bias map; the next forward builds it again.'''
        self.bias = None
        self.bias_map_input_size = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + 'bias', None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.drop_bias_map()
        # a ``bias`` entry (saved before the map was kept out of the state_dict) is derived state too
        state_dict.pop(prefix + 'bias', None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FoldedLinear(FoldedLayerMixin, torch.nn.Linear):
    '''Linear with BatchNorms folded into it; see :py:class:`FoldedLayerMixin`.'''


class FoldedConv1d(FoldedLayerMixin, torch.nn.Conv1d):
    '''Conv1d with BatchNorms folded into it; see :py:class:`FoldedLayerMixin`.'''


class FoldedConv2d(FoldedLayerMixin, torch.nn.Conv2d):
    '''Conv2d with BatchNorms folded into it; see :py:class:`FoldedLayerMixin`.'''


class FoldedConv3d(FoldedLayerMixin, torch.nn.Conv3d):
    '''Conv3d with BatchNorms folded into it; see :py:class:`FoldedLayerMixin`.'''


class FoldedConvTranspose1d(FoldedLayerMixin, torch.nn.ConvTranspose1d):
    '''ConvTranspose1d with BatchNorms folded into it; see :py:class:`FoldedLayerMixin`.'''


class FoldedConvTranspose2d(FoldedLayerMixin, torch.nn.ConvTranspose2d):
    '''ConvTranspose2d with BatchNorms folded into it; see :py:class:`FoldedLayerMixin`.'''


class FoldedConvTranspose3d(FoldedLayerMixin, torch.nn.ConvTranspose3d):
    '''ConvTranspose3d with BatchNorms folded into it; see :py:class:`FoldedLayerMixin`.'''


class BiasMapConv1d(FoldedLayerMixin, BiasMapConvMixin, torch.nn.Conv1d):
    '''Conv1d with a position-dependent bias; see :py:class:`BiasMapConvMixin` and :py:class:`FoldedLayerMixin`.'''


class BiasMapConv2d(FoldedLayerMixin, BiasMapConvMixin, torch.nn.Conv2d):
    '''Conv2d with a position-dependent bias; see :py:class:`BiasMapConvMixin` and :py:class:`FoldedLayerMixin`.'''


class BiasMapConv3d(FoldedLayerMixin, BiasMapConvMixin, torch.nn.Conv3d):
    '''Conv3d with a position-dependent bias; see :py:class:`BiasMapConvMixin` and :py:class:`FoldedLayerMixin`.'''


FOLDED_TYPES = {
    torch.nn.Linear: FoldedLinear,
    torch.nn.Conv1d: FoldedConv1d,
    torch.nn.Conv2d: FoldedConv2d,
    torch.nn.Conv3d: FoldedConv3d,
    torch.nn.ConvTranspose1d: FoldedConvTranspose1d,
    torch.nn.ConvTranspose2d: FoldedConvTranspose2d,
    torch.nn.ConvTranspose3d: FoldedConvTranspose3d,
}
BIAS_MAP_TYPES = {
    torch.nn.Conv1d: BiasMapConv1d,
    torch.nn.Conv2d: BiasMapConv2d,
    torch.nn.Conv3d: BiasMapConv3d,
}


class ThresholdReLU(torch.nn.Module):
    '''Per-channel thresholded ReLU ``relu(sign_c * x_c + threshold_c)`` over channel dim 1.

    This is what remains of ``BatchNorm -> ReLU`` once the BatchNorm's scale magnitude has moved into the next layer
    (see :py:func:`zennit_bnfuse.fold.relu_fold`). The threshold is the BatchNorm's shift ``t / |s|``: a bias, so LRP
    must treat this module as a per-channel affine map with a bias followed by a ReLU, not as a plain activation.
    Passing relevance through it unchanged (what Zennit's composites do with activations) would ignore the shift and
    the sign, and divide by layer outputs near zero further down: relevance sums of 1e17 times the logit on DenseNet-121
    under Captum's epsilon.

    So it is deliberately *not* a :py:class:`torch.nn.ReLU` subclass, and gets the epsilon rule: from
    :py:class:`~zennit_bnfuse.FusedLRP` and :py:class:`~zennit_bnfuse.CompositeLRP` (as the BatchNorms they keep,
    ``batch_norm_rule``), and from the :py:class:`~zennit_bnfuse.FuseBatchNorm` canonizer, which registers its
    ``threshold_rule`` on every ThresholdReLU it puts in place. Under LRP-epsilon its input gets
    ``sign * x / (sign * x + threshold)`` of the output's relevance, exactly what an unfused BatchNorm under
    LRP-epsilon gives. With :py:func:`~zennit_bnfuse.fuse` and your own Zennit composite, map it yourself, e.g.
    ``LayerMapComposite([(ThresholdReLU, Epsilon())])`` in a :py:class:`zennit.composites.MixedComposite`.

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
        # clamp saves its input for backward, not its output, so an in-place ReLU after this one (DenseNet's
        # F.relu(inplace=True)) keeps autograd intact
        return self.pre_activation(input).clamp(min=0)

    def pre_activation(self, input):
        '''``sign * input + threshold`` per channel (dim 1), what the ReLU of :py:meth:`forward` gets.'''
        shape = (1, -1) + (1,) * (input.ndim - 2)
        return input * self.sign.reshape(shape) + self.threshold.reshape(shape)

    def extra_repr(self):
        return f'{self.sign.numel()}'


def layer_kind_problem(layer):
    '''Why a BatchNorm cannot be folded into ``layer`` because of what kind of layer it is, or None.

    Folds go into Linear, Conv and ConvTranspose layers of the exact torch types, and into timm's conv variants whose
    forward is a plain convolution or linear map with a weight computed from their parameters (see
    :py:mod:`zennit_bnfuse.timm_layers`). Other subclasses are refused: their forward may differ from their base.

    Parameters
    ----------
    layer: :py:obj:`torch.nn.Module`

    Returns
    -------
    str or None
        The reason, phrased to follow the layer's name (``'is not a conv/linear layer'``).
    '''
    if type(layer) in FOLDABLE_LAYER_TYPES:
        return None
    extension = timm_layers()
    if extension is not None:
        if type(layer) in extension.REFUSED_LAYER_REASONS:
            return f'is a {type(layer).__name__}, which {extension.REFUSED_LAYER_REASONS[type(layer)]}'
        if type(layer) in extension.FOLDABLE_VARIANT_TYPES:
            return None
    if isinstance(layer, FOLDABLE_LAYER_TYPES) and parametrize.is_parametrized(layer):
        return (f'is a {type(layer).__name__}, whose weight torch.nn.utils.parametrize computes in every forward '
                '(FusedLRP and CompositeLRP fold into a copy holding its current weight; for fuse(), remove the '
                'parametrization first, though not with remove_parametrizations on a deep copy of a model still in '
                'use: the copy shares its class, and removing it there breaks the original)')
    if isinstance(layer, FOLDABLE_LAYER_TYPES):
        return f'is a {type(layer).__name__}, a subclass whose forward may differ from its base'
    return 'is not a conv/linear layer'


def is_layer_like(module):
    '''Whether ``module`` is a Linear/Conv/ConvTranspose (any subclass) or a layer timm builds in their place, i.e.
    a layer a fold would go into if :py:func:`layer_kind_problem` allows it.'''
    extension = timm_layers()
    return isinstance(module, FOLDABLE_LAYER_TYPES) or (
        extension is not None and type(module) in extension.REFUSED_LAYER_REASONS)


def effective_layer(layer):
    '''``layer``'s forward as ``(weight, empty layer)``: the float64 weight it computes with, and a new layer without
    weight or bias, of a type whose forward uses its weight as it is, with ``layer``'s geometry and no hooks.

    Weight-standardised convolutions (timm) become a plain convolution with their standardised weight; every other
    foldable layer keeps its own type.
    '''
    extension = timm_layers()
    if extension is not None and type(layer) in extension.STANDARDIZED_CONV_TYPES:
        return extension.standardized_weight(layer), extension.plain_conv(layer)
    return layer.weight.detach().double(), detached_copy(layer)


def folded_type(layer):
    '''The :py:class:`FoldedLayerMixin` class for a layer of ``layer``'s type.'''
    extension = timm_layers()
    if extension is not None and type(layer) in extension.FOLDED_TYPES:
        return extension.FOLDED_TYPES[type(layer)]
    return FOLDED_TYPES[type(layer)]


def bias_map_type(layer):
    '''The :py:class:`BiasMapConvMixin` class (a :py:class:`FoldedLayerMixin` one) for a conv of ``layer``'s
    type.'''
    extension = timm_layers()
    if extension is not None and type(layer) in extension.BIAS_MAP_TYPES:
        return extension.BIAS_MAP_TYPES[type(layer)]
    return BIAS_MAP_TYPES[type(layer)]


def needs_bias_map(layer):
    '''Whether a shift folded into the input of ``layer`` needs a position-dependent bias (zero-padded conv).'''
    if not isinstance(layer, torch.nn.modules.conv._ConvNd) or layer.padding_mode != 'zeros':
        return False
    extension = timm_layers()
    if extension is not None and extension.has_dynamic_padding(layer):
        return True
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


def folded_layer(layer, before=None, after=None, name='', batch_norms=()):
    '''Build the fused replacement of ``layer`` with BatchNorms or scales folded into its input and output.

    The fold is computed in float64 and cast to the layer's dtype and device; ``layer`` is not changed.

    Parameters
    ----------
    layer: :py:obj:`torch.nn.Module`
        A Linear, Conv or ConvTranspose module (exact torch types) or one of timm's variants that
        :py:func:`layer_kind_problem` accepts.
    before: tuple[:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`] or None
        ``(scale, shift)`` per input feature of ``layer`` (float64) applied before it, or None.
    after: :py:obj:`torch.nn.Module` or None
        A BatchNorm applied to the output of ``layer`` (or the part of one, see
        :py:func:`zennit_bnfuse.fold.channel_range`), or None.
    name: str, optional
        The layer's name in its model, for error messages.
    batch_norms: tuple[str, ...], optional
        The names of the BatchNorms folded into it, for error messages.

    Returns
    -------
    :py:obj:`torch.nn.Module`
        The fused layer, a :py:class:`FoldedLayerMixin` subclass of the type of ``layer`` (a
        :py:class:`BiasMapConvMixin` one where a shift meets zero padding); for timm's weight-standardised
        convolutions, of the plain convolution type, and without a fold (``before`` and ``after`` None) the plain
        convolution itself.

    Raises
    ------
    TypeError
        If a shift is folded into the input of a transposed convolution.
    '''
    transposed = getattr(layer, 'transposed', False)
    groups = getattr(layer, 'groups', 1)
    weight, new = effective_layer(layer)
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
        if not needs_bias_map(new) or not bool(shift.any()):
            border_kernel = None

    dtype = layer.weight.dtype
    requires_grad = layer.weight.requires_grad
    # copies: in float64, ``.double()`` and ``.to(dtype)`` return the layer's own tensors (its bias, where only a
    # BatchNorm before it folds), which the fused layer must not share
    new.weight = torch.nn.Parameter(weight.to(dtype, copy=True), requires_grad)
    if border_kernel is None:
        if before is not None or after is not None:
            new.__class__ = folded_type(new)
            new.folded_layer_name = name
            new.folded_batch_norms = tuple(batch_norms)
        new.bias = None if bias is None else torch.nn.Parameter(bias.to(dtype, copy=True), requires_grad)
        return new

    new.__class__ = bias_map_type(new)
    new.folded_layer_name = name
    new.folded_batch_norms = tuple(batch_norms)
    new.bias = None
    if base_bias is None:
        base_bias = torch.zeros_like(bias)
    new.register_buffer('border_kernel', border_kernel.to(dtype, copy=True))
    new.register_buffer('base_bias', base_bias.to(dtype, copy=True))
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
