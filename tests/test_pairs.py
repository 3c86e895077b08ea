'''Tests for finding fusable pairs (zennit_bnfuse.pairs) and the report (zennit_bnfuse.report).'''
import copy
import re
import threading
import warnings
from collections import OrderedDict

import pytest
import torch

from fusion_cases import Lambda, Untraceable, must_fuse, must_not_fuse, prepared
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat
from zennit_bnfuse import CompositeLRP, FuseBatchNorm, FusedLRP, SinglePass, find_fusable_pairs, fuse

FUSE_CASES = must_fuse()
NO_FUSE_CASES = must_not_fuse()


@pytest.mark.parametrize('case', sorted(FUSE_CASES))
def test_must_fuse_pairs(case):
    model, _, folds = FUSE_CASES[case]
    report = find_fusable_pairs(model)
    assert {item.bn: (item.layer, item.side) for item in report.fused} == folds
    assert not report.unfused and report.traced


@pytest.mark.parametrize('case', sorted(NO_FUSE_CASES))
def test_must_not_fuse_reason(case):
    model, _, unfused = NO_FUSE_CASES[case]
    report = find_fusable_pairs(model)
    reasons = {item.bn: item.reason for item in report.unfused}
    assert set(reasons) == set(unfused)
    for name, pattern in unfused.items():
        assert re.search(pattern, reasons[name]), reasons[name]
    assert not {item.bn for item in report.fused} & set(unfused)


def test_training_mode_raises_naming_module():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Sequential(torch.nn.BatchNorm2d(2)))
    with pytest.raises(ValueError, match=r"'1\.0' is in training mode.*model\.eval\(\)"):
        find_fusable_pairs(model)


def test_non_finite_statistics_raise_naming_module():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).eval()
    model[1].running_var[0] = float('inf')
    with pytest.raises(ValueError, match=r"'1' has non-finite values in 'running_var'"):
        find_fusable_pairs(model)


def test_untraceable_without_example_inputs_folds_nothing_and_says_why():
    model, _ = prepared(Untraceable(), 1, 3, 5, 5)
    with pytest.warns(UserWarning, match=r'could not trace the forward of Untraceable with torch\.fx \(TraceError.*'
                      r'folded none of its 2 BatchNorms; pass example_inputs'):
        report = find_fusable_pairs(model)
    assert not report.traced and 'TraceError' in report.trace_error and report.checked_on is None
    assert not report.fused
    reasons = {item.bn: item.reason for item in report.unfused}
    assert set(reasons) == {'block.1', 'bn'}
    prefix = f'the forward could not be traced ({report.trace_error})'
    assert all(reason.startswith(prefix) for reason in reasons.values())
    assert re.search(r'next to `block\.0` inside an nn\.Sequential.*pass example_inputs', reasons['block.1'])
    assert 'never called as a module inside an nn.Sequential' in reasons['bn']
    assert 'none was folded: pass example_inputs' in str(report)


def test_untraceable_with_example_inputs_folds_what_they_confirm():
    model, input = prepared(Untraceable(), 2, 3, 5, 5)
    with pytest.warns(UserWarning, match=r'folded 1 of its 2 BatchNorms.*gave the model\'s output on example_inputs'):
        report = find_fusable_pairs(model, example_inputs=input)
    assert [(item.bn, item.layer, item.side) for item in report.fused] == [('block.1', 'block.0', 'after')]
    assert [item.bn for item in report.unfused] == ['bn']
    assert report.checked_on == 'example_inputs (2, 3, 5, 5) torch.float64, computed in torch.float64'
    assert 'a fold was kept only where it gave the model\'s output on example_inputs (2, 3, 5, 5)' in str(report)


class SharedActivation(torch.nn.Module):
    '''An untraceable forward (control flow on the data) around a Sequential whose ReLU is registered before it
    under another name.'''
    def __init__(self):
        super().__init__()
        self.act = torch.nn.ReLU()
        self.seq = torch.nn.Sequential(torch.nn.BatchNorm2d(3), self.act, torch.nn.Conv2d(3, 4, 3))

    def forward(self, x):
        if x.sum() > 0:
            x = self.seq(x)
        return self.act(x)


