'''Shared fixtures and helpers for the tests.'''
import pytest
import torch
from captum.attr._utils.lrp_rules import EpsilonRule
from zennit.composites import LayerMapComposite, layer_map_base
from zennit.rules import Epsilon
from zennit.types import Convolution

from zennit_bnfuse import CompositeLRP, FusedLRP
from zennit_bnfuse.attribution import EPSILON_RULE_TYPES
from zennit_bnfuse.fold import BATCH_NORM_TYPES
from zennit_bnfuse.layers import ThresholdReLU


def pytest_addoption(parser):
    parser.addoption('--run-slow', action='store_true', help='also run the tests marked slow (big models)')


def pytest_collection_modifyitems(config, items):
    if config.getoption('--run-slow'):
        return
    skip = pytest.mark.skip(reason='slow (a big model); run with --run-slow')
    for item in items:
        if 'slow' in item.keywords:
            item.add_marker(skip)


def randomize_batch_norms(model, seed=0):
    '''Give every BatchNorm of ``model`` random statistics and affine parameters (in place) and return the model in
    eval mode. Scales are kept away from zero so deep models stay well conditioned.'''
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, 'running_mean') and module.running_mean is not None:
                channels = module.running_mean.shape

                def draw(low, high):
                    return (torch.rand(channels, generator=generator, dtype=torch.float64) * (high - low) + low)

                module.running_mean.copy_(draw(-0.5, 0.5))
                module.running_var.copy_(draw(0.5, 2.0))
                if getattr(module, 'weight', None) is not None:
                    module.weight.copy_(draw(0.5, 1.5))
                if getattr(module, 'bias', None) is not None:
                    module.bias.copy_(draw(-0.5, 0.5))
    return model.eval()


class ModelSnapshot:
    '''Everything a user owns in a model, to check it is unchanged later: state_dict keys and values, parameter and
    buffer objects, the attributes of every module, hooks and training flags.'''
    def __init__(self, model):
        self.model = model
        self.state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        self.parameter_ids = [(name, id(param)) for name, param in model.named_parameters()]
        self.buffer_ids = [(name, id(buffer)) for name, buffer in model.named_buffers()]
        self.modules = [(name, id(module)) for name, module in model.named_modules()]
        self.attributes = {name: sorted(vars(module)) for name, module in model.named_modules()}
        self.hooks = {name: self.hook_count(module) for name, module in model.named_modules()}
        self.training = {name: module.training for name, module in model.named_modules()}

    @staticmethod
    def hook_count(module):
        return sum(len(value) for key, value in vars(module).items()
                   if key.endswith('hooks') and isinstance(value, dict))

    def assert_unchanged(self):
        model = self.model
        state = model.state_dict()
        assert list(state) == list(self.state)
        for key, value in state.items():
            saved = self.state[key]
            # NaN statistics (which the checks refuse) must stay NaN
            same = torch.equal(value, saved) or (value.shape == saved.shape and value.is_floating_point()
                                                 and torch.allclose(value, saved, rtol=0, atol=0, equal_nan=True))
            assert value.dtype == saved.dtype and same, key
        assert [(name, id(param)) for name, param in model.named_parameters()] == self.parameter_ids
        assert [(name, id(buffer)) for name, buffer in model.named_buffers()] == self.buffer_ids
        assert [(name, id(module)) for name, module in model.named_modules()] == self.modules
        assert {name: sorted(vars(module)) for name, module in model.named_modules()} == self.attributes
        assert {name: self.hook_count(module) for name, module in model.named_modules()} == self.hooks
        assert {name: module.training for name, module in model.named_modules()} == self.training


@pytest.fixture
def snapshot():
    '''Factory: ``snapshot(model)`` returns a :py:class:`ModelSnapshot`.'''
    return ModelSnapshot


# a stabiliser small enough that LRP-epsilon equals gradient x input in float64 on ReLU/conv/linear/pool/add networks
EPSILON = 1e-15


def epsilon_composite():
    '''Zennit's layer map of its built-in composites (Pass for activations, Norm for sums and pooling) with a
    negligible stabiliser, and Epsilon on every conv and linear layer: zennit_bnfuse.evaluation.composites.epsilon
    with EPSILON instead of 1e-6.'''
    return LayerMapComposite(layer_map=layer_map_base(stabilizer=EPSILON) + [
        (Convolution, Epsilon(EPSILON)), (torch.nn.Linear, Epsilon(EPSILON))])


def epsilon_explainer(engine, model, handling):
    '''FusedLRP with Captum's EpsilonRule on every layer type that has a rule by default, or CompositeLRP with
    :py:func:`epsilon_composite`; BatchNorms left in the model get the epsilon rule too.'''
    if engine == 'FusedLRP':
        return FusedLRP(model, handling=handling,
                        rules={key: EpsilonRule(EPSILON)
                               for key in (*EPSILON_RULE_TYPES, *BATCH_NORM_TYPES, ThresholdReLU)})
    return CompositeLRP(model, epsilon_composite(), handling=handling, batch_norm_rule=Epsilon(EPSILON))
