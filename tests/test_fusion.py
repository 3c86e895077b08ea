'''Tests for fuse(): exact outputs on every fixture, hypothesis-generated layers, dtypes and torchvision models.'''
import copy
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from hypothesis import given, settings, strategies as st
from torchvision.ops.misc import FrozenBatchNorm2d

from conftest import randomize_batch_norms
from fusion_cases import BATCH_NORM, CONV, CONV_TRANSPOSE, Lambda, must_fuse, must_not_fuse, prepared, \
    rank_dependent_cases
from zennit_bnfuse import find_fusable_pairs, fuse
from zennit_bnfuse.evaluation.models import build
from zennit_bnfuse.fold import is_batch_norm, timm_layers
from zennit_bnfuse.layers import FOLDABLE_LAYER_TYPES, FoldedInputError, FoldedTrainingError

FUSE_CASES = must_fuse()
NO_FUSE_CASES = must_not_fuse()
RANK_CASES = rank_dependent_cases()


def assert_fused_exactly(model, input, snapshot, atol=1e-10):
    '''fuse(model) agrees with model on input to atol, removes the folded BNs and leaves model unchanged.'''
    before = snapshot(model)
    with torch.no_grad():
        expected = model(input)
    fused, report = fuse(model)
    with torch.no_grad():
        actual = fused(input)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)
    before.assert_unchanged()
    remaining = {name for name, module in fused.named_modules() if is_batch_norm(module)}
    assert remaining == {item.bn for item in report.unfused}
    # the copy shares no memory with the model (in float64, a BatchNorm folded into the zero-padded conv after it
    # kept the conv's own bias as the bias map's base: loading a state_dict into the copy changed the model) and
    # carries no graph (deepcopy refuses tensors that do)
    assert not storages(fused) & storages(model)
    copy.deepcopy(fused)
    return fused, report


def storages(model):
    '''The memory addresses of ``model``'s parameters and buffers (persistent or not).'''
    return {tensor.untyped_storage().data_ptr() for tensor in (*model.parameters(), *model.buffers())
            if tensor.numel()}


@pytest.mark.parametrize('case', sorted(FUSE_CASES))
def test_must_fuse_exact(case, snapshot):
    model, input, folds = FUSE_CASES[case]
    _, report = assert_fused_exactly(model, input, snapshot)
    assert len(report.fused) == len(folds)


@pytest.mark.parametrize('case', sorted(NO_FUSE_CASES))
def test_must_not_fuse_keeps_model_exact(case, snapshot):
    model, input, unfused = NO_FUSE_CASES[case]
    assert_fused_exactly(model, input, snapshot)


def test_fused_model_keeps_names_and_classes():
    model, input, _ = FUSE_CASES['functional-forward']
    fused, _ = fuse(model)
    assert type(fused) is type(model)
    assert [name for name, _ in fused.named_modules()] == [name for name, _ in model.named_modules()]
    assert isinstance(fused.bn_in, torch.nn.Identity) and isinstance(fused.bn_out, torch.nn.Identity)
    assert fused.head is not model.head and torch.equal(fused.head.weight, model.head.weight)


def test_bias_map_exact_at_other_input_sizes(snapshot):
    model, _, _ = FUSE_CASES['bn-conv2d-zero-padding']
    fused, _ = fuse(model)
    for size in ((5, 5), (7, 4), (2, 9)):
        input = torch.randn(1, 3, *size, dtype=torch.float64)
        torch.testing.assert_close(fused(input), model(input), rtol=0, atol=1e-10)


