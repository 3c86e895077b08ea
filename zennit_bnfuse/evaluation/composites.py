'''Zennit composites by name, as the study and the command line use them.

Every composite exists twice: as named, and with the suffix ``-nobias``, the same rules with ``zero_params=['bias']``
(every conv/linear bias left out of the relevance computation; Zennit's ``Flat`` rule already leaves it out). The
bias-free twins are the study's control: with them, how relevance is shared can no longer depend on what biases
absorb.
'''
from functools import partial

import torch
from zennit.composites import (
    EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlusFlat, LayerMapComposite, layer_map_base,
)
from zennit.layer import Sum
from zennit.rules import Epsilon, Pass
from zennit.types import Activation, AvgPool, BatchNorm, Convolution, MaxPool

from ..handling import bn_handling

# Captum's EpsilonRule stabiliser (captum.attr._utils.lrp_rules.EpsilonRule, epsilon=1e-9)
CAPTUM_EPSILON = 1e-9
# the stabiliser of Zennit's Epsilon rule by default, and of the Epsilon rule CompositeLRP gives BatchNorms
ZENNIT_EPSILON = 1e-6
BIAS_FREE_SUFFIX = '-nobias'


def epsilon(canonizers=None, zero_params=None):
    '''LRP-epsilon (1e-6) on every conv and linear layer, the rest as in Zennit's built-in composites (``Pass`` on
    activations and BatchNorms, ``Norm`` on sums and average pooling).

    Parameters
    ----------
    canonizers: list, optional
        Zennit canonizers.
    zero_params: list[str], optional
        Parameters left out of the relevance computation, e.g. ``['bias']``.
    '''
    rule = Epsilon(ZENNIT_EPSILON, zero_params=zero_params)
    return LayerMapComposite(layer_map=layer_map_base() + [(Convolution, rule), (torch.nn.Linear, rule)],
                             canonizers=canonizers)


def captum_epsilon(canonizers=None, zero_params=None):
    '''Captum's default LRP as a Zennit composite: LRP-epsilon with Captum's ``epsilon=1e-9`` on every layer
    Captum's ``LRP`` gives ``EpsilonRule`` (conv, linear, max and average pooling, BatchNorm, residual additions,
    which this package's LRP graph makes Zennit ``Sum`` modules), and relevance passed through activations.

    Captum lists only ``Conv2d``, ``Linear``, ``MaxPool1d/2d/3d``, ``AvgPool2d``, ``AdaptiveAvgPool2d``,
    ``BatchNorm2d`` and its ``Addition_Module`` (``captum.attr._core.lrp.SUPPORTED_LAYERS_WITH_RULES``) and refuses
    other layers; this composite gives every dimension of those kinds the same rule, as
    :py:class:`~zennit_bnfuse.FusedLRP` does. With ``zero_params=['bias']``, BatchNorms get ``Pass``: a BatchNorm
    without its shift is a per-channel scaling, through which LRP-epsilon passes relevance unchanged.

    Parameters
    ----------
    canonizers: list, optional
        Zennit canonizers.
    zero_params: list[str], optional
        Parameters left out of the relevance computation, e.g. ``['bias']``.
    '''
    rule = Epsilon(CAPTUM_EPSILON, zero_params=zero_params)
    batch_norm = Pass() if zero_params and 'bias' in zero_params else Epsilon(CAPTUM_EPSILON)
    layer_map = [
        (Activation, Pass()),
        (BatchNorm, batch_norm),
        (Sum, rule),
        (AvgPool, rule),
        (MaxPool, rule),
        (Convolution, rule),
        (torch.nn.Linear, rule),
    ]
    return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


