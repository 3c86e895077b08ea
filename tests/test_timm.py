'''Tests for timm's layers (zennit_bnfuse.timm_layers): norm-act layers, conv variants and small timm models.'''
import re

import pytest
import torch

from conftest import epsilon_explainer, randomize_batch_norms
from fusion_cases import Lambda, prepared, with_scales
from zennit_bnfuse import CompositeLRP, FuseBatchNorm, FusedLRP, find_fusable_pairs, fuse
from zennit_bnfuse.fold import is_batch_norm
from zennit_bnfuse.layers import BiasMapConv2d, FoldedLinear, ThresholdReLU

timm = pytest.importorskip('timm')
from timm.layers import (  # noqa: E402 (after the skip)
    BatchNormAct2d, CondConv2d, Conv2dSame, FrozenBatchNormAct2d, Linear as TimmLinear, MixedConv2d,
    ScaledStdConv2dSame, SplitBatchNorm2d, StdConv2d, SyncBatchNormAct, convert_splitbn_model, convert_sync_batchnorm,
    create_conv2d, freeze_batch_norm_2d,
)
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import EpsilonPlusFlat  # noqa: E402
from zennit.core import Composite  # noqa: E402

from zennit_bnfuse.timm_layers import BiasMapConv2dSame, FoldedConv2dSame  # noqa: E402


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def fused_exactly(model, input, snapshot, sizes=()):
    '''fuse(model): the fused copy agrees with ``model`` in float64 on ``input`` and on inputs of the other spatial
    ``sizes``, and ``model`` is unchanged. Returns the fused copy and the report.'''
    before = snapshot(model)
    fused, report = fuse(model)
    inputs = [input] + [torch.randn(*input.shape[:2], *size, dtype=input.dtype) for size in sizes]
    with torch.no_grad():
        for each in inputs:
            assert relative_error(fused(each), model(each)) < 1e-12
    before.assert_unchanged()
    return fused, report


def folds(report):
    return {item.bn: (item.layers, item.side) for item in report.fused}


def conv_norm_act(norm, in_channels=3, channels=4):
    '''conv -> norm -> conv: the norm folds into the conv before it.'''
    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, channels, 3, padding=1), norm,
                               torch.nn.Conv2d(channels, 2, 3, padding=1))


def norm_act_cases():
    """``{case: (model, input, folds, type of the activation the fused model keeps)}``."""
    cases = {
        'relu-after': (*prepared(conv_norm_act(BatchNormAct2d(4)), 2, 3, 6, 6), {'1': (('0',), 'after')},
                       torch.nn.ReLU),
        'silu-dropout-after': (*prepared(conv_norm_act(BatchNormAct2d(
            4, act_layer=torch.nn.SiLU, drop_layer=torch.nn.Dropout)), 2, 3, 6, 6), {'1': (('0',), 'after')},
            torch.nn.SiLU),
        'leaky-act-kwargs-after': (*prepared(conv_norm_act(BatchNormAct2d(
            4, act_layer='leaky_relu', act_kwargs={'negative_slope': .2})), 2, 3, 6, 6), {'1': (('0',), 'after')},
            torch.nn.LeakyReLU),
        'no-act-zero-padding-before': (*prepared(torch.nn.Sequential(
            BatchNormAct2d(3, apply_act=False), torch.nn.Conv2d(3, 4, 3, padding=1)), 2, 3, 6, 6),
            {'0': (('1',), 'before')}, torch.nn.Identity),
        'sync-after': (*prepared(convert_sync_batchnorm(conv_norm_act(BatchNormAct2d(4, act_layer=torch.nn.GELU))),
                                 2, 3, 6, 6), {'1': (('0',), 'after')}, torch.nn.GELU),
    }
    model, input = prepared(torch.nn.Sequential(BatchNormAct2d(4), torch.nn.Conv2d(4, 3, 3, padding=1)), 2, 4, 6, 6)
    cases['relu-before-relu'] = (with_scales(model, 0, [1.5, -.7, 0., -2.]), input, {'0': (('1',), 'before-relu')},
                                 torch.nn.ReLU)
    assert type(cases['sync-after'][0][1]) is SyncBatchNormAct
    return cases


