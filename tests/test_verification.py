'''Tests for checking folds on example inputs (zennit_bnfuse.verification), through fuse() and the canonizer.'''
import dataclasses
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_batch_norms
from fusion_cases import prepared, rank_dependent_cases, untraceable_cases
from zennit_bnfuse import FuseBatchNorm, fuse
from zennit_bnfuse.replacements import replaced_copy, replacement_modules
from zennit_bnfuse.report import FusedBatchNorm, FusionReport
from zennit_bnfuse.verification import PERTURBATION, ROUNDING_ALLOWANCE, output_differences, output_mismatch, \
    value_scales

UNTRACEABLE = untraceable_cases()
RANK_CASES = rank_dependent_cases()
# the folds torch.fx-less pairing finds between Sequential neighbours, right or wrong
SEQUENTIAL_NEIGHBOURS = {
    'sequential-folds-right': [('block.1', 'block.0')],
    'sliced-sequential': [('features.1', 'features.0'), ('features.4', 'features.3')],
    'reordered-children': [('features.1', 'features.0'), ('features.3', 'features.2')],
}


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def fused_unchecked(model, folds):
    '''``model`` with ``folds`` (BN name, layer name, side 'after') done, checked by nothing.'''
    report = FusionReport(fused=[FusedBatchNorm(bn, layer, 'after') for bn, layer in folds])
    return replaced_copy(model, replacement_modules(model, report))


@pytest.mark.parametrize('case', sorted(UNTRACEABLE))
def test_untraceable_folds_only_what_example_inputs_confirm(case, snapshot):
    model, input, folds = UNTRACEABLE[case]
    before = snapshot(model)
    with torch.no_grad():
        expected = model(input)
        # the Sequential neighbours that are not folds of this forward would change the output (issue: 1.03, 2.21)
        for fold in SEQUENTIAL_NEIGHBOURS[case]:
            if fold[0] not in folds:
                assert relative_error(fused_unchecked(model, [fold])(input), expected) > .1
    with pytest.warns(UserWarning, match='could not trace'):
        fused, report = fuse(model, example_inputs=input)
    assert {item.bn: (item.layer, item.side) for item in report.fused} == folds
    with torch.no_grad():
        torch.testing.assert_close(fused(input), expected, rtol=0, atol=1e-10)
        # and on inputs the folds were not checked on
        other = torch.randn(3, *input.shape[1:], dtype=torch.float64)
        torch.testing.assert_close(fused(other), model(other), rtol=0, atol=1e-10)
    refused = {item.bn: item.reason for item in report.unfused}
    for bn, layer in SEQUENTIAL_NEIGHBOURS[case]:
        if bn not in folds:
            assert re.fullmatch(rf'the forward could not be traced \(.+\); with it folded into `{layer}` \(its '
                                r'nn\.Sequential neighbour\), on example_inputs \(\(\d, \d, 5, 5\) torch\.float64\) '
                                r'the model output differs by [\d.e+-]+ relative to the scale of its values '
                                r'\(torch\.float64, allowed 1e-08\)', refused[bn]), refused[bn]
    before.assert_unchanged()


@pytest.mark.parametrize('case', sorted(UNTRACEABLE))
def test_untraceable_without_example_inputs_folds_nothing(case, snapshot):
    model, input, _ = UNTRACEABLE[case]
    before = snapshot(model)
    with pytest.warns(UserWarning, match='folded none of its'):
        fused, report = fuse(model)
    assert not report.fused and len(report.unfused) == report.num_batch_norms
    for bn, layer in SEQUENTIAL_NEIGHBOURS[case]:
        reason = next(item.reason for item in report.unfused if item.bn == bn)
        assert reason.startswith(f'the forward could not be traced ({report.trace_error})')
        assert f'next to `{layer}`' in reason
        assert 'pass example_inputs' in reason
    with torch.no_grad():
        assert torch.equal(fused(input), model(input))
    before.assert_unchanged()


