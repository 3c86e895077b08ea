'''``fuse(model)``, which returns a fused copy of a model and the report of what was folded.'''
from .checks import check_model
from .pairs import find_fusable_pairs
from .replacements import replaced_copy, replacement_modules, set_module  # noqa: F401 (set_module: graph.py)


def fuse(model, example_inputs=None):
    '''Return a copy of ``model`` with every BatchNorm that can be folded exactly folded into a neighbouring layer.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        A model in eval mode. It is not changed.
    example_inputs: :py:obj:`torch.Tensor` or tuple, optional
        Positional arguments of the model's forward to check the folds on (see
        :py:func:`~zennit_bnfuse.pairs.find_fusable_pairs`); needed to fold anything where the forward cannot be
        traced with torch.fx.

    Returns
    -------
    tuple[:py:obj:`torch.nn.Module`, :py:class:`~zennit_bnfuse.report.FusionReport`]
        The fused model (same classes and module names as ``model``; folded BatchNorms are
        :py:class:`torch.nn.Identity`, the layers they were folded into
        :py:class:`~zennit_bnfuse.layers.FoldedLayerMixin` subclasses of their type) and the report of what was
        folded and why the rest was not.

    Raises
    ------
    TypeError
        If ``model`` is not a torch.nn.Module or holds a TorchScript module (pass the original module), or
        ``example_inputs`` is not a tensor or tuple.
    ValueError
        If a BatchNorm is in training mode or has invalid statistics, or the model raises on ``example_inputs``.
    '''
    check_model(model, 'fuse()')
    report = find_fusable_pairs(model, example_inputs)
    return replaced_copy(model, replacement_modules(model, report)), report
