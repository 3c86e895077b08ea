'''Turning a fusion report into replacement modules, and ``fuse(model)``, which returns a fused copy.'''
import copy

import torch

from .fold import batch_norm_affine
from .layers import folded_layer, threshold_relu_for
from .pairs import find_fusable_pairs


def replacement_modules(model, report):
    '''Build the modules that replace the folded BatchNorms and their layers.

    Folded BatchNorms become :py:class:`torch.nn.Identity` (or a :py:class:`~zennit_bnfuse.layers.ThresholdReLU`
    for ``BN -> ReLU -> layer``), and each layer that takes a fold becomes one fused layer. ``model`` is not changed.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model the report was made for.
    report: :py:class:`~zennit_bnfuse.report.FusionReport`
        The folds to do.

    Returns
    -------
    dict[str, :py:obj:`torch.nn.Module`]
        Module name -> replacement module.
    '''
    modules = dict(model.named_modules())
    inputs, outputs, replacements = {}, {}, {}
    for fold in report.fused:
        batch_norm = modules[fold.bn]
        if fold.side == 'after':
            outputs[fold.layer] = batch_norm
            replacements[fold.bn] = torch.nn.Identity()
        elif fold.side == 'before':
            inputs[fold.layer] = batch_norm_affine(batch_norm)
            replacements[fold.bn] = torch.nn.Identity()
        else:
            replacements[fold.bn], scale = threshold_relu_for(batch_norm)
            inputs[fold.layer] = (scale, torch.zeros_like(scale))

    for name in {*inputs, *outputs}:
        layer = modules[name]
        before = inputs.get(name)
        if before is not None:
            features = getattr(layer, 'in_features', None)
            if features is not None and features != before[0].numel():
                # a channel-major flatten sits between the BatchNorm and this Linear
                repeats = features // before[0].numel()
                before = tuple(value.repeat_interleave(repeats) for value in before)
        replacements[name] = folded_layer(layer, before=before, after=outputs.get(name))
    for name, module in replacements.items():
        module.train(modules[name].training)
    return replacements


def set_module(root, name, module):
    '''Register ``module`` under the dotted ``name`` in ``root``, replacing what was there, keeping the order.'''
    parent_name, _, child = name.rpartition('.')
    setattr(root.get_submodule(parent_name), child, module)


def fuse(model):
    '''Return a copy of ``model`` with every BatchNorm that can be folded exactly folded into a neighbouring layer.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        A model in eval mode. It is not changed.

    Returns
    -------
    tuple[:py:obj:`torch.nn.Module`, :py:class:`~zennit_bnfuse.report.FusionReport`]
        The fused model (same classes and module names as ``model``; folded BatchNorms are
        :py:class:`torch.nn.Identity`) and the report of what was folded and why the rest was not.

    Raises
    ------
    ValueError
        If a BatchNorm is in training mode or has non-finite statistics.
    '''
    report = find_fusable_pairs(model)
    replacements = replacement_modules(model, report)
    modules = dict(model.named_modules())
    # deepcopy with the originals mapped to their replacements: the copy holds the new modules in their place and
    # the replaced parameters are never copied
    memo = {id(modules[name]): module for name, module in replacements.items()}
    return copy.deepcopy(model, memo), report
