'''An ``explain_func`` for Quantus metrics: LRP relevance with BatchNorm fused, numpy in and numpy out.

Quantus metrics call ``explain_func(model=..., inputs=..., targets=..., **explain_func_kwargs)`` with numpy arrays and
expect a numpy array of attributions back::

    import quantus
    from zennit_bnfuse import explain_func

    metric = quantus.RegionPerturbation(patch_size=4, regions_evaluation=10)
    scores = metric(model=model, x_batch=images, y_batch=labels, explain_func=explain_func,
                    explain_func_kwargs={'composite': 'epsilon-plus-flat', 'handling': 'fused'})
'''
import math
import warnings

import numpy as np
import torch
from zennit.core import Composite

from .attribution import CompositeLRP, FusedLRP

# the attribution object of the last call, reused while the model and settings stay the same, so that the LRP-ready
# copy of a model is built once per model (it is rebuilt anyway when the model's tensors change); only one model is
# kept alive by it
_LAST = {}


def bound_key(value):
    '''An input bound (a number, tensor or array, per channel for normalised inputs) by its values and shape, to
    compare as part of a cache key.'''
    array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=float)
    return array.shape, tuple(array.reshape(-1).tolist())


def _attribution(model, composite, handling, rules, low, high):
    '''The :py:class:`~zennit_bnfuse.CompositeLRP` or :py:class:`~zennit_bnfuse.FusedLRP` for these settings,
    reused from the last call where possible.'''
    # the rules by content: a dict changed in place between calls gives a new FusedLRP
    entries = None if rules is None else tuple((key, id(rule)) for key, rule in dict(rules).items())
    key = (id(model), composite if isinstance(composite, str) else id(composite), handling, entries,
           bound_key(low), bound_key(high))
    if _LAST.get('key') == key and _LAST['model'] is model:
        return _LAST['attribution']
    if composite == 'captum':
        attribution = FusedLRP(model, rules=rules, handling=handling)
    elif rules is not None:
        raise ValueError('rules are Captum rules for composite=\'captum\'; a Zennit composite brings its own rules '
                         f'(got rules with composite={composite!r})')
    else:
        rule = None
        if isinstance(composite, str):
            from .evaluation.composites import batch_norm_rule, make_composite
            # a bias-free composite's rule for BatchNorms and thresholded ReLUs is Pass
            composite, rule = make_composite(composite, low, high), batch_norm_rule(composite, handling)
        elif not isinstance(composite, Composite):
            raise TypeError(f'composite must be a Zennit Composite (e.g. EpsilonPlusFlat()), the name of one in '
                            f'zennit_bnfuse.evaluation.composites, or \'captum\'; not {composite!r}')
        attribution = CompositeLRP(model, composite, handling=handling, batch_norm_rule=rule)
    _LAST.update(key=key, model=model, rules=rules, attribution=attribution)
    return attribution


