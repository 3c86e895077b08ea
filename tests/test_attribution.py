'''Tests for the Captum-style classes FusedLRP and CompositeLRP, in Captum's style: tiny models, exact tensors.'''
import collections
import copy
import matplotlib
import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops import StochasticDepth
from captum.attr import LRP
from captum.attr._utils.lrp_rules import EpsilonRule, GammaRule, IdentityRule
from zennit.attribution import Gradient
from zennit.canonizers import CompositeCanonizer, SequentialMergeBatchNorm
from zennit.composites import (EpsilonAlpha2Beta1Flat, EpsilonPlusFlat, LayerMapComposite, MixedComposite,
                               NameMapComposite)
from zennit.rules import Epsilon, Gamma
from zennit.torchvision import ResNetCanonizer

from conftest import epsilon_explainer, randomize_batch_norms
from zennit_bnfuse import CompositeLRP, FuseBatchNorm, FusedLRP, SinglePass, ThresholdReLU
from zennit_bnfuse.graph import writes_into_input

matplotlib.use('Agg')

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
EACH_EXPLAINER = pytest.mark.parametrize(
    'explainer', [FusedLRP, lambda model: CompositeLRP(model, EpsilonPlusFlat())], ids=['FusedLRP', 'CompositeLRP'])


class TinyNet(torch.nn.Module):
    '''fc1 -> BatchNorm1d -> relu -> fc2, every number chosen by hand (see test_hand_computed_relevance).'''
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(2, 2, bias=False)
        self.bn = torch.nn.BatchNorm1d(2, eps=0.)
        self.relu = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1., 2.], [-1., 2.]]))
            self.bn.running_var.fill_(.25)  # scale 2
            self.bn.bias.fill_(3.)  # shift 3
            self.fc2.weight.fill_(1.)
        self.double().eval()

    def forward(self, x):
        return self.fc2(self.relu(self.bn(self.fc1(x))))


@pytest.mark.parametrize('handling, expected', [('fused', [0., 8.]), ('unfused', [0., 8.]), ('naive', [-2., 16.])])
def test_hand_computed_relevance(handling, expected):
    # x = (1, 1): fc1 -> (3, 1), bn -> (9, 5), output 14.
    # fused: fc1' = 2 * fc1 with bias 3: R = 9 * (2, 4) / 9 + 5 * (-2, 4) / 5 = (0, 8); the biases absorb 6.
    # unfused: epsilon on the BN hands (6, 2) to fc1: 6 * (1, 2) / 3 + 2 * (-1, 2) / 1 = (0, 8).
    # naive: (9, 5) passes the BN: 9 * (1, 2) / 3 + 5 * (-1, 2) / 1 = (-2, 16).
    model = TinyNet()
    input = torch.ones(1, 2, dtype=torch.float64)
    relevance, delta = FusedLRP(model, handling=handling).attribute(input, target=0, return_convergence_delta=True)
    torch.testing.assert_close(relevance, torch.tensor([expected], dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(delta, torch.tensor([14. - sum(expected)], dtype=torch.float64), rtol=0, atol=1e-6)


def test_captum_rejects_batchnorm1d_fused_lrp_does_not():
    model = TinyNet()
    input = torch.ones(1, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match='BatchNorm1d'):
        LRP(model).attribute(input, target=0)
    assert FusedLRP(model).attribute(input, target=0).shape == (1, 2)


class Conv3dNet(torch.nn.Module):
    '''Conv1d/Conv3d with BatchNorm1d/3d, none of which Captum's LRP accepts.'''
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)
        self.bn = torch.nn.BatchNorm3d(2)
        self.conv1d = torch.nn.Conv1d(2, 3, 3)
        self.bn1d = torch.nn.BatchNorm1d(3)
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(3, 4))
        x = torch.relu(self.bn1d(self.conv1d(x))).mean(dim=2)
        return self.fc(x)


def test_captum_rejects_3d_and_1d_fused_lrp_does_not():
    torch.manual_seed(0)
    model = randomize_batch_norms(Conv3dNet().double())
    input = torch.rand(2, 1, 5, 4, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match='Conv3d'):
        LRP(model).attribute(input, target=1)
    relevance = FusedLRP(model).attribute(input, target=1)
    assert relevance.shape == input.shape and torch.isfinite(relevance).all()


class PlainNet(torch.nn.Module):
    '''conv -> [bn] -> relu -> maxpool -> conv -> [bn] -> relu -> avgpool -> linear.'''
    def __init__(self, batch_norm=False):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = torch.nn.ReLU()
        self.pool = torch.nn.MaxPool2d(2)
        self.conv2 = torch.nn.Conv2d(4, 5, 3)
        self.relu2 = torch.nn.ReLU()
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(5, 3)
        if batch_norm:
            self.bn1 = torch.nn.BatchNorm2d(4)
            self.bn2 = torch.nn.BatchNorm2d(5)

    def forward(self, x):
        x = self.conv1(x)
        x = self.pool(self.relu1(self.bn1(x) if hasattr(self, 'bn1') else x))
        x = self.conv2(x)
        x = self.avgpool(self.relu2(self.bn2(x) if hasattr(self, 'bn2') else x))
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize('rules', [None, {torch.nn.Conv2d: GammaRule(gamma=.5)}])
def test_equals_captum_without_batchnorm(rules):
    torch.manual_seed(0)
    model = PlainNet().double().eval()
    input = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    reference_model = PlainNet().double().eval()
    reference_model.load_state_dict(model.state_dict())
    for name, module in reference_model.named_modules():
        if rules and type(module) in rules:
            module.rule = GammaRule(gamma=.5)
    expected = LRP(reference_model).attribute(input, target=[0, 2])
    actual = FusedLRP(model, rules=rules).attribute(input, target=[0, 2])
    assert torch.equal(actual, expected)


def fused_by_hand(model):
    '''PlainNet without BatchNorm, with the BatchNorms of ``model`` folded by the textbook formula.'''
    fused = PlainNet().double().eval()
    state = {key: value for key, value in model.state_dict().items() if not key.startswith('bn')}
    fused.load_state_dict(state)
    for conv, bn in ((fused.conv1, model.bn1), (fused.conv2, model.bn2)):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        with torch.no_grad():
            conv.weight.mul_(scale[:, None, None, None])
            conv.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
    return fused


@pytest.mark.parametrize('rule', [EpsilonRule(), GammaRule(gamma=.25)])
def test_equals_captum_on_model_fused_by_hand(rule):
    torch.manual_seed(0)
    model = randomize_batch_norms(PlainNet(batch_norm=True).double())
    input = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    reference = fused_by_hand(model)
    for module in (reference.conv1, reference.conv2):
        module.rule = type(rule)(**({'gamma': .25} if isinstance(rule, GammaRule) else {}))
    expected = LRP(reference).attribute(input, target=1)
    actual = FusedLRP(model, rules={torch.nn.Conv2d: rule}).attribute(input, target=1)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_conserves_relevance_without_shifts_and_biases():
    torch.manual_seed(0)
    model = randomize_batch_norms(PlainNet(batch_norm=True).double())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.zero_()
                module.bias.zero_()
            elif getattr(module, 'bias', None) is not None:
                module.bias.zero_()
    # replace the max pool by an average pool: epsilon on a max pool is not conservative
    model.pool = torch.nn.AvgPool2d(2)
    input = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    output = model(input)[:, 2]
    lrp = FusedLRP(model, rules={torch.nn.Conv2d: EpsilonRule(epsilon=1e-9)})
    _, delta = lrp.attribute(input, target=2, return_convergence_delta=True)
    assert (delta.abs() / output.abs()).max() < 1e-6


def test_unfusable_batchnorm_gets_chosen_rule():
    # a BN after a ReLU and before an average pooling that counts zero padding cannot be fused; by default it gets
    # Captum's EpsilonRule
    torch.manual_seed(0)
    model = randomize_batch_norms(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4), torch.nn.AvgPool2d(3, 1, 1),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)).double())
    input = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    lrp = FusedLRP(model)
    default = lrp.attribute(input, target=0)
    assert [item.bn for item in lrp.prepared.report.unfused] == ['2']
    # Captum itself gives BatchNorm2d the EpsilonRule: the same relevance (Flatten is Captum-incompatible, so the
    # reference uses the flatten-free equivalent with a 1x1 input to the Linear)
    reference = torch.nn.Sequential(*list(model.children())[:5], torch.nn.Conv2d(4, 2, 1)).double().eval()
    with torch.no_grad():
        reference[5].weight.copy_(model[6].weight[:, :, None, None])
        reference[5].bias.copy_(model[6].bias)
    expected = LRP(reference).attribute(input, target=(0, 0, 0))
    torch.testing.assert_close(default, expected, rtol=1e-10, atol=1e-12)
    identity = FusedLRP(model, rules={'2': IdentityRule()}).attribute(input, target=0)
    assert not torch.allclose(identity, default)


