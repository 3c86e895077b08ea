'''``fuse(model)``, which returns a fused copy of a model and the report of what was folded.'''
from dataclasses import replace

from .checks import check_model, refuse_global_hooks, refuse_zennit_hooks
from .pairs import find_fusable_pairs
from .report import UnfusedBatchNorm
from .replacements import replaced_copy, replacement_modules


def fuse(model, example_inputs=None, include=None, concrete_args=None):
    '''Return a copy of ``model`` with every BatchNorm that can be folded exactly folded into a neighbouring layer.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        A model in eval mode. It is not changed.
    example_inputs: :py:obj:`torch.Tensor` or tuple, optional
        Positional arguments of the model's forward to check the folds on (see
        :py:func:`~zennit_bnfuse.pairs.find_fusable_pairs`); needed to fold anything where the forward cannot be
        traced with torch.fx.
    include: callable or collection of str, optional
        Which BatchNorms to fold: ``include(name, module) -> bool``, or their names; the others stay in place with
        the reason ``not selected``. Default: every BatchNorm that can be folded.
    concrete_args: dict[str, object], optional
        Arguments of the forward to decide the folds for as fixed values (torch.fx's ``concrete_args``, see
        :py:func:`~zennit_bnfuse.pairs.find_fusable_pairs`); the fused copy is exact on calls with those values.

    Returns
    -------
    tuple[:py:obj:`torch.nn.Module`, :py:class:`~zennit_bnfuse.report.FusionReport`]
        The fused model (same classes and module names as ``model``; folded BatchNorms are
        :py:class:`torch.nn.Identity` or a :py:class:`~zennit_bnfuse.layers.ThresholdReLU`, a folded timm norm-act
        layer a Sequential of that, its ``drop`` and its ``act``; the layers they were folded into
        :py:class:`~zennit_bnfuse.layers.FoldedLayerMixin` subclasses of their type, see
        :py:func:`~zennit_bnfuse.replacements.replacement_modules`) and the report of what was folded and why the
        rest was not.

    Raises
    ------
    TypeError
        If ``model`` is not a torch.nn.Module, holds a TorchScript module or a wrapper (``DataParallel``,
        ``torch.compile``), has a hook from the deprecated ``register_backward_hook`` (see
        :py:func:`~zennit_bnfuse.checks.check_model`) or cannot be deep-copied; if ``example_inputs`` is not a tensor
        or tuple, or ``include`` neither a function nor a collection of names.
    ValueError
        If a BatchNorm is in training mode or has invalid statistics, a lazy module has not run yet or a parameter
        is on the meta device, a Zennit composite is registered on ``model``, ``include`` names a module that is not
        a BatchNorm, or the model raises on ``example_inputs``.
    RuntimeError
        If global module hooks are registered (``torch.nn.modules.module.register_module_forward_hook`` and the
        like), which would run inside the fused copy too.

    Examples
    --------
    >>> import torch
    >>> from zennit_bnfuse import fuse
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    >>> fused, report = fuse(model)
    >>> [(entry.bn, entry.layer, entry.side) for entry in report.fused]
    [('1', '0', 'after')]
    >>> input = torch.rand(2, 3, 8, 8)
    >>> torch.allclose(fused(input), model(input), atol=1e-6)
    True
    '''
    check_model(model, 'fuse()')
    refuse_zennit_hooks(model, 'fuse()')
    refuse_global_hooks('fuse()')
    report = find_fusable_pairs(model, example_inputs, concrete_args)
    if include is not None:
        report = selected(model, report, include)
    return replaced_copy(model, replacement_modules(model, report)), report


def selected(model, report, include):
    '''``report`` with only the folds of the BatchNorms ``include`` selects (see :py:func:`fuse`).

    Raises
    ------
    TypeError
        If ``include`` is neither callable nor a collection of names.
    ValueError
        If ``include`` names a module that is not a BatchNorm of ``model``.
    '''
    if not callable(include):
        if isinstance(include, str) or not hasattr(include, '__iter__'):
            raise TypeError(f'include must be a function (name, module) -> bool or a collection of BatchNorm names, '
                            f'not {include!r}')
        names = set(include)
        known = {entry.bn for entry in (*report.fused, *report.unfused)}
        unknown = sorted(names - known)
        if unknown:
            raise ValueError(f'include names {", ".join(map(repr, unknown))}, which '
                             f'{"is not a BatchNorm" if len(unknown) == 1 else "are not BatchNorms"} of the model')

        def include(name, module):
            return name in names
    modules = dict(model.named_modules())
    chosen = [entry for entry in report.fused if include(entry.bn, modules[entry.bn])]
    left = [UnfusedBatchNorm(entry.bn, 'not selected by `include`') for entry in report.fused if entry not in chosen]
    return replace(report, fused=chosen, unfused=[*report.unfused, *left])