@pytest.mark.parametrize('case', sorted(UNTRACEABLE))
def test_canonizer_with_example_inputs_is_exact(case, snapshot):
    model, input, folds = UNTRACEABLE[case]
    before = snapshot(model)
    with torch.no_grad():
        expected = model(input)
    canonizer = FuseBatchNorm(example_inputs=input)
    with pytest.warns(UserWarning, match='could not trace'):
        handles = canonizer.apply(model)
    try:
        assert {item.bn for item in handles[0].report.fused} == set(folds)
        with torch.no_grad():
            torch.testing.assert_close(model(input), expected, rtol=0, atol=1e-10)
    finally:
        for handle in handles:
            handle.remove()
    before.assert_unchanged()


@pytest.mark.parametrize('case', sorted(RANK_CASES))
def test_example_inputs_leave_rank_dependent_folds_unfused(case, snapshot):
    model, input, (bn, layer) = RANK_CASES[case]
    before = snapshot(model)
    fused, report = fuse(model, example_inputs=input)
    assert not report.fused and [item.bn for item in report.unfused] == [bn]
    shape = re.escape(str(tuple(input.shape)))
    assert re.fullmatch(rf'with it folded into `{layer}`, on example_inputs \({shape} torch\.float64\) `{layer}` gets '
                        rf'an input of shape {shape}, on which the fold is not exact \(the BatchNorm acts on dim 1, '
                        r'the layer on its features\)', report.unfused[0].reason)
    assert report.checked_on == f'example_inputs {tuple(input.shape)} torch.float64, computed in torch.float64'
    assert 'input ranks were checked on example_inputs' in str(report)
    with torch.no_grad():
        assert torch.equal(fused(input), model(input))
    before.assert_unchanged()


def test_one_rank_dependent_fold_does_not_discard_the_others():
    model, input = prepared(torch.nn.Sequential(
        torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Conv1d(3, 2, 1), torch.nn.BatchNorm1d(2)), 2, 3, 3)
    fused, report = fuse(model, example_inputs=input)
    assert [(item.bn, item.layer) for item in report.fused] == [('3', '2')]
    assert [item.bn for item in report.unfused] == ['1']
    torch.testing.assert_close(fused(input), model(input), rtol=0, atol=1e-12)


def test_example_inputs_of_the_right_rank_keep_the_folds():
    model, _, _ = RANK_CASES['linear-bn1d-on-nlc']
    input = torch.randn(4, 3, dtype=torch.float64)
    fused, report = fuse(model, example_inputs=(input,))
    assert [item.bn for item in report.fused] == ['1'] and not report.unfused
    torch.testing.assert_close(fused(input), model(input), rtol=0, atol=1e-12)


class Float32Only(torch.nn.Module):
    '''Its forward makes a float32 weight, so it cannot run in float64; untraceable.'''
    def __init__(self):
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))

    def forward(self, x):
        x = self.block(x).mean(dim=(2, 3))
        if x.sum() > 0:
            x = -x
        return F.linear(x, torch.ones(2, 4))


def test_model_that_cannot_run_in_float64_is_checked_in_its_own_dtype():
    torch.manual_seed(0)
    model = Float32Only().eval()
    input = torch.randn(2, 3, 5, 5)
    with pytest.warns(UserWarning, match='folded 1 of its 1'):
        fused, report = fuse(model, example_inputs=input)
    assert report.checked_on == 'example_inputs (2, 3, 5, 5) torch.float32, computed in torch.float32'
    torch.testing.assert_close(fused(input), model(input))


def test_example_inputs_the_model_rejects_raise(snapshot):
    model, input, _ = UNTRACEABLE['sequential-folds-right']
    before = snapshot(model)
    with pytest.raises(ValueError, match=r'Untraceable raised RuntimeError on example_inputs \(\(2, 5, 5, 5\) '
                       r'torch\.float64\):.*Pass example inputs the model takes') as error:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            fuse(model, example_inputs=torch.randn(2, 5, 5, 5, dtype=torch.float64))
    assert isinstance(error.value.__cause__, RuntimeError)
    before.assert_unchanged()