def test_rule_for_a_folded_batchnorm_is_refused(snapshot):
    # the BatchNorm is folded into the conv: no layer is left to take its rule
    torch.manual_seed(0)  # unseeded, every ReLU was dead in some runs (relevance all 0)
    model = randomize_batch_norms(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(16, 2)).double())
    input = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^rules names '1', which is folded into `0`: it has no layer of its own to "
                       r"take the rule, which would never apply\. Give the rule to the layer it was folded into, or "
                       r"pass handling='unfused' to keep the BatchNorm as a layer\.$"):
        FusedLRP(model, rules={'1': IdentityRule()}).attribute(input, target=0)
    before.assert_unchanged()
    kept = FusedLRP(model, rules={'1': IdentityRule()}, handling='unfused').attribute(input, target=0)
    assert not torch.allclose(kept, FusedLRP(model, handling='unfused').attribute(input, target=0))
    # set Captum's way, as an attribute of the module, the rule was ignored without a word
    model = copy.deepcopy(model)
    model[1].rule = IdentityRule()
    with pytest.raises(ValueError, match=r"^a `rule` attribute is set on '1', which is folded into `0`"):
        FusedLRP(model).attribute(input, target=0)
    # on a module the forward never calls (an auxiliary head, Captum's rule on every layer of a type), it is fine
    del model[1].rule
    with_head = WithUnusedHead(model)
    with_head.head.rule = EpsilonRule()
    torch.testing.assert_close(FusedLRP(with_head).attribute(input, target=0),
                               FusedLRP(model).attribute(input, target=0), rtol=0, atol=0)


class WithUnusedHead(torch.nn.Module):
    '''``net``, and a linear head the forward never calls (as an auxiliary head in eval mode).'''
    def __init__(self, net):
        super().__init__()
        self.net, self.head = net, torch.nn.Linear(2, 2).double()

    def forward(self, x):
        return self.net(x)


def test_unsupported_layer_raises_captum_style_type_error():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.PixelShuffle(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 2)).eval()
    with pytest.raises(TypeError, match=r"Module `2` of type torch\.nn\.modules\.pixelshuffle\.PixelShuffle has no "
                                        r"rule.*rules=\{'2': EpsilonRule\(\)\}"):
        FusedLRP(model).attribute(torch.rand(1, 1, 4, 4), target=0)
    relevance = FusedLRP(model, rules={torch.nn.PixelShuffle: None}).attribute(torch.rand(1, 1, 4, 4), target=0)
    assert relevance.shape == (1, 1, 4, 4)


class CallsGroupNorm(torch.nn.GroupNorm):
    '''A GroupNorm subclass whose forward calls ``F.group_norm`` itself, as timm's GroupNorm does (fx would trace
    through it).'''
    def forward(self, x):
        return torch.nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class GroupNormed(torch.nn.Module):
    '''conv -> norm -> relu -> conv -> norm (the same module again) -> mean -> linear.'''
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.norm = CallsGroupNorm(2, 4)
        self.conv2 = torch.nn.Conv2d(4, 4, 1)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        x = self.norm(self.conv2(torch.relu(self.norm(self.conv(x)))))
        return self.fc(x.mean((2, 3)))


def group_normed():
    torch.manual_seed(0)
    return GroupNormed().double().eval(), torch.rand(2, 2, 6, 6, dtype=torch.float64)


@pytest.mark.filterwarnings('ignore:Input Tensor 0 did not already require gradients')
@pytest.mark.filterwarnings('error')
def test_group_norm_subclass_gets_a_rule_or_a_type_error():
    '''A normalisation layer other than BatchNorm is one module to LRP, subclasses included: FusedLRP raises Captum's
    error for a layer without a rule, and a rule given for torch's type reaches the subclass.'''
    model, input = group_normed()
    with pytest.raises(TypeError, match=r'Module `norm` of type test_attribution\.CallsGroupNorm has no rule defined'):
        FusedLRP(model).attribute(input, target=0)
    relevance = FusedLRP(model, rules={torch.nn.GroupNorm: EpsilonRule()}).attribute(input, target=0)
    assert relevance.shape == input.shape


def mapped_group_norm():
    '''EpsilonPlusFlat with Epsilon for every GroupNorm.'''
    return MixedComposite([LayerMapComposite([(torch.nn.GroupNorm, Epsilon())]), EpsilonPlusFlat()])


@pytest.mark.filterwarnings('error')
def test_composite_without_a_rule_for_group_norm_warns_once():
    model, input = group_normed()
    lrp = CompositeLRP(model, EpsilonPlusFlat())
    with pytest.warns(UserWarning) as caught:
        lrp.attribute(input, target=0)
    assert [str(warning.message) for warning in caught] == [
        'zennit_bnfuse: the composite gives no rule to 1 normalisation layer(s) that are not BatchNorms (`norm`; the '
        'first of type CallsGroupNorm), so LRP passes relevance through them by their plain gradient, which is not a '
        'relevance: it carries the gradient of the statistics they normalise by. Give them a rule that fits the layer '
        'in the composite, by type (a LayerMapComposite in a MixedComposite ahead of yours) or by name '
        '(NameMapComposite).']
    assert caught[0].filename == __file__
    lrp.attribute(input, target=1)  # once per prepared copy
    mapped = [CompositeLRP(model, mapped_group_norm(), engine=engine).attribute(input, target=0)
              for engine in ('singlepass', 'zennit')]
    assert torch.equal(*mapped)


def test_bad_rules_argument():
    with pytest.raises(TypeError, match='PropagationRule'):
        FusedLRP(TinyNet(), rules={'fc1': 'epsilon'})
    with pytest.raises(TypeError, match='module names or module types'):
        FusedLRP(TinyNet(), rules={1: EpsilonRule()})
    with pytest.raises(ValueError, match="unknown BatchNorm handling 'merged'"):
        FusedLRP(TinyNet(), handling='merged')
    # a misspelt name would leave the layer on its default rule without a word
    with pytest.raises(ValueError, match="rules names 'fc3', which is not a module of the model; did you mean 'fc"):
        FusedLRP(TinyNet(), rules={'fc3': GammaRule()})


def test_users_captum_rule_attribute_is_honoured_and_kept():
    model = TinyNet()
    model.fc1.rule = GammaRule(gamma=1.)
    input = torch.ones(1, 2, dtype=torch.float64)
    lrp = FusedLRP(model)
    first, second = lrp.attribute(input, target=0), lrp.attribute(input, target=0)
    plain = FusedLRP(TinyNet()).attribute(input, target=0)
    assert torch.equal(first, second) and not torch.allclose(first, plain)
    assert isinstance(model.fc1.rule, GammaRule)


def test_prepared_copy_cached_and_rebuilt_on_change():
    model = TinyNet()
    input = torch.ones(1, 2, dtype=torch.float64)
    lrp = FusedLRP(model)
    lrp.attribute(input, target=0)
    lrp.attribute(input, target=0)
    assert lrp.prepared.builds == 1
    optimizer = torch.optim.SGD(model.parameters(), lr=.1)
    model(input).sum().backward()
    optimizer.step()
    changed = lrp.attribute(input, target=0)
    assert lrp.prepared.builds == 2
    assert torch.allclose(changed, FusedLRP(model).attribute(input, target=0))
    model.load_state_dict(TinyNet().state_dict())
    torch.testing.assert_close(lrp.attribute(input, target=0), torch.tensor([[0., 8.]], dtype=torch.float64))
    assert lrp.prepared.builds == 3


@EACH_EXPLAINER
def test_prepared_copy_rebuilt_when_hooks_or_forward_change(explainer):
    # the model's function changes without any tensor changing: the cached copy must follow it
    model = TinyNet()
    input = torch.ones(1, 2, dtype=torch.float64)
    lrp = explainer(model)
    before = lrp.attribute(input, target=0)
    handle = model.fc2.register_forward_hook(lambda module, args, output: output * 2)
    hooked = lrp.attribute(input, target=0)
    assert lrp.prepared.builds == 2
    assert torch.equal(hooked, explainer(model).attribute(input, target=0))
    assert not torch.allclose(hooked, before)
    handle.remove()
    assert torch.equal(lrp.attribute(input, target=0), before)
    model.relu.forward = lambda x: torch.relu(x - 6.)  # (9, 5) -> (3, 0)
    shifted = lrp.attribute(input, target=0)
    assert lrp.prepared.builds == 4
    assert torch.equal(shifted, explainer(model).attribute(input, target=0))
    assert not torch.allclose(shifted, before)


