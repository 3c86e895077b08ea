'''The ways of handling BatchNorm in LRP, and the LRP-ready model copy each one explains.

- ``fused``: BatchNorms are folded into their neighbouring layers first (this package; Guillemot et al. 2020).
- ``unfused``: each BatchNorm stays a layer and gets the LRP-epsilon rule as an affine layer (Captum's default).
- ``naive``: relevance passes each BatchNorm unchanged (Zennit's composites map BatchNorm to ``Pass``).
- ``zennit``: Zennit's own ``SequentialMergeBatchNorm`` canonizer merges BatchNorms into the layer before them, and
  relevance passes the BatchNorms it leaves (the reference: what Zennit users get from its canonizers).

:py:data:`HANDLINGS` holds this package's three handlings, :py:data:`ALL_HANDLINGS` those and ``zennit``.
'''
from dataclasses import dataclass
from typing import Callable

import torch
import torchvision.ops
from zennit.canonizers import SequentialMergeBatchNorm

from .fold import check_batch_norm, is_batch_norm, timm_layers
from .fusion import fuse
from .graph import lrp_graph
from .pairs import find_fusable_pairs
from .replacements import model_copy, unparametrized_copy, untie_parameters
from .report import FusedBatchNorm, FusionReport, UnfusedBatchNorm


def plain_copy(model, example_inputs=None, concrete_args=None):
    '''A deep copy of ``model`` and no report (the handlings that leave BatchNorms in place).

    Raises
    ------
    ValueError
        If a BatchNorm is in training mode or has invalid statistics (see
        :py:func:`zennit_bnfuse.fold.check_batch_norm`).
    '''
    for name, module in model.named_modules():
        if is_batch_norm(module):
            check_batch_norm(name, module)
    return model_copy(model), None


def zennit_merged(model, example_inputs=None, concrete_args=None):
    '''A copy of ``model`` with Zennit's ``SequentialMergeBatchNorm`` applied, if that keeps the model's function.

    Zennit pairs a BatchNorm with the leaf module registered right before it (module order, not the forward graph),
    folds the BatchNorm into that layer and makes the BatchNorm an identity. That is exact only where the
    BatchNorm's input is that layer's output and nothing else uses that output; every pair is checked against the
    traced forward graph (:py:func:`~zennit_bnfuse.pairs.find_fusable_pairs`, side ``'after'``), and a model with a
    pair that would change its function is refused. The canonizer runs on a copy and is never removed, so the
    user's model is untouched even where Zennit's own removal would fail. As in Zennit, a merged BatchNorm stays in
    the model with running mean 0, variance 1, weight 1 and bias 0, so it computes ``x / sqrt(1 + eps)``: the merged
    model's activations differ from the original's by a factor ``1 - 5e-6`` per merged BatchNorm (``eps = 1e-5``).

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        In eval mode; it is not changed.
    example_inputs: :py:obj:`torch.Tensor` or tuple, optional
        Forward arguments for the graph check of an untraceable model (see
        :py:func:`~zennit_bnfuse.pairs.find_fusable_pairs`); without them Zennit's merges there are refused.
    concrete_args: dict[str, object], optional
        Arguments of the forward to check the merges for as fixed values (see
        :py:func:`~zennit_bnfuse.pairs.find_fusable_pairs`).

    Returns
    -------
    tuple[:py:obj:`torch.nn.Module`, :py:class:`~zennit_bnfuse.report.FusionReport`]
        The merged copy, and a report with the merged BatchNorms as ``fused`` (side ``'after'``) and the others as
        ``unfused``.

    Raises
    ------
    ValueError
        If a BatchNorm is in training mode or has invalid statistics, or Zennit would merge a BatchNorm into a layer
        whose output is not (only) that BatchNorm's input.
    '''
    graph_report = find_fusable_pairs(model, example_inputs, concrete_args)
    exact = {(entry.layer, entry.bn) for entry in graph_report.fused if entry.side == 'after'}
    merged = model_copy(model)
    names = {id(module): name for name, module in merged.named_modules()}
    pairs = [(names[id(instance.linears[0])], names[id(instance.batch_norm)])
             for instance in SequentialMergeBatchNorm().apply(merged)]
    wrong = [(layer, bn) for layer, bn in pairs if (layer, bn) not in exact]
    if wrong:
        described = '; '.join(f'`{layer}` into `{bn}`' for layer, bn in wrong)
        raise ValueError(
            f'Zennit\'s SequentialMergeBatchNorm would merge {described}: neighbours in module registration order, but '
            'in the traced forward the BatchNorm does not take that layer\'s output alone, so the merged model would '
            'compute a different function. The \'zennit\' handling does not apply to this model; use \'fused\'.')
    done = {bn for _, bn in pairs}
    report = FusionReport(
        fused=[FusedBatchNorm(bn, layer, 'after') for layer, bn in pairs],
        unfused=[UnfusedBatchNorm(name, 'Zennit\'s SequentialMergeBatchNorm does not merge it (no conv/linear layer '
                                  'right before it in module order); relevance passes it')
                 for name, module in model.named_modules() if is_batch_norm(module) and name not in done],
        traced=graph_report.traced, trace_error=graph_report.trace_error,
    )
    return merged, report