# factories of (low, high, zero_params): the bounds of the input, used by the first layer's ZBox rule where a
# composite has one, and the parameters to leave out
_BASE_COMPOSITES = {
    'epsilon': lambda low, high, zero_params: epsilon(zero_params=zero_params),
    'captum-epsilon': lambda low, high, zero_params: captum_epsilon(zero_params=zero_params),
    'epsilon-plus-flat': lambda low, high, zero_params: EpsilonPlusFlat(zero_params=zero_params),
    'epsilon-alpha2-beta1-flat': lambda low, high, zero_params: EpsilonAlpha2Beta1Flat(zero_params=zero_params),
    'epsilon-gamma-box': lambda low, high, zero_params: EpsilonGammaBox(low=low, high=high, zero_params=zero_params),
}
_BASE_DISPLAY_NAMES = {
    'epsilon': 'Epsilon',
    'captum-epsilon': 'Captum default (Epsilon 1e-9)',
    'epsilon-plus-flat': 'EpsilonPlusFlat',
    'epsilon-alpha2-beta1-flat': 'EpsilonAlpha2Beta1Flat',
    'epsilon-gamma-box': 'EpsilonGammaBox',
}

# name -> factory of (low, high)
COMPOSITES = {
    **{name: partial(factory, zero_params=None) for name, factory in _BASE_COMPOSITES.items()},
    **{name + BIAS_FREE_SUFFIX: partial(factory, zero_params=['bias']) for name, factory in _BASE_COMPOSITES.items()},
}
DISPLAY_NAMES = {
    **_BASE_DISPLAY_NAMES,
    **{name + BIAS_FREE_SUFFIX: f'{display} (no bias)' for name, display in _BASE_DISPLAY_NAMES.items()},
}


def is_bias_free(name):
    '''Whether composite ``name`` is a bias-free twin (``...-nobias``).'''
    return name.endswith(BIAS_FREE_SUFFIX)


def make_composite(name, low=0., high=1.):
    '''A new instance of the composite ``name`` (see :py:data:`COMPOSITES`).

    Parameters
    ----------
    name: str
        A key of :py:data:`COMPOSITES`: ``epsilon``, ``captum-epsilon``, ``epsilon-plus-flat``,
        ``epsilon-alpha2-beta1-flat``, ``epsilon-gamma-box``, each also with ``-nobias``.
    low, high: float or :py:obj:`torch.Tensor`
        Bounds of the model's input for a first-layer ZBox rule: 0 and 1 for the study's models, which take images
        in [0, 1]; per-channel tensors ``(1, C, 1, 1)`` for normalised inputs.

    Raises
    ------
    ValueError
        If ``name`` is unknown, or ``low`` is above ``high`` somewhere.
    '''
    if bool((torch.as_tensor(low) > torch.as_tensor(high)).any()):
        raise ValueError(f'low must not be above high (the input box of the first layer\'s ZBox rule), got low={low} '
                         f'and high={high}')
    try:
        return COMPOSITES[name](low, high)
    except KeyError:
        raise ValueError(f'unknown composite {name!r}; choose one of {", ".join(COMPOSITES)}') from None


def batch_norm_rule(name, handling):
    '''The rule a BatchNorm still in the model gets under composite ``name`` and a BatchNorm handling, for
    :py:class:`~zennit_bnfuse.CompositeLRP`'s ``batch_norm_rule``.

    - ``Pass`` where the handling passes relevance through BatchNorms (``naive``, ``zennit``);
    - ``Pass`` for a bias-free composite: a BatchNorm without its shift (``beta - mean * scale``) is a per-channel
      scaling, and LRP-epsilon on a scaling passes relevance unchanged (Zennit's ``zero_params=['bias']`` would drop
      only ``beta``, not the running mean);
    - otherwise LRP-epsilon with the composite's stabiliser: Captum's 1e-9 for ``captum-epsilon``, else Zennit's
      1e-6 (CompositeLRP's default).

    Parameters
    ----------
    name: str
        A key of :py:data:`COMPOSITES`.
    handling: str or :py:class:`~zennit_bnfuse.handling.BatchNormHandling`

    Returns
    -------
    :py:obj:`zennit.core.Hook`

    Raises
    ------
    ValueError
        If ``name`` or ``handling`` is unknown.
    '''
    if name not in COMPOSITES:
        raise ValueError(f'unknown composite {name!r}; choose one of {", ".join(COMPOSITES)}')
    if bn_handling(handling).batch_norm_rule == 'pass' or is_bias_free(name):
        return Pass()
    return Epsilon(CAPTUM_EPSILON if name == 'captum-epsilon' else ZENNIT_EPSILON)