class Gated(torch.nn.Module):
    """TinyNet's layers, with plain attributes the forward reads: a flag that skips the BatchNorm, a scale and a
    tensor held as an attribute, not a buffer."""
    def __init__(self):
        super().__init__()
        self.net = TinyNet()
        self.use_bn = True
        self.scale = 1.
        self.offset = torch.zeros(2, dtype=torch.float64)

    def forward(self, x):
        net = self.net
        hidden = net.fc1(x)
        hidden = net.bn(hidden) if self.use_bn else hidden
        return net.fc2(net.relu(hidden * self.scale + self.offset))


@EACH_EXPLAINER
def test_prepared_copy_rebuilt_when_a_plain_attribute_changes(explainer):
    # each change below leaves every parameter, buffer, hook and module as it was; only what forward reads differs
    model = Gated()
    input = torch.ones(1, 2, dtype=torch.float64)
    lrp = explainer(model)
    seen = [lrp.attribute(input, target=0)]
    changes = [lambda: setattr(model, 'scale', 3.), lambda: setattr(model, 'use_bn', False),
               lambda: model.offset.add_(1.), lambda: setattr(model, 'offset', torch.full((2,), 2.).double())]
    for builds, change in enumerate(changes, start=2):
        change()
        relevance, delta = lrp.attribute(input, target=0, return_convergence_delta=True)
        assert lrp.prepared.builds == builds
        assert torch.equal(relevance, explainer(model).attribute(input, target=0))
        # the convergence delta is measured against the model's output now
        torch.testing.assert_close(relevance.sum() + delta[0], model(input)[0, 0])
        assert not any(torch.equal(relevance, before) for before in seen[-1:])
        seen.append(relevance)
    lrp.attribute(input, target=0)
    assert lrp.prepared.builds == len(changes) + 1


def test_canonizer_follows_a_plain_attribute():
    # the canonizer keeps its folds between contexts; a flag that stops the forward calling the BatchNorm must not
    # leave the BatchNorm's fold in place
    model = Gated()
    input = torch.ones(1, 2, dtype=torch.float64)
    canonizer = FuseBatchNorm()
    composite = EpsilonPlusFlat(canonizers=[canonizer])
    for use_bn in (True, False):
        model.use_bn = use_bn
        expected = model(input)
        with Gradient(model, composite) as attributor:
            output, _ = attributor(input, torch.ones(1, 1, dtype=torch.float64))
        assert torch.equal(output, expected)


@pytest.mark.parametrize('engine', ['singlepass', 'captum'])
def test_float16_refused_where_captum_epsilon_underflows(engine):
    # Captum's epsilon 1e-9 is 0 in float16: a layer output of exactly 0 gives 0 / 0, and the NaN fills the relevance
    # (fc1 has no bias, so the zero input gives z = 0 under the naive handling)
    model = TinyNet().half()
    input = torch.tensor([[0., 0.], [1., 1.]], dtype=torch.float16)
    with pytest.raises(ValueError, match=r'EpsilonRule of `fc1`.* 1e-09 is 0 in torch.float16.*float32'):
        FusedLRP(model, handling='naive', engine=engine).attribute(input, target=0)
    # an epsilon float16 holds gives the float64 numbers (x = (1, 1): (-2, 16), see test_hand_computed_relevance)
    rules = {torch.nn.Linear: EpsilonRule(1e-3)}
    relevance = FusedLRP(model, handling='naive', rules=rules, engine=engine).attribute(input, target=0)
    torch.testing.assert_close(relevance.double(), torch.tensor([[0., 0.], [-2., 16.]], dtype=torch.float64),
                               atol=0.05, rtol=0.01)


@pytest.mark.parametrize('engine', ['singlepass', 'captum'])
def test_float16_inputs_to_a_float32_model_are_named_as_the_mismatch(engine):
    # the stabiliser check read the inputs' dtype and blamed Captum's epsilon, which the float32 layers hold
    with pytest.raises(ValueError, match=r'^TinyNet could not compute its output for inputs of shape \(2, 2\) '
                                         r'torch\.float16: .*Pass inputs of the shape and dtype the model takes'):
        FusedLRP(TinyNet(), engine=engine).attribute(torch.ones(2, 2, dtype=torch.float16), target=0)


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.bn = torch.nn.BatchNorm2d(3)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, image, vector, scale=1.):
        return scale * (torch.flatten(self.bn(self.conv(image)).mean(dim=(2, 3)), 1) + self.fc(vector))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('cls', ['fused', 'composite'])
def test_tuple_inputs_devices_dtypes_batches(device, dtype, batch, cls):
    torch.manual_seed(0)
    model = randomize_batch_norms(TwoInputs()).to(device, dtype)
    inputs = (torch.rand(batch, 2, 5, 5, device=device, dtype=dtype),
              torch.rand(batch, 4, device=device, dtype=dtype))
    lrp = FusedLRP(model) if cls == 'fused' else CompositeLRP(model, EpsilonPlusFlat())
    relevance = lrp.attribute(inputs, target=1, additional_forward_args=(2.,))
    assert isinstance(relevance, tuple) and len(relevance) == 2
    for actual, input in zip(relevance, inputs):
        assert actual.shape == input.shape and actual.dtype == dtype and actual.device.type == device
        assert torch.isfinite(actual).all()


def test_composite_equals_zennit_by_hand():
    torch.manual_seed(0)
    model = randomize_batch_norms(PlainNet(batch_norm=True).double())
    input = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([1, 2])
    actual = CompositeLRP(model, EpsilonAlpha2Beta1Flat()).attribute(input, target=target)
    with Gradient(model, EpsilonAlpha2Beta1Flat(canonizers=[FuseBatchNorm()])) as attributor:
        _, expected = attributor(input, lambda output: torch.eye(3, dtype=output.dtype)[target] * output)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def resnet18():
    torch.manual_seed(0)
    return randomize_batch_norms(torchvision.models.resnet18(weights=None))


def test_composite_residual_sums_equal_zennit_resnet_canonizer():
    # our Sum modules come from the traced graph; Zennit's ResNetCanonizer writes them by hand for ResNets only
    model = resnet18()
    input = torch.rand(1, 3, 64, 64)
    actual = CompositeLRP(model, EpsilonPlusFlat()).attribute(input, target=7)
    with Gradient(model, EpsilonPlusFlat(canonizers=[FuseBatchNorm(), ResNetCanonizer()])) as attributor:
        _, expected = attributor(input, lambda output: torch.eye(1000)[[7]] * output)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize('arch', ['resnet18', 'vgg11_bn'])
@pytest.mark.parametrize('cls', ['fused', 'composite'])
def test_torchvision_models_run_and_stay_unchanged(arch, cls, snapshot):
    torch.manual_seed(0)
    model = randomize_batch_norms(getattr(torchvision.models, arch)(weights=None))
    before = snapshot(model)
    input = torch.rand(2, 3, 64, 64)
    lrp = FusedLRP(model) if cls == 'fused' else CompositeLRP(model, EpsilonPlusFlat())
    relevance, delta = lrp.attribute(input, target=[1, 2], return_convergence_delta=True)
    assert relevance.shape == input.shape and torch.isfinite(relevance).all()
    with torch.no_grad():
        output = model(input)[[0, 1], [1, 2]]
    # relevance is on the logit's scale (Captum's own LRP on resnet18 is off by orders of magnitude, see below)
    assert (relevance.sum(dim=(1, 2, 3)).abs() < 100 * output.abs().max()).all()
    before.assert_unchanged()


def test_captum_miscounts_resnet18_residuals():
    model = resnet18()
    input = torch.rand(1, 3, 64, 64)
    output = model(input)[0, 4].item()
    captum_total = LRP(model).attribute(input, target=4).sum().item()
    ours_total = FusedLRP(model).attribute(input, target=4).sum().item()
    assert abs(captum_total) > 1e6 * abs(output)
    assert abs(ours_total) < 10 * abs(output)


