'''Tracing a forward per call signature: its arguments after the inputs that are not tensors as fixed values.'''
import copy
import enum
import math
import operator
import random
import types
import warnings

import numpy as np
import pytest
import torch
import torch.fx
from zennit.composites import EpsilonPlusFlat

from conftest import epsilon_explainer, randomize_batch_norms
from zennit_bnfuse import CompositeLRP, FuseBatchNorm, FusedLRP, find_fusable_pairs, fuse
from zennit_bnfuse.prepared import PreparedModel
from zennit_bnfuse.specialization import (
    FixedList, FixedTuple, concrete_arguments, remove_guards, signature_key, trace_for_call,
)

EACH_EXPLAINER = pytest.mark.parametrize(
    'explainer', [FusedLRP, lambda model: CompositeLRP(model, EpsilonPlusFlat())], ids=['fused', 'composite'])


class Options(torch.nn.Module):
    '''conv -> BatchNorm -> relu -> linear, with options after the input: a mask, a flag and a scale.'''
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.linear = torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Linear(48, 2)

    def forward(self, x, mask=None, flip=False, scale=1.):
        hidden = torch.relu(self.bn(self.conv(x))).flatten(1)
        if mask is not None:
            hidden = hidden * mask
        if flip:  # control flow on a proxy: not traceable
            hidden = hidden.flip(-1)
        return self.linear(hidden) * scale


class Kind(enum.Enum):
    '''An enum whose members are not numbers: a proxy is none of them.'''
    SUM = 'sum'
    MAX = 'max'


def options():
    torch.manual_seed(0)
    return randomize_batch_norms(Options()).double().eval()


def test_concrete_arguments_are_the_non_tensors_given_or_by_default():
    model, mask = Options(), torch.ones(48)
    assert concrete_arguments(model, 1, None) == {'mask': None, 'flip': False, 'scale': 1.}
    assert concrete_arguments(model, 1, (mask, True)) == {'flip': True, 'scale': 1.}
    assert concrete_arguments(model, 1, mask) == {'flip': False, 'scale': 1.}  # one argument, not a tuple
    assert concrete_arguments(model, 2, (True,)) == {'flip': True, 'scale': 1.}  # a second input
    assert concrete_arguments(model, 1, (None, False, 2., 'too many')) == {}  # the forward raises for that

    class Star(torch.nn.Module):
        def forward(self, x, *rest, scale=1.):
            return x

    class Required(torch.nn.Module):
        def forward(self, x, mask, scale=2):
            return x

    class Before(torch.nn.Module):
        def forward(self, x, mask=None, *rest, scale=1., **options):
            return x
    assert concrete_arguments(Star(), 1, (None,)) == {'scale': 1.}  # keyword-only by default
    assert concrete_arguments(Before(), 1, ()) == {'mask': None, 'scale': 1.}
    assert concrete_arguments(Before(), 1, (None, 2.)) == {'mask': None, 'scale': 1.}  # 2. goes to *rest: a proxy
    assert concrete_arguments(Required(), 1, None) == {'scale': 2}  # a missing argument stays a proxy
    # NumPy's scalars as the Python numbers they hold (np.float64 would be written into the graph's code as such)
    fixed = concrete_arguments(model, 1, (None, np.bool_(True), np.float64(2.5)))
    assert fixed == {'mask': None, 'flip': True, 'scale': 2.5} and type(fixed['scale']) is float
    # a tuple or list of fixed values is one fixed value (a FixedTuple or FixedList, which torch.fx does not
    # flatten); one holding a tensor stays a proxy
    fixed = concrete_arguments(model, 1, (None, False, (1., [np.int64(2), None])))
    assert fixed == {'mask': None, 'flip': False, 'scale': (1., [2, None])} and type(fixed['scale']) is FixedTuple
    assert type(fixed['scale'][1]) is FixedList and type(fixed['scale'][1][0]) is int
    for proxy in ((1., torch.ones(1)), [1., (torch.ones(1),)]):
        assert concrete_arguments(model, 1, (None, False, proxy)) == {'mask': None, 'flip': False}
    assert concrete_arguments(model, 1, (None, Kind.SUM)) == {'mask': None, 'flip': Kind.SUM, 'scale': 1.}

    class Builtin(torch.nn.Module):
        forward = torch.relu  # no signature Python can read: inspect raised ValueError
    assert concrete_arguments(Builtin(), 1, (None,)) == {}


def test_signature_key_tells_apart_what_computes_differently():
    assert signature_key({'flag': True}) != signature_key({'flag': 1})
    assert signature_key({'scale': 0.}) != signature_key({'scale': -0.})
    assert signature_key({'scale': math.nan}) == signature_key({'scale': float('nan')})
    assert signature_key({'a': 1, 'b': None}) == signature_key({'b': None, 'a': 1})
    assert signature_key({'a': 1}) != signature_key({'a': 2})
    # tuples and lists item by item (a list, unhashable itself, has a key too)
    assert signature_key({'size': FixedTuple((1, 2))}) != signature_key({'size': FixedList([1, 2])})
    assert signature_key({'size': FixedList([1, 2])}) == signature_key({'size': FixedList([1, 2])})
    assert signature_key({'size': FixedTuple((1, 2))}) != signature_key({'size': FixedTuple((1., 2))})
    assert signature_key({'size': FixedTuple((0., 2))}) != signature_key({'size': FixedTuple((-0., 2))})
    assert signature_key({'size': FixedTuple((True, 2))}) != signature_key({'size': FixedTuple((1, 2))})
    assert signature_key({'size': FixedTuple((1, 2))}) == signature_key({'size': FixedTuple((1, 2))})


