'''Regimes of the study: models changed so that their BatchNorms meet LRP differently while their function stays.

Negative BatchNorm scales, without changing the function (:py:func:`flip_batch_norm_signs`): for a BatchNorm that
directly follows the layer producing its input (conv or linear, whose output feeds only this BatchNorm), negate for a
channel ``c`` the layer's weights and bias of output channel ``c``, the BatchNorm's ``running_mean[c]`` and its
``weight[c]``. The layer then outputs ``-z`` and the BatchNorm computes

    ``(-z - (-mu)) / sqrt(var + eps) * (-gamma) + beta = (z - mu) / sqrt(var + eps) * gamma + beta``,

the same value as before (exactly in floating point: negation only flips sign bits). The fused layer is the same
too: its weight ``W gamma / s`` and bias ``(b - mu) gamma / s + beta`` have both signs flipped in each product. So
fused LRP gives the same relevance, while naive LRP (relevance passes the BatchNorm) and unfused LRP (the BatchNorm
under LRP-epsilon) now see a layer with negated weights in that channel: rules that treat positive and negative
weights differently (z+, alpha-beta, gamma) give different relevance; LRP-epsilon does not (``-w x / -z = w x / z``).
'''
import copy
from dataclasses import dataclass, field

import torch

from ..fold import output_channels_first, output_channels_last
from ..pairs import TRANSPOSED_TYPES, find_fusable_pairs


@dataclass
class SignFlip:
    '''A copy of a model with negated BatchNorm scales, and what was negated.

    Attributes
    ----------
    model: :py:obj:`torch.nn.Module`
        The changed copy; it computes the same function as the original.
    flipped: dict[str, :py:obj:`torch.Tensor`]
        BatchNorm name -> sorted indices of its negated channels.
    producers: dict[str, str]
        BatchNorm name -> name of the layer whose output channels were negated with it.
    skipped: dict[str, str]
        BatchNorm name -> why it was left unchanged.
    '''
    model: torch.nn.Module
    flipped: dict = field(default_factory=dict)
    producers: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    def negative_share(self):
        '''The share of negative BatchNorm weights (scales) over all channels of the flipped BatchNorms.'''
        modules = dict(self.model.named_modules())
        weights = [modules[name].weight.detach().flatten() for name in self.flipped]
        if not weights:
            return float('nan')
        return float((torch.cat(weights) < 0).double().mean())


def relative_output_difference(model, other, inputs, batch_size=256):
    '''How far two models' outputs are apart: the largest ``max_k |a_k - b_k| / max_k |a_k|`` over the images.

    The check that a :py:func:`flip_batch_norm_signs` copy computes the same function, on the images it is used on.

    Parameters
    ----------
    model, other: :py:obj:`torch.nn.Module`
        In eval mode; ``model`` gives the reference outputs ``a``.
    inputs: :py:obj:`torch.Tensor`
        ``(N, ...)``.
    batch_size: int

    Returns
    -------
    float
    '''
    worst = 0.
    with torch.no_grad():
        for batch in inputs.split(batch_size):
            reference, compared = model(batch).flatten(start_dim=1), other(batch).flatten(start_dim=1)
            scale = reference.abs().amax(dim=1).clamp(min=torch.finfo(reference.dtype).tiny)
            worst = max(worst, ((reference - compared).abs().amax(dim=1) / scale).max().item())
    return worst


def negate_output_channels(layer, sign):
    '''Multiply the output channels of a conv/linear ``layer`` (in place) by ``sign`` (+1 or -1 per channel).

    Parameters
    ----------
    layer: :py:obj:`torch.nn.Module`
        Linear, Conv or ConvTranspose (any dimension, any groups).
    sign: :py:obj:`torch.Tensor`
        ``(C_out,)`` of +1 and -1.
    '''
    transposed = isinstance(layer, TRANSPOSED_TYPES)
    groups = getattr(layer, 'groups', 1)
    with torch.no_grad():
        weight = output_channels_first(layer.weight, transposed, groups)
        weight = weight * sign.to(weight).reshape(-1, *(1,) * (weight.ndim - 1))
        layer.weight.copy_(output_channels_last(weight, transposed, groups))
        if layer.bias is not None:
            layer.bias.mul_(sign.to(layer.bias))


def flip_batch_norm_signs(model, share=.5, seed=0):
    '''A copy of ``model`` that computes the same function with negative scales in ``share`` of the channels of
    every BatchNorm that directly follows the layer producing its input.

    For each such BatchNorm with ``C`` channels, ``round(share * C)`` channels drawn at random (one
    ``torch.Generator`` seeded with ``seed``, BatchNorms in forward order) are negated as the module docstring
    derives. A BatchNorm is skipped, with the reason, where no conv/linear layer produces its input for it alone (it
    follows a residual addition, a ReLU, or a layer whose output also feeds something else), where it has no affine
    weight, or where it cannot be folded at all (training mode raises instead). The pairs are those that
    :py:func:`zennit_bnfuse.pairs.find_fusable_pairs` folds on the ``'after'`` side.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        In eval mode; it is not changed.
    share: float
        In [0, 1]: the share of each BatchNorm's channels to negate.
    seed: int
        Which channels.

    Returns
    -------
    :py:class:`SignFlip`

    Raises
    ------
    ValueError
        If ``share`` is outside [0, 1] or a BatchNorm is in training mode.
    '''
    if not 0 <= share <= 1:
        raise ValueError(f'share must lie in [0, 1], not {share!r}')
    report = find_fusable_pairs(model)
    result = SignFlip(copy.deepcopy(model))
    modules = dict(result.model.named_modules())
    generator = torch.Generator().manual_seed(seed)
    for entry in report.unfused:
        result.skipped[entry.bn] = f'it cannot be folded: {entry.reason}'
    for entry in report.fused:
        batch_norm = modules[entry.bn]
        if entry.side != 'after':
            result.skipped[entry.bn] = (
                f'no conv/linear layer produces its input for it alone (it folds into `{entry.layer}` after it)')
            continue
        if getattr(batch_norm, 'weight', None) is None:
            result.skipped[entry.bn] = 'it has no affine weight to negate'
            continue
        channels = batch_norm.running_mean.numel()
        chosen = torch.randperm(channels, generator=generator)[:round(share * channels)].sort().values
        sign = torch.ones(channels, dtype=torch.float64)
        sign[chosen] = -1
        negate_output_channels(modules[entry.layer], sign)
        with torch.no_grad():
            batch_norm.running_mean.mul_(sign.to(batch_norm.running_mean))
            batch_norm.weight.mul_(sign.to(batch_norm.weight))
        result.flipped[entry.bn] = chosen
        result.producers[entry.bn] = entry.layer
    order = list(modules)
    result.skipped = dict(sorted(result.skipped.items(), key=lambda item: order.index(item[0])))
    return result