class ConvUsedTwice(torch.nn.Module):
    """``conv`` runs twice; with ``unrolled``, its second use is a separate copy ``conv_again``."""
    def __init__(self, unrolled=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.Linear(2, 2)
        self.conv_again = copy.deepcopy(self.conv) if unrolled else self.conv
        self.double().eval()

    def forward(self, x):
        x = torch.relu(self.conv_again(torch.relu(self.conv(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize('single_pass', [False, True])
def test_rule_by_name_reaches_every_use_of_a_reused_module(single_pass):
    # the prepared copy has one module per use (conv, conv_1); a name the user gives must reach both
    def composite(names):
        composite = NameMapComposite([(['fc'], Epsilon()), (names, Gamma(gamma=1.))])
        return SinglePass(composite) if single_pass else composite

    input = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    relevance = CompositeLRP(ConvUsedTwice(), composite(['conv'])).attribute(input, target=1)
    unrolled = ConvUsedTwice(unrolled=True)
    both = CompositeLRP(unrolled, composite(['conv', 'conv_again'])).attribute(input, target=1)
    first = CompositeLRP(unrolled, composite(['conv'])).attribute(input, target=1)
    torch.testing.assert_close(relevance, both, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(relevance, first)


def test_reused_relu_gets_one_copy_per_use():
    lrp = FusedLRP(resnet18())
    lrp.attribute(torch.rand(1, 3, 32, 32), target=0)
    assert lrp.prepared.copies['layer1.0.relu_1'] == 'layer1.0.relu'
    names = dict(lrp.prepared.get().named_modules())
    assert type(names['layer1.0.residual_add']).__name__ == 'Addition_Module'


def test_visualize_image_attr_accepts_result():
    from captum.attr import visualization
    model = resnet18()
    input = torch.rand(1, 3, 32, 32)
    relevance = FusedLRP(model).attribute(input, target=0)
    figure, axis = visualization.visualize_image_attr(
        relevance[0].permute(1, 2, 0).detach().numpy(), input[0].permute(1, 2, 0).numpy(), method='blended_heat_map',
        sign='all', show_colorbar=True, use_pyplot=False)
    assert figure is not None and axis is not None


def test_pass_through_on_shape_changing_module_raises():
    with pytest.raises(TypeError, match=r'Module `fc2` \(Linear\) changes the shape.*give it a rule'):
        FusedLRP(TinyNet(), rules={'fc2': None}).attribute(torch.ones(1, 2, dtype=torch.float64), target=0)


def test_prepared_model_has_no_identity_left_by_fusion():
    lrp = FusedLRP(resnet18())
    prepared = lrp.prepared.get()
    assert not any(isinstance(module, torch.nn.Identity) for module in prepared.modules())
    assert lrp.prepared.report.num_batch_norms == 20


def test_rule_set_after_first_call_is_used():
    model = TinyNet()
    input = torch.ones(1, 2, dtype=torch.float64)
    lrp = FusedLRP(model)
    plain = lrp.attribute(input, target=0)
    model.fc1.rule = GammaRule(gamma=1.)
    assert not torch.allclose(lrp.attribute(input, target=0), plain)
    del model.fc1.rule
    assert torch.equal(lrp.attribute(input, target=0), plain)


class PoolThenBatchNorm(torch.nn.Module):
    '''conv -> maxpool -> BN -> ReLU -> zero-padded conv -> ReLU -> pool -> linear: the BN folds through the ReLU.'''
    def __init__(self):
        super().__init__()
        self.conv0 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.bn = torch.nn.BatchNorm2d(4)
        self.relu = torch.nn.ReLU()
        self.conv1 = torch.nn.Conv2d(4, 5, 3, padding=1)
        self.relu1 = torch.nn.ReLU()
        self.fc = torch.nn.Linear(5, 3)

    def forward(self, x):
        x = self.relu1(self.conv1(self.relu(self.bn(self.pool(self.conv0(x))))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def pool_then_batch_norm():
    torch.manual_seed(0)
    model = randomize_batch_norms(PoolThenBatchNorm().double())
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([1.5, -.7, .3, -2.], dtype=torch.float64))
    return model


def test_threshold_relu_fold_gives_unfused_relevance():
    # BN -> ReLU -> conv folded: the conv sees |s| W and relu(sign x + t / |s|), the same products as W and
    # relu(s x + t); the thresholded ReLU under LRP-epsilon gives its input sign x / (sign x + t / |s|) of the
    # relevance, what LRP-epsilon gives the unfused BatchNorm (s x / (s x + t)): fused equals unfused, and not naive
    model = pool_then_batch_norm()
    input = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    fused = CompositeLRP(model, EpsilonPlusFlat(), handling='fused', batch_norm_rule=Epsilon(1e-12))
    relevance = fused.attribute(input, target=[0, 2])
    assert [item.side for item in fused.prepared.report.fused] == ['before-relu']
    unfused = CompositeLRP(model, EpsilonPlusFlat(), handling='unfused', batch_norm_rule=Epsilon(1e-12))
    torch.testing.assert_close(relevance, unfused.attribute(input, target=[0, 2]), rtol=1e-7, atol=1e-10)
    naive = CompositeLRP(model, EpsilonPlusFlat(), handling='naive').attribute(input, target=[0, 2])
    assert (relevance - naive).abs().max() > 1e-3 * naive.abs().max()
    rules = {torch.nn.BatchNorm2d: EpsilonRule(1e-12), ThresholdReLU: EpsilonRule(1e-12)}
    captum = FusedLRP(model, rules=rules).attribute(input, target=[0, 2])
    torch.testing.assert_close(captum, FusedLRP(model, rules=rules, handling='unfused').attribute(input, target=[0, 2]),
                               rtol=1e-7, atol=1e-10)


def test_bias_map_conv_under_both_classes():
    # BN before a zero-padded conv: CompositeLRP (cached fused copy) equals Zennit with the canonizer (in place),
    # and Captum's rules run through the bias map at two input sizes (the map is rebuilt before Captum's snapshot)
    from fusion_cases import must_fuse
    model, input, _ = must_fuse()['bn-conv2d-zero-padding']
    model = torch.nn.Sequential(model, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2)).double().eval()
    composite = CompositeLRP(model, EpsilonAlpha2Beta1Flat())
    actual = composite.attribute(input, target=1)
    with Gradient(model, EpsilonAlpha2Beta1Flat(canonizers=[FuseBatchNorm()])) as attributor:
        _, expected = attributor(input, lambda output: torch.eye(2, dtype=output.dtype)[[1, 1]] * output)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    lrp = FusedLRP(model)
    for size in (6, 9):
        images = torch.rand(2, 3, size, size, dtype=torch.float64)
        relevance, delta = lrp.attribute(images, target=0, return_convergence_delta=True)
        assert relevance.shape == images.shape and torch.isfinite(relevance).all() and torch.isfinite(delta).all()


def test_densenet_under_both_classes(snapshot):
    torch.manual_seed(0)
    model = randomize_batch_norms(torchvision.models.densenet121(weights=None))
    before = snapshot(model)
    input = torch.rand(1, 3, 32, 32)
    for lrp in (FusedLRP(model), CompositeLRP(model, EpsilonPlusFlat())):
        relevance = lrp.attribute(input, target=5)
        assert relevance.shape == input.shape and torch.isfinite(relevance).all()
        assert len(lrp.prepared.report.fused) == 121
    before.assert_unchanged()


def tiny_lrp(cls):
    return FusedLRP(TinyNet()) if cls == 'fused' else CompositeLRP(TinyNet(), EpsilonPlusFlat())


@pytest.mark.parametrize('cls', ['fused', 'composite'])
@pytest.mark.parametrize('target, value', [(-1, -1), (1, 1), ([0, -2], -2), (torch.tensor([0, 7]), 7), ((4,), 4)])
def test_target_out_of_range_names_the_valid_range(cls, target, value, snapshot):
    lrp = tiny_lrp(cls)
    before = snapshot(lrp.model)
    with pytest.raises(ValueError, match=rf'^target {value} is out of range for the model output of shape \(2, 1\): '
                       r'valid indices for dim 1 are 0 to 0\.$'):
        lrp.attribute(torch.ones(2, 2, dtype=torch.float64), target=target)
    before.assert_unchanged()
    # the next call runs as usual (hooks and rules were removed)
    relevance = lrp.attribute(torch.ones(2, 2, dtype=torch.float64), target=0)
    assert torch.equal(relevance, tiny_lrp(cls).attribute(torch.ones(2, 2, dtype=torch.float64), target=0))


@pytest.mark.parametrize('cls', ['fused', 'composite'])
@pytest.mark.parametrize('target, plain', [
    (np.int64(0), 0), ([np.int32(0), np.int64(0)], [0, 0]), ((np.int16(0),), (0,)), ([(np.int64(0),)] * 2, [(0,)] * 2)])
def test_numpy_integer_targets_work_as_python_ints(cls, target, plain):
    # Captum asserts on a NumPy integer; Quantus and numpy label arrays give them
    input = torch.ones(2, 2, dtype=torch.float64)
    relevance, delta = tiny_lrp(cls).attribute(input, target=target, return_convergence_delta=True)
    expected, expected_delta = tiny_lrp(cls).attribute(input, target=plain, return_convergence_delta=True)
    assert torch.equal(relevance, expected) and torch.equal(delta, expected_delta)


@pytest.mark.parametrize('cls', ['fused', 'composite'])
@pytest.mark.parametrize('dropout', [torch.nn.Dropout(.5), torch.nn.AlphaDropout(.5), StochasticDepth(.5, 'row')],
                         ids=['Dropout', 'AlphaDropout', 'StochasticDepth'])
def test_dropout_in_training_mode_is_refused(cls, dropout, snapshot):
    # an active dropout gives a different relevance on every call; no BatchNorm is there to catch it (torchvision's
    # StochasticDepth, whose name holds no "Drop", was not refused)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), dropout, torch.nn.Linear(4, 1)).double()
    model.eval()
    model[2].train()
    before = snapshot(model)
    lrp = FusedLRP(model, rules={type(dropout): None}) if cls == 'fused' else CompositeLRP(model, EpsilonPlusFlat())
    with pytest.raises(ValueError, match=rf'^`2` \({type(dropout).__name__}\) is in training mode, where it drops a '
                       r'random part of its input on every call .* Call model\.eval\(\) before explaining'):
        lrp.attribute(torch.ones(2, 2, dtype=torch.float64), target=0)
    before.assert_unchanged()
    model.eval()
    assert torch.equal(lrp.attribute(torch.ones(2, 2, dtype=torch.float64), target=0),
                       lrp.attribute(torch.ones(2, 2, dtype=torch.float64), target=0))


class TupleOutput(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.net, self.kind = TinyNet(), kind

    def forward(self, x):
        logits = self.net(x)
        return {'logits': logits} if self.kind == 'dict' else (logits, x)


@EACH_EXPLAINER
@pytest.mark.parametrize('kind', ['tuple', 'dict'])
def test_output_that_is_not_a_tensor_is_refused(explainer, kind, snapshot):
    model = TupleOutput(kind)
    before = snapshot(model)
    with pytest.raises(TypeError, match=rf'^TupleOutput\.forward returns a {kind}, not a tensor; LRP explains one '
                       r'output tensor: pass a model that returns the logits'):
        explainer(model).attribute(torch.ones(2, 2, dtype=torch.float64), target=0)
    before.assert_unchanged()


@pytest.mark.parametrize('cls', ['fused', 'composite'])
def test_wrong_input_shape_names_the_model_and_the_shape(cls, snapshot):
    lrp = tiny_lrp(cls)
    before = snapshot(lrp.model)
    with pytest.raises(ValueError, match=r'^TinyNet could not compute its output for inputs of shape \(2, 3\) '
                       r'torch\.float64: mat1 and mat2 shapes cannot be multiplied') as error:
        lrp.attribute(torch.ones(2, 3, dtype=torch.float64), target=0)
    assert isinstance(error.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match=r'^TinyNet could not compute its output for inputs of shape \(2, 2\) '
                       r'torch\.float32: mat1 and mat2 must have the same dtype'):
        lrp.attribute(torch.ones(2, 2), target=0)
    before.assert_unchanged()


EMPTY_BATCHES = {
    # model, inputs, additional_forward_args
    'tensor': (TinyNet, torch.rand(0, 2, dtype=torch.float64), None),
    'tuple': (lambda: TwoInputs().double().eval(),
              (torch.rand(0, 2, 5, 5, dtype=torch.float64), torch.rand(0, 4, dtype=torch.float64)), (2.,)),
}


@pytest.mark.parametrize('cls', ['fused', 'composite'])
@pytest.mark.parametrize('case', sorted(EMPTY_BATCHES))
def test_empty_batch_gives_empty_relevance_and_delta(cls, case):
    make_model, empty, args = EMPTY_BATCHES[case]
    model = make_model()
    lrp = FusedLRP(model) if cls == 'fused' else CompositeLRP(model, EpsilonPlusFlat())
    relevance, delta = lrp.attribute(empty, target=0, return_convergence_delta=True, additional_forward_args=args)
    if case == 'tuple':
        assert isinstance(relevance, tuple) and len(relevance) == 2
        assert all(torch.equal(actual, torch.zeros_like(input)) for actual, input in zip(relevance, empty))
    else:
        assert torch.equal(relevance, torch.zeros_like(empty))
    assert delta.shape == (0,) and delta.dtype == torch.float64
    # the forward still checks shapes and targets
    with pytest.raises(ValueError, match='target 5 is out of range'):
        lrp.attribute(empty, target=5, additional_forward_args=args)


def test_type_rules_reach_fused_layers_most_specific_first():
    # fc1 takes the BN's fold and is a subclass of Linear; a Linear rule wins over a Module rule for it as for fc2
    input = torch.rand(3, 2, dtype=torch.float64)
    by_type = FusedLRP(TinyNet(), rules={torch.nn.Module: None, torch.nn.Linear: GammaRule()})
    by_name = FusedLRP(TinyNet(), rules={'fc1': GammaRule(), 'fc2': GammaRule()})
    expected = by_name.attribute(input, target=0)
    assert not torch.allclose(expected, FusedLRP(TinyNet()).attribute(input, target=0))
    torch.testing.assert_close(by_type.attribute(input, target=0), expected, rtol=0, atol=0)


def bias_map_model():
    '''BN -> zero-padded conv -> pool -> linear: the conv becomes a bias-map conv.'''
    torch.manual_seed(0)
    return randomize_batch_norms(torch.nn.Sequential(
        torch.nn.BatchNorm2d(2), torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2)).double())


class RecordingRule(EpsilonRule):
    '''EpsilonRule that records the bias each layer has when Captum's rule changes its weights.'''
    seen = []

    def _manipulate_weights(self, module, inputs, outputs):
        self.seen.append(None if module.bias is None else tuple(module.bias.shape))


def test_captum_rules_see_the_bias_map_and_the_model_is_restored():
    model = bias_map_model()
    input = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    RecordingRule.seen.clear()
    FusedLRP(model, rules={'1': RecordingRule()}).attribute(input, target=0)
    assert RecordingRule.seen == [(3, 5, 5)]
    lrp = FusedLRP(model)
    expected = lrp.attribute(input, target=0)
    zeroed = FusedLRP(model, rules={'1': GammaRule(set_bias_to_zero=True)})
    with_bias = FusedLRP(model, rules={'1': GammaRule()}).attribute(input, target=0)
    assert not torch.allclose(zeroed.attribute(input, target=0), with_bias)
    # Captum's load_state_dict restore rebuilds the zeroed bias map: the same copy gives the usual relevance again
    zeroed.rules = {}
    torch.testing.assert_close(zeroed.attribute(input, target=0), expected, rtol=0, atol=0)
    conv = zeroed.prepared.get().get_submodule('1')
    assert list(conv.state_dict()) == ['weight', 'border_kernel', 'base_bias']


@pytest.mark.parametrize('cls', [FusedLRP, CompositeLRP])
def test_example_inputs_reach_the_fusion(cls):
    from fusion_cases import untraceable_cases
    sliced, input, folds = untraceable_cases()['sliced-sequential']
    model = torch.nn.Sequential(sliced, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    folds = {f'0.{name}' for name in folds}
    args = (EpsilonPlusFlat(),) if cls is CompositeLRP else ()
    lrp = cls(model, *args, example_inputs=input)
    with pytest.warns(UserWarning):
        relevance = lrp.attribute(input, target=0)
    assert {item.bn for item in lrp.prepared.report.fused} == set(folds)
    assert relevance.shape == input.shape and torch.isfinite(relevance).all()


def batch_norm_relu_linear():
    '''x -> BatchNorm1d (scale -2, shift 1) -> ReLU -> Linear (weight 3, no bias), float64.

    At x = -1: BN gives 3, the ReLU 3, the output 9. Fused, the BatchNorm becomes relu(-x + 0.5) and the Linear's
    weight 6; LRP-epsilon gives the ThresholdReLU's input (-x) / (-x + 0.5) * 9 = 6 of the relevance, as LRP-epsilon on
    the unfused BatchNorm does (2 / 3 * 9 = 6); relevance passed through the BatchNorm unchanged (naive) is 9.
    '''
    bn = torch.nn.BatchNorm1d(1).double().eval()
    linear = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        bn.weight.fill_(-2.)
        bn.bias.fill_(1.)
        bn.running_var.fill_(1. - bn.eps)
        linear.weight.fill_(3.)
    return torch.nn.Sequential(bn, torch.nn.ReLU(), linear).eval()


@pytest.mark.parametrize('handling, expected', [('fused', 6.), ('unfused', 6.), ('naive', 9.)])
def test_threshold_relu_gets_the_epsilon_rule_hand_computed(handling, expected):
    model = batch_norm_relu_linear()
    input = torch.tensor([[-1.]], dtype=torch.float64)
    kinds = (torch.nn.Linear, ThresholdReLU, *((torch.nn.BatchNorm1d,) if handling != 'naive' else ()))
    rules = {key: EpsilonRule(1e-12) for key in kinds}
    captum = FusedLRP(model, handling=handling, rules=rules).attribute(input)
    composite = CompositeLRP(model, LayerMapComposite([(torch.nn.Linear, Epsilon(1e-12))]), handling=handling,
                             batch_norm_rule=Epsilon(1e-12) if handling != 'naive' else None).attribute(input)
    assert torch.allclose(captum.detach(), torch.tensor([[expected]], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(composite, torch.tensor([[expected]], dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize('kind', ['FusedLRP', 'CompositeLRP'])
def test_captum_noise_tunnel_takes_both_classes(kind):
    '''NoiseTunnel calls ``attribute.__wrapped__`` (Captum's log_usage decorator); with zero noise it returns the
    attribution itself, averaged over the samples.'''
    from captum.attr import NoiseTunnel
    model = pool_then_batch_norm()
    input = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    lrp = FusedLRP(model) if kind == 'FusedLRP' else CompositeLRP(model, EpsilonPlusFlat())
    smooth, delta = NoiseTunnel(lrp).attribute(input, nt_type='smoothgrad', nt_samples=3, stdevs=0., target=[0, 2],
                                               return_convergence_delta=True)
    expected = lrp.attribute(input, target=[0, 2])
    torch.testing.assert_close(smooth.detach(), expected.detach())
    assert delta.shape == (6,)


def test_engine_and_its_older_spelling_must_agree():
    model = pool_then_batch_norm()
    assert CompositeLRP(model, EpsilonPlusFlat(), single_pass=False).engine == 'zennit'
    assert CompositeLRP(model, EpsilonPlusFlat(), single_pass=True, engine='singlepass').engine == 'singlepass'
    assert CompositeLRP(model, EpsilonPlusFlat()).engine == 'singlepass'
    with pytest.raises(ValueError, match="single_pass=False asks for engine='zennit' but engine='singlepass'"):
        CompositeLRP(model, EpsilonPlusFlat(), single_pass=False, engine='singlepass')


@pytest.mark.parametrize('handling', ['unfused', 'naive'])
@pytest.mark.parametrize('canonizer, name', [
    (FuseBatchNorm, 'FuseBatchNorm'), (SequentialMergeBatchNorm, 'SequentialMergeBatchNorm'),
    (lambda: CompositeCanonizer([FuseBatchNorm()]), 'FuseBatchNorm'),
    (ResNetCanonizer, 'SequentialMergeBatchNorm'),  # Zennit's ResNet canonizer merges BatchNorms too
], ids=['FuseBatchNorm', 'SequentialMergeBatchNorm', 'nested', 'ResNetCanonizer'])
def test_composite_lrp_refuses_a_canonizer_that_folds_the_batch_norms_the_handling_keeps(handling, canonizer, name):
    # FuseBatchNorm's ThresholdReLU would get two rules (its own and the handling's), and the handling would not hold
    composite = EpsilonPlusFlat(canonizers=[canonizer()])
    with pytest.raises(ValueError, match=rf"handling='{handling}' keeps the BatchNorms for its own rule, but the "
                                         rf"composite's canonizer {name} folds them"):
        CompositeLRP(TinyNet(), composite, handling=handling)
    # with handling='fused' (the default) the copy has no BatchNorm left for the canonizer
    input = torch.ones(1, 2, dtype=torch.float64)
    assert torch.equal(CompositeLRP(TinyNet(), composite).attribute(input, target=0),
                       CompositeLRP(TinyNet(), EpsilonPlusFlat()).attribute(input, target=0))


RESIZING = {
    'zero-pad': lambda: torch.nn.ZeroPad2d(1), 'constant-pad': lambda: torch.nn.ConstantPad2d((1, 2, 0, 1), 1.5),
    'reflection-pad': lambda: torch.nn.ReflectionPad2d(1), 'replication-pad': lambda: torch.nn.ReplicationPad2d(2),
    'circular-pad': lambda: torch.nn.CircularPad2d(1), 'nearest': lambda: torch.nn.Upsample(scale_factor=2),
    'bilinear': lambda: torch.nn.Upsample(size=(9, 7), mode='bilinear', align_corners=True),
    'bicubic': lambda: torch.nn.Upsample(scale_factor=2, mode='bicubic'),
}


@pytest.mark.parametrize('engine', ['singlepass', 'captum'])
@pytest.mark.parametrize('resizing', sorted(RESIZING))
def test_padding_and_upsampling_modules_keep_the_identity(resizing, engine):
    '''FusedLRP raised "no rule defined" for padding modules (timm's nasnet, resnetv2) and Upsample (hrnet). A
    padding's gradient hands each copy's relevance back whole and leaves the constants' where they are, as LRP-epsilon
    does; an upsampling is a linear map, which gets EpsilonRule: LRP-epsilon with a negligible epsilon equals gradient
    x input.'''
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(), RESIZING[resizing](),
                                torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)).double()
    input = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    output = model(input)
    expected = torch.autograd.grad(output[:, 1].sum(), input)[0] * input
    rules = {layer: EpsilonRule(1e-15) for layer in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Upsample)}
    relevance = FusedLRP(model, rules=rules, engine=engine).attribute(input.detach(), target=1)
    torch.testing.assert_close(relevance, expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())
    with pytest.raises(TypeError, match='has no rule defined'):  # Captum's own LRP
        LRP(model).attribute(input.detach(), target=1)


class Masked(torch.nn.Module):
    '''conv -> relu -> linear, times a ``mask`` where one is given (checked by its type or for None).'''
    def __init__(self, check):
        super().__init__()
        self.check = check
        self.conv, self.linear = torch.nn.Conv2d(2, 3, 3), torch.nn.Linear(48, 2)

    def forward(self, x, mask=None):
        hidden = torch.relu(self.conv(x)).flatten(1)
        if (isinstance(mask, torch.Tensor) if self.check == 'type' else mask is not None):
            hidden = hidden * mask
        return self.linear(hidden)


@EACH_EXPLAINER
def test_a_type_check_on_a_tensor_argument_the_trace_cannot_follow_is_refused(explainer):
    '''torch.fx traces a tensor argument as a proxy: `isinstance(mask, torch.Tensor)` took the branch without the
    mask (the relevance explained the unmasked model, without a word).'''
    torch.manual_seed(0)
    model = Masked('type').double().eval()
    input, mask = torch.rand(3, 2, 6, 6, dtype=torch.float64), torch.zeros(3, 48, dtype=torch.float64)
    lrp = explainer(model)
    with pytest.raises(ValueError, match='does not read its argument `mask`, for which a tensor was given'):
        lrp.attribute(input, target=0, additional_forward_args=(mask,))
    assert lrp.attribute(input, target=0).shape == input.shape  # no mask: the traced branch


@EACH_EXPLAINER
def test_an_optional_argument_is_traced_for_each_call(explainer):
    '''`if mask is not None` was traced with a proxy for `mask`, so a call without it was refused (None failed inside
    the generated code before that). Each call signature gets its own trace: the call without a mask explains the
    unmasked model, the one with it the masked one.'''
    torch.manual_seed(0)
    model = Masked('none').double().eval()
    unmasked = Masked('type').double().eval()
    unmasked.load_state_dict(model.state_dict())
    input, mask = torch.rand(3, 2, 6, 6, dtype=torch.float64), torch.zeros(3, 48, dtype=torch.float64)
    lrp = explainer(model)
    assert torch.equal(lrp.attribute(input, target=0), explainer(unmasked).attribute(input, target=0))
    relevance = lrp.attribute(input, target=0, additional_forward_args=(mask,))
    assert torch.equal(relevance, torch.zeros_like(relevance))  # the mask zeroes every path from the input
    lrp.attribute(input, target=0, additional_forward_args=(None,))  # the default's signature: no new copy
    assert lrp.prepared.builds == 2


@EACH_EXPLAINER
def test_a_one_element_target_tensor_is_one_index_for_every_example(explainer):
    '''Captum takes it so (its NoiseTunnel hands it on unexpanded); it was refused for batches of more than one.'''
    torch.manual_seed(0)
    model = Masked('none').double().eval()
    input = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    mask = torch.ones(3, 48, dtype=torch.float64)
    lrp = explainer(model)
    expected = lrp.attribute(input, target=1, additional_forward_args=(mask,))
    assert torch.equal(lrp.attribute(input, target=torch.tensor([1]), additional_forward_args=(mask,)), expected)


def test_a_rule_for_a_container_is_refused():
    '''rules={'features': ...} named a Sequential: Captum's rules go on layers, so it never applied, silently.'''
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU()), torch.nn.Flatten())
    with pytest.raises(ValueError, match=r"rules names '0' \(Sequential\), a module that holds others"):
        FusedLRP(model, rules={'0': EpsilonRule()})


class OwnLinear(torch.nn.Module):
    '''A linear layer of the user's own: a module without children that torch.fx traces into.'''
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(1, 2))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


def one_linear_layer(kind='torch'):
    model = (torch.nn.Linear(2, 1, bias=False) if kind == 'torch' else OwnLinear()).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1., -2.]]))
    return model


@pytest.mark.parametrize('engine', ['singlepass', 'captum'])
@pytest.mark.parametrize('how', ['name', 'type', 'attribute'])
@pytest.mark.parametrize('kind', ['torch', 'own'])
def test_a_rule_for_a_model_that_is_one_layer_applies(engine, how, kind):
    '''A model that is one layer was traced into a copy whose layer had another name than '', so a rule named ''
    or set on it was ignored, silently. z = 3 - 2 = 1; gamma=1 doubles the positive weight: z' = 6 - 2 = 4, and the
    relevance is x * w' * z / z' = [6, -2] / 4; the epsilon rule gives x * w = [3, -2].'''
    model, rule = one_linear_layer(kind), GammaRule(gamma=1.)
    rules = {'name': {'': rule}, 'type': {type(model): rule}, 'attribute': None}[how]
    if how == 'attribute':
        model.rule = rule
    lrp = FusedLRP(model, rules=rules, engine=engine)
    actual = lrp.attribute(torch.tensor([[3., 1.]], dtype=torch.float64), target=0)
    torch.testing.assert_close(actual.detach(), torch.tensor([[1.5, -0.5]], dtype=torch.float64))
    assert lrp.fallbacks == []  # nothing runs after the layer: the single pass computes the rule
    plain = FusedLRP(one_linear_layer(), engine=engine).attribute(torch.tensor([[3., 1.]], dtype=torch.float64), 0)
    torch.testing.assert_close(plain.detach(), torch.tensor([[3., -2.]], dtype=torch.float64))


@pytest.mark.parametrize('single_pass', [None, False])
def test_a_composite_rule_for_a_model_that_is_one_layer_equals_zennit(single_pass):
    '''NameMapComposite([([''], rule)]) on a model that is one layer: Zennit gives the model the rule; the prepared
    copy named its layer otherwise and gave it none.'''
    torch.manual_seed(0)
    model, input = torch.nn.Linear(4, 3).double(), torch.randn(2, 4, dtype=torch.float64)
    composite = NameMapComposite([([''], Gamma(gamma=1.))])
    actual = CompositeLRP(model, composite, single_pass=single_pass).attribute(input, target=0)
    with Gradient(model, composite) as attributor:
        _, expected = attributor(input, lambda output: torch.eye(3, dtype=output.dtype)[[0, 0]] * output)
    with Gradient(model, NameMapComposite([([''], Epsilon())])) as attributor:
        _, epsilon = attributor(input, lambda output: torch.eye(3, dtype=output.dtype)[[0, 0]] * output)
    assert not torch.allclose(expected, epsilon)  # the rule makes a difference here
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


class ChannelMix(torch.nn.Module):
    '''A layer of the user's own, without children: its forward is traced into, unless it has a rule.'''
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return torch.einsum('bchw,dc->bdhw', x, self.weight)


class ChannelMixNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.relu, self.mix, self.mix_relu = torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), ChannelMix(), \
            torch.nn.ReLU()
        self.pool, self.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.mix_relu(self.mix(self.relu(self.conv(x))))).flatten(1))


