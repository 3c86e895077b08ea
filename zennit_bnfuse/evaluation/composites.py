'''Zennit composites by name, as the benchmark and the command line use them.'''
import torch
from zennit.composites import (
    EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlusFlat, LayerMapComposite, layer_map_base,
)
from zennit.rules import Epsilon
from zennit.types import Convolution


def epsilon(canonizers=None):
    '''LRP-epsilon on every conv and linear layer (the rest as in Zennit's built-in composites), with
    ``canonizers`` (a list of Zennit canonizers, optional).'''
    return LayerMapComposite(layer_map=layer_map_base() + [(Convolution, Epsilon()), (torch.nn.Linear, Epsilon())],
                             canonizers=canonizers)


# factories of (low, high): the bounds of the input, used by the first layer's ZBox rule where a composite has one
COMPOSITES = {
    'epsilon': lambda low, high: epsilon(),
    'epsilon-plus-flat': lambda low, high: EpsilonPlusFlat(),
    'epsilon-alpha2-beta1-flat': lambda low, high: EpsilonAlpha2Beta1Flat(),
    'epsilon-gamma-box': lambda low, high: EpsilonGammaBox(low=low, high=high),
}
DISPLAY_NAMES = {
    'epsilon': 'Epsilon',
    'epsilon-plus-flat': 'EpsilonPlusFlat',
    'epsilon-alpha2-beta1-flat': 'EpsilonAlpha2Beta1Flat',
    'epsilon-gamma-box': 'EpsilonGammaBox',
}


def make_composite(name, low=0., high=1.):
    '''A new instance of the composite ``name`` (see :py:data:`COMPOSITES`).

    Parameters
    ----------
    name: str
    low, high: float or :py:obj:`torch.Tensor`
        Bounds of the model's input for a first-layer ZBox rule: 0 and 1 for the study's models, which take images
        in [0, 1]; per-channel tensors ``(1, C, 1, 1)`` for normalised inputs.

    Raises
    ------
    ValueError
        If ``name`` is unknown.
    '''
    try:
        return COMPOSITES[name](low, high)
    except KeyError:
        raise ValueError(f'unknown composite {name!r}; choose one of {", ".join(COMPOSITES)}') from None