@st.composite
def layer_and_batch_norm(draw):
    '''A random Conv/ConvTranspose/Linear with a BN before or after it, and an input.'''
    kind = draw(st.sampled_from(['conv', 'transposed', 'linear']))
    side = draw(st.sampled_from(['before', 'after'] if kind != 'transposed' else ['after']))
    groups = draw(st.sampled_from([1, 2, 3])) if kind != 'linear' else 1
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    bias = draw(st.booleans())
    affine = draw(st.booleans())
    if kind == 'linear':
        layer = torch.nn.Linear(in_channels, out_channels, bias=bias)
        batch_norm_type, input_shape = torch.nn.BatchNorm1d, (3, in_channels)
    else:
        dims = draw(st.sampled_from([1, 2, 3]))
        kernel = draw(st.integers(1, 3))
        stride = draw(st.integers(1, 2))
        dilation = draw(st.integers(1, 2))
        padding = draw(st.integers(0, 2))
        size = draw(st.integers(5, 7))
        if kind == 'conv':
            padding_mode = draw(st.sampled_from(['zeros', 'reflect', 'replicate', 'circular']))
            layer = CONV[dims](in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
                               groups=groups, bias=bias, padding_mode=padding_mode)
        else:
            output_padding = draw(st.integers(0, max(stride, dilation) - 1))
            layer = CONV_TRANSPOSE[dims](in_channels, out_channels, kernel, stride=stride, padding=padding,
                                         output_padding=output_padding, groups=groups, bias=bias, dilation=dilation)
        batch_norm_type, input_shape = BATCH_NORM[dims], (2, in_channels, *(size,) * dims)
        if dims == 2 and draw(st.booleans()):
            batch_norm_type = FrozenBatchNorm2d
    channels = in_channels if side == 'before' else out_channels
    kwargs = {} if batch_norm_type is FrozenBatchNorm2d else {'affine': affine}
    batch_norm = batch_norm_type(channels, **kwargs)
    parts = (batch_norm, layer) if side == 'before' else (layer, batch_norm)
    seed = draw(st.integers(0, 2 ** 16))
    return prepared(torch.nn.Sequential(*parts), *input_shape, seed=seed), side


@settings(max_examples=150, deadline=None)
@given(layer_and_batch_norm())
def test_generated_layers_fuse_exactly(case):
    (model, input), side = case
    with torch.no_grad():
        expected = model(input)
    fused, report = fuse(model)
    assert [item.side for item in report.fused] == [side]
    with torch.no_grad():
        torch.testing.assert_close(fused(input), expected, rtol=0, atol=1e-10)


def dtype_model():
    '''Every kind of fold: before a zero-padded conv, after a conv, through a ReLU and a flatten, after a Linear.'''
    torch.manual_seed(0)
    return randomize_batch_norms(torch.nn.Sequential(
        torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 3), torch.nn.BatchNorm1d(3)))


DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype, tolerance', [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_low_precision_and_device(dtype, tolerance, device):
    model = dtype_model()
    input = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        reference = model.double()(input.double())
        low = model.to(device, dtype)
        fused, report = fuse(low)
        assert sorted(item.side for item in report.fused) == ['after', 'after', 'before', 'before-relu']
        assert all(param.dtype == dtype and param.device.type == device for param in fused.parameters())
        original = low(input.to(device, dtype)).double().cpu()
        actual = fused(input.to(device, dtype)).double().cpu()
    scale = reference.abs().max()
    # the fused model is at least as close to the float64 reference as the low precision original
    assert (actual - reference).abs().max() / scale <= max(tolerance, 2 * (original - reference).abs().max() / scale)


# torchvision models, weights=None and randomised BN statistics; BN counts the package must fold
TORCHVISION = {
    'vgg11_bn': 8,
    'resnet18': 20,
    'resnet50': 53,
    'mobilenet_v2': 52,
    'efficientnet_b0': 49,
    'densenet121': 121,
}


@pytest.mark.parametrize('arch', sorted(TORCHVISION))
def test_torchvision_models(arch, snapshot):
    torch.manual_seed(0)
    model = randomize_batch_norms(getattr(torchvision.models, arch)(weights=None))
    total = sum(is_batch_norm(module) for module in model.modules())
    before = snapshot(model)
    input = torch.randn(2, 3, 64, 64)
    fused, report = fuse(model)
    with torch.no_grad():
        expected, actual = model(input), fused(input)
    assert len(report.fused) == TORCHVISION[arch] == total, str(report)
    assert not any(is_batch_norm(module) for module in fused.modules())
    assert ((actual - expected).abs().max() / expected.abs().max()).item() < 1e-5
    before.assert_unchanged()