NORM_ACT_CASES = norm_act_cases()


@pytest.mark.parametrize('case', sorted(NORM_ACT_CASES))
def test_norm_act_folds_exactly_and_keeps_its_activation(case, snapshot):
    model, input, expected_folds, act_type = NORM_ACT_CASES[case]
    fused, report = fused_exactly(model, input, snapshot)
    assert folds(report) == expected_folds and not report.unfused
    name = next(iter(expected_folds))
    act = fused.get_submodule(name).act
    assert type(act) is act_type and act is not model.get_submodule(name).act
    assert not any(is_batch_norm(module) for module in fused.modules())


def test_norm_act_before_relu_becomes_threshold_relu_then_its_act():
    model, _, _, _ = NORM_ACT_CASES['relu-before-relu']
    fused, _ = fuse(model)
    assert [type(module) for module in fused[0]] == [ThresholdReLU, torch.nn.Identity, torch.nn.ReLU]
    assert [name for name, _ in fused[0].named_children()] == ['bn', 'drop', 'act']


def test_canonizer_gives_the_threshold_relu_inside_a_norm_act_its_rule(snapshot):
    # the same relevance as CompositeLRP, which maps ThresholdReLU to Epsilon on the prepared copy
    model, input, _, _ = NORM_ACT_CASES['relu-before-relu']
    model = torch.nn.Sequential(*model, torch.nn.Flatten())
    before = snapshot(model)
    target = torch.eye(3 * 36, dtype=torch.float64)[[4, 7]]
    with Gradient(model, EpsilonPlusFlat(canonizers=[FuseBatchNorm()])) as attributor:
        output, relevance = attributor(input, target)
        assert isinstance(model[0].bn, ThresholdReLU) and len(model[0].bn._forward_hooks) > 0
    expected = CompositeLRP(model, EpsilonPlusFlat()).attribute(input, target=[4, 7])
    torch.testing.assert_close(relevance * output.gather(1, torch.tensor([[4], [7]])).reshape(2, 1, 1, 1), expected)
    before.assert_unchanged()


def test_frozen_norm_act_folds_in_training_mode(snapshot):
    model, input = prepared(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), BatchNormAct2d(4), BatchNormAct2d(4, apply_act=False), torch.nn.Conv2d(4, 2, 1)),
        2, 3, 6, 6)
    model = freeze_batch_norm_2d(model).train()
    assert isinstance(model[1], FrozenBatchNormAct2d) and is_batch_norm(model[1])
    _, report = fused_exactly(model, input, snapshot)
    assert folds(report) == {'1': (('0',), 'after'), '2': (('3',), 'before')}


def test_split_batch_norm_folds_and_names_its_training_only_batch_norms(snapshot):
    model, input = prepared(conv_norm_act(BatchNormAct2d(4, act_layer=torch.nn.SiLU)), 2, 3, 6, 6)
    model = convert_splitbn_model(model, num_splits=2).eval()
    assert type(model[1]) is SplitBatchNorm2d
    fused, report = fused_exactly(model, input, snapshot)
    assert folds(report) == {'1': (('0',), 'after')}
    assert {item.bn for item in report.unfused} == {'1.aux_bn.0'}
    assert re.search(r'BatchNorm `1` \(SplitBatchNorm2d\), whose eval-mode forward does not call it',
                     report.unfused[0].reason)
    assert type(fused[1].act) is torch.nn.SiLU


class BatchNormActTwice(BatchNormAct2d):
    '''A subclass the package does not know: its forward applies the activation twice.'''
    def forward(self, x):
        return self.act(super().forward(x))