@dataclass(frozen=True)
class BatchNormHandling:
    '''How LRP treats BatchNorm layers.

    Attributes
    ----------
    name: str
        ``'fused'``, ``'unfused'``, ``'naive'`` or ``'zennit'``.
    description: str
        One sentence for tables and help texts.
    batch_norm_rule: str
        The rule a BatchNorm that is still in the model gets: ``'epsilon'`` or ``'pass'``.
    make_copy: callable
        ``make_copy(model, example_inputs, concrete_args=None) -> (copy, report or None)``: the model copy LRP runs
        on, before the LRP graph rewrite.
    '''
    name: str
    description: str
    batch_norm_rule: str
    make_copy: Callable = plain_copy

    @property
    def fuses(self):
        '''Whether BatchNorms are folded by this package before LRP runs.'''
        return self.name == 'fused'

    def prepare(self, model, residual, example_inputs=None, concrete_args=None, leaves=()):
        '''The LRP-ready copy of ``model`` for this handling; ``model`` is not changed.

        Parameters
        ----------
        model: :py:obj:`torch.nn.Module`
            The user's model, in eval mode.
        residual: str
            ``'captum'``, ``'zennit'`` or ``'operands'``: which module residual additions become (see
            :py:func:`zennit_bnfuse.graph.lrp_graph`).
        example_inputs: :py:obj:`torch.Tensor` or tuple, optional
            For the ``fused`` and ``zennit`` handlings: forward arguments to check the folds on, see
            :py:func:`zennit_bnfuse.fuse`.
        concrete_args: dict[str, object], optional
            Arguments of the forward that the copy is made for as fixed values (torch.fx's ``concrete_args``): the
            folds and the LRP graph follow the path the forward takes for them (see
            :py:mod:`zennit_bnfuse.specialization`).
        leaves: collection of str, optional
            Modules the LRP graph keeps as modules rather than tracing into them (see
            :py:func:`zennit_bnfuse.graph.lrp_graph`).

        Returns
        -------
        tuple[:py:obj:`torch.nn.Module`, dict[str, str], FusionReport or None]
            The prepared model, the names of copies of reused modules (copy -> original) and the report of what was
            folded (None where the handling folds nothing).

        Raises
        ------
        ValueError
            Under every handling, if a BatchNorm or dropout is in training mode or a BatchNorm has invalid statistics
            (see :py:func:`zennit_bnfuse.fold.check_batch_norm`); see :py:func:`zennit_bnfuse.fuse` and
            :py:func:`zennit_merged` for the others.
        '''
        # a parametrized layer computes its weight in every forward, where LRP rules could not modify it
        owned, report = self.make_copy(unparametrized_copy(model), example_inputs, concrete_args=concrete_args)
        refuse_training_mode(owned)
        refuse_standardizing_convs(owned)
        prepared, copies = lrp_graph(owned, residual=residual, concrete_args=concrete_args, leaves=leaves)
        if residual == 'captum':
            # Captum's rules change a layer's weight in place, which would reach every layer sharing it
            untie_parameters(prepared)
        return prepared, copies, report