def channel_mix_net():
    torch.manual_seed(0)
    return ChannelMixNet().double()


@pytest.mark.parametrize('engine', ['singlepass', 'captum'])
@pytest.mark.parametrize('how', ['name', 'type', 'attribute'])
def test_a_rule_for_a_layer_the_trace_goes_into_applies_as_in_captum(engine, how):
    '''The prepared copy traced into a module without children that is not torch's (timm's activations, a user's own
    layer), so a rule given for it never applied, without a word. Captum's LRP gives it the rule.'''
    model, rule = channel_mix_net(), GammaRule(gamma=.5)
    rules = {'name': {'mix': rule}, 'type': {ChannelMix: rule}, 'attribute': {}}[how]
    if how == 'attribute':
        model.mix.rule = rule
    input = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    actual = FusedLRP(model, rules=rules, engine=engine).attribute(input, target=1)
    reference = copy.deepcopy(model)
    reference.mix.rule = GammaRule(gamma=.5)
    expected = LRP(reference).attribute(input, target=1)
    plain = FusedLRP(channel_mix_net(), engine=engine).attribute(input, target=1)
    assert not torch.allclose(plain, expected)  # the rule makes a difference
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize('single_pass', [None, False])
def test_a_composite_rule_for_a_layer_the_trace_goes_into_equals_zennit(single_pass):
    model, input = channel_mix_net(), torch.rand(2, 3, 8, 8, dtype=torch.float64)
    composite = NameMapComposite([(['conv', 'fc'], Epsilon()), (['mix'], Gamma(gamma=.5))])
    actual = CompositeLRP(model, composite, single_pass=single_pass).attribute(input, target=1)
    with Gradient(model, composite) as attributor:
        _, expected = attributor(input, lambda output: torch.eye(3, dtype=output.dtype)[[1, 1]] * output)
    plain = CompositeLRP(model, NameMapComposite([(['conv', 'fc'], Epsilon())])).attribute(input, target=1)
    assert not torch.allclose(plain, expected)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-14)


