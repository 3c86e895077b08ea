'''Tests for zennit_bnfuse.evaluation.composites: Captum's default as a Zennit composite equals Captum's own LRP, and
the bias-free twins leave the biases out.'''
import copy

import pytest
import torch
from captum.attr import LRP
from zennit.rules import Epsilon, Pass

from conftest import randomize_batch_norms
from zennit_bnfuse import CompositeLRP, FusedLRP
from zennit_bnfuse.evaluation.composites import (
    COMPOSITES, DISPLAY_NAMES, batch_norm_rule, is_bias_free, make_composite,
)

TARGETS = [0, 1, 2]


def images():
    return torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


class ConvNet(torch.nn.Module):
    '''The layers Captum's LRP supports: Conv2d, BatchNorm2d, ReLU, MaxPool2d, AdaptiveAvgPool2d, Linear (flattened
    in forward: Captum has no rule for Flatten).'''
    def __init__(self, bias=True, batch_norm=True):
        super().__init__()
        layers = [torch.nn.Conv2d(1, 4, 3, bias=bias), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                  torch.nn.Conv2d(4, 6, 3, padding=1, bias=bias), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                  torch.nn.AdaptiveAvgPool2d(1)]
        if not batch_norm:
            layers = [layer for layer in layers if not isinstance(layer, torch.nn.BatchNorm2d)]
        self.features = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(6, 3, bias=bias)

    def forward(self, input):
        return self.fc(torch.flatten(self.features(input), 1))


def conv_net(bias=True, batch_norm=True):
    torch.manual_seed(0)
    model = ConvNet(bias, batch_norm).double()
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, 'bias', None) is not None and not isinstance(module, torch.nn.BatchNorm2d):
                module.bias.uniform_(-.5, .5)  # biases large enough to matter
    return randomize_batch_norms(model)


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.relu = torch.nn.ReLU()
        self.inner = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, input):
        hidden = self.relu(self.bn(self.conv(input)))
        return self.fc(torch.flatten(self.pool(self.relu(self.inner(hidden) + hidden)), 1))


def composite_relevance(model, name, handling):
    lrp = CompositeLRP(model, make_composite(name), handling=handling, batch_norm_rule=batch_norm_rule(name, handling))
    return lrp.attribute(images(), target=TARGETS)


def test_names():
    assert set(DISPLAY_NAMES) == set(COMPOSITES)
    bases = [name for name in COMPOSITES if not is_bias_free(name)]
    assert len(bases) == 5 and set(COMPOSITES) == {*bases, *(f'{name}-nobias' for name in bases)}
    assert DISPLAY_NAMES['epsilon-plus-flat-nobias'] == 'EpsilonPlusFlat (no bias)'
    with pytest.raises(ValueError, match='unknown composite \'lrp\'; choose one of epsilon, captum-epsilon'):
        make_composite('lrp')
    with pytest.raises(ValueError, match='unknown composite'):
        batch_norm_rule('lrp', 'fused')


def test_captum_epsilon_equals_captum_lrp():
    # Captum's own LRP on the model as it is: EpsilonRule(1e-9) on conv, BatchNorm, pooling and linear layers
    model = conv_net()
    expected = LRP(copy.deepcopy(model)).attribute(images(), target=TARGETS)
    ours = composite_relevance(model, 'captum-epsilon', 'unfused')
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    # fused: Captum's LRP on the fused copy
    fused = FusedLRP(model).attribute(images(), target=TARGETS)
    torch.testing.assert_close(composite_relevance(model, 'captum-epsilon', 'fused'), fused, rtol=1e-10, atol=1e-12)


def test_captum_epsilon_equals_captum_lrp_with_residual_sum():
    # the residual sum: Captum's Addition_Module (EpsilonRule) against Zennit's Sum under the composite
    torch.manual_seed(0)
    model = randomize_batch_norms(Residual().double())
    for handling in ('fused', 'unfused'):
        expected = FusedLRP(model, handling=handling).attribute(images(), target=TARGETS)
        torch.testing.assert_close(composite_relevance(model, 'captum-epsilon', handling), expected, rtol=1e-10,
                                   atol=1e-12, msg=handling)


def conservation_gap(model, name, handling):
    relevance = composite_relevance(model, name, handling)
    with torch.no_grad():
        logits = model(images())[range(3), TARGETS]
    return ((relevance.sum(dim=(1, 2, 3)) - logits) / logits.abs()).abs().max().item()


@pytest.mark.parametrize('handling', ['fused', 'unfused', 'naive'])
@pytest.mark.parametrize('name, tolerance', [('epsilon', 1e-3), ('captum-epsilon', 1e-6)])
def test_bias_free_epsilon_conserves_relevance(name, tolerance, handling):
    # without biases, LRP-epsilon passes all of the logit to the input (up to the stabiliser: 1e-6 or Captum's 1e-9),
    # whatever the handling; with them, the biases take their share
    model = conv_net()
    assert conservation_gap(model, f'{name}-nobias', handling) < tolerance
    assert conservation_gap(model, name, handling) > 5e-2


@pytest.mark.parametrize('name', [name for name in COMPOSITES if not is_bias_free(name)])
def test_bias_free_twins_leave_out_only_biases(name):
    # every Zennit rule of the composite accepts zero_params: on a model without biases and BatchNorms the twins are
    # the same, on a model with biases they differ
    plain = conv_net(bias=False, batch_norm=False)
    torch.testing.assert_close(composite_relevance(plain, f'{name}-nobias', 'fused'),
                               composite_relevance(plain, name, 'fused'), rtol=1e-12, atol=1e-14)
    biased = conv_net(bias=True, batch_norm=False)
    assert not torch.allclose(composite_relevance(biased, f'{name}-nobias', 'fused'),
                              composite_relevance(biased, name, 'fused'), rtol=1e-3, atol=1e-6)


def test_batch_norm_rule():
    assert isinstance(batch_norm_rule('epsilon-plus-flat', 'naive'), Pass)
    assert isinstance(batch_norm_rule('epsilon-plus-flat', 'zennit'), Pass)
    assert isinstance(batch_norm_rule('epsilon-plus-flat-nobias', 'unfused'), Pass)
    assert isinstance(batch_norm_rule('epsilon-plus-flat', 'unfused'), Epsilon)
    # the stabiliser: 1e-9 for Captum's default, Zennit's 1e-6 otherwise (seen on a BatchNorm with a zero output)
    batch_norm = torch.nn.BatchNorm1d(1).double().eval()
    for name, epsilon in (('captum-epsilon', 1e-9), ('epsilon', 1e-6)):
        rule = batch_norm_rule(name, 'unfused')
        handles = rule.register(batch_norm)
        input = torch.tensor([[1.]], dtype=torch.float64, requires_grad=True)
        output = batch_norm(input)  # running mean 0, variance 1: about 1
        relevance, = torch.autograd.grad(output, input, torch.ones_like(output))
        handles.remove()
        torch.testing.assert_close(relevance, input.detach() / (input.detach() + epsilon / (1 + 1e-5) ** -.5),
                                   rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match='unknown BatchNorm handling'):
        batch_norm_rule('epsilon', 'merged')
