'''The study's design as code: the arms, composites, models, regimes, metrics and thresholds that
``benchmarks/study_protocol.md`` declares, and the keys of its methods.'''
from pathlib import Path

from zennit_bnfuse.evaluation.composites import BIAS_FREE_SUFFIX
from zennit_bnfuse.evaluation.metrics import BASELINES

PROTOCOL = Path(__file__).parent / 'study_protocol.md'

CLAIM_MODELS = {
    1: ('mnist-cnn-bn', 'cifar10-vgg-bn', 'cifar10-preact-resnet'),
    2: ('mnist-mlp-bn', 'cifar10-vgg-bn-fc'),
}
TWINS = {'mnist-mlp-bn': 'mnist-mlp', 'cifar10-vgg-bn-fc': 'cifar10-vgg'}
COMPOSITES = ('epsilon-plus-flat', 'epsilon-alpha2-beta1-flat', 'epsilon-gamma-box', 'captum-epsilon')
HANDLINGS = ('fused', 'unfused', 'naive', 'zennit')
OPPONENTS = ('unfused', 'naive', 'zennit')
REGIMES = ('trained', 'negative-scales', 'bias-free')
REGIME_NAMES = {'trained': '(a) as trained', 'negative-scales': '(b) negative scales', 'bias-free': '(c) bias-free'}
BASELINE_METHODS = ('random', 'gradient-x-input')
PRIMARY = 'road_abpc'
ALPHA = .05
# the smallest median paired difference that counts, as a share of the median |primary metric| of fused
MIN_EFFECT_SHARE = .01
NEGATIVE_SHARE = .5
FUNCTION_TOLERANCE = 1e-5
# ROAD (primary): the removal percentages
ROAD_STEPS = (10, 30, 50, 70, 90)
# region perturbation (secondary, regime (a) only): 4x4 patches, 16 per step
PATCH_SIZE = 4
PATCHES_PER_STEP = 16
# the noise stream of the random heatmaps (metrics.NOISE_STREAMS uses 0 and 1)
RANDOM_STREAM = 2
# the randomisation check: one composite, every handling, the first images of each model
RANDOMISATION_COMPOSITE = 'epsilon-plus-flat'
# higher is better for these per-image metrics; the others are descriptive
FAITHFULNESS_METRICS = ('road_abpc', 'road_aopc_morf', *(f'{kind}_{baseline}' for baseline in BASELINES
                                                         for kind in ('aopc_morf', 'abpc')))
DESCRIPTIVE_METRICS = ('gini', 'entropy', 'conservation', 'gap')


def method_key(regime, composite, handling):
    '''The key of one attribution method of a model in the results.'''
    return f'{regime}/{composite}/{handling}'


def split_key(key):
    '''``(regime, composite, handling)`` of a method key; baselines give ``('baseline', '', name)``.'''
    if key in BASELINE_METHODS:
        return 'baseline', '', key
    return tuple(key.split('/'))


def claim_of(name):
    '''1 or 2 for the models the claims are about, None for the no-BN twins.'''
    return next((claim for claim, names in CLAIM_MODELS.items() if name in names), None)


def regime_composite(composite, regime):
    '''The composite name a regime uses (the bias-free twin in regime (c)).'''
    return composite + BIAS_FREE_SUFFIX if regime == 'bias-free' else composite