def test_untraceable_sequential_child_registered_first_under_another_name():
    '''The Sequential's graph names its children under its own name (`seq.1`): KeyError, as the model's first name
    for the ReLU is `act`.'''
    model, input = prepared(SharedActivation(), 2, 3, 6, 6)
    with pytest.warns(UserWarning, match='could not trace'):
        report = find_fusable_pairs(model, example_inputs=input)
    assert [(item.bn, item.layer, item.side) for item in report.fused] == [('seq.0', 'seq.2', 'before-relu')]


def test_traceable_model_gives_no_warning():
    model, _, _ = FUSE_CASES['functional-forward']
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        find_fusable_pairs(model)


def test_never_called_batch_norm_reported():
    model, _ = prepared(Lambda(lambda self, x: self.conv(x), conv=torch.nn.Conv2d(1, 1, 1),
                               spare=torch.nn.BatchNorm2d(1)), 1, 1, 2, 2)
    report = find_fusable_pairs(model)
    assert [item.bn for item in report.unfused] == ['spare']
    assert report.unfused[0].reason.startswith('it is never called as a module in the traced (eval-mode) forward')


def test_report_prints_table():
    model, _, _ = FUSE_CASES['frozen-bn']
    text = str(find_fusable_pairs(model))
    assert text.splitlines()[0] == 'BatchNorm fusion: 2 of 2 folded'
    assert re.search(r'^0\s+1\s+before$', text, re.MULTILINE)
    assert re.search(r'^2\s+1\s+after$', text, re.MULTILINE)
    model, _, _ = NO_FUSE_CASES['no-running-statistics']
    text = str(find_fusable_pairs(model))
    assert 'BatchNorm left in place' in text and 'no running statistics' in text


def test_report_to_dict():
    model, _, _ = FUSE_CASES['functional-forward']
    report = find_fusable_pairs(model).to_dict()
    assert report['fused'][0] == {'bn': 'bn_in', 'layer': 'conv', 'side': 'before', 'via': [], 'also': []}
    assert report['unfused'] == [] and report['traced'] and report['checked_on'] is None


def test_shared_and_concatenated_folds_name_every_layer():
    layers = {case: find_fusable_pairs(FUSE_CASES[case][0]).fused[0].layers for case in (
        'bn-relu-shared-by-three-layers', 'bn-shared-by-two-convs', 'cat-of-convs-bn')}
    assert layers == {'bn-relu-shared-by-three-layers': ('conv', 'shortcut', 'pooled'),
                      'bn-shared-by-two-convs': ('conv', 'shortcut'), 'cat-of-convs-bn': ('conv1', 'conv2')}
    report = find_fusable_pairs(FUSE_CASES['bn-relu-shared-by-three-layers'][0])
    assert report.fused[0].via == ('`F.relu`', '`F.avg_pool2d`')
    assert re.search(r'^bn\s+conv, shortcut, pooled\s+before-relu via `F.relu`, `F.avg_pool2d`$', str(report),
                     re.MULTILINE)


class Recording(torch.nn.Module):
    '''Keeps its last feature map, counts its calls and caches by device in its forward (as models kept for Grad-CAM,
    and timm's LeViT with its attention-bias cache, do).'''
    def __init__(self, lock=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.linear = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 5)
        self.calls, self.last, self.cache, self.ordered = 0, None, {}, OrderedDict()
        self.count = torch.zeros(())  # a plain tensor attribute the forward changes in place
        self.config = {'name': 'recording'}
        self.config['self'] = self.config  # a container that holds itself
        if lock:
            self.lock = threading.Lock()  # deepcopy cannot copy it

    def forward(self, input):
        self.calls += 1
        hidden = torch.relu(self.bn(self.conv(input)))
        self.last = hidden
        self.cache[str(input.device)] = hidden  # a tensor computed with autograd, inside a dict
        self.ordered[str(input.device)] = hidden.shape
        self.count += 1
        return self.linear(hidden.mean((2, 3)))


