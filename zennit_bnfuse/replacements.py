'''Turning a fusion report into the modules that replace the folded BatchNorms and their layers, and a copy of the
model with them in place.'''
import copy

import torch

from .fold import batch_norm_affine
from .layers import folded_layer, threshold_relu_for


def replacement_modules(model, report):
    '''Build the modules that replace the folded BatchNorms and their layers.

    Folded BatchNorms become :py:class:`torch.nn.Identity` (or a :py:class:`~zennit_bnfuse.layers.ThresholdReLU`
    for ``BN -> ReLU -> layer``), and each layer that takes a fold becomes one fused layer
    (:py:class:`~zennit_bnfuse.layers.FoldedLayerMixin`). ``model`` is not changed.

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
    inputs, outputs, replacements, batch_norms = {}, {}, {}, {}
    for fold in report.fused:
        batch_norm = modules[fold.bn]
        batch_norms.setdefault(fold.layer, []).append(fold.bn)
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
        replacements[name] = folded_layer(layer, before=before, after=outputs.get(name), name=name,
                                          batch_norms=batch_norms[name])
    for name, module in replacements.items():
        module.train(modules[name].training)
    return replacements


def replaced_copy(model, replacements):
    '''A deep copy of ``model`` with ``replacements`` (module name -> module) in place of its modules.

    The replaced modules (and their parameters) are never copied; ``model`` is not changed.
    '''
    modules = dict(model.named_modules())
    memo = {id(modules[name]): module for name, module in replacements.items()}
    return copy.deepcopy(model, memo)


def set_module(root, name, module):
    '''Register ``module`` under the dotted ``name`` in ``root``, replacing what was there, keeping the order.'''
    parent_name, _, child = name.rpartition('.')
    setattr(root.get_submodule(parent_name), child, module)
