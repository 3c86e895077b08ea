'''Faithfulness metrics for attributions: region perturbation (pixel flipping) curves, AOPC, the area between the
LeRF and MoRF curves, relevance conservation, and confidence intervals.

All functions work on batches and on any device; the perturbation curves of all steps are evaluated as one batch of
perturbed inputs (in chunks of ``batch_size``).
'''
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


ORDERS = ('morf', 'lerf')


def patch_relevance(relevance, patch_size):
    '''Sum relevance over channels and non-overlapping ``patch_size`` x ``patch_size`` patches.

    Parameters
    ----------
    relevance: :py:obj:`torch.Tensor`
        Shape ``(N, C, H, W)``; ``H`` and ``W`` must be multiples of ``patch_size``.
    patch_size: int

    Returns
    -------
    :py:obj:`torch.Tensor`
        Shape ``(N, H // patch_size * W // patch_size)``, patches in row-major order.

    Raises
    ------
    ValueError
        If the image size is not a multiple of ``patch_size``.
    '''
    height, width = relevance.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f'image size {height}x{width} is not a multiple of the patch size {patch_size}')
    summed = F.avg_pool2d(relevance.sum(dim=1, keepdim=True), patch_size) * patch_size ** 2
    return summed.flatten(start_dim=1)


def perturbation_masks(relevance, order='morf', patch_size=1, patches_per_step=1, steps=None):
    '''Which pixels are perturbed after each step, most (MoRF) or least (LeRF) relevant patches first.

    Parameters
    ----------
    relevance: :py:obj:`torch.Tensor`
        ``(N, C, H, W)``.
    order: str
        ``'morf'`` or ``'lerf'``.
    patch_size, patches_per_step: int
        Patch side length, and patches removed per step.
    steps: int, optional
        Number of steps; default: until every patch is removed.

    Returns
    -------
    :py:obj:`torch.Tensor`
        Boolean ``(N, steps + 1, 1, H, W)``; step 0 perturbs nothing.
    '''
    if order not in ORDERS:
        raise ValueError(f'order must be one of {ORDERS}, not {order!r}')
    scores = patch_relevance(relevance, patch_size)
    count, patches = scores.shape
    steps = math.ceil(patches / patches_per_step) if steps is None else steps
    ranking = scores.argsort(dim=1, descending=(order == 'morf'), stable=True)
    rank = torch.empty_like(ranking)
    rank.scatter_(1, ranking, torch.arange(patches, device=scores.device).expand(count, patches))
    removed = torch.arange(steps + 1, device=scores.device)[:, None] * patches_per_step
    masks = rank[:, None, :] < removed[None, :, :]
    height, width = relevance.shape[-2:]
    masks = masks.reshape(count, steps + 1, 1, height // patch_size, width // patch_size)
    return masks.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)


def perturbation_baseline(inputs, baseline=0., noise_range=(0., 1.), seeds=None):
    '''The values that replace perturbed pixels: a constant, or uniform noise fixed per image.

    Parameters
    ----------
    inputs: :py:obj:`torch.Tensor`
        ``(N, C, H, W)``.
    baseline: float or str
        A constant, or ``'noise'``.
    noise_range: tuple[float, float]
        Range of the uniform noise.
    seeds: sequence of int, optional
        One seed per image for the noise, so an image gets the same noise however the data is batched or sharded;
        default ``0 .. N - 1``.

    Returns
    -------
    :py:obj:`torch.Tensor`
        Broadcastable against ``inputs``.
    '''
    if baseline != 'noise':
        if not isinstance(baseline, (int, float)):
            raise ValueError(f'baseline must be a number or \'noise\', not {baseline!r}')
        return torch.full((1,) * inputs.ndim, float(baseline), dtype=inputs.dtype, device=inputs.device)
    seeds = range(len(inputs)) if seeds is None else seeds
    low, high = noise_range
    noise = torch.stack([
        torch.rand(inputs.shape[1:], generator=torch.Generator().manual_seed(int(seed)), dtype=inputs.dtype)
        for seed in seeds
    ])
    return (noise * (high - low) + low).to(inputs.device)


def target_scores(model, inputs, targets, output='logit'):
    '''The model's ``output`` (``'logit'`` or ``'probability'``) for each example's target class.'''
    with torch.no_grad():
        logits = model(inputs)
    if output == 'probability':
        logits = logits.softmax(dim=1)
    elif output != 'logit':
        raise ValueError(f'output must be \'logit\' or \'probability\', not {output!r}')
    return logits.gather(1, targets[:, None])[:, 0]


