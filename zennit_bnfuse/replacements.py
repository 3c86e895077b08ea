'''Turning a fusion report into the modules that replace the folded BatchNorms and their layers, and a copy of the
model with them in place.'''
import copy

import torch
from torch.nn.utils import parametrize

from .fold import batch_norm_affine, channel_range, is_frozen, timm_layers
from .layers import folded_layer, threshold_relu_for


def replacement_modules(model, report):
    """Build the modules that replace the folded BatchNorms and their layers.

    Folded BatchNorms become :py:class:`torch.nn.Identity` (or a :py:class:`~zennit_bnfuse.layers.ThresholdReLU`
    for ``BN -> ReLU -> layer``); what a timm norm-act layer applies after normalising stays behind it (see
    :py:func:`zennit_bnfuse.timm_layers.norm_act_remainder`). Each layer that takes a fold becomes one fused layer
    (:py:class:`~zennit_bnfuse.layers.FoldedLayerMixin`). timm's weight-standardised convolutions
    (``report.standardized`` and those that take a fold) become plain convolutions with their standardised weight.
    ``model`` is not changed.

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
    """
    modules = dict(model.named_modules())
    inputs, outputs, replacements, batch_norms, stand_ins = {}, {}, {}, {}, {}
    for fold in report.fused:
        batch_norm = modules[fold.bn]
        for name in fold.layers:
            batch_norms.setdefault(name, []).append(fold.bn)
        if fold.side == 'after':
            start = 0
            for name in fold.layers:
                layer = modules[name]
                stop = start + getattr(layer, 'out_channels', getattr(layer, 'out_features', None))
                outputs[name] = batch_norm if len(fold.layers) == 1 else channel_range(batch_norm, start, stop)
                start = stop
            normalized = torch.nn.Identity()
        elif fold.side == 'before':
            inputs.update(dict.fromkeys(fold.layers, batch_norm_affine(batch_norm)))
            normalized = torch.nn.Identity()
        else:
            normalized, scale = threshold_relu_for(batch_norm)
            inputs.update(dict.fromkeys(fold.layers, (scale, torch.zeros_like(scale))))
        normalized.train(batch_norm.training)
        if not is_frozen(batch_norm):
            for name in fold.layers:
                stand_ins.setdefault(name, []).append((fold.bn, normalized))
        extension = timm_layers()
        if extension is not None and extension.norm_act_tail(batch_norm) is not None:
            normalized = extension.norm_act_remainder(batch_norm, normalized)
        replacements[fold.bn] = normalized

    for name in report.standardized:
        # LRP rules modify a layer's weight; a weight-standardised conv would standardise the modified weight again
        inputs.setdefault(name, None)
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
                                          batch_norms=batch_norms.get(name, ()))
        if name in stand_ins:
            replacements[name].batch_norm_stand_ins = tuple(stand_ins[name])
        # not train(): the norm-act remainders hold copies of the user's drop and act with their own flags
        replacements[name].training = layer.training
    return replacements


def attribute_tensors(model):
    '''The tensors kept in ``model``'s modules' attributes, also inside dicts, lists, tuples and sets there (a cache a
    forward fills; each container walked once, so one that holds itself ends).'''
    pending = [value for module in model.modules() for value in vars(module).values()]
    seen = set()
    while pending:
        value = pending.pop()
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (dict, list, tuple, set, frozenset)) and id(value) not in seen:
            seen.add(id(value))
            pending.extend(value.values() if isinstance(value, dict) else value)


def model_copy(model, memo=None):
    '''A deep copy of ``model`` (``copy.deepcopy`` with ``memo``) that also copies what a forward may keep in a
    module's attributes and ``copy.deepcopy`` refuses: a tensor computed with autograd (a feature map kept for
    later, a cache of tensors computed from parameters, see :py:func:`attribute_tensors`) becomes a detached copy.

    Raises
    ------
    TypeError
        If ``copy.deepcopy`` cannot copy ``model`` (an attribute such as a lock or an open file), naming the fix.
        Running out of memory raises as it does.
    '''
    memo = {} if memo is None else memo
    for tensor in attribute_tensors(model):
        if not tensor.is_leaf and id(tensor) not in memo:
            memo[id(tensor)] = tensor.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as error:
        raise TypeError(
            f'zennit_bnfuse works on a copy of {type(model).__name__} and copy.deepcopy cannot copy it '
            f'({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}); keep objects deepcopy '
            'cannot copy (locks, open files, ...) out of the modules\' attributes, or give their class a '
            '__deepcopy__.') from error


