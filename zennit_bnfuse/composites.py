'''Zennit composites by name, as the benchmark and the command line use them.'''
import torch
from zennit.composites import (
    EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlusFlat, LayerMapComposite, layer_map_base,
)
from zennit.rules import Epsilon
from zennit.types import Convolution


def epsilon():
    '''LRP-epsilon on every conv and linear layer (the rest as in Zennit's built-in composites).'''
    return LayerMapComposite(layer_map=layer_map_base() + [(Convolution, Epsilon()), (torch.nn.Linear, Epsilon())])


COMPOSITES = {
    'epsilon': epsilon,
    'epsilon-plus-flat': EpsilonPlusFlat,
    'epsilon-alpha2-beta1-flat': EpsilonAlpha2Beta1Flat,
    # the study's models take inputs in [0, 1], so the first layer's box is [0, 1]
    'epsilon-gamma-box': lambda: EpsilonGammaBox(low=0., high=1.),
}
DISPLAY_NAMES = {
    'epsilon': 'Epsilon',
    'epsilon-plus-flat': 'EpsilonPlusFlat',
    'epsilon-alpha2-beta1-flat': 'EpsilonAlpha2Beta1Flat',
    'epsilon-gamma-box': 'EpsilonGammaBox',
}


def make_composite(name):
    '''A new instance of the composite ``name`` (see :py:data:`COMPOSITES`).

    Raises
    ------
    ValueError
        If ``name`` is unknown.
    '''
    try:
        return COMPOSITES[name]()
    except KeyError:
        raise ValueError(f'unknown composite {name!r}; choose one of {", ".join(COMPOSITES)}') from None