def lrp_entry_points():
    '''Every entry point that traces the user's model, as ``name -> function(model, input)``, and how many times
    each runs the model's own forward.'''
    def canonizer(model, input):
        with Gradient(model, SinglePass(EpsilonPlusFlat(canonizers=[FuseBatchNorm()]))) as attributor:
            attributor(input, torch.eye(5)[[1]])
    return {
        'find_fusable_pairs': (lambda model, input: find_fusable_pairs(model), 0),
        'fuse': (lambda model, input: fuse(model), 0),
        'FusedLRP': (lambda model, input: FusedLRP(model).attribute(input, target=1), 0),
        'CompositeLRP': (lambda model, input: CompositeLRP(model, EpsilonPlusFlat()).attribute(input, target=1), 0),
        'canonizer and SinglePass': (canonizer, 1),
    }


@pytest.mark.parametrize('entry', sorted(lrp_entry_points()))
def test_tracing_leaves_what_the_forward_stores_alone(entry):
    # fx runs the forward's Python with proxies in place of tensors: on a copy, so no proxy and no extra call reaches
    # the user's model
    model, input = Recording().eval(), torch.rand(1, 3, 6, 6)
    model(input)
    last, cache = model.last, dict(model.cache)
    function, forwards = lrp_entry_points()[entry]
    function(model, input)
    assert model.calls == 1 + forwards and model.cache.keys() == cache.keys() == model.ordered.keys()
    assert model.count.item() == 1 + forwards
    assert type(model.last) is torch.Tensor and (forwards or model.last is last)


def test_a_model_deepcopy_cannot_copy_is_traced_itself_and_its_attributes_put_back():
    model, input = Recording(lock=True).eval(), torch.rand(1, 3, 6, 6)
    with torch.no_grad():
        model(input)
    last = model.last
    with pytest.raises(TypeError):
        copy.deepcopy(model)
    assert find_fusable_pairs(model).fused[0].bn == 'bn'
    assert model.calls == 1 and model.last is last and 'lock' in vars(model) and list(model.cache) == ['cpu']
    assert list(model.ordered) == ['cpu'] and model.config['self'] is model.config
    # the package's own copies say why they cannot be made
    with pytest.raises(TypeError, match=r"zennit_bnfuse works on a copy of Recording and copy.deepcopy cannot copy "
                                        r"it \(TypeError: cannot pickle '_thread.lock' object\); keep objects deepcopy "
                                        r"cannot copy"):
        FusedLRP(model).attribute(input, target=1)


def test_running_out_of_memory_while_copying_raises_as_it_does(monkeypatch):
    # only what deepcopy cannot copy becomes the TypeError that says so
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError('out of memory')
    monkeypatch.setattr(copy, 'deepcopy', out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        fuse(Recording().eval())


class SplitThenNorm(torch.nn.Module):
    '''A BatchNorm on one part of a conv's output channels (timm's lambda layer norms its query so), one on a slice.'''
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 8, 1)
        self.bn_query, self.bn_slice = torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        query, value = torch.split(self.conv(x), [4, 4], dim=1)
        return self.bn_query(query).relu().mean((2, 3)) + self.bn_slice(value[:, :4]).mean((2, 3))


def test_reasons_name_what_an_item_comes_from():
    '''The reason named the op of an item of a split as "`[]`".'''
    report = find_fusable_pairs(SplitThenNorm().eval())
    reasons = {entry.bn: entry.reason for entry in report.unfused}
    assert 'its input comes from item 0 of `torch.split`, not a conv/linear layer' in reasons['bn_query']
    assert 'its input comes from a slice of item 1 of `torch.split`, not a conv/linear layer' in reasons['bn_slice']