class InPlaceAct(torch.nn.Module):
    '''conv -> act -> mean -> linear, with ``act`` in place. ``forward_kind``: 'untraced' (data-dependent control
    flow), 'reads-write' (the forward reads the write through a view taken before), 'plain'.'''
    def __init__(self, act, forward_kind):
        super().__init__()
        self.conv, self.act, self.fc = torch.nn.Conv2d(3, 4, 3), act, torch.nn.Linear(4, 3)
        self.forward_kind = forward_kind

    def forward(self, x):
        hidden = self.conv(x)
        if self.forward_kind == 'untraced' and hidden.sum() > -1e9:
            hidden = self.act(hidden)
        elif self.forward_kind == 'reads-write':
            view = hidden.flatten(2)
            self.act(hidden)
            return self.fc(view.mean(2))
        else:
            hidden = self.act(hidden)
        return self.fc(hidden.mean((2, 3)))


@pytest.mark.parametrize('engine', ['singlepass', 'captum'])
@pytest.mark.parametrize('forward_kind, act, rule, where', [
    ('untraced', torch.nn.LeakyReLU(.1, inplace=True), EpsilonRule(), 'in a forward torch.fx could not trace'),
    ('untraced', torch.nn.ReLU(inplace=True), IdentityRule(), 'in a forward torch.fx could not trace'),
    ('reads-write', torch.nn.LeakyReLU(.1, inplace=True), EpsilonRule(), 'where the forward reads again the tensor'),
], ids=['untraced-leaky-epsilon', 'untraced-relu-identity', 'reads-write'])
@pytest.mark.filterwarnings('ignore:zennit_bnfuse')
def test_a_rule_for_a_module_left_in_place_is_refused(engine, forward_kind, act, rule, where):
    '''Captum's rules hook the input a module writes over: on an untraced forward an in-place LeakyReLU with the
    epsilon rule was 0.50 off the same module out of place, and IdentityRule on an in-place ReLU raised Captum's
    KeyError. Only modules the copy leaves in place are refused.'''
    model = InPlaceAct(copy.deepcopy(act), forward_kind).double()
    input = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf'module `act` \({type(act).__name__}\) has a rule and runs in place {where}'
                                         r'.*set inplace=False on it'):
        FusedLRP(model, rules={'act': rule}, engine=engine).attribute(input, target=0)
    model.act.inplace = False
    assert FusedLRP(model, rules={'act': rule}, engine=engine).attribute(input, target=0).abs().sum() > 0
    plain = InPlaceAct(copy.deepcopy(act), 'plain').double()  # the rewrite makes it out of place
    FusedLRP(plain, rules={'act': rule}, engine=engine).attribute(input, target=0)


