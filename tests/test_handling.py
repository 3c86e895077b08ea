'''Tests for the BatchNorm handlings: they differ where they should and agree where they should.'''
import copy

import pytest
import torch
from captum.attr._utils.lrp_rules import GammaRule
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlusFlat, LayerMapComposite, MixedComposite, NameMapComposite
from zennit.rules import Epsilon as ZennitEpsilon, Gamma
from zennit.types import BatchNorm

from conftest import randomize_batch_norms
from zennit_bnfuse import ALL_HANDLINGS, HANDLINGS, CompositeLRP, FusedLRP, bn_handling, fuse
from zennit_bnfuse.evaluation.composites import COMPOSITES, make_composite
from zennit_bnfuse.evaluation.models import build
from zennit_bnfuse.handling import zennit_merged


def conv_net(batch_norm):
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3, padding=1),
              torch.nn.BatchNorm2d(6), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
              torch.nn.Linear(6, 3)]
    if not batch_norm:
        layers = [layer for layer in layers if not isinstance(layer, torch.nn.BatchNorm2d)]
    return randomize_batch_norms(torch.nn.Sequential(*layers).double())


def attribute(cls, model, handling, composite='epsilon-plus-flat'):
    images = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if cls == 'composite':
        return CompositeLRP(model, make_composite(composite), handling=handling).attribute(images, target=[0, 1, 2])
    return FusedLRP(model, handling=handling).attribute(images, target=[0, 1, 2]).detach()


def test_bn_handling_lookup():
    assert bn_handling('fused').fuses and not bn_handling('naive').fuses
    assert bn_handling(HANDLINGS['unfused']) is HANDLINGS['unfused']
    assert bn_handling('naive').batch_norm_rule == 'pass'
    with pytest.raises(ValueError, match="handling 'pass'; choose one of 'fused', 'unfused', 'naive', 'zennit'"):
        bn_handling('pass')


@pytest.mark.parametrize('cls', ['composite', 'captum'])
@pytest.mark.parametrize('composite', sorted(COMPOSITES))
def test_all_handlings_agree_without_batchnorm(cls, composite):
    model = conv_net(batch_norm=False)
    fused, unfused, naive = (attribute(cls, model, handling, composite) for handling in ('fused', 'unfused', 'naive'))
    assert torch.equal(fused, unfused) and torch.equal(fused, naive)


@pytest.mark.parametrize('cls', ['composite', 'captum'])
def test_handlings_differ_with_batchnorm(cls):
    model = conv_net(batch_norm=True)
    fused, unfused, naive = (attribute(cls, model, handling) for handling in ('fused', 'unfused', 'naive'))
    assert not torch.allclose(fused, naive, rtol=1e-3, atol=1e-6)
    if cls == 'composite':
        # ZPlus on the fused conv sees the BN's scale in its weights; unfused it does not
        assert not torch.allclose(fused, unfused, rtol=1e-3, atol=1e-6)


def test_epsilon_fused_equals_unfused_for_conv_then_bn():
    # under LRP-epsilon the BN's ratio z_bn / z_conv cancels: conv -> BN gives the same relevance fused or not, up
    # to the stabiliser (here 1e-12; also on the BN when unfused)
    model = conv_net(batch_norm=True)
    images = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def relevance(handling):
        composite = LayerMapComposite([((torch.nn.Conv2d, torch.nn.Linear), ZennitEpsilon(1e-12))])
        lrp = CompositeLRP(model, composite, handling=handling, batch_norm_rule=ZennitEpsilon(1e-12))
        return lrp.attribute(images, target=[0, 1, 2])

    torch.testing.assert_close(relevance('fused'), relevance('unfused'), rtol=1e-8, atol=1e-12)


def test_naive_and_unfused_equal_zennit_by_hand():
    model = conv_net(batch_norm=True)
    images = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2])

    def by_hand(composite):
        with Gradient(model, composite) as attributor:
            return attributor(images, lambda output: torch.eye(3, dtype=output.dtype)[target] * output)[1]

    naive = CompositeLRP(model, EpsilonPlusFlat(), handling='naive').attribute(images, target=target)
    torch.testing.assert_close(naive, by_hand(EpsilonPlusFlat()), rtol=1e-10, atol=1e-12)
    unfused = CompositeLRP(model, EpsilonPlusFlat(), handling='unfused').attribute(images, target=target)
    epsilon_on_bn = MixedComposite([LayerMapComposite([(BatchNorm, ZennitEpsilon())]), EpsilonPlusFlat()])
    torch.testing.assert_close(unfused, by_hand(epsilon_on_bn), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('handling', sorted(ALL_HANDLINGS))
def test_every_handling_refuses_invalid_batch_norm_statistics(handling, snapshot):
    model = conv_net(batch_norm=True)
    model[4].running_var[1] = -1.
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"BatchNorm '4' has running_var \+ eps <= 0 in channel\(s\) \[1\]"):
        bn_handling(handling).prepare(model, 'captum')
    before.assert_unchanged()