@pytest.mark.parametrize('example_inputs', ['images', (), 3])
def test_example_inputs_of_wrong_type_raise(example_inputs):
    model, _, _ = UNTRACEABLE['sequential-folds-right']
    with pytest.raises(TypeError, match=r'example_inputs must be a tensor, or a tuple of the forward\'s positional '
                       'arguments'):
        fuse(model, example_inputs=example_inputs)


def output_error(actual, expected):
    '''The largest relative error over the tensors of two model outputs.'''
    return max((error for error, _ in output_differences(actual, expected)), default=0.)


def test_output_error_compares_structures_and_non_finite_entries():
    one = torch.tensor([1., 2., float('nan')], dtype=torch.float64)
    assert output_error({'a': one, 'b': (one,)}, {'b': (one,), 'a': one}) == 0.
    assert output_error(one + torch.tensor([0., .5, 0.], dtype=torch.float64), one) == .25
    assert output_error(one, torch.tensor([1., 2., 3.], dtype=torch.float64)) == float('inf')
    assert output_error(one, torch.tensor([1., 2., float('inf')], dtype=torch.float64)) == float('inf')
    assert output_error((one, one), (one,)) == float('inf')
    assert output_error(one[:2], one) == float('inf')
    # per tensor: a small output is compared on its own scale, not on that of a large one beside it
    big = torch.tensor([1e9], dtype=torch.float64)
    assert output_error((big, one + torch.tensor([0., .5, 0.], dtype=torch.float64)), (big, one)) == .25
    # complex values by their modulus: the imaginary parts were dropped
    assert output_error(torch.tensor([1 + 1j]), torch.tensor([1 + 0j])) == 1.


def test_output_mismatch_allows_each_tensor_the_rounding_of_its_dtype():
    '''The tolerance was that of the first output's dtype for every tensor: a float16 output beside float32 logits
    was held to float32's, and an exact fold was refused for float16's rounding.'''
    logits = torch.tensor([1., 2.])
    half = torch.tensor([1., 2.], dtype=torch.float16)
    assert output_mismatch((logits, half + .001), (logits, half)) is None
    assert output_mismatch((logits + .001, half), (logits, half)) == (
        'tensor 1 of the 2 in the model output differs by 0.0005 relative to its largest value (torch.float32, '
        'allowed 0.0003)')
    assert output_mismatch(torch.tensor([1, 2]), torch.tensor([1, 3])) == (
        'the model output differs by 0.333 relative to its largest value (torch.int64, allowed 0)')


class LargeAndAuxiliary(torch.nn.Module):
    '''An untraceable forward that returns large logits and, beside them, the output of the conv that a BatchNorm
    follows inside an nn.Sequential.'''
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))

    def forward(self, x):
        if x.sum() > -1e9:  # control flow on a proxy: not traceable
            x = x + 0.
        return self.features(x).flatten(1) * 1e9, self.features[0](x).flatten(1)


class Concatenated(LargeAndAuxiliary):
    '''As :py:class:`LargeAndAuxiliary`, with both outputs concatenated into one tensor.'''
    def forward(self, x):
        return torch.cat(super().forward(x), 1)