def test_remove_guards_keeps_the_forwards_own_assertions():
    class Asserting(torch.nn.Module):
        def forward(self, x, mask=None, scale=1.):
            torch._assert(x.shape[0] > 0, 'empty')
            return x * scale

    model = Asserting()
    concrete = {'mask': None, 'scale': 2.}
    graph = torch.fx.Tracer().trace(model, concrete)
    calls = [node.target for node in graph.nodes if node.op == 'call_function']
    assert calls.count(torch._assert) == 2 and torch.fx._symbolic_trace._assert_is_none in calls
    remove_guards(graph, model, concrete)
    calls = [node.target for node in graph.nodes if node.op == 'call_function']
    assert calls.count(torch._assert) == 1 and torch.fx._symbolic_trace._assert_is_none not in calls
    assert all(not node.users for node in graph.nodes if node.op == 'placeholder' and node.target != 'x')
    assert operator.mul in calls


def test_find_fusable_pairs_decides_on_the_path_of_the_concrete_arguments():
    '''A forward that reads the conv's output again for an optional argument: traced with a proxy for it, the
    BatchNorm cannot take the conv's output alone; for a call without it, it can.'''
    class Optional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3)

        def forward(self, x, extra=None):
            hidden = self.conv(x)
            out = self.bn(hidden)
            return out if extra is None else out + hidden * extra

    model = randomize_batch_norms(Optional()).eval()
    assert [entry.side for entry in find_fusable_pairs(model).fused] != ['after']
    report = find_fusable_pairs(model, concrete_args={'extra': None})
    assert [(entry.bn, entry.layer, entry.side) for entry in report.fused] == [('bn', 'conv', 'after')]
    fused, _ = fuse(model, concrete_args={'extra': None})
    input = torch.rand(2, 2, 5, 5)
    torch.testing.assert_close(fused(input), model(input))


@EACH_EXPLAINER
def test_control_flow_on_a_flag_is_traced(explainer):
    '''`if flip:` on a proxy cannot be traced: the prepared copy was the untraced model (BatchNorm unfolded, a
    warning). Traced with the call's value, both paths fold the BatchNorm and explain the model's function.'''
    model = options()
    input = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    lrp = explainer(model)
    for flip in (False, True):
        with warnings.catch_warnings():
            warnings.filterwarnings('error', message='zennit_bnfuse: could not trace')
            relevance, delta = lrp.attribute(input, target=1, additional_forward_args=(None, flip),
                                             return_convergence_delta=True)
        assert isinstance(lrp.prepared.get(1, (None, flip)), torch.fx.GraphModule)
        assert [entry.bn for entry in lrp.prepared.report.fused] == ['bn']
        torch.testing.assert_close(relevance.flatten(1).sum(1) + delta, model(input, None, flip)[:, 1])
    assert lrp.prepared.builds == 2


@EACH_EXPLAINER
def test_a_number_argument_is_a_constant(explainer):
    '''A number given after the inputs is part of the traced graph as a constant: the relevance of the output times
    3 is 3 times the relevance, and the copy for each number is built once.'''
    model = options()
    input = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    lrp = explainer(model)
    once = lrp.attribute(input, target=0)
    thrice = lrp.attribute(input, target=0, additional_forward_args=(None, False, 3.))
    torch.testing.assert_close(thrice, 3 * once, rtol=1e-12, atol=1e-15)
    lrp.attribute(input, target=0)
    assert lrp.prepared.builds == 2
    # the graph does not read the number from its placeholder: it holds it
    placeholders = [node for node in lrp.prepared.get(1, (None, False, 3.)).graph.nodes if node.op == 'placeholder']
    assert all(not node.users for node in placeholders[1:])


class Resized(torch.nn.Module):
    '''conv -> BatchNorm -> relu -> pooled to a size given after the input, with control flow on the size.'''
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.linear = torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Linear(3, 2)

    def forward(self, x, size=(2, 2)):
        hidden = torch.relu(self.bn(self.conv(x)))
        if size[0] > 1:  # control flow on the size: not traceable where the size is a proxy
            hidden = torch.nn.functional.adaptive_avg_pool2d(hidden, size)
        return self.linear(hidden.mean((2, 3)))