def perturbation_curve(model, inputs, relevance, targets, order='morf', patch_size=1, patches_per_step=1,
                       steps=None, baseline=0., noise_range=(0., 1.), seeds=None, output='logit', batch_size=512):
    '''Region perturbation (pixel flipping for ``patch_size=1``): the target score after each step.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The classifier, in eval mode.
    inputs, relevance: :py:obj:`torch.Tensor`
        ``(N, C, H, W)`` each.
    targets: :py:obj:`torch.Tensor`
        ``(N,)`` class indices.
    order, patch_size, patches_per_step, steps:
        See :py:func:`perturbation_masks`.
    baseline, noise_range, seeds:
        See :py:func:`perturbation_baseline`.
    output: str
        ``'logit'`` or ``'probability'``.
    batch_size: int
        Perturbed inputs evaluated per forward pass.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N, steps + 1)``: the score of the unperturbed input, then after each step.
    '''
    masks = perturbation_masks(relevance, order, patch_size, patches_per_step, steps)
    values = perturbation_baseline(inputs, baseline, noise_range, seeds)
    count, points = masks.shape[:2]
    flat_masks = masks.flatten(end_dim=1)
    image = torch.arange(count, device=inputs.device).repeat_interleave(points)
    scores = []
    for start in range(0, count * points, batch_size):
        index = image[start:start + batch_size]
        values_chunk = values if values.shape[0] == 1 else values[index]
        perturbed = torch.where(flat_masks[start:start + batch_size], values_chunk, inputs[index])
        scores.append(target_scores(model, perturbed, targets[index], output))
    return torch.cat(scores).reshape(count, points)


def aopc(curve):
    '''Area over the perturbation curve: the mean drop ``f(x_0) - f(x_k)`` over steps ``k = 0 .. K``.

    Parameters
    ----------
    curve: :py:obj:`torch.Tensor`
        ``(N, K + 1)`` from :py:func:`perturbation_curve`.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N,)``.
    '''
    return (curve[:, :1] - curve).mean(dim=1)


@dataclass
class PerturbationResult:
    '''MoRF and LeRF perturbation curves and their summaries, per example.

    Attributes
    ----------
    morf, lerf: :py:obj:`torch.Tensor`
        ``(N, K + 1)`` curves.
    '''
    morf: torch.Tensor
    lerf: torch.Tensor

    @property
    def aopc_morf(self):
        '''AOPC of the MoRF curve, ``(N,)``: higher means the most relevant regions matter more.'''
        return aopc(self.morf)

    @property
    def aopc_lerf(self):
        '''AOPC of the LeRF curve, ``(N,)``: lower means the least relevant regions matter less.'''
        return aopc(self.lerf)

    @property
    def abpc(self):
        '''Area between the LeRF and MoRF curves, ``(N,)``: the mean of ``lerf - morf`` over steps.'''
        return (self.lerf - self.morf).mean(dim=1)


def region_perturbation(model, inputs, relevance, targets, **kwargs):
    '''MoRF and LeRF perturbation curves of the same inputs and relevance.

    Parameters
    ----------
    model, inputs, relevance, targets, kwargs:
        As for :py:func:`perturbation_curve` (without ``order``).

    Returns
    -------
    :py:class:`PerturbationResult`
    '''
    return PerturbationResult(
        morf=perturbation_curve(model, inputs, relevance, targets, order='morf', **kwargs),
        lerf=perturbation_curve(model, inputs, relevance, targets, order='lerf', **kwargs),
    )


def conservation_error(relevance, output):
    '''Relative relevance conservation error per example: ``(sum(relevance) - output) / |output|``.

    Parameters
    ----------
    relevance: :py:obj:`torch.Tensor`
        ``(N, ...)``.
    output: :py:obj:`torch.Tensor`
        ``(N,)``: the explained logit.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N,)``; 0 for perfect conservation.
    '''
    return (relevance.flatten(start_dim=1).sum(dim=1) - output) / output.abs().clamp(min=torch.finfo(output.dtype).tiny)


def mean_ci(values, confidence=.95):
    '''Mean and normal-approximation confidence interval half-width of a sample.

    Parameters
    ----------
    values: :py:obj:`torch.Tensor`
        ``(N,)`` with ``N >= 2``.
    confidence: float

    Returns
    -------
    tuple[float, float]
        ``(mean, half_width)``.
    '''
    values = values.double()
    quantile = torch.distributions.Normal(0., 1.).icdf(torch.tensor(.5 + confidence / 2)).item()
    return values.mean().item(), quantile * values.std().item() / math.sqrt(len(values))