@pytest.mark.parametrize('kind', [LargeAndAuxiliary, Concatenated])
def test_a_fold_that_changes_small_values_beside_large_ones_is_refused(kind, snapshot):
    '''The fold into the Sequential's conv changes the small values the model returns beside values 1e9 times
    larger, as a second output or concatenated into the same tensor: measured against the largest value of both
    outputs, and later of the tensor, the difference (0.57 of values about 1) was below the tolerance and the fold was
    kept, with those values wrong.'''
    torch.manual_seed(0)
    model = randomize_batch_norms(kind()).double().eval()
    before = snapshot(model)
    input = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match='could not trace'):
        fused, report = fuse(model, example_inputs=input)
    assert not report.fused and [entry.bn for entry in report.unfused] == ['features.1']
    assert re.search(r'(the model output|tensor 2 of the 2 in the model output) differs by [0-9.]+ relative to the '
                     r'scale of its values \(torch\.float64, allowed 1e-08\)', report.unfused[0].reason)
    torch.testing.assert_close(fused(input), model(input), rtol=0, atol=0)
    before.assert_unchanged()


class SiameseDifference(torch.nn.Module):
    '''Both inputs through the same features in one batch, and the difference of their features summed; with
    ``reuse``, the forward also adds the conv's output to the BatchNorm's, so that folding it into the conv (the
    candidate of an untraced forward) is wrong.'''
    def __init__(self, reuse=False):
        super().__init__()
        self.reuse = reuse
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                            torch.nn.Flatten())

    def forward(self, first, second):
        if not self.reuse:
            first, second = self.features(torch.cat([first, second])).chunk(2)
            return (first - second).sum(1)
        if first.sum() > -1e9:  # control flow on a proxy: not traceable
            pass
        convolved = self.features[0](torch.cat([first, second]))
        first, second = (self.features[1:](convolved) + convolved.flatten(1)).chunk(2)
        return (first - second).sum(1)


@pytest.mark.parametrize('reuse', [False, True])
def test_a_fold_is_refused_where_the_output_cancels_with_the_reason(reuse, snapshot):
    '''On a near-duplicate pair the output (about 1e-11) is what is left of features about 10: an exact fold's
    rounding (about 4e-16) and the wrong fold (8e-13) are both within what a fold's rounding may make of features
    that size, so either fold is refused, and the reason says why and what to pass instead. On a pair that does not
    cancel the exact fold is kept and the wrong one refused. (A scale taken from a float32 run of the model kept the
    wrong fold on the near-duplicate pair.)'''
    torch.manual_seed(0)
    model = randomize_batch_norms(SiameseDifference(reuse)).double().eval()
    before = snapshot(model)
    first = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    near = first + 1e-12 * torch.rand_like(first)
    assert model(first, near).abs().max() < 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        _, report = fuse(model, example_inputs=(first, near))
        assert not report.fused
        hint = (r'; its values are at most [0-9.]+e-1\d of the values they are computed from \(they cancel\), so the '
                r'rounding of an exact fold can show as much: pass example inputs on which the output does not cancel')
        assert re.search(r'the model output differs by [0-9.e+-]+ relative to the scale of its values '
                         r'\(torch\.float64, allowed 1e-08\)' + hint + '$', report.unfused[0].reason)
        fused, report = fuse(model, example_inputs=(first, torch.rand_like(first)))
    assert [entry.bn for entry in report.fused] == ([] if reuse else ['features.1'])
    if reuse:
        assert 'they cancel' not in report.unfused[0].reason
    torch.testing.assert_close(fused(first, near), model(first, near), rtol=0, atol=1e-14)
    before.assert_unchanged()


class SaturatedHead(torch.nn.Module):
    '''An untraceable classifier ending in an activation module on logits of +-30 (outputs near 1 and near 1e-13),
    whose forward adds the conv's output to the BatchNorm's, so that folding it into the conv is wrong.'''
    def __init__(self, head):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        self.fc, self.head = torch.nn.Linear(8, 4), head
        with torch.no_grad():
            self.fc.bias.copy_(torch.tensor([30., -30., 30., -30.]))

    def forward(self, x):
        if x.sum() > -1e9:  # control flow on a proxy: not traceable
            pass
        convolved = self.features[0](x)
        return self.head(self.fc((self.features[1](convolved) + convolved).mean((2, 3))))