def explain_func(model, inputs, targets, composite='epsilon-plus-flat', handling='fused', rules=None, low=0.,
                 high=1., device=None, reduce_axes=(1,), keepdims=True, **kwargs):
    '''LRP relevance of ``inputs`` for ``targets``, as Quantus metrics call an ``explain_func``.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The classifier, in eval mode. It is not changed.
    inputs: :py:obj:`numpy.ndarray` or :py:obj:`torch.Tensor`
        ``(N, C, ...)``, channels first.
    targets: :py:obj:`numpy.ndarray`, :py:obj:`torch.Tensor`, int or sequence of int
        The class to explain per example, ``(N,)``, or one class for all.
    composite: str or :py:obj:`zennit.core.Composite`
        A Zennit composite, the name of one in :py:data:`zennit_bnfuse.evaluation.composites.COMPOSITES` (default
        ``'epsilon-plus-flat'``), or ``'captum'`` for Captum's rules through :py:class:`~zennit_bnfuse.FusedLRP`.
    handling: str
        The BatchNorm handling: ``'fused'`` (default), ``'unfused'``, ``'naive'`` or ``'zennit'`` (see
        :py:func:`zennit_bnfuse.bn_handling`).
    rules: dict, optional
        Captum rules by module name or type, with ``composite='captum'`` (see :py:class:`~zennit_bnfuse.FusedLRP`).
    low, high: float
        Input bounds for a named composite's first-layer ZBox rule.
    device: str or :py:obj:`torch.device`, optional
        Where to compute; default: where the model's parameters are.
    reduce_axes: tuple[int, ...] or None
        Axes of the relevance to sum, as in Quantus' own ``explain`` (default ``(1,)``: over channels; ``None`` or
        ``()`` keeps every axis). Axis 0, the batch, cannot be summed.
    keepdims: bool
        Keep the summed axes with size 1 (Quantus' default).
    **kwargs:
        Other keywords: ignored, with a warning that names them.

    Returns
    -------
    :py:obj:`numpy.ndarray`
        The relevance, ``inputs``' shape with ``reduce_axes`` summed, float32, scaled so that each example's relevance
        sums to about its target logit (Captum's convention).

    Raises
    ------
    TypeError
        If ``model`` is not a :py:obj:`torch.nn.Module`, ``composite`` is neither a Composite nor a known name, the
        inputs are not floating-point or the targets are booleans.
    ValueError
        If ``reduce_axes`` names the batch axis 0 or an axis the inputs lack, ``handling`` or a composite name is
        unknown, ``rules`` come with a composite other than ``'captum'``, ``low`` is above ``high``, or the targets
        are missing, not one whole class index per example or do not fit the model's outputs.

    Examples
    --------
    >>> import numpy as np
    >>> from zennit_bnfuse import explain_func
    >>> from zennit_bnfuse.evaluation.models import pretrained
    >>> model = pretrained('mnist-cnn-bn')
    >>> relevance = explain_func(model=model, inputs=np.random.rand(2, 1, 28, 28).astype(np.float32),
    ...                          targets=np.array([3, 7]), composite='epsilon-plus-flat', handling='fused')
    >>> relevance.shape, relevance.dtype
    ((2, 1, 28, 28), dtype('float32'))
    '''
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f'model must be a torch.nn.Module, not {type(model).__name__}')
    reduce_axes = (reduce_axes,) if isinstance(reduce_axes, int) else tuple(reduce_axes or ())
    dims = np.ndim(inputs)
    if any(not -dims <= axis < dims for axis in reduce_axes):
        raise ValueError(f'reduce_axes {reduce_axes} names an axis the inputs (of {dims} axes) do not have')
    if any(axis % dims == 0 for axis in reduce_axes):
        raise ValueError('reduce_axes must not contain the batch axis 0')
    if targets is None:
        raise ValueError('explain_func needs targets, the class to explain per example (Quantus passes y_batch)')
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    inputs = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs)
    if not inputs.is_floating_point():
        # an 8-bit image cast as it is would be explained at 255 times the scale the model was trained on
        raise TypeError(f'inputs has dtype {inputs.dtype}; explain_func takes the floating-point inputs the model '
                        'takes (8-bit images: convert them as the model\'s training did, e.g. images / 255)')
    inputs = inputs.to(device=device)
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.is_floating_point():
        inputs = inputs.to(parameter.dtype)
    if kwargs:
        warnings.warn(f'explain_func ignores the keyword(s) {", ".join(sorted(kwargs))}; it takes composite, handling, '
                      'rules, low, high, device, reduce_axes and keepdims (a misspelt one falls back to its default).',
                      stacklevel=2)
    targets = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets)
    if targets.dtype == torch.bool:
        raise TypeError('targets must be class indices, not booleans (True would explain class 1)')
    if math.prod(targets.shape[1:]) > 1:
        raise ValueError(f'targets must hold one class index per example, not an array of shape '
                         f'{tuple(targets.shape)} (for one-hot labels pass labels.argmax(1)).')
    if (targets.is_floating_point() or targets.is_complex()) and not torch.equal(targets, targets.round()):
        raise ValueError(f'targets must be class indices; {targets.reshape(-1).tolist()[:8]} holds a value that is '
                         'not a whole number.')
    targets = targets.to(device=device, dtype=torch.long).reshape(-1)
    if targets.numel() == 1 and len(inputs) != 1:
        targets = targets.expand(len(inputs))
    relevance = _attribution(model, composite, handling, rules, low, high).attribute(inputs, target=targets)
    relevance = relevance.detach()
    if reduce_axes:
        relevance = relevance.sum(dim=reduce_axes, keepdim=keepdims)
    return relevance.float().cpu().numpy()