@pytest.mark.parametrize('engine', ['FusedLRP', 'CompositeLRP'])
def test_a_tuple_of_numbers_is_traced_as_its_value(engine):
    '''A size given (or left at its default) as a tuple or list was a proxy: `if size[0] > 1:` could not be traced,
    the model ran untraced, with its BatchNorm unfolded and its pooling passed by the gradient. Each size is now a
    fixed value of its own call signature; LRP-epsilon with a negligible epsilon equals gradient x input.'''
    torch.manual_seed(0)
    model = randomize_batch_norms(Resized()).double().eval()
    input = torch.rand(3, 2, 7, 7, dtype=torch.float64)
    lrp = epsilon_explainer(engine, model, 'fused')
    for arguments in (None, ((3, 3),), ([3, 3],), ((1, 1),)):
        with warnings.catch_warnings():
            warnings.filterwarnings('error', message='zennit_bnfuse')
            relevance = lrp.attribute(input, target=1, additional_forward_args=arguments)
        assert isinstance(lrp.prepared.get(1, arguments), torch.fx.GraphModule)
        assert [entry.bn for entry in lrp.prepared.report.fused] == ['bn']
        leaf = input.clone().requires_grad_()
        gradient, = torch.autograd.grad(model(leaf, *(arguments or ()))[:, 1].sum(), leaf)
        torch.testing.assert_close(relevance, gradient * input, rtol=1e-9, atol=1e-12)
    assert lrp.prepared.builds == 4  # (2, 2), (3, 3), [3, 3] and (1, 1)