# modules that draw random numbers in training mode (besides any whose type name contains ``Drop``)
RANDOM_IN_TRAINING = (torch.nn.modules.dropout._DropoutNd, torch.nn.RReLU, torchvision.ops.StochasticDepth)


def is_random_in_training(module):
    '''Whether ``module`` draws random numbers in training mode: torch's dropout layers and ``RReLU``, torchvision's
    ``StochasticDepth``, and any module whose type name contains ``Drop`` (timm's ``DropPath`` and ``DropBlock2d``).'''
    return isinstance(module, RANDOM_IN_TRAINING) or 'Drop' in type(module).__name__


def refuse_training_mode(model):
    '''Raise if a module of ``model`` that is random in training mode (:py:func:`is_random_in_training`: dropout,
    stochastic depth) is in training mode, where it changes its input at random on every call and the relevance would
    explain a random network. (A BatchNorm in training mode is refused where it is checked for fusion.)

    Raises
    ------
    ValueError
        Naming the first such module.
    '''
    for name, module in model.named_modules():
        if module.training and is_random_in_training(module):
            raise ValueError(
                f'`{name}` ({type(module).__name__}) is in training mode, where it drops a random part of its input '
                'on every call and the relevance would change from call to call. Call model.eval() before explaining '
                'the model.')


def refuse_standardizing_convs(model):
    '''Raise if ``model`` (a prepared copy) still holds one of timm's weight-standardised convolutions.

    Such a layer standardises its weight in every forward, so an LRP rule that modifies the weight (z+, gamma, flat)
    would have the modified weight standardised again and the relevance would not follow the rule. Fusion makes them
    plain convolutions where the traced forward only calls them; the others are refused here.

    Raises
    ------
    ValueError
        Naming the first such layer and why it was not made plain.
    '''
    extension = timm_layers()
    if extension is None:
        return
    for name, module in model.named_modules():
        if type(module) in extension.STANDARDIZED_CONV_TYPES:
            raise ValueError(
                f'`{name}` ({type(module).__name__}) standardises its weight in its forward, so LRP rules that modify '
                'the weight would be standardised again and its relevance would not follow them. zennit_bnfuse makes '
                'such a layer a plain convolution with its standardised weight only under the fused handling and where '
                'the traced forward calls the layer and reads nothing else of it; here it is not (the forward was not '
                'traced, the layer runs inside a block torch.fx keeps whole, such as timm\'s NormFreeBlock, or the '
                'forward reads its weight). Replace it by a torch.nn.Conv2d holding its standardised weight '
                '(zennit_bnfuse.timm_layers.standardized_weight) before explaining the model.')


HANDLINGS = {
    'fused': BatchNormHandling('fused', 'BatchNorm folded into the neighbouring conv/linear layer', 'epsilon',
                               fuse),
    'unfused': BatchNormHandling('unfused', 'BatchNorm kept as an affine layer under the epsilon rule', 'epsilon'),
    'naive': BatchNormHandling('naive', 'relevance passes BatchNorm unchanged', 'pass'),
}
ALL_HANDLINGS = {
    **HANDLINGS,
    'zennit': BatchNormHandling(
        'zennit', 'Zennit\'s SequentialMergeBatchNorm merges each BatchNorm registered right after a conv/linear '
        'layer into that layer, and relevance passes the BatchNorms it leaves unchanged', 'pass', zennit_merged),
}


def bn_handling(name):
    '''Look up a BatchNorm handling by name.

    Parameters
    ----------
    name: str or :py:class:`BatchNormHandling`
        ``'fused'``, ``'unfused'``, ``'naive'`` or ``'zennit'`` (a handling is returned as it is).

    Returns
    -------
    :py:class:`BatchNormHandling`

    Raises
    ------
    ValueError
        If ``name`` is not one of :py:data:`ALL_HANDLINGS`.

    Examples
    --------
    >>> from zennit_bnfuse import bn_handling
    >>> bn_handling('naive').batch_norm_rule
    'pass'
    '''
    if isinstance(name, BatchNormHandling):
        return name
    try:
        return ALL_HANDLINGS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f'unknown BatchNorm handling {name!r}; choose one of {", ".join(map(repr, ALL_HANDLINGS))}'
        ) from None