@pytest.mark.parametrize('head', [torch.nn.Sigmoid(), torch.nn.Softmax(1)])
def test_a_wrong_fold_under_a_saturated_activation_module_is_refused(head):
    '''Each output of the activation module was perturbed by 1e-6 of the module's largest output (about 1): its
    outputs near 1e-13 seemed to depend on values a million times their size, and the wrong fold (12% off them) was
    kept. An activation's outputs are perturbed by 1e-6 of each value; a layer's, which sum their inputs, by 1e-6 of
    the largest.'''
    torch.manual_seed(0)
    model = randomize_batch_norms(SaturatedHead(head)).double().eval()
    input = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert model(input).min() < 1e-11
    with pytest.warns(UserWarning, match='could not trace'):
        _, report = fuse(model, example_inputs=input)
    assert not report.fused and 'differs by' in report.unfused[0].reason


class DeterministicLeaves(SiameseDifference):
    '''As :py:class:`SiameseDifference`, raising where its features give two results for one input.'''
    def forward(self, first, second):
        if not torch.equal(self.features(first), self.features(first)):
            raise RuntimeError('the features are not deterministic')
        return super().forward(first, second)


def test_without_a_perturbed_run_each_tensor_is_compared_on_its_largest_value():
    '''Where the model refuses the run with its leaf modules' outputs perturbed, nothing tells the scale of each
    value: each output tensor is compared on its largest value, as the reason says.'''
    torch.manual_seed(0)
    model = randomize_batch_norms(DeterministicLeaves()).double().eval()
    first = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match='could not trace'):  # torch.equal of proxies is control flow
        _, report = fuse(model, example_inputs=(first, first + 1e-12 * torch.rand_like(first)))
    assert not report.fused
    assert report.unfused[0].reason.endswith('relative to its largest value (torch.float64, allowed 1e-08)')
    with pytest.warns(UserWarning, match='could not trace'):
        _, report = fuse(model, example_inputs=(first, torch.rand_like(first)))
    assert [entry.bn for entry in report.fused] == ['features.1']


def test_value_scales_by_hand():
    '''Each value's scale is the larger of its magnitude and ROUNDING_ALLOWANCE float64 epsilons of how far it
    moves per unit of relative perturbation (in units of the tolerance), at most the tensor's largest value; None for
    tensors without rounding and outputs of another structure.'''
    expected = torch.tensor([1e-12, -2., 3., 1.], dtype=torch.float64)
    moved = torch.tensor([5., 0., 3., 1e4], dtype=torch.float64)
    indices = torch.tensor([1, 2])
    scales, none = value_scales((expected + PERTURBATION * moved, indices), (expected, indices))
    assert none is None
    per_dependence = ROUNDING_ALLOWANCE * torch.finfo(torch.float64).eps / torch.finfo(torch.float64).eps ** .5
    torch.testing.assert_close(scales.scale, torch.tensor([5 * per_dependence, 2., 3., 1e4 * per_dependence],
                                                          dtype=torch.float64), rtol=1e-6, atol=0)
    assert scales.relative_size == pytest.approx(3 / 1e4, rel=1e-6) and not scales.cancels
    # a value that moves by far more (a decision flips) is compared at most on the tensor's largest value
    flipped, = value_scales(expected + PERTURBATION * torch.tensor([0., 0., 0., 1e9]), expected)
    assert flipped.scale[3].item() == 3. and flipped.cancels
    # one that overflows in the perturbed run is compared on its own magnitude, and says nothing of the others
    overflowed, = value_scales(expected + PERTURBATION * torch.tensor([5., 0., 3., float('inf')]), expected)
    assert overflowed.scale[3].item() == 1. and overflowed.relative_size == pytest.approx(3 / 5) and (
        not overflowed.cancels)
    assert value_scales((expected,), (expected, indices)) is None
    assert value_scales(expected[:2], expected) is None
    # a tensor that cancels: its largest value 1e-12 of what it depends on
    tiny = torch.tensor([1e-12], dtype=torch.float64)
    cancelled, = value_scales(tiny + PERTURBATION, tiny)
    assert cancelled.cancels and cancelled.scale.item() == 1e-12
    # a small value beside large ones is compared on its own size unless it cancels
    actual = expected + torch.tensor([1e-20, 0., 0., 0.], dtype=torch.float64)
    [(error, _)] = output_differences(actual, expected, [scales])
    assert error == pytest.approx(1e-20 / (5 * per_dependence))