def test_a_tuple_in_concrete_args_is_one_value():
    '''concrete_args={'size': (3, 3)}: torch.fx made each item a placeholder of its own, with a check of its value on
    every call, and generated a forward that takes the size flattened (remove_guards, which pairs placeholders with
    the forward's parameters, left the second item's check in the graph). It is one fixed value now.'''
    torch.manual_seed(0)
    model = randomize_batch_norms(Resized()).double().eval()
    graph = trace_for_call(torch.fx.Tracer(), model, {'size': (3, 3)})
    assert [node.target for node in graph.nodes if node.op == 'placeholder'] == ['x', 'size_1']
    assert torch._assert not in [node.target for node in graph.nodes]
    fused, report = fuse(model, concrete_args={'size': (3, 3)})
    assert [entry.bn for entry in report.fused] == ['bn']
    input = torch.rand(3, 2, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(fused(input, (3, 3)), model(input, (3, 3)))


def test_prepared_copies_kept_per_signature_and_dropped_on_change():
    model = options()
    prepared = PreparedModel(model)
    first = prepared.get(1, None)
    assert prepared.get(1, (None,)) is first and prepared.builds == 1  # the default given: the same signature
    flipped = prepared.get(1, (None, True))
    assert flipped is not first and prepared.get(1, None) is first and prepared.builds == 2
    for scale in range(PreparedModel.MAX_SIGNATURES):
        prepared.get(1, (None, False, float(scale)))
    builds = prepared.builds
    assert prepared.get(1, (None, True)) is not flipped and prepared.builds == builds + 1  # the oldest was dropped
    with torch.no_grad():
        model.linear.weight.mul_(2.)
    assert prepared.get(1, (None, True)) is not flipped and prepared.builds == builds + 2


@EACH_EXPLAINER
def test_a_number_that_changes_on_every_call_warns_once(explainer):
    '''Each new number builds a copy: past MAX_SIGNATURES the user is told why calls are slow, once; a tensor
    instead is an input of one copy.'''
    model = options()
    input = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    lrp = explainer(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for scale in range(PreparedModel.MAX_SIGNATURES + 3):
            lrp.attribute(input, target=0, additional_forward_args=(None, False, float(scale)))
    caught = [warning for warning in caught if 'traced the forward of Options for more than 4' in str(warning.message)]
    assert len(caught) == 1 and 'this call: mask=None, flip=False, scale=4.0' in str(caught[0].message)
    assert caught[0].filename == __file__
    builds = lrp.prepared.builds
    for scale in (2., 3.):
        lrp.attribute(input, target=0, additional_forward_args=(None, False, torch.tensor(scale, dtype=torch.float64)))
    assert lrp.prepared.builds == builds + 1


def test_a_users_graph_module_traced_for_none():
    '''A GraphModule the user traced with concrete_args={'mask': None} checks `mask` with `_assert_is_none`, which
    counted as a use of the argument (refused); given a tensor, re-tracing its code made a graph whose generated code
    broke every later trace in the process (a KeyError in torch.fx).'''
    model = options()
    graph_module = torch.fx.symbolic_trace(model, concrete_args={'mask': None, 'flip': False})
    input, mask = torch.rand(3, 2, 6, 6, dtype=torch.float64), torch.ones(3, 48, dtype=torch.float64)
    lrp = FusedLRP(graph_module)
    assert torch.equal(lrp.attribute(input, target=0), FusedLRP(model).attribute(input, target=0))
    with pytest.raises(AssertionError, match='mask has been specialized to have value None'):
        graph_module(input, mask)  # the model raises
    with pytest.raises(AssertionError, match='mask has been specialized to have value None'):
        lrp.attribute(input, target=0, additional_forward_args=(mask,))  # so does its explanation
    assert find_fusable_pairs(model, concrete_args={'flip': False}).traced  # and tracing still works


class KeywordOnly(torch.nn.Module):
    '''conv -> relu -> linear, times a keyword-only ``mask`` where one is given (after a ``*rest`` it ignores).'''
    def __init__(self):
        super().__init__()
        self.conv, self.linear = torch.nn.Conv2d(2, 3, 3), torch.nn.Linear(48, 2)

    def forward(self, x, *rest, mask=None):
        hidden = torch.relu(self.conv(x)).flatten(1)
        if mask is not None:
            hidden = hidden * mask
        return self.linear(hidden)


class Unmasked(KeywordOnly):
    def forward(self, x):
        return self.linear(torch.relu(self.conv(x)).flatten(1))


@EACH_EXPLAINER
def test_keyword_only_and_numpy_arguments(explainer):
    '''A keyword-only ``mask=None`` stayed a proxy (the call failed in the generated code with a TypeError); a NumPy
    float was written into the graph's code as ``np.float64(2.5)`` (NameError), and a NumPy bool in ``if flip:``
    left the forward untraced.'''
    torch.manual_seed(0)
    model = KeywordOnly().double().eval()
    reference = Unmasked().double().eval()
    reference.load_state_dict(model.state_dict())
    input = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    assert torch.equal(explainer(model).attribute(input, target=0), explainer(reference).attribute(input, target=0))
    with pytest.raises(ValueError, match=r'takes `\*rest` and then keyword-only arguments \(mask\)'):
        explainer(model).attribute(input, target=0, additional_forward_args=(2.,))  # 2. would be taken as the mask
    flipped = options()
    lrp = explainer(flipped)
    for numpy_value, value in ((np.float64(2.5), 2.5), (np.bool_(True), True)):
        expected = explainer(flipped).attribute(input, target=0, additional_forward_args=(None, value))
        with warnings.catch_warnings():
            warnings.filterwarnings('error', message='zennit_bnfuse: could not trace')
            actual = lrp.attribute(input, target=0, additional_forward_args=(None, numpy_value))
        assert torch.equal(actual, expected)


class UseMask(torch.nn.Module):
    '''conv -> relu -> linear, times ``mask`` only where ``use_mask`` is set, or where the mask is a tensor; counts
    its calls in a buffer.'''
    def __init__(self, check='flag'):
        super().__init__()
        self.check = check
        self.conv, self.linear = torch.nn.Conv2d(2, 3, 3), torch.nn.Linear(48, 2)
        self.register_buffer('calls', torch.zeros(()))

    def forward(self, x, mask, use_mask=False):
        self.calls += 1
        hidden = torch.relu(self.conv(x)).flatten(1)
        if use_mask if self.check == 'flag' else isinstance(mask, torch.Tensor):
            hidden = hidden * mask
        return self.linear(hidden)


@EACH_EXPLAINER
def test_a_tensor_the_call_leaves_unread_is_not_refused(explainer):
    '''With the flag fixed, the traced forward rightly never reads ``mask``: that call was refused as if a type
    check had dropped it. A type check on the tensor still is refused.'''
    torch.manual_seed(0)
    model = UseMask().double().eval()
    input, mask = torch.rand(3, 2, 6, 6, dtype=torch.float64), torch.zeros(3, 48, dtype=torch.float64)
    lrp = explainer(model)
    unmasked = lrp.attribute(input, target=0, additional_forward_args=(mask, False))
    assert unmasked.abs().sum() > 0 and model.calls == 0  # the check ran the model's forward on a copy
    masked = lrp.attribute(input, target=0, additional_forward_args=(mask, True))
    assert torch.equal(masked, torch.zeros_like(masked))
    typed = UseMask('type').double().eval()
    with pytest.raises(ValueError, match='does not read its argument `mask`, for which a tensor was given'):
        explainer(typed).attribute(input, target=0, additional_forward_args=(mask,))


class Mode(enum.IntEnum):
    SUM, MAX = 0, 1


class Pooled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.linear = torch.nn.Conv2d(2, 3, 3), torch.nn.Linear(3, 2)

    def forward(self, x, mode=Mode.SUM):
        hidden = torch.relu(self.conv(x))
        pooled = hidden.sum((2, 3)) if mode is Mode.SUM else hidden.amax((2, 3))
        return self.linear(pooled)


def test_an_enum_argument_is_traced_without_a_warning():
    '''torch.fx warned on every build that it could not add a check for an enum value, which the user cannot act
    on: the graph is only run for calls with that value.'''
    torch.manual_seed(0)
    model = Pooled().double().eval()
    input = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='Was not able to add assertion')
        relevance = FusedLRP(model).attribute(input, target=0, additional_forward_args=(Mode.SUM,))
    assert relevance.shape == input.shape


class KindPooled(Pooled):
    '''Pooled by a plain enum (members that are not numbers), max by default.'''
    def forward(self, x, kind=Kind.MAX):
        hidden = torch.relu(self.conv(x))
        pooled = hidden.sum((2, 3)) if kind is Kind.SUM else hidden.amax((2, 3))
        return self.linear(pooled)


@pytest.mark.parametrize('engine', ['FusedLRP', 'CompositeLRP'])
def test_a_plain_enum_is_traced_as_its_value(engine):
    '''A plain Enum member (given, or a default left out) was a proxy, which `kind is Kind.SUM` never is: the sum
    call was explained as the max, without a warning. LRP-epsilon with a negligible epsilon equals gradient x
    input on both.'''
    torch.manual_seed(0)
    model = KindPooled().double().eval()
    input = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    lrp = epsilon_explainer(engine, model, 'fused')
    for arguments in (None, (Kind.SUM,), (Kind.MAX,)):
        relevance = lrp.attribute(input, target=0, additional_forward_args=arguments)
        leaf = input.clone().requires_grad_()
        gradient, = torch.autograd.grad(model(leaf, *(arguments or ()))[:, 0].sum(), leaf)
        torch.testing.assert_close(relevance, gradient * input, rtol=1e-9, atol=1e-12)
    assert lrp.prepared.builds == 2


class Gate(torch.nn.Module):
    '''conv, plus a skip conv where no mask is given, -> BatchNorm -> relu -> pool: the BatchNorm takes the conv's
    output alone only where a mask is given.'''
    def __init__(self):
        super().__init__()
        self.conv, self.skip, self.bn = torch.nn.Conv2d(2, 3, 3), torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3)

    def forward(self, x, mask=None):
        hidden = self.conv(x)
        if mask is None:
            hidden = hidden + self.skip(x)
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(hidden)), 1).flatten(1)