def replaced_copy(model, replacements):
    '''A deep copy of ``model`` (see :py:func:`model_copy`) with ``replacements`` (module name -> module) in place
    of its modules.

    The replaced modules (and their parameters) are never copied; ``model`` is not changed.
    '''
    modules = dict(model.named_modules())
    return model_copy(model, {id(modules[name]): module for name, module in replacements.items()})


def set_module(root, name, module):
    '''Register ``module`` under the dotted ``name`` in ``root``, replacing what was there, keeping the order.'''
    parent_name, _, child = name.rpartition('.')
    setattr(root.get_submodule(parent_name), child, module)


# parametrizations whose tensor does not depend on the training mode
STATELESS_PARAMETRIZATIONS = (torch.nn.utils.parametrizations._WeightNorm,)


def unparametrized(module):
    '''A module of the class ``module`` had before :py:mod:`torch.nn.utils.parametrize` parametrized it (a
    ``weight_norm`` or ``spectral_norm`` conv), holding its parametrized tensors' current values as plain parameters
    (or buffers): the same forward, with a weight that LRP rules can modify. It shares its children, its other
    parameters and buffers with ``module`` (call it on a copy); ``module`` itself is not changed.

    Never made by ``remove_parametrizations``: ``module`` shares its class with the model it was copied from, and
    torch removes the parametrization's property from that class, which breaks the model.

    Raises
    ------
    ValueError
        If a parametrization other than ``weight_norm``'s is in training mode, where it may change its tensor on
        every call (``spectral_norm``'s power iteration).
    '''
    training = next((each for parametrizations in module.parametrizations.values() for each in parametrizations
                     if each.training and not isinstance(each, STATELESS_PARAMETRIZATIONS)), None)
    if training is not None:
        raise ValueError(
            f'{type(module).__name__} has a parametrization in training mode ({type(training).__name__}), which may '
            'compute another weight on every call. Call model.eval() before explaining the model.')
    values = {}
    with torch.no_grad():
        for name, parametrization in module.parametrizations.items():
            originals = ([parametrization.original] if parametrization.is_tensor else
                         [getattr(parametrization, f'original{index}') for index in range(parametrization.ntensors)])
            values[name] = getattr(module, name), originals
    base = type(module).__bases__[0]  # parametrize makes the class Parametrized<base>(base)
    plain = base.__new__(base)
    vars(plain).update(vars(module))
    plain._modules, plain._parameters, plain._buffers = (
        {key: value for key, value in module._modules.items() if key != 'parametrizations'},
        dict(module._parameters), dict(module._buffers))
    for name, (value, originals) in values.items():
        if any(isinstance(original, torch.nn.Parameter) for original in originals):
            plain._parameters[name] = torch.nn.Parameter(value, any(original.requires_grad for original in originals))
        else:
            plain._buffers[name] = value
    return plain


def unparametrized_copy(model):
    '''``model`` itself where none of its modules is parametrized (:py:mod:`torch.nn.utils.parametrize`); else a
    deep copy (see :py:func:`model_copy`) in which every parametrized module is :py:func:`unparametrized`, the
    innermost first, under each of its names (a module shared with another stays shared).

    Raises
    ------
    ValueError
        See :py:func:`unparametrized`, naming the module.
    '''
    names = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if parametrize.is_parametrized(module):
            names.setdefault(id(module), []).append(name)
    if not names:
        return model
    owned = model_copy(model)
    modules = dict(owned.named_modules(remove_duplicate=False))
    # the innermost first: a module's depth is the number of modules above it
    for aliases in sorted(names.values(), key=lambda aliases: -(aliases[0].count('.') + bool(aliases[0]))):
        try:
            plain = unparametrized(modules[aliases[0]])
        except ValueError as error:
            raise ValueError(f'`{aliases[0]}`: {error}' if aliases[0] else str(error)) from None
        if aliases[0] == '':
            owned = plain
        for name in aliases:
            if name:
                set_module(owned, name, plain)
    return owned


def untie_parameters(model):
    '''Give every module of ``model`` (a copy the caller owns; changed in place) its own copy of each parameter it
    shares with a module met before in ``model.modules()`` order: the same values, so the same function, but a rule
    that changes one layer's weights (Captum's ``GammaRule`` sets ``weight.data``) no longer changes another's.
    Returns how many parameters were copied.'''
    seen, copied = set(), 0
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None:
                continue
            if id(parameter) in seen:
                module._parameters[name] = torch.nn.Parameter(parameter.detach().clone(), parameter.requires_grad)
                copied += 1
            else:
                seen.add(id(parameter))
    return copied