class ConvBatchNorm(torch.nn.Module):
    '''conv -> BatchNorm -> mean over space, with a way of computing its output that example_inputs checks meet.'''
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
        self.register_buffer('step', torch.zeros(()))

    def forward(self, x):
        if self.kind == 'in-place input':
            x.sub_(.5).mul_(2.)
        output = self.bn(self.conv(x)).mean((2, 3))
        if self.kind == 'random':  # MC-dropout style: random in eval mode
            output = output + F.dropout(output, .5, training=True)
        if self.kind == 'counting':  # its output depends on a buffer it updates
            self.step += 1
            output = output * self.step
        return output


@pytest.mark.parametrize('kind', ['random', 'in-place input', 'counting'])
def test_example_inputs_compare_like_with_like(kind, snapshot):
    '''Comparing a traced forward's folds by their output refused every fold of a forward that draws random numbers,
    changes its input in place or counts its calls in a buffer: each run saw other random numbers, the input changed
    by the run before, or the counter moved on. Each run now gets the same seed and its own input, on a copy.'''
    torch.manual_seed(0)
    model = randomize_batch_norms(ConvBatchNorm(kind)).double().eval()
    input = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    given = input.clone()
    before = snapshot(model)
    _, report = fuse(model, example_inputs=input)
    assert [entry.bn for entry in report.fused] == ['bn'], report.unfused
    assert torch.equal(input, given) and model.step == 0
    before.assert_unchanged()


@dataclasses.dataclass
class Logits:
    scores: torch.Tensor


class Untraceable(torch.nn.Module):
    '''conv -> BatchNorm in a Sequential, behind control flow torch.fx cannot trace, returning a dataclass, or a
    string.'''
    def __init__(self, wrap):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        self.wrap = wrap

    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: not traceable
            x = self.body(x)
        return Logits(x) if self.wrap == 'dataclass' else 'done'


class OwnOrder(torch.nn.Sequential):
    '''A Sequential subclass whose untraceable forward runs its children in its own way.'''
    def forward(self, x):
        return self[1](self[0](x)) if x.sum() > 0 else x


def test_outputs_without_plain_tensors():
    '''A dataclass output held no tensor the comparison found: every fold agreed (error 0). Its fields are read now;
    an output with no tensor at all proves nothing, and an untraced model's folds are refused.'''
    torch.manual_seed(0)
    input = torch.rand(2, 3, 6, 6)
    model = randomize_batch_norms(Untraceable('dataclass')).eval()
    assert output_error(Logits(torch.ones(2)), Logits(torch.full((2,), 2.))) == .5
    assert [entry.bn for entry in fuse(model, example_inputs=input)[1].fused] == ['body.1']
    _, report = fuse(randomize_batch_norms(Untraceable('string')).eval(), example_inputs=input)
    assert not report.fused and 'gives an output that holds no tensor' in report.unfused[0].reason


def test_a_sequential_subclass_with_its_own_forward_is_no_candidate():
    '''Where the model cannot be traced, the children of each Sequential are candidates, traced one by one; a
    subclass with a forward of its own was traced as a whole and its TraceError escaped fuse(). Its children need not
    run in order: it is no candidate.'''
    model = randomize_batch_norms(OwnOrder(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))).eval()
    with pytest.warns(UserWarning, match='could not trace'):
        _, report = fuse(model, example_inputs=torch.rand(2, 3, 6, 6))
    assert not report.fused and [entry.bn for entry in report.unfused] == ['1']