def test_tiny_scale_in_float16_stays_unfused():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.Conv2d(2, 2, 1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1e-6, 1.]))
        model[0].bias.fill_(1.)
    report = find_fusable_pairs(model.half())
    assert report.unfused[0].reason.endswith("its scale is too small for torch.float16: the thresholded ReLU's "
                                             "threshold would overflow)")
    assert not find_fusable_pairs(model.float()).unfused


def test_fused_densenet_backpropagates_through_inplace_relu():
    # densenet's F.relu(inplace=True) follows the thresholded ReLU that norm5 becomes
    torch.manual_seed(0)
    model = randomize_batch_norms(torchvision.models.densenet121(weights=None))
    fused, _ = fuse(model)
    input = torch.rand(1, 3, 32, 32, requires_grad=True)
    gradient, = torch.autograd.grad(fused(input)[0, 3], input)
    expected, = torch.autograd.grad(model(input)[0, 3], input)
    torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize('case', sorted(RANK_CASES))
def test_rank_dependent_fold_raises_where_it_would_be_wrong(case, snapshot):
    model, input, (bn, layer) = RANK_CASES[case]
    before = snapshot(model)
    fused, report = fuse(model)
    assert [(item.bn, item.layer) for item in report.fused] == [(bn, layer)]
    with torch.no_grad():
        expected = model(input)
        # the fold computed anyway (the torch layer's own forward) is wrong on this input: the 0.46-1.86
        folded = fused.get_submodule(layer)
        base = next(kind for kind in FOLDABLE_LAYER_TYPES if isinstance(folded, kind))
        unchecked = copy.deepcopy(fused)
        unchecked.get_submodule(layer).forward = lambda input: base.forward(unchecked.get_submodule(layer), input)
        assert ((unchecked(input) - expected).abs().max() / expected.abs().max()) > .1
        with pytest.raises(FoldedInputError, match=rf'`{layer}` \({base.__name__}\) has BatchNorm `{bn}` folded into '
                           rf'it.*an input of shape \({input.shape[0]}, 3(, 3)?\)'):
            fused(input)
        # on the rank the fold assumes, it is exact
        batched = torch.randn(4, 3, *(() if base is torch.nn.Linear else (5,)), dtype=torch.float64)
        torch.testing.assert_close(fused(batched), model(batched), rtol=0, atol=1e-12)
    before.assert_unchanged()


def include_model():
    '''conv -> BN2d -> ReLU -> flatten -> linear -> BN1d, float64, random statistics.'''
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(12, 4), torch.nn.BatchNorm1d(4))
    return randomize_batch_norms(model.double())


@pytest.mark.parametrize('include', [lambda name, module: isinstance(module, torch.nn.BatchNorm2d), ['1'], {'1'}])
def test_include_folds_only_the_selected_batch_norms(include):
    model = include_model()
    fused, report = fuse(model, include=include)
    assert [entry.bn for entry in report.fused] == ['1']
    assert [(entry.bn, entry.reason) for entry in report.unfused] == [('5', 'not selected by `include`')]
    assert isinstance(fused[1], torch.nn.Identity) and isinstance(fused[5], torch.nn.BatchNorm1d)
    input = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    assert torch.allclose(fused(input), model(input), rtol=1e-12, atol=1e-12)


def test_include_errors_name_the_problem():
    model = include_model()
    with pytest.raises(ValueError, match=r"include names '4', which is not a BatchNorm of the model"):
        fuse(model, include=['1', '4'])
    with pytest.raises(TypeError, match='include must be a function'):
        fuse(model, include='1')