def test_fuse_keeps_only_folds_that_hold_with_the_defaults_too(snapshot):
    '''Traced with a proxy for `mask`, the BatchNorm folds into `conv`; a call without a mask (the forward's default,
    what Zennit's attributors make) adds the skip first, and the fused model was 0.14 off. The fold is now kept only
    where the path with the defaults decides it alike.'''
    torch.manual_seed(1)
    model = randomize_batch_norms(Gate()).double().eval()
    input = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    before = snapshot(model)
    fused, report = fuse(model, example_inputs=input)
    assert not report.fused and 'where it runs with mask=None' in report.unfused[0].reason
    torch.testing.assert_close(fused(input), model(input), rtol=0, atol=0)
    mask = torch.ones(1, dtype=torch.float64)
    fused, report = fuse(model, concrete_args={'mask': mask})  # the path with a mask, as the caller asks
    assert [(entry.bn, entry.layer) for entry in report.fused] == [('bn', 'conv')]
    torch.testing.assert_close(fused(input, mask), model(input, mask))
    canonized = copy.deepcopy(model)
    handles = FuseBatchNorm().apply(canonized)
    try:
        torch.testing.assert_close(canonized(input), model(input), rtol=0, atol=0)
    finally:
        for handle in handles:
            handle.remove()
    before.assert_unchanged()


def test_a_forward_assigned_on_the_instance_is_not_traced():
    '''torch.fx traces the forward of the class: a forward assigned on the instance (scale fixed to 5) was explained
    as the class's (relevance summing to the output at scale 2). Such a model is now left untraced, with a warning.'''
    torch.manual_seed(0)
    model = options()
    model.forward = types.MethodType(lambda self, x, mask=None: Options.forward(self, x, mask, False, 5.), model)
    input = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match='assigned on the instance'):
        relevance, delta = FusedLRP(model).attribute(input, target=0, return_convergence_delta=True)
    torch.testing.assert_close(relevance.flatten(1).sum(1) + delta, model(input)[:, 0])
    assert not find_fusable_pairs(model).traced


class TensorDefault(torch.nn.Module):
    '''relu(x * weight) -> linear, ``weight`` a tensor by default.'''
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2).double()

    def forward(self, x, weight=torch.tensor([2., -1., 3.], dtype=torch.float64)):
        return self.linear(torch.relu(x * weight))


def test_a_tensor_default_is_a_constant_of_the_call():
    '''The generated code cannot take a tensor as a default: every call failed with NameError
    (`_tensor_constant0`). Left out, the default is a constant of the traced forward (LRP-epsilon with a negligible
    epsilon is gradient x input); given, the tensor is an input of the product, which LRP passes by its gradient,
    with the warning that says so.'''
    from captum.attr._utils.lrp_rules import EpsilonRule
    torch.manual_seed(0)
    model = TensorDefault()
    input = torch.rand(4, 3, dtype=torch.float64)
    lrp = FusedLRP(model, rules={torch.nn.Linear: EpsilonRule(1e-15)})
    relevance = lrp.attribute(input, target=0)
    leaf = input.clone().requires_grad_()
    expected = torch.autograd.grad(model(leaf)[:, 0].sum(), leaf)[0] * input
    torch.testing.assert_close(relevance, expected, rtol=1e-9, atol=1e-12)
    with pytest.warns(UserWarning, match='passes relevance through 1 functional op'):
        given = lrp.attribute(input, target=0, additional_forward_args=(torch.ones(3, dtype=torch.float64),))
    assert given.shape == input.shape


