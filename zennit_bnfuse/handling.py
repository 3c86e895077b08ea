'''The three ways of handling BatchNorm in LRP, and the LRP-ready model copy each one explains.

- ``fused``: BatchNorms are folded into their neighbouring layers first (this package; Guillemot et al. 2020).
- ``unfused``: each BatchNorm stays a layer and gets the LRP-epsilon rule as an affine layer (Captum's default).
- ``naive``: relevance passes each BatchNorm unchanged (Zennit's composites map BatchNorm to ``Pass``).
'''
import copy
from dataclasses import dataclass

from .fold import check_batch_norm, is_batch_norm
from .fusion import fuse
from .graph import lrp_graph


@dataclass(frozen=True)
class BatchNormHandling:
    '''How LRP treats BatchNorm layers.

    Attributes
    ----------
    name: str
        ``'fused'``, ``'unfused'`` or ``'naive'``.
    description: str
        One line for tables and help texts.
    batch_norm_rule: str
        The rule a BatchNorm that is still in the model gets: ``'epsilon'`` or ``'pass'``.
    '''
    name: str
    description: str
    batch_norm_rule: str

    @property
    def fuses(self):
        '''Whether BatchNorms are folded before LRP runs.'''
        return self.name == 'fused'

    def prepare(self, model, residual, example_inputs=None):
        '''The LRP-ready copy of ``model`` for this handling; ``model`` is not changed.

        Parameters
        ----------
        model: :py:obj:`torch.nn.Module`
            The user's model, in eval mode.
        residual: str
            ``'captum'`` or ``'zennit'``: which module residual additions become (see
            :py:func:`zennit_bnfuse.graph.lrp_graph`).
        example_inputs: :py:obj:`torch.Tensor` or tuple, optional
            For the ``fused`` handling: forward arguments to check the folds on, see :py:func:`zennit_bnfuse.fuse`.

        Returns
        -------
        tuple[:py:obj:`torch.nn.Module`, dict[str, str], FusionReport or None]
            The prepared model, the names of copies of reused modules (copy -> original) and the fusion report
            (None unless this handling fuses).

        Raises
        ------
        ValueError
            Under every handling, if a BatchNorm is in training mode or has invalid statistics (see
            :py:func:`zennit_bnfuse.fold.check_batch_norm`); see :py:func:`zennit_bnfuse.fuse` for the others.
        '''
        report = None
        if self.fuses:
            owned, report = fuse(model, example_inputs)
        else:
            for name, module in model.named_modules():
                if is_batch_norm(module):
                    check_batch_norm(name, module)
            owned = copy.deepcopy(model)
        prepared, copies = lrp_graph(owned, residual=residual)
        return prepared, copies, report


HANDLINGS = {
    'fused': BatchNormHandling('fused', 'BatchNorm folded into the neighbouring conv/linear layer', 'epsilon'),
    'unfused': BatchNormHandling('unfused', 'BatchNorm kept as an affine layer under the epsilon rule', 'epsilon'),
    'naive': BatchNormHandling('naive', 'relevance passes BatchNorm unchanged', 'pass'),
}


def bn_handling(name):
    '''Look up a BatchNorm handling by name.

    Parameters
    ----------
    name: str or :py:class:`BatchNormHandling`
        ``'fused'``, ``'unfused'`` or ``'naive'`` (a handling is returned as it is).

    Returns
    -------
    :py:class:`BatchNormHandling`

    Raises
    ------
    ValueError
        If ``name`` is not one of the three.
    '''
    if isinstance(name, BatchNormHandling):
        return name
    try:
        return HANDLINGS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f'unknown BatchNorm handling {name!r}; choose one of {", ".join(map(repr, HANDLINGS))}'
        ) from None