def test_preact_resnet_folds_shared_preactivations(snapshot):
    # blocks.3 and blocks.6 share relu(bn1(x)) between conv1 and the projection shortcut (He et al.)
    torch.manual_seed(0)
    model = randomize_batch_norms(build('cifar10-preact-resnet').double())
    _, report = assert_fused_exactly(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), snapshot)
    assert len(report.fused) == 19 and not report.unfused
    assert {item.bn: (item.layers, item.side) for item in report.fused if item.also} == {
        'blocks.3.bn1': (('blocks.3.shortcut', 'blocks.3.conv1'), 'before-relu'),
        'blocks.6.bn1': (('blocks.6.shortcut', 'blocks.6.conv1'), 'before-relu'),
    }


def test_timm_is_looked_at_only_once_the_user_imported_it(monkeypatch):
    # timm is a test dependency only: no module but zennit_bnfuse.timm_layers imports it, and that one only once
    # the user has imported timm
    package = Path(__file__).parent.parent / 'zennit_bnfuse'
    importing = [path.name for path in package.rglob('*.py')
                 if re.search(r'^\s*(import|from) timm\b', path.read_text(), re.MULTILINE)]
    assert importing == ['timm_layers.py']
    monkeypatch.delitem(sys.modules, 'timm', raising=False)
    assert timm_layers() is None
    model, input, folds = FUSE_CASES['bn-relu-conv-negative-zero-scales']
    fused, report = fuse(model)
    assert len(report.fused) == len(folds)
    torch.testing.assert_close(fused(input), model(input), rtol=0, atol=1e-10)


def test_rank_check_drops_a_shared_fold_whichever_layer_raises():
    # BatchNorm1d on (N, C, L) normalises C; the Linears act on L: their fold is exact only for (N, C) inputs
    model = randomize_batch_norms(Lambda(
        lambda self, x: (lambda h: self.first(h) + self.second(h))(torch.relu(self.bn(x))),
        bn=torch.nn.BatchNorm1d(3), first=torch.nn.Linear(3, 2), second=torch.nn.Linear(3, 2)).double())
    assert find_fusable_pairs(model).fused[0].layers == ('first', 'second')
    _, report = fuse(model, example_inputs=torch.randn(2, 3, 3, dtype=torch.float64))
    assert not report.fused and re.search(r'folded into `first`, `second`.*gets an input of shape \(2, 3, 3\)',
                                          report.unfused[0].reason)


def test_fused_layer_in_training_mode_raises_unless_its_batch_norms_are_frozen():
    '''In training mode a BatchNorm normalises by each batch's statistics: the fused copy (and the model inside the
    canonizer's context after model.train()) computed with the running ones, 0.96 relative off the model.'''
    model, input, _ = FUSE_CASES['functional-forward']
    fused, _ = fuse(model)
    fused.train()
    message = r'`conv` \(Conv2d\) has BatchNorm `bn_in`, `bn_out` folded into it, which is in training mode'
    with pytest.raises(FoldedTrainingError, match=message):
        fused(input)
    # BatchNorms kept in eval mode while the rest trains (fine-tuning) normalise by their running statistics, as the
    # fold does: the layer's own training flag raised here
    for model_in_training in (model, fused):
        model_in_training.train()
        for module in model_in_training.modules():
            if is_batch_norm(module) or isinstance(module, torch.nn.Identity):
                module.eval()
    torch.testing.assert_close(fused(input), model(input), rtol=0, atol=1e-10)
    model.eval()
    torch.manual_seed(0)
    frozen = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4)).double()
    fused, report = fuse(frozen)
    assert len(report.fused) == 1
    input = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(fused.train()(input), frozen.train()(input), rtol=0, atol=1e-12)


def test_a_model_that_is_one_batch_norm_says_so_without_a_warning():
    '''Its forward does not trace (it branches on its mode), so fuse() warned to pass example_inputs, which cannot
    give it a layer to fold into.'''
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        fused, report = fuse(torch.nn.BatchNorm2d(3).eval())
    assert [(item.bn, item.reason) for item in report.unfused] == [
        ('', 'the model is this BatchNorm alone: no layer to fold it into')]
    assert isinstance(fused, torch.nn.BatchNorm2d)