def refusal_cases():
    cases = {}
    cases['unknown-subclass'] = (prepared(conv_norm_act(BatchNormActTwice(4, act_layer=torch.nn.SiLU)), 2, 3, 6, 6),
                                 r'it is a BatchNormActTwice, a BatchNorm subclass')
    model, input = prepared(conv_norm_act(BatchNormAct2d(4)), 2, 3, 6, 6)
    model[1].register_forward_hook(lambda module, args, output: output * 2)
    cases['hook'] = ((model, input), r'`1` has forward or backward hooks')
    model, input = prepared(conv_norm_act(BatchNormAct2d(4)), 2, 3, 6, 6)
    model[1].act = None
    cases['act-not-a-module'] = ((model, input), r'it is a BatchNormAct2d and its forward applies `act`, which is '
                                                 r'NoneType, not a module')
    cases['no-running-statistics'] = (prepared(conv_norm_act(BatchNormAct2d(4, track_running_stats=False)),
                                               2, 3, 6, 6), r'no running statistics')
    cases['silu-before'] = (prepared(torch.nn.Sequential(
        torch.nn.MaxPool2d(2), BatchNormAct2d(3, act_layer=torch.nn.SiLU), torch.nn.Conv2d(3, 2, 1)), 2, 3, 6, 6),
        r'the output of `1\.drop` \(Identity\) feeds `1\.act` \(SiLU\), not a conv/linear layer, ReLU, pooling or '
        r'flatten')
    return cases


REFUSALS = refusal_cases()


@pytest.mark.parametrize('case', sorted(REFUSALS))
def test_norm_act_refused_with_reason(case, snapshot):
    (model, input), pattern = REFUSALS[case]
    report = find_fusable_pairs(model)
    assert not report.fused and len(report.unfused) == 1
    assert re.search(pattern, report.unfused[0].reason), report.unfused[0].reason
    if case != 'act-not-a-module':  # that one's forward raises
        fused_exactly(model, input, snapshot)


def test_norm_act_in_training_mode_raises():
    model = conv_norm_act(BatchNormAct2d(4))
    with pytest.raises(ValueError, match=r"'1' is in training mode"):
        find_fusable_pairs(model)


def test_conv2d_same_folds_on_both_sides_at_every_input_size(snapshot):
    model, input = prepared(torch.nn.Sequential(
        BatchNormAct2d(3, apply_act=False), Conv2dSame(3, 4, 3, stride=2), torch.nn.BatchNorm2d(4)), 2, 3, 7, 7)
    fused, report = fused_exactly(model, input, snapshot, sizes=[(8, 8), (5, 6)])
    assert folds(report) == {'0': (('1',), 'before'), '2': (('1',), 'after')}
    assert type(fused[1]) is BiasMapConv2dSame


def test_standardized_convs_become_plain_convs(snapshot):
    model, input = prepared(torch.nn.Sequential(
        torch.nn.BatchNorm2d(3), StdConv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
        torch.nn.BatchNorm2d(4), ScaledStdConv2dSame(4, 2, 3, stride=2), torch.nn.BatchNorm2d(2)), 2, 3, 7, 7)
    with torch.no_grad():
        model[4].gain.uniform_(.5, 2.)
    fused, report = fused_exactly(model, input, snapshot, sizes=[(8, 8)])
    assert folds(report) == {'0': (('1',), 'before'), '2': (('1',), 'after'), '3': (('4',), 'before'),
                             '5': (('4',), 'after')}
    assert type(fused[1]) is BiasMapConv2d and type(fused[4]) is BiasMapConv2dSame


def test_standardized_conv_without_batch_norm_becomes_plain_for_lrp():
    model = torch.nn.Sequential(StdConv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 2))
    model = model.double().eval()
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), *model[1:]).double()
    with torch.no_grad():
        # the standardisation as timm writes it
        plain[0].weight.copy_(torch.nn.functional.batch_norm(
            model[0].weight.reshape(1, 4, -1), None, None, training=True, eps=model[0].eps).reshape(4, 3, 3, 3))
    input = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fused, report = fuse(model)
    assert type(fused[0]) is torch.nn.Conv2d and not report.fused and report.standardized == ['0']
    relevance, expected = (CompositeLRP(each, EpsilonPlusFlat()).attribute(input, target=1) for each in (model, plain))
    torch.testing.assert_close(relevance, expected, rtol=1e-10, atol=1e-12)
    assert relevance.abs().sum() > 0
    # a forward that also reads the raw weight keeps the layer as it is
    reading = Lambda(lambda self, x: self.conv(x) * self.conv.weight.mean(), conv=StdConv2d(3, 4, 3)).double()
    fused, report = fuse(reading)
    assert type(fused.conv) is StdConv2d and report.standardized == []
    torch.testing.assert_close(fused(input), reading(input), rtol=0, atol=0)


