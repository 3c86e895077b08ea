'''The modules and functions :py:func:`zennit_bnfuse.graph.lrp_graph` puts in place of functional ops.

- :py:class:`AddOperands`: a residual ``a + b`` as a module, for :py:class:`~zennit_bnfuse.SinglePass`.
- :py:class:`SumReduction` and :py:class:`MeanReduction`: ``x.sum(dims)``/``x.mean(dims)`` as modules. Both are
  subclasses of Zennit's :py:class:`zennit.layer.Sum`, which Zennit's composites give the ``Norm`` rule (LRP-epsilon
  without a bias: each input gets its share of the sum); ``FusedLRP`` gives them Captum's ``EpsilonRule``.
- :py:func:`scale_passing_relevance`: ``signal * factor`` where the factor is a constant or a gate; relevance passes
  to the signal unchanged and none to the factor (what LRP-epsilon gives a product with a constant factor).
- :py:func:`split_norm_act`: timm's BatchNorm + activation modules as a plain BatchNorm followed by their drop and
  activation modules, so that each part gets its own rule.
'''
import functools
import operator

import torch
from torchvision.ops.misc import FrozenBatchNorm2d
from zennit.layer import Sum

from .fold import FOLDABLE_BATCH_NORM_TYPES, timm_layers


class AddOperands(Sum):
    '''The sum of its inputs, broadcast against each other: ``a + b``, as a module of its own.

    This is what a residual addition becomes in the LRP graph that :py:class:`~zennit_bnfuse.SinglePass` computes
    (``lrp_graph(..., residual='operands')``). It subclasses Zennit's :py:class:`~zennit.layer.Sum`, so Zennit's
    composites give it their rule for sums (``Norm``), and SinglePass computes that rule exactly as Zennit computes it
    on ``Sum()(torch.stack(torch.broadcast_tensors(a, b), dim=-1))``, without stacking. Zennit's own hooks take one
    input per module; use the stacked form with them.
    '''
    def __init__(self):
        super().__init__(dim=-1)

    def forward(self, *operands):
        '''Add the operands (broadcasting as ``+`` does).'''
        return functools.reduce(operator.add, operands)


class SumReduction(Sum):
    '''``torch.sum(input, dim, keepdim)`` as a module.

    Parameters
    ----------
    dim: int, tuple[int, ...] or None
        The dims to sum over; None sums over all.
    keepdim: bool
        Whether the summed dims are kept with size 1.
    '''
    reduce = staticmethod(torch.sum)

    def __init__(self, dim=None, keepdim=False):
        super().__init__(dim=tuple(dim) if isinstance(dim, list) else dim)
        self.keepdim = keepdim

    def forward(self, input):
        '''The reduction of ``input`` over ``dim``.'''
        if self.dim is None and not self.keepdim:
            return self.reduce(input)
        return self.reduce(input, dim=self.dim, keepdim=self.keepdim)

    def extra_repr(self):
        return f'dim={self.dim}, keepdim={self.keepdim}'


class MeanReduction(SumReduction):
    '''``torch.mean(input, dim, keepdim)`` as a module: a sum scaled by a constant, so LRP treats it like
    :py:class:`SumReduction` (the same relevance shares; a global average pooling).'''
    reduce = staticmethod(torch.mean)


class _ScalePassingRelevance(torch.autograd.Function):
    '''``signal * factor`` (or ``signal / factor``) whose backward hands the incoming relevance to ``signal``
    unchanged (summed over dims the signal was broadcast along) and zeros to a tensor ``factor`` (zeros rather than
    None: Captum's hooks in the factor's branch expect a tensor).'''
    @staticmethod
    def forward(ctx, signal, factor, divide):
        ctx.signal_shape = signal.shape
        ctx.factor_shape = factor.shape if isinstance(factor, torch.Tensor) else None
        return signal / factor if divide else signal * factor

    @staticmethod
    def backward(ctx, grad_output):
        factor = grad_output.new_zeros(ctx.factor_shape) if ctx.needs_input_grad[1] else None
        return grad_output.sum_to_size(ctx.signal_shape), factor, None


def scale_passing_relevance(signal, factor, divide=False):
    '''``signal * factor`` (``signal / factor`` if ``divide``), with the relevance of the result passed to ``signal``
    unchanged and none (zeros) to ``factor``.

    This is LRP's rule for a product whose factor is not a layer input: LRP-epsilon with a vanishing epsilon on
    ``x -> c * x`` for a constant ``c`` gives ``x * c * R / (c * x) = R``; for a gate computed from the input (a
    squeeze-and-excitation block's ``x * sigmoid(...)``) it is the "signal takes all" rule of Arras et al. (2017),
    the same as treating the gate as a constant. The backward pass computes this relevance, not the gradient, so the
    function belongs in an LRP-prepared model only.

    Parameters
    ----------
    signal: :py:obj:`torch.Tensor`
        The tensor that receives the relevance.
    factor: :py:obj:`torch.Tensor` or float
        The constant or gate; broadcast against ``signal``.
    divide: bool
        Divide by ``factor`` instead of multiplying.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``signal * factor`` (or ``signal / factor``), broadcast.
    '''
    return _ScalePassingRelevance.apply(signal, factor, divide)


def norm_act_tail(module):
    '''The ``(name, module)`` pairs timm's norm-act layer ``module`` applies after normalising, or None where it is
    not exactly one of the norm-act types the engine knows or applies something that is not a module (see
    :py:func:`zennit_bnfuse.timm_layers.norm_act_tail`; always None without timm: a model cannot hold them then).'''
    extension = timm_layers()
    if extension is None or extension.norm_act_tail(module) is None or extension.norm_act_problem(module):
        return None
    return extension.norm_act_tail(module)


def is_norm_act(module):
    '''Whether ``module`` is one of timm's BatchNorm + drop + activation layers that LRP sees split in parts.'''
    return norm_act_tail(module) is not None


def plain_batch_norm(module):
    '''The BatchNorm part of a timm norm-act ``module``: a torch BatchNorm (or torchvision's FrozenBatchNorm2d for
    timm's FrozenBatchNormAct2d) that shares ``module``'s parameters and buffers.'''
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        base = next(cls for cls in type(module).__mro__ if cls in FOLDABLE_BATCH_NORM_TYPES)
        norm = base(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                    track_running_stats=module.track_running_stats)
    else:
        norm = FrozenBatchNorm2d(module.running_mean.shape[0], eps=module.eps)
    for name, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
        setattr(norm, name, tensor)
    return norm.train(module.training)


def split_norm_act(module):
    '''The parts timm's norm-act ``module`` applies one after the other.

    Parameters
    ----------
    module: :py:obj:`torch.nn.Module`
        A norm-act layer (:py:func:`is_norm_act`).

    Returns
    -------
    tuple[:py:obj:`torch.nn.Module`, list[str]]
        The plain BatchNorm, holding ``module``'s children under their names (``drop``, ``act``), and the names of
        the children to call after it, in order (identities left out).
    '''
    norm = plain_batch_norm(module)
    parts = []
    for name, child in norm_act_tail(module):
        norm.add_module(name, child)
        if type(child) is not torch.nn.Identity:
            parts.append(name)
    return norm, parts