def test_zennit_handling_lookup():
    assert set(HANDLINGS) == {'fused', 'unfused', 'naive'}
    assert list(ALL_HANDLINGS) == ['fused', 'unfused', 'naive', 'zennit']
    assert bn_handling('zennit').batch_norm_rule == 'pass' and not bn_handling('zennit').fuses
    assert 'SequentialMergeBatchNorm' in bn_handling('zennit').description


def test_zennit_handling_equals_zennit_canonizer_by_hand(snapshot):
    model = conv_net(batch_norm=True)
    user = snapshot(model)
    images = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2])
    by_hand_model = copy.deepcopy(model)
    with Gradient(by_hand_model, EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])) as attributor:
        expected = attributor(images, lambda output: torch.eye(3, dtype=output.dtype)[target] * output)[1]
    lrp = CompositeLRP(model, EpsilonPlusFlat(), handling='zennit')
    torch.testing.assert_close(lrp.attribute(images, target=target), expected, rtol=1e-10, atol=1e-12)
    assert [(entry.layer, entry.bn) for entry in lrp.prepared.report.fused] == [('0', '1'), ('3', '4')]
    # Captum's rules: Zennit's merge and this package's fold give the same relevance on conv -> BN, up to the
    # BatchNorms Zennit leaves behind, which compute x / sqrt(1 + eps): a factor 1 - 5e-6 each (two on every path)
    zennit = FusedLRP(model, handling='zennit').attribute(images, target=target)
    fused = FusedLRP(model, handling='fused').attribute(images, target=target)
    torch.testing.assert_close(zennit, fused, rtol=3e-5, atol=1e-12)
    assert not torch.allclose(zennit, fused, rtol=1e-6, atol=0)
    user.assert_unchanged()


def test_zennit_handling_where_zennit_merges_nothing():
    # BN after the ReLU: no linear layer right before it, so Zennit leaves it and relevance passes it, as naive
    torch.manual_seed(0)
    model = randomize_batch_norms(torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 3, 3),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).double())
    images = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lrp = CompositeLRP(model, EpsilonPlusFlat(), handling='zennit')
    zennit = lrp.attribute(images, target=[0, 1, 2])
    assert not lrp.prepared.report.fused and [entry.bn for entry in lrp.prepared.report.unfused] == ['2']
    assert torch.equal(zennit, CompositeLRP(model, EpsilonPlusFlat(), handling='naive').attribute(images, [0, 1, 2]))


class SumThenBatchNorm(torch.nn.Module):
    '''``bn(conv(x) + x)``: the conv is registered right before the BN, but the BN normalises the sum.'''
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(2)

    def forward(self, input):
        return self.bn(self.conv(input) + input).flatten(1)


def test_zennit_handling_refuses_merges_that_change_the_function(snapshot):
    torch.manual_seed(0)
    model = randomize_batch_norms(SumThenBatchNorm().double())
    user = snapshot(model)
    # what Zennit's canonizer does to this model: a different function
    merged = copy.deepcopy(model)
    SequentialMergeBatchNorm().apply(merged)
    images = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    assert not torch.allclose(merged(images), model(images))
    with pytest.raises(ValueError, match=r"merge `conv` into `bn`: neighbours in module registration.*use 'fused'"):
        CompositeLRP(model, EpsilonPlusFlat(), handling='zennit').attribute(images, target=[0, 1])
    user.assert_unchanged()
    with pytest.raises(ValueError, match='`stem` into `blocks.0.bn1`'):
        zennit_merged(randomize_batch_norms(build('cifar10-preact-resnet')))


class WeightNormedNet(torch.nn.Module):
    '''conv -> ReLU -> BatchNorm -> weight-normed conv -> ReLU -> pool -> linear: the BatchNorm folds only into the
    weight-normed conv (the ReLU before it leaves no layer there).'''
    def __init__(self, parametrization=torch.nn.utils.parametrizations.weight_norm):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.mid = parametrization(torch.nn.Conv2d(4, 4, 3))
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.mid(self.bn(torch.relu(self.conv(x))))).mean((2, 3)))