def standardized_conv_models():
    """Models whose weight-standardised convs cannot be made plain, and the name of the first."""
    from timm.models.nfnet import NormFreeBlock
    block = torch.nn.Sequential(  # timm marks NormFreeBlock untraceable: the trace keeps it whole
        NormFreeBlock(4, 8, act_layer=torch.nn.ReLU), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 2))
    reading = torch.nn.Sequential(
        Lambda(lambda self, x: self.conv(x) * self.conv.weight.mean(), conv=StdConv2d(4, 3, 3)),
        torch.nn.Flatten(), torch.nn.Linear(12, 2))
    return {'inside-NormFreeBlock': (block, '0.downsample.conv'), 'weight-read-by-forward': (reading, '0.conv')}


@pytest.mark.parametrize('case', ['inside-NormFreeBlock', 'weight-read-by-forward'])
@pytest.mark.parametrize('explainer', [FusedLRP, lambda model: CompositeLRP(model, EpsilonPlusFlat()),
                                       lambda model: CompositeLRP(model, EpsilonPlusFlat(), handling='unfused')],
                         ids=['FusedLRP', 'CompositeLRP', 'CompositeLRP-unfused'])
def test_standardized_conv_left_standardizing_is_refused(case, explainer, snapshot):
    # a rule's modified weight would be standardised again: the relevance would silently not follow the rule
    model, name = standardized_conv_models()[case]
    model = model.double().eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf'^`{re.escape(name)}` \((Scaled)?StdConv2d\) standardises its weight in its '
                       r'forward, so LRP rules that modify the weight would be standardised again'):
        explainer(model).attribute(torch.rand(1, 4, 2, 2, dtype=torch.float64), target=0)
    before.assert_unchanged()


@pytest.mark.parametrize('norm', ['EvoNorm2dB0', 'EvoNorm2dS0', 'FilterResponseNormTlu2d', 'RmsNorm2d', 'SimpleNorm2d',
                                  'GroupNorm', 'LayerNorm2d', 'GroupNormAct'])
def test_timm_norms_are_one_module_that_needs_a_rule(norm):
    '''timm's normalisation layers, whether or not they subclass torch's: fx traced through those that do not and
    LRP passed relevance through their arithmetic by its gradient; now FusedLRP asks for a rule, naming the layer.'''
    groups = {'GroupNorm': {'num_groups': 2}, 'GroupNormAct': {'num_groups': 2}, 'EvoNorm2dS0': {'groups': 2}}
    layer = getattr(timm.layers, norm)(4, **groups.get(norm, {}))
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), layer, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2)).double().eval()
    input = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    with pytest.raises(TypeError, match=rf'Module `1` of type timm\.layers\.[a-z_]+\.{norm} has no rule defined'):
        FusedLRP(model).attribute(input, target=0)
    with pytest.warns(UserWarning, match=rf'no rule to 1 normalisation layer\(s\) .*\(`1`; the first of type {norm}\)'):
        CompositeLRP(model, EpsilonPlusFlat()).attribute(input, target=0)


def test_timm_linear_folds(snapshot):
    model, input = prepared(torch.nn.Sequential(
        torch.nn.BatchNorm1d(5), TimmLinear(5, 4), torch.nn.BatchNorm1d(4)), 3, 5)
    fused, report = fused_exactly(model, input, snapshot)
    assert folds(report) == {'0': (('1',), 'before'), '2': (('1',), 'after')}
    assert type(fused[1]) is FoldedLinear