class ScaledBy(torch.nn.Module):
    '''conv -> relu -> linear, scaled by the sum of ``weight`` where it is a tensor with a non-zero entry (read as a
    number: no tensor of it reaches the traced graph).'''
    def __init__(self):
        super().__init__()
        self.conv, self.linear = torch.nn.Conv2d(2, 3, 3), torch.nn.Linear(48, 2)

    def forward(self, x, weight):
        hidden = torch.relu(self.conv(x)).flatten(1)
        if isinstance(weight, torch.Tensor) and bool(weight.any()):
            hidden = hidden * float(weight.sum())
        return self.linear(hidden)


@EACH_EXPLAINER
def test_an_unread_tensor_is_accepted_only_where_the_copy_gives_the_models_output(explainer):
    '''Whether the forward reads a tensor the traced graph leaves out was decided by a trace with the tensor as a
    constant: a tensor read as a number left no constant, and the relevance explained the model without it (4 times
    off); the answer, kept per shape, followed the values of the first call. The prepared copy's output on the call
    decides now.'''
    torch.manual_seed(0)
    lrp = explainer(ScaledBy().double().eval())
    input = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    zeros, twos = torch.zeros(2, dtype=torch.float64), torch.full((2,), 2., dtype=torch.float64)
    assert lrp.attribute(input, target=0, additional_forward_args=(zeros,)).abs().sum() > 0  # the model ignores it
    with pytest.raises(ValueError, match='does not read its argument `weight`, for which a tensor was given, and does '
                       'not give the model\'s output on this call'):
        lrp.attribute(input, target=0, additional_forward_args=(twos,))


class Branch(torch.nn.Module):
    '''conv -> relu -> linear, plus a linear ``extra`` of the mask where one is given.'''
    def __init__(self):
        super().__init__()
        self.conv, self.linear, self.extra = torch.nn.Conv2d(2, 3, 3), torch.nn.Linear(48, 2), torch.nn.Linear(48, 2)

    def forward(self, x, mask=None):
        output = self.linear(torch.relu(self.conv(x)).flatten(1))
        return output if mask is None else output + self.extra(mask)


def test_a_rule_for_a_module_only_another_call_runs_is_fine():
    '''Each call signature has its own copy, which holds only the modules the call runs: a rule for `extra` made
    every call without a mask raise (as if `extra` were a folded BatchNorm).'''
    from captum.attr._utils.lrp_rules import EpsilonRule
    torch.manual_seed(0)
    model = Branch().double().eval()
    input, mask = torch.rand(3, 2, 6, 6, dtype=torch.float64), torch.rand(3, 48, dtype=torch.float64)
    lrp = FusedLRP(model, rules={'extra': EpsilonRule()})
    assert torch.equal(lrp.attribute(input, target=0), FusedLRP(model).attribute(input, target=0))
    assert lrp.attribute(input, target=0, additional_forward_args=(mask,)).shape == input.shape


class Shifted(torch.nn.Module):
    '''conv -> BatchNorm -> relu -> pool, where an ``offset`` tensor given with a non-zero entry is added to the
    conv's output before the BatchNorm: a path the trace (``offset`` a proxy: `isinstance` False) does not take.'''
    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3)

    def forward(self, x, offset):
        hidden = self.conv(x)
        if isinstance(offset, torch.Tensor) and bool(offset.any()):
            hidden = hidden + self.conv(offset)
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(hidden)), 1).flatten(1)


def test_example_inputs_check_folds_of_a_traced_forward_too(snapshot):
    '''A traced graph proves its folds on the path it traced; on example_inputs the forward took another, where the
    folded model was wrong (its output was compared only for untraced forwards).'''
    torch.manual_seed(0)
    model = randomize_batch_norms(Shifted()).double().eval()
    input, offset = torch.rand(2, 2, 6, 6, dtype=torch.float64), torch.rand(2, 2, 6, 6, dtype=torch.float64)
    before = snapshot(model)
    assert [entry.bn for entry in fuse(model)[1].fused] == ['bn']  # on the traced path, the fold holds
    fused, report = fuse(model, example_inputs=(input, offset))
    assert not report.fused and 'the model output differs by' in report.unfused[0].reason
    torch.testing.assert_close(fused(input, offset), model(input, offset), rtol=0, atol=0)
    before.assert_unchanged()


class Collecting(Resized):
    '''Resized, filling a list it is given with its hidden features.'''
    def forward(self, x, features=None):
        hidden = torch.relu(self.bn(self.conv(x)))
        features.append(hidden)
        return self.linear(hidden.mean((2, 3)))


@EACH_EXPLAINER
def test_a_list_the_forward_fills_reaches_the_caller(explainer):
    '''A list was traced as a fixed value, a copy: the caller's list stayed empty. A list the trace changes is traced
    as a proxy again, and the check that the copy computes as the model runs both on copies of the list.'''
    torch.manual_seed(0)
    model = randomize_batch_norms(Collecting()).double().eval()
    features = []
    explainer(model).attribute(torch.rand(2, 2, 7, 7, dtype=torch.float64), target=0,
                               additional_forward_args=(features,))
    assert len(features) == 1 and features[0].shape == (2, 3, 5, 5)