def weight_normed_net(**kwargs):
    torch.manual_seed(0)
    return randomize_batch_norms(WeightNormedNet(**kwargs)).double().eval()


def plain_twin(model):
    '''``model`` with a torch.nn.Conv2d holding the weight its weight-normed conv computes, built by hand.'''
    twin = copy.deepcopy(model)
    twin.mid = torch.nn.Conv2d(4, 4, 3).double()
    with torch.no_grad():
        twin.mid.weight.copy_(model.mid.weight)
        twin.mid.bias.copy_(model.mid.bias)
    return twin


@pytest.mark.parametrize('explainer', [
    lambda model: CompositeLRP(model, EpsilonPlusFlat()),
    lambda model: CompositeLRP(model, EpsilonPlusFlat(), single_pass=False),
    lambda model: FusedLRP(model, rules={torch.nn.Conv2d: GammaRule(gamma=.5)}),
    lambda model: FusedLRP(model, rules={'mid': GammaRule(gamma=.5)}, engine='captum'),
], ids=['composite', 'composite-zennit-engine', 'fused', 'fused-captum'])
@pytest.mark.parametrize('parametrization', [torch.nn.utils.parametrizations.weight_norm,
                                             torch.nn.utils.parametrizations.spectral_norm],
                         ids=['weight_norm', 'spectral_norm'])
def test_a_parametrized_layer_gets_its_rule_and_its_fold(explainer, parametrization):
    '''A weight-normed conv computes its weight in its forward, so a rule could not modify it: Zennit's rules
    modified the bias only (0.59 off the same model with a plain conv), Captum's GammaRule set the data of a weight
    computed anew (0.21 off), the Captum single pass raised an error that blamed the inputs, and the BatchNorm before
    it stayed unfolded. The user's model and its class are left as they were.'''
    model = weight_normed_net(parametrization=parametrization)
    state = copy.deepcopy(model.state_dict())
    input = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    lrp = explainer(model)
    actual = lrp.attribute(input, target=1)
    assert [item.bn for item in lrp.prepared.report.fused] == ['bn']
    expected = explainer(plain_twin(model)).attribute(input, target=1)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-14)
    assert torch.nn.utils.parametrize.is_parametrized(model.mid)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    model(input)  # the class keeps its parametrized weight


def test_a_parametrization_in_training_mode_is_refused():
    model = weight_normed_net(parametrization=torch.nn.utils.parametrizations.spectral_norm)
    model.mid.parametrizations.train()
    with pytest.raises(ValueError, match=r'`mid`: ParametrizedConv2d has a parametrization in training mode '
                                         r'\(_SpectralNorm\), which may compute another weight on every call'):
        FusedLRP(model).attribute(torch.rand(1, 3, 8, 8, dtype=torch.float64), target=0)


def test_fuse_names_a_parametrized_layer_as_the_reason():
    report = fuse(weight_normed_net())[1]
    assert report.fused == []
    assert 'whose weight torch.nn.utils.parametrize computes in every forward' in report.unfused[0].reason


class Doubled(torch.nn.Module):
    '''A parametrization: the tensor is twice what is stored.'''
    def forward(self, value):
        return 2 * value


class ScaledHead(torch.nn.Module):
    '''A weight-normed linear layer times a parametrized scale: one parametrized module inside another.'''
    def __init__(self, parametrized=True, out=3):
        super().__init__()
        self.linear = torch.nn.Linear(4, out)
        self.scale = torch.nn.Parameter(torch.tensor(.35 if parametrized else .7))
        if parametrized:
            torch.nn.utils.parametrizations.weight_norm(self.linear)
            torch.nn.utils.parametrize.register_parametrization(self, 'scale', Doubled(), unsafe=True)

    def forward(self, x):
        return self.linear(x) * self.scale