def test_mixed_conv_folds_per_split(snapshot):
    model, input = prepared(torch.nn.Sequential(
        create_conv2d(4, 6, [3, 5], padding='same', stride=2), BatchNormAct2d(6, act_layer=torch.nn.SiLU)),
        2, 4, 7, 7)
    assert type(model[0]) is MixedConv2d and type(model[0]['0']) is Conv2dSame
    fused, report = fused_exactly(model, input, snapshot)
    assert folds(report) == {'1': (('0.0', '0.1'), 'after')}
    assert type(fused[0]['0']) is FoldedConv2dSame and type(fused[0]['1']) is FoldedConv2dSame


def test_same_padded_pooling_between_batch_norm_and_conv(snapshot):
    '''timm's MaxPool2dSame pads with -inf: a BatchNorm with scales >= 0 folds through it into the conv, exactly at
    an input size that needs padding; AvgPool2dSame averages the zeros it pads with, so the fold is refused with that
    reason (both were refused as "not a pooling").'''
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
    for pool, folded in ((MaxPool2dSame(3, 2), True), (AvgPool2dSame(3, 2), False)):
        model, input = prepared(torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4), pool, torch.nn.Conv2d(4, 2, 3)),
            2, 3, 12, 12)
        model = with_scales(model, 2, [1., 0., .5, 2.])
        fused, report = fused_exactly(model, input, snapshot, sizes=[(11, 11), (13, 14)])
        if folded:
            assert folds(report) == {'2': (('4',), 'before')}
        else:
            assert not report.fused
            assert re.search(r'`3` \(AvgPool2dSame\), which averages the zeros it pads with \(\'same\' padding\) into '
                             r'its border outputs', report.unfused[0].reason)


def test_conv_variants_refused_with_reason():
    model, _ = prepared(Lambda(
        lambda self, x: self.bn(self.cond(x, torch.sigmoid(self.route(x.mean((2, 3)))))),
        route=torch.nn.Linear(3, 2), cond=CondConv2d(3, 4, 3, num_experts=2), bn=torch.nn.BatchNorm2d(4)), 2, 3, 6, 6)
    reason = find_fusable_pairs(model).unfused[0].reason
    assert re.search(r'`cond` is a CondConv2d, which mixes its expert kernels', reason), reason
    model, _ = prepared(torch.nn.Sequential(torch.nn.BatchNorm2d(4), create_conv2d(4, 6, [3, 5])), 2, 4, 7, 7)
    reason = find_fusable_pairs(model).unfused[0].reason
    assert re.search(r'its output feeds `torch\.split`, not a conv/linear layer', reason), reason


def tiny_resnetv2():
    '''Pre-activation ResNetV2 with weight-standardised convs and BatchNormAct2d: the pre-activation feeds conv1 and
    the projection shortcut.'''
    return timm.models.resnetv2.ResNetV2(layers=[1, 1], channels=(16, 32), stem_chs=8, num_classes=5,
                                         norm_layer=BatchNormAct2d, conv_layer=StdConv2d)


def tiny_densenet():
    return timm.models.densenet.DenseNet(growth_rate=8, block_config=(2, 2), num_classes=5)


# small timm models: how to build them, and how many BatchNorms fold
MODELS = {
    'mobilenetv3_small_050': (lambda: timm.create_model('mobilenetv3_small_050', num_classes=5), 34),
    'tf_mobilenetv3_small_minimal_100': (
        lambda: timm.create_model('tf_mobilenetv3_small_minimal_100', num_classes=5), 34),
    'resnetv2-std-conv-batchnorm': (tiny_resnetv2, 7),
    'densenet-tiny': (tiny_densenet, 11),
}


@pytest.fixture(scope='module', params=sorted(MODELS))
def timm_model(request):
    build, expected = MODELS[request.param]
    torch.manual_seed(0)
    model = randomize_batch_norms(build().double())
    return model, torch.randn(2, 3, 32, 32, dtype=torch.float64), expected