class WritingByIndex(Resized):
    '''Resized, writing its hidden features into the list it is given by index, and zeroing a channel by an item
    assignment on a tensor.'''
    def forward(self, x, features=None):
        hidden = self.bn(self.conv(x))
        hidden[:, 0] = 0.
        hidden = torch.relu(hidden)
        features[0] = hidden
        return self.linear(hidden.mean((2, 3)))


@pytest.mark.parametrize('engine', ['FusedLRP', 'CompositeLRP'])
def test_item_assignments_are_traced(engine):
    '''``features[0] = h`` on a list argument and ``h[:, 0] = 0.`` on a tensor made the trace fail (a proxy does
    not take item assignment): the model ran untraced, its BatchNorm unfolded, 2.29 off gradient x input (FusedLRP,
    the review's model). Traced now, the caller's list is filled once and LRP-epsilon equals gradient x input.'''
    torch.manual_seed(0)
    model = randomize_batch_norms(WritingByIndex()).double().eval()
    input = torch.rand(2, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    features = [None]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no warning that the forward could not be traced
        lrp = epsilon_explainer(engine, model, 'fused')
        relevance = lrp.attribute(input, target=0, additional_forward_args=(features,))
    assert [item.bn for item in lrp.prepared.report.fused] == ['bn']
    assert features[0].shape == (2, 3, 5, 5) and not features[0][:, 0].any()
    model(input, [None])[:, 0].sum().backward()
    torch.testing.assert_close(relevance, input.grad * input, rtol=1e-10, atol=1e-14)


class TypeChecked(Resized):
    '''Resized, pooled only where the size is exactly a tuple.'''
    def forward(self, x, size=(2, 2)):
        hidden = torch.relu(self.bn(self.conv(x)))
        if type(size) is tuple:
            hidden = torch.nn.functional.adaptive_avg_pool2d(hidden, size)
        return self.linear(hidden.amax((2, 3)))


@EACH_EXPLAINER
def test_a_check_of_a_tuples_exact_type_is_refused(explainer):
    '''The trace sees a FixedTuple, which `type(size) is tuple` tells from a tuple: the relevance explained the
    map without pooling, without a warning (4.4 off gradient x input in the review's model).'''
    torch.manual_seed(0)
    model = randomize_batch_norms(TypeChecked()).double().eval()
    input = torch.rand(2, 2, 7, 7, dtype=torch.float64)
    lrp = explainer(model)
    for arguments in (None, ((3, 3),)):
        with pytest.raises(ValueError, match=r'does not give the model\'s output for its argument `size`=\(\d, \d\): '
                           r'torch\.fx traced the tuple as a value of a tuple subclass'):
            lrp.attribute(input, target=0, additional_forward_args=arguments)


class Extra(Resized):
    '''Resized, scaled by the first item of a pair where it is a tensor.'''
    def forward(self, x, extra=(None, None)):
        hidden = torch.relu(self.bn(self.conv(x)))
        if isinstance(extra[0], torch.Tensor):
            hidden = hidden * extra[0]
        return self.linear(hidden.mean((2, 3)))


class ExtraIsNone(Resized):
    '''Resized, scaled by the first item of a pair unless it is None.'''
    def forward(self, x, extra=(None, None)):
        hidden = torch.relu(self.bn(self.conv(x)))
        if extra[0] is not None:
            hidden = hidden * extra[0]
        return self.linear(hidden.mean((2, 3)))


@EACH_EXPLAINER
@pytest.mark.parametrize('model_type, extra', [(Extra, (2., 3)), (ExtraIsNone, (None, 2.))], ids=['isinstance', 'none'])
def test_a_tuple_holding_a_tensor_is_checked_against_the_model(explainer, model_type, extra):
    '''A tuple holding a tensor stays a proxy, whose items are neither tensors nor None: the isinstance branch was
    left out without a warning (1.05 off), and None beside a tensor raised torch.fx's TypeError from the generated
    code. Each such call is refused unless the copy gives the model's output.'''
    torch.manual_seed(0)
    model = randomize_batch_norms(model_type()).double().eval()
    input = torch.rand(2, 2, 7, 7, dtype=torch.float64)
    extra = tuple(torch.full((1, 3, 1, 1), item, dtype=torch.float64) if isinstance(item, float) else item
                  for item in extra)
    with pytest.raises(ValueError, match=r'traced the argument `extra` of \w+ \(tuple\) as a tensor-like proxy'):
        explainer(model).attribute(input, target=0, additional_forward_args=(extra,))


class Noisy(Resized):
    '''Resized, with noise of a fixed size drawn in the forward: from torch's generator, NumPy's or its own.'''
    def __init__(self, source):
        super().__init__()
        self.source = source
        self.generator = torch.Generator().manual_seed(1)
        self.numpy_generator = np.random.default_rng(1)

    def forward(self, x, size=(1, 3, 1, 1)):
        hidden = torch.relu(self.bn(self.conv(x)))
        if self.source == 'numpy':
            noise = torch.from_numpy(np.random.randn(*size))
        elif self.source == 'own numpy':
            noise = torch.from_numpy(self.numpy_generator.standard_normal(size))
        elif self.source == 'python':
            noise = random.gauss(0., 1.)
        else:
            noise = torch.randn(size, dtype=torch.float64, generator=self.generator if self.source == 'own' else None)
        return self.linear((hidden * (1 + noise)).mean((2, 3)))


@EACH_EXPLAINER
@pytest.mark.parametrize('source', ['torch', 'numpy', 'own', 'own numpy', 'python'])
def test_a_forward_that_draws_while_traced_runs_untraced(explainer, source):
    '''torch.fx ran torch.randn(size) for a fixed size once and kept the draw as a constant: every call explained
    the same noise. Such a forward runs as it is, with the warning for untraced forwards; tracing leaves the random
    number generators as they were (fuse() moved them on).'''
    torch.manual_seed(0)
    model = randomize_batch_norms(Noisy(source)).double().eval()
    input = torch.rand(2, 2, 7, 7, dtype=torch.float64)
    lrp = explainer(model)
    with pytest.warns(UserWarning, match='draws random numbers while it is traced'):
        first = lrp.attribute(input, target=0)
    assert not torch.equal(first, lrp.attribute(input, target=0))
    states = (torch.get_rng_state(), model.generator.get_state(), np.random.get_state()[1].copy(),
              model.numpy_generator.bit_generator.state, random.getstate())
    fuse(model)
    assert torch.equal(torch.get_rng_state(), states[0]) and torch.equal(model.generator.get_state(), states[1])
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert model.numpy_generator.bit_generator.state == states[3] and random.getstate() == states[4]


class HeldDefault(Resized):
    '''Resized, scaled by the first item of a default pair that holds a tensor.'''
    def forward(self, x, extra=(torch.full((1, 3, 1, 1), 2., dtype=torch.float64), 3)):
        hidden = torch.relu(self.bn(self.conv(x))) * extra[0]
        return self.linear(hidden.mean((2, 3)))


@pytest.mark.parametrize('engine', ['FusedLRP', 'CompositeLRP'])
def test_a_tuple_default_holding_a_tensor(engine):
    '''torch.fx's generated code failed with a NameError for the tensor constant in the default: the default left
    out is a constant of the call, and LRP-epsilon with a negligible epsilon equals gradient x input.'''
    torch.manual_seed(0)
    model = randomize_batch_norms(HeldDefault()).double().eval()
    input = torch.rand(2, 2, 7, 7, dtype=torch.float64)
    relevance = epsilon_explainer(engine, model, 'fused').attribute(input, target=1)
    leaf = input.clone().requires_grad_()
    gradient, = torch.autograd.grad(model(leaf)[:, 1].sum(), leaf)
    torch.testing.assert_close(relevance, gradient * input, rtol=1e-9, atol=1e-12)


class Cropped(Resized):
    '''Resized, cropped by a default margin where the input is large enough: control flow on a proxy where the
    margin is fixed, none where it is a proxy.'''
    def forward(self, x, crop=(1, 1)):
        if isinstance(crop, tuple) and x.shape[-1] > 2 * crop[1]:
            x = x[..., crop[0]:x.shape[-2] - crop[0], crop[1]:x.shape[-1] - crop[1]]
        return self.linear(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_folds_where_the_forward_with_its_defaults_does_not_trace(snapshot):
    '''The trace with the default (1, 1) fails: fuse() warned that it "could not trace ... folded none" beside a
    traced report, and said the forward decides the fold otherwise. It now says the fold is not proven where the
    defaults are left out, and example_inputs (which leave them out) prove it.'''
    torch.manual_seed(0)
    model = randomize_batch_norms(Cropped()).double().eval()
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='zennit_bnfuse')
        _, report = fuse(model)
    assert report.traced and not report.fused
    assert report.unfused[0].reason.startswith(
        'the forward could not be traced where it runs with crop=(1, 1) (TraceError: symbolically traced variables')
    input = torch.rand(2, 2, 9, 9, dtype=torch.float64)
    fused, report = fuse(model, example_inputs=input)
    assert [entry.bn for entry in report.fused] == ['bn']
    torch.testing.assert_close(fused(input), model(input))


@EACH_EXPLAINER
def test_the_check_of_a_tuple_is_not_passed_by_a_blank_first_call(explainer):
    '''On a blank image the pooled and the unpooled map have the same maximum: the copy was marked as agreeing with
    the model, and every later call was 0.78-0.97 off without a warning. The check compares random inputs too.'''
    torch.manual_seed(0)
    model = randomize_batch_norms(TypeChecked()).double().eval()
    lrp = explainer(model)
    with pytest.raises(ValueError, match='torch.fx traced the tuple as a value of a tuple subclass'):
        lrp.attribute(torch.zeros(2, 2, 7, 7, dtype=torch.float64), target=0)
    with pytest.raises(ValueError, match='torch.fx traced the tuple as a value of a tuple subclass'):
        lrp.attribute(torch.rand(2, 2, 7, 7, dtype=torch.float64), target=0)