class TiedConvs(torch.nn.Module):
    '''Two 1x1 convs on the same features; ``tied``: they share one weight Parameter.'''
    def __init__(self, tied):
        super().__init__()
        self.pre, self.conv, self.mix = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1)
        self.mix.weight = self.conv.weight if tied else torch.nn.Parameter(self.conv.weight.detach().clone())
        self.pool, self.pool_mix, self.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.AdaptiveAvgPool2d(1), \
            torch.nn.Linear(8, 3)

    def forward(self, x):
        hidden = torch.relu(self.pre(x))
        pooled = torch.cat([self.pool(torch.relu(self.conv(hidden))), self.pool_mix(torch.relu(self.mix(hidden)))], 1)
        return self.fc(pooled.flatten(1))


@pytest.mark.parametrize('engine', ['singlepass', 'captum'])
def test_a_rule_that_changes_a_shared_weight_changes_only_its_layer(engine):
    '''Captum's GammaRule sets ``weight.data`` of its layer, which a tied layer under the epsilon rule then computes
    with too (Captum's own LRP, and engine='captum' before: 0.08 off the same model untied, 0.39 in the review's
    model); the default engine computed each layer on its own weight, so the engines disagreed without a word. The
    prepared copy gives each layer its own weight.'''
    torch.manual_seed(0)
    tied = TiedConvs(tied=True).double().eval()
    torch.manual_seed(0)
    untied = TiedConvs(tied=False).double().eval()
    input = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    reference = copy.deepcopy(untied)
    reference.mix.rule = GammaRule()
    expected = LRP(reference).attribute(input, target=1).detach()
    actual = FusedLRP(tied, rules={'mix': GammaRule()}, engine=engine).attribute(input, target=1).detach()
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-14)
    assert tied.mix.weight is tied.conv.weight  # the user's model keeps its tie
    captums = copy.deepcopy(tied)
    captums.mix.rule = GammaRule()
    assert ((LRP(captums).attribute(input, target=1).detach() - expected).abs().max() / expected.abs().max()) > .05