def test_timm_model_folds_every_batch_norm_exactly(timm_model, snapshot):
    model, input, expected = timm_model
    _, report = fused_exactly(model, input, snapshot)
    assert len(report.fused) == expected == sum(is_batch_norm(module) for module in model.modules()), str(report)


def test_timm_model_canonizer_exact_and_restored(timm_model, snapshot):
    model, input, expected = timm_model
    before = snapshot(model)
    with torch.no_grad():
        reference = model(input)
    canonizer = FuseBatchNorm()
    with Composite(canonizers=[canonizer]).context(model), torch.no_grad():
        assert relative_error(model(input), reference) < 1e-12
        assert not any(is_batch_norm(module) for module in model.modules())
    assert len(canonizer.report.fused) == expected
    before.assert_unchanged()


@pytest.mark.parametrize('method', ['fused-lrp', 'composite-lrp', 'single-pass'])
def test_timm_model_lrp_runs(timm_model, method, snapshot):
    model, input, _ = timm_model
    before = snapshot(model)
    attribution = {
        'fused-lrp': lambda: FusedLRP(model),
        'composite-lrp': lambda: CompositeLRP(model, EpsilonPlusFlat()),
        'single-pass': lambda: CompositeLRP(model, EpsilonPlusFlat(), single_pass=True),
    }[method]()
    relevance = attribution.attribute(input, target=1)
    assert relevance.shape == input.shape and bool(torch.isfinite(relevance).all()) and relevance.abs().sum() > 0
    assert attribution.prepared.report.num_batch_norms == len(attribution.prepared.report.fused)
    before.assert_unchanged()


@pytest.mark.parametrize('method', ['fused-lrp', 'composite-lrp'])
def test_levit_after_a_forward_with_gradients(method, snapshot):
    # LeViT caches its attention biases by device in forward, computed from parameters (tensors deepcopy refuses):
    # the package copies them detached, and its tracing, on a copy, leaves no proxy key in the cache
    torch.manual_seed(0)
    model = randomize_batch_norms(timm.create_model('levit_128s', num_classes=3, img_size=64)).eval()
    input = torch.rand(1, 3, 64, 64)
    model(input)
    caches = [(module.attention_bias_cache, dict(module.attention_bias_cache)) for module in model.modules()
              if hasattr(module, 'attention_bias_cache')]
    assert caches and all(not bias.is_leaf for _, cache in caches for bias in cache.values())
    before = snapshot(model)
    lrp = FusedLRP(model) if method == 'fused-lrp' else CompositeLRP(model, EpsilonPlusFlat())
    relevance = lrp.attribute(input, target=1)
    assert relevance.shape == input.shape and bool(torch.isfinite(relevance).all()) and relevance.abs().sum() > 0
    assert all(cache.keys() == kept.keys() and all(cache[key] is kept[key] for key in kept) for cache, kept in caches)
    before.assert_unchanged()


def test_feature_hook_net_features_stay_exact(snapshot):
    '''timm's FeatureHookNet gathers its outputs with hooks on blocks; folds across a hooked block's boundary changed
    them (xception41p: 4 of its 5 feature maps 4 to 5 relative off), with no word in the report.'''
    torch.manual_seed(0)
    model = randomize_batch_norms(timm.create_model('xception41p', features_only=True, feature_cls='hook').double())
    input = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    before = snapshot(model)
    fused, report = fuse(model)
    with torch.no_grad():
        expected, features = model(input), fused(input)
    assert len(features) == len(expected) == 5
    assert all(relative_error(actual, wanted) < 1e-12 for actual, wanted in zip(features, expected))
    # every fold stays inside a hooked block or outside it: blocks_0.stack.conv2's BatchNorm folds into the conv after
    # it within the block, not into blocks_0.stack.conv1's, as it did
    hooked = [name for name, module in model.named_modules() if module._forward_hooks]
    assert len(hooked) == 5
    for fold in report.fused:
        for block in hooked:
            assert len({name.startswith(f'{block}.') for name in (fold.bn, *fold.layers)}) == 1, (fold, block)
    before.assert_unchanged()