@pytest.mark.parametrize('explainer', [
    lambda model: CompositeLRP(model, LayerMapComposite([(torch.nn.Linear, Gamma(gamma=.5))])),
    lambda model: FusedLRP(model, rules={torch.nn.Linear: GammaRule(gamma=.5)}),
    lambda model: FusedLRP(model, rules={torch.nn.Linear: GammaRule(gamma=.5)}, engine='captum'),
], ids=['composite', 'fused', 'fused-captum'])
@pytest.mark.parametrize('where', ['nested', 'root', 'shared'])
def test_parametrized_modules_inside_others_and_shared_are_plain_in_the_copy(explainer, where):
    '''Only the outermost parametrized module was made plain: a weight-normed layer inside one kept its
    parametrization (GammaRule 0.19 off the plain model, the single pass raised); a module used under two names was
    made plain under one.'''
    torch.manual_seed(0)
    first = torch.nn.Linear(4, 4)
    layers = [first, torch.nn.ReLU(), ScaledHead()]
    if where == 'shared':
        layers = [first, torch.nn.ReLU(), torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 4)),
                  torch.nn.ReLU(), ScaledHead()]
        layers.insert(4, layers[2])
    model = (ScaledHead() if where == 'root' else torch.nn.Sequential(*layers)).double().eval()
    twin = copy.deepcopy(model)
    heads = [name for name, module in model.named_modules() if isinstance(module, ScaledHead)]
    for name in heads:
        plain = ScaledHead(parametrized=False).double()
        with torch.no_grad():
            plain.linear.weight.copy_(model.get_submodule(name).linear.weight)
            plain.linear.bias.copy_(model.get_submodule(name).linear.bias)
        twin = plain if name == '' else twin
        if name:
            twin[int(name)] = plain
    if where == 'shared':
        shared = torch.nn.Linear(4, 4).double()
        with torch.no_grad():
            shared.weight.copy_(model[2].weight)
            shared.bias.copy_(model[2].bias)
        twin[2] = twin[4] = shared
    input = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(twin(input), model(input), rtol=1e-14, atol=0)
    actual = explainer(model).attribute(input, target=1)
    torch.testing.assert_close(actual, explainer(twin).attribute(input, target=1), rtol=1e-10, atol=1e-14)
    assert torch.nn.utils.parametrize.is_parametrized(model.get_submodule(heads[0]))


def test_weight_norm_in_training_mode_is_not_refused():
    '''weight_norm computes the same weight in either mode; only BatchNorms, dropouts and other parametrizations in
    training mode are refused.'''
    model = torch.nn.Sequential(torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 3))).double()
    assert model.training
    FusedLRP(model).attribute(torch.randn(2, 4, dtype=torch.float64), target=0)


def test_a_parametrized_module_shared_inside_and_outside_a_parametrized_one_stays_shared():
    '''The weight-normed layer made plain under its first name was copied again with the parametrized block
    around it: two modules in the copy, a fold the model does not allow and a rule by name reaching one call
    (FusedLRP 0.93 off the plain twin in the review's model, CompositeLRP 3.0).'''
    torch.manual_seed(0)
    head = ScaledHead(out=4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), head.linear, torch.nn.ReLU(), head,
                                torch.nn.Linear(4, 3)).double().eval()
    twin = copy.deepcopy(model)
    plain = ScaledHead(parametrized=False, out=4).double()
    with torch.no_grad():
        plain.linear.weight.copy_(head.linear.weight)
        plain.linear.bias.copy_(head.linear.bias)
    twin[2], twin[4] = plain.linear, plain
    input = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(twin(input), model(input), rtol=1e-14, atol=0)
    for explainer in (lambda model: FusedLRP(model, rules={'2': GammaRule(gamma=.5)}),
                      lambda model: CompositeLRP(model, NameMapComposite([(['2'], Gamma(gamma=.5))]))):
        torch.testing.assert_close(explainer(model).attribute(input, target=1),
                                   explainer(twin).attribute(input, target=1), rtol=1e-10, atol=1e-14)


class ParametrizedBlock(torch.nn.Module):
    '''conv -> BatchNorm, times a parametrized scale: torch.fx keeps the block whole, its BatchNorm unpaired.'''
    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
        self.scale = torch.nn.Parameter(torch.tensor(.5))
        torch.nn.utils.parametrize.register_parametrization(self, 'scale', Doubled(), unsafe=True)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.scale


def test_a_batch_norm_inside_a_parametrized_block_folds_in_the_lrp_copy_and_fuse_says_why_not():
    torch.manual_seed(0)
    model = randomize_batch_norms(torch.nn.Sequential(ParametrizedBlock(), torch.nn.Flatten(),
                                                      torch.nn.Linear(64, 2))).double().eval()
    report = fuse(model)[1]
    assert 'torch.nn.utils.parametrize made it parametrized' in report.unfused[0].reason
    lrp = FusedLRP(model)
    lrp.attribute(torch.rand(2, 3, 6, 6, dtype=torch.float64), target=0)
    assert [item.bn for item in lrp.prepared.report.fused] == ['0.bn']