class InPlaceLeaky(torch.nn.Module):
    '''An activation of the user's own that writes into its input, without an ``inplace`` flag.'''
    def forward(self, x):
        return torch.nn.functional.leaky_relu_(x, .1)


@pytest.mark.parametrize('explainer', [
    lambda model: FusedLRP(model, rules={'act': EpsilonRule()}),
    lambda model: FusedLRP(model, rules={'act': EpsilonRule()}, engine='captum'),
    lambda model: CompositeLRP(model, NameMapComposite([(['act'], Epsilon())])),
    lambda model: CompositeLRP(model, NameMapComposite([(['act'], Epsilon())]), engine='zennit'),
], ids=['fused', 'fused-captum', 'composite', 'composite-zennit'])
def test_a_rule_for_a_layer_of_ones_own_that_writes_into_its_input_is_refused(explainer):
    '''Kept a module for its rule, such a layer wrote over the input the rule's hooks had kept: 0.07-0.10 off the
    same layer out of place (FusedLRP, CompositeLRP's default engine), a bare RuntimeError under Zennit's hooks.'''
    torch.manual_seed(0)
    model = torch.nn.Sequential(collections.OrderedDict([
        ('conv', torch.nn.Conv2d(3, 4, 3)), ('act', InPlaceLeaky()), ('pool', torch.nn.AdaptiveAvgPool2d(1)),
        ('flatten', torch.nn.Flatten()), ('fc', torch.nn.Linear(4, 3))])).double()
    with pytest.raises(ValueError, match=r'module `act` \(InPlaceLeaky\) has a rule and its forward writes into its '
                                         r'input in place \(leaky_relu_\).*Give it no rule'):
        explainer(model).attribute(torch.rand(2, 3, 6, 6, dtype=torch.float64), target=0)


class CountingLeaky(torch.nn.Module):
    '''An activation of the user's own that counts its calls in a buffer and an attribute; ``branchy``: its forward
    branches on the data (torch.fx cannot trace it on its own); ``in_place``: it writes into its input.'''
    def __init__(self, branchy=False, in_place=False):
        super().__init__()
        self.register_buffer('calls', torch.zeros(()))
        self.count, self.branchy, self.in_place = 0, branchy, in_place

    def forward(self, x):
        self.calls.add_(1)
        self.count += 1
        if self.branchy and x.sum() > 1e9:
            return x
        return torch.nn.functional.leaky_relu(x, .1, inplace=self.in_place)


class CountingNet(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.conv, self.act = torch.nn.Conv2d(3, 4, 3), CountingLeaky(**kwargs)
        self.pool, self.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def counting_net(**kwargs):
    torch.manual_seed(0)
    return CountingNet(**kwargs).double()


EACH_CLASS_WITH_A_RULE_ON_ACT = pytest.mark.parametrize('explainer', [
    lambda model: FusedLRP(model, rules={'act': EpsilonRule()}),
    lambda model: FusedLRP(model, rules={'act': EpsilonRule()}, engine='captum'),
    lambda model: CompositeLRP(model, NameMapComposite([(['act'], Epsilon())])),
], ids=['fused', 'fused-captum', 'composite'])


@EACH_CLASS_WITH_A_RULE_ON_ACT
def test_the_check_of_a_layer_kept_for_its_rule_leaves_the_model_alone(explainer):
    '''The check whether the layer writes into its input traced the user's module itself: its buffer and attribute
    counted the traces, and the changed buffer rebuilt the copy on every call.'''
    model = counting_net()
    lrp = explainer(model)
    for _ in range(3):
        lrp.attribute(torch.rand(2, 3, 6, 6, dtype=torch.float64), target=0)
    assert model.act.calls.item() == 0 and model.act.count == 0 and lrp.prepared.builds == 1


@EACH_CLASS_WITH_A_RULE_ON_ACT
def test_a_layer_kept_for_its_rule_that_cannot_be_traced_alone_is_checked_on_every_call(explainer):
    '''Where its forward cannot be traced on its own, whether it writes into its input shows only when it runs:
    before, such a layer was 0.10 off (0.97 under Captum's hooks) the same layer out of place.'''
    input = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r'module `act` \(CountingLeaky\) has a rule and its forward wrote into its '
                                         r'input in place'):
        explainer(counting_net(branchy=True, in_place=True)).attribute(input, target=0)
    lrp = explainer(counting_net(branchy=True))
    actual = lrp.attribute(input, target=0).detach()
    reference = counting_net(branchy=True)
    if isinstance(lrp, CompositeLRP):  # Zennit's hooks on the model
        with Gradient(reference, NameMapComposite([(['act'], Epsilon())])) as attributor:
            _, expected = attributor(input, lambda output: torch.eye(3, dtype=output.dtype)[[0, 0]] * output)
    else:
        reference.act.rule = EpsilonRule()
        expected = LRP(reference).attribute(input, target=0).detach()
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-14)


class FlaggedTanh(torch.nn.Module):
    '''An activation of the user's own with an ``inplace`` flag its forward does not use; with ``draws``, its
    forward draws a random number (scaled to nothing).'''
    def __init__(self, draws=False):
        super().__init__()
        self.inplace, self.draws = True, draws

    def forward(self, x):
        return torch.tanh(x) + 0. * torch.rand(()) if self.draws else torch.tanh(x)


@pytest.mark.parametrize('engine', ['singlepass', 'captum'])
def test_a_layer_kept_for_its_rule_is_judged_by_what_its_forward_writes(engine):
    '''A flag named inplace that the forward ignores is no write: the check of the traced forward decides (FusedLRP
    refused such a layer by its flag).'''
    torch.manual_seed(0)
    model = CountingNet().double()
    model.act = FlaggedTanh()
    reference = copy.deepcopy(model)
    reference.act.rule = EpsilonRule()
    input = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    actual = FusedLRP(model, rules={'act': EpsilonRule()}, engine=engine).attribute(input, target=0).detach()
    torch.testing.assert_close(actual, LRP(reference).attribute(input, target=0).detach(), rtol=1e-10, atol=1e-14)


def test_the_check_of_what_a_forward_writes_leaves_the_random_number_generators_alone():
    state = torch.get_rng_state()
    assert writes_into_input(FlaggedTanh(draws=True)) == (True, None)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize('engine', ['FusedLRP', 'CompositeLRP'])
@pytest.mark.parametrize('pool', ['adaptive-average', 'max', 'average-padding-not-counted'])
def test_batch_norm_folded_through_pooling_keeps_epsilon_equal_to_gradient_times_input(engine, pool, snapshot):
    '''conv -> ReLU -> BatchNorm -> pooling -> layer: the BatchNorm folds into the layer after the pooling (an average
    of real inputs passes its whole affine map, a maximum a non-negative scale), and LRP-epsilon with a negligible
    epsilon still equals gradient x input (float64).'''
    torch.manual_seed(0)
    pools = {'adaptive-average': torch.nn.AdaptiveAvgPool2d(2), 'max': torch.nn.MaxPool2d(2),
             'average-padding-not-counted': torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False)}
    model = randomize_batch_norms(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4), pools[pool], torch.nn.Flatten(),
        torch.nn.LazyLinear(2)).double())
    model(torch.rand(1, 3, 8, 8, dtype=torch.float64))  # materialise the Linear
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([1., -2., 0., .5] if pool != 'max' else [1., 2., 0., .5]))
    before = snapshot(model)
    input = torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    output = model(input)
    gradient, = torch.autograd.grad(output[:, 1].sum(), input)
    explainer = epsilon_explainer(engine, model, 'fused')
    relevance = explainer.attribute(input.detach(), target=1)
    assert [(fold.bn, fold.side) for fold in explainer.prepared.report.fused] == [('2', 'before')]
    torch.testing.assert_close(relevance, gradient * input.detach(), rtol=1e-9, atol=1e-12)
    before.assert_unchanged()