class ActivatedUntraceable(torch.nn.Module):
    '''conv -> ``act`` -> linear, with control flow on the data: torch.fx cannot trace it, so the activation stays a
    module of its own (a traced forward inlines it).'''
    def __init__(self, act):
        super().__init__()
        self.conv, self.act, self.linear = torch.nn.Conv2d(2, 3, 3), act, torch.nn.Linear(48, 2)

    def forward(self, x):
        hidden = self.act(self.conv(x))
        if hidden.sum() > 1e9:
            hidden = hidden * 2
        return self.linear(hidden.flatten(1))


@pytest.mark.filterwarnings('ignore:zennit_bnfuse. could not trace')
@pytest.mark.parametrize('engine', ['singlepass', 'captum'])
@pytest.mark.parametrize('timm_act, torch_act', [
    (lambda: timm.layers.activations.Sigmoid(), lambda: torch.nn.Sigmoid()),
    (lambda: timm.layers.activations.GELUTanh(), lambda: torch.nn.GELU(approximate='tanh')),
    (lambda: timm.layers.activations.Tanh(), lambda: torch.nn.Tanh()),
], ids=['Sigmoid', 'GELUTanh', 'Tanh'])
def test_timm_activation_modules_pass_relevance_as_torchs_do(timm_act, torch_act, engine):
    '''FusedLRP raised "no rule defined" for timm's own activation modules where the forward cannot be traced
    (efficientvit_m0, efficientvit_l1).'''
    relevance = []
    for act in (timm_act, torch_act):
        torch.manual_seed(0)
        model = ActivatedUntraceable(act()).double()
        input = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        relevance.append(FusedLRP(model, engine=engine).attribute(input, target=1))
    assert relevance[1].abs().sum() > 0 and torch.equal(*relevance)


def test_a_rule_for_a_folded_norm_act_layer_is_refused():
    '''A folded norm-act layer keeps its name as a container of its drop and act, which takes no rule: a Captum rule
    naming it was accepted and never applied (a folded plain BatchNorm's was refused).'''
    from captum.attr._utils.lrp_rules import GammaRule
    torch.manual_seed(0)
    model = randomize_batch_norms(torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), BatchNormAct2d(3), torch.nn.Flatten(), torch.nn.Linear(12, 2))).eval().double()
    input = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^rules names '1', which is folded into `0`: it has no layer of its own"):
        FusedLRP(model, rules={'1': GammaRule()}).attribute(input, target=0)
    assert FusedLRP(model, rules={'1.act': None}).attribute(input, target=0).shape == input.shape


