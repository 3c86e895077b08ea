'''Explaining a batch of images under several BatchNorm handlings, and summarising their faithfulness.'''
import torch
from tqdm.auto import tqdm

from ..attribution import CompositeLRP
from ..handling import HANDLINGS
from .composites import batch_norm_rule, make_composite
from .metrics import mean_ci, region_perturbation


def predicted_classes(model, images, batch_size=256):
    '''The model's top class for each image, ``(N,)``.'''
    with torch.no_grad():
        return torch.cat([model(batch).argmax(dim=1) for batch in images.split(batch_size)])


def relevance_by_handling(model, images, targets, composite, low=None, high=None, handlings=tuple(HANDLINGS),
                          batch_size=64, progress=True):
    '''LRP relevance of ``images`` for ``targets`` under each BatchNorm handling, as the study computes it: the
    composite ``composite`` names, with the rule :py:func:`~zennit_bnfuse.evaluation.composites.batch_norm_rule`
    gives the BatchNorms each handling keeps.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The classifier, in eval mode.
    images: :py:obj:`torch.Tensor`
        ``(N, C, H, W)``.
    targets: :py:obj:`torch.Tensor`
        ``(N,)`` class indices.
    composite: str
        A key of :py:data:`~zennit_bnfuse.evaluation.composites.COMPOSITES`.
    low, high: float or :py:obj:`torch.Tensor`, optional
        The input box of ``epsilon-gamma-box`` (see :py:func:`~zennit_bnfuse.evaluation.composites.make_composite`).
    handlings: sequence of str
    batch_size: int
    progress: bool
        Show a progress bar.

    Returns
    -------
    dict[str, :py:obj:`torch.Tensor`]
        Handling -> relevance ``(N, C, H, W)``.
    '''
    relevance = {}
    batches = list(zip(images.split(batch_size), targets.split(batch_size)))
    with tqdm(total=len(handlings) * len(batches), desc='explaining', disable=not progress, leave=False) as bar:
        for handling in handlings:
            lrp = CompositeLRP(model, make_composite(composite, low, high), handling=handling,
                               batch_norm_rule=batch_norm_rule(composite, handling))
            parts = []
            for batch, target in batches:
                parts.append(lrp.attribute(batch, target=target))
                bar.update()
            relevance[handling] = torch.cat(parts)
    return relevance


def faithfulness_summary(model, images, targets, relevance, patch_size, progress=True):
    '''AOPC (MoRF, LeRF) and the area between the curves, mean ± 95% half-width, per handling.

    Parameters
    ----------
    model, images, targets:
        As for :py:func:`relevance_by_handling`.
    relevance: dict[str, :py:obj:`torch.Tensor`]
        From :py:func:`relevance_by_handling`.
    patch_size: int
        Side of the square regions removed (replaced by 0), 4 per step.
    progress: bool

    Returns
    -------
    dict[str, dict[str, list[float]]]
        Handling -> metric -> ``[mean, half_width]`` (half-width 0 for a single image).
    '''
    summary = {}
    for handling, values in tqdm(relevance.items(), desc='perturbing', disable=not progress, leave=False):
        result = region_perturbation(model, images, values, targets, patch_size=patch_size, patches_per_step=4)
        summary[handling] = {}
        for metric, per_image in (('aopc_morf', result.aopc_morf), ('aopc_lerf', result.aopc_lerf),
                                  ('abpc', result.abpc)):
            summary[handling][metric] = list(mean_ci(per_image)) if len(per_image) > 1 else [per_image.item(), 0.]
    return summary


def summary_markdown(summary, title):
    '''A Markdown table of :py:func:`faithfulness_summary`.'''
    lines = [f'## {title}', '', '| handling | AOPC (MoRF) ↑ | AOPC (LeRF) ↓ | ABPC ↑ |', '| --- | --- | --- | --- |']
    for handling, metrics in summary.items():
        cells = ' | '.join(f'{mean:.3f} ± {half:.3f}' for mean, half in
                           (metrics['aopc_morf'], metrics['aopc_lerf'], metrics['abpc']))
        lines.append(f'| {handling} | {cells} |')
    return '\n'.join(lines) + '\n'