class WithConvMlp(torch.nn.Module):
    '''conv -> BatchNorm -> relu -> timm's ConvMlp (a block timm marks untraceable: it pools inputs smaller than its
    kernel) -> mean -> linear.'''
    def __init__(self):
        super().__init__()
        from timm.models.vgg import ConvMlp
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.mlp = ConvMlp(4, 6, kernel_size=3, drop_rate=0.)
        self.linear = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.linear(self.mlp(torch.relu(self.bn(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize('engine', ['FusedLRP', 'CompositeLRP'])
def test_a_block_timm_marks_untraceable_is_kept_whole_in_the_lrp_graph(engine):
    '''The LRP graph's tracer did not keep timm's untraceable blocks whole (fuse()'s did): the whole model ran
    untraced, the mean passed relevance by its gradient and the BatchNorm stayed unfolded (timm's vgg11_bn,
    efficientvit_m0, where FusedLRP returned NaN). Kept whole, with a warning that names it, its layers get their
    rules: LRP-epsilon with a negligible epsilon equals gradient x input.'''
    torch.manual_seed(0)
    model = randomize_batch_norms(WithConvMlp()).double().eval()
    input = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    lrp = epsilon_explainer(engine, model, 'fused')
    with pytest.warns(UserWarning, match=r'1 call\(s\) of what timm marks as untraceable are kept whole \(first: '
                      r'`mlp` \(ConvMlp\)\)') as caught:
        relevance = lrp.attribute(input, target=1)
    assert not [warning for warning in caught if 'could not trace' in str(warning.message)]
    assert [entry.bn for entry in lrp.prepared.report.fused] == ['bn']
    leaf = input.clone().requires_grad_()
    gradient, = torch.autograd.grad(model(leaf)[:, 1].sum(), leaf)
    torch.testing.assert_close(relevance, gradient * input, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('name', ['repvgg_a0', 'levit_128s'])
def test_reasons_in_blocks_timm_reparameterises_say_how_to_fold_them(name):
    '''The identity-branch BatchNorms of RepVGG and the BatchNorm1d of LeViT's LinearNorm (after a flatten) stay
    unfused; the reason now names timm's reparameterize_model, after which every one of them is folded by timm.'''
    from timm.utils.model import reparameterize_model
    model = randomize_batch_norms(timm.create_model(name, pretrained=False)).eval()
    report = find_fusable_pairs(model)
    assert report.unfused and all('call timm.utils.model.reparameterize_model(model) first' in entry.reason
                                  for entry in report.unfused)
    merged = reparameterize_model(model)
    assert not find_fusable_pairs(merged).unfused


@pytest.mark.parametrize('engine', ['singlepass', 'captum'])
def test_a_rule_for_an_in_place_module_inside_a_block_kept_whole_is_refused(engine):
    '''Captum's IdentityRule on ConvMlp's in-place ReLU (inside the block the prepared copy keeps whole) failed with
    a KeyError from Captum's hooks; the same module at the top level is given its own input by the graph rewrite.'''
    from captum.attr._utils.lrp_rules import IdentityRule
    torch.manual_seed(0)
    model = randomize_batch_norms(WithConvMlp()).double().eval()
    input = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r'module `mlp.act1` \(ReLU\) has a rule and runs in place inside `mlp`'):
        with pytest.warns(UserWarning, match='kept whole'):
            FusedLRP(model, rules={'mlp.act1': IdentityRule()}, engine=engine).attribute(input, target=1)


def test_a_rule_named_for_timms_group_norm_act_is_taken():
    '''The error for GroupNormAct without a rule says to name it in rules=; the check of rules names for modules that
    hold others (GroupNormAct holds its act) refused that name.'''
    from captum.attr._utils.lrp_rules import EpsilonRule
    from timm.layers import GroupNormAct
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), GroupNormAct(4, 2), torch.nn.Conv2d(4, 2, 3),
                                torch.nn.Flatten()).double().eval()
    input = torch.rand(2, 3, 7, 7, dtype=torch.float64)
    named = FusedLRP(model, rules={'1': EpsilonRule(1.)}).attribute(input, target=1)
    assert not torch.allclose(named, FusedLRP(model, rules={'1': EpsilonRule()}).attribute(input, target=1))


def test_a_rule_for_the_type_of_an_unfolded_norm_act_layer_is_taken():
    '''With the BatchNorm left unfolded, the copy holds the BatchNorm part of timm's BatchNormAct2d as a plain
    BatchNorm: a rule given for the type BatchNormAct2d was ignored without a word (by name it applied).'''
    from captum.attr._utils.lrp_rules import EpsilonRule
    torch.manual_seed(0)
    model = randomize_batch_norms(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), BatchNormAct2d(4), torch.nn.Conv2d(4, 2, 3), torch.nn.Flatten())).double().eval()
    input = torch.rand(2, 3, 7, 7, dtype=torch.float64)
    by_type = FusedLRP(model, handling='unfused', rules={BatchNormAct2d: EpsilonRule(1.)}).attribute(input, target=1)
    by_name = FusedLRP(model, handling='unfused', rules={'1': EpsilonRule(1.)}).attribute(input, target=1)
    torch.testing.assert_close(by_type, by_name)
    assert not torch.allclose(by_type, FusedLRP(model, handling='unfused').attribute(input, target=1))
