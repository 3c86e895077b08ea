'''Tests for the argument checks (zennit_bnfuse.checks) and the entry points that use them.'''
import re
import warnings

import numpy
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat
from zennit.core import Composite

from conftest import randomize_batch_norms
from fusion_cases import Lambda
from zennit_bnfuse import CompositeLRP, FuseBatchNorm, FusedLRP, SinglePass, find_fusable_pairs, fuse
from zennit_bnfuse.checks import check_composite, check_inputs, check_model, check_target, checked_forward


def conv_net():
    torch.manual_seed(0)
    return randomize_batch_norms(torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8, 3)).double())


def scripted(kind):
    '''The model compiled with torch.jit.script or torch.jit.trace, or holding a scripted submodule.'''
    model = conv_net()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit is deprecated
        if kind == 'script':
            return torch.jit.script(model)
        if kind == 'trace':
            return torch.jit.trace(model, torch.rand(1, 1, 4, 4, dtype=torch.float64))
        model[1] = torch.jit.script(model[1])
        return model


ENTRY_POINTS = {
    'fuse': (lambda model: fuse(model), 'fuse()'),
    'find_fusable_pairs': (lambda model: find_fusable_pairs(model), 'find_fusable_pairs()'),
    'FuseBatchNorm.apply': (lambda model: FuseBatchNorm().apply(model), 'FuseBatchNorm'),
    'Gradient': (lambda model: Gradient(model, EpsilonPlusFlat(canonizers=[FuseBatchNorm()])).__enter__(),
                 'FuseBatchNorm'),
    'SinglePass': (lambda model: SinglePass(EpsilonPlusFlat()).context(model).__enter__(), 'SinglePass'),
    'FusedLRP': (lambda model: FusedLRP(model), 'FusedLRP'),
    'CompositeLRP': (lambda model: CompositeLRP(model, EpsilonPlusFlat()), 'CompositeLRP'),
}


@pytest.mark.parametrize('kind', ['script', 'trace', 'submodule'])
@pytest.mark.parametrize('entry', sorted(ENTRY_POINTS))
def test_torchscript_refused_by_every_entry_point(entry, kind):
    model = scripted(kind)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    call, caller = ENTRY_POINTS[entry]
    where = 'its submodule `1` is a RecursiveScriptModule' if kind == 'submodule' else 'the model is a'
    with pytest.raises(TypeError, match=rf'^{caller.replace("(", r"[(]").replace(")", r"[)]")} got a TorchScript '
                       rf'module: {where}.*Pass the original torch\.nn\.Module'):
        call(model)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize('entry', sorted(ENTRY_POINTS))
def test_a_deprecated_backward_hook_is_refused_by_every_entry_point(entry):
    '''Tracing through a module with a register_backward_hook hook never ended (torch looks for a tensor in the
    proxy it returns).'''
    model = conv_net()
    model[0] = torch.nn.Sequential(model[0])  # a block tracing goes through
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # deprecated
        model[0].register_backward_hook(lambda module, grad_input, grad_output: None)
    call, caller = ENTRY_POINTS[entry]
    with pytest.raises(TypeError, match=rf'^{re.escape(caller)} got a model with a backward hook from the deprecated '
                       r'register_backward_hook: its submodule `0` is a Sequential with one'):
        call(model)


@pytest.mark.parametrize('kind', ['DataParallel', 'compile', 'submodule'])
@pytest.mark.parametrize('entry', sorted(ENTRY_POINTS))
def test_wrappers_refused_naming_the_module_to_pass(entry, kind):
    # torch.fx cannot trace the wrappers' forward: nothing would be folded and residual sums would get no rule
    inner = conv_net()
    model = {'DataParallel': lambda: torch.nn.DataParallel(inner), 'compile': lambda: torch.compile(inner),
             'submodule': lambda: torch.nn.Sequential(torch.nn.DataParallel(inner))}[kind]()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    call, caller = ENTRY_POINTS[entry]
    kind_name, where, attribute = {
        'DataParallel': ('DataParallel', 'the model is', 'model.module'),
        'compile': ('OptimizedModule', 'the model is', 'model._orig_mod'),
        'submodule': ('DataParallel', 'its submodule `0` is', '0.module')}[kind]
    with pytest.raises(TypeError, match=rf'^{caller.replace("(", r"[(]").replace(")", r"[)]")} got a wrapped module: '
                       rf'{where} a {kind_name}, whose forward torch\.fx cannot trace .* Pass the module it wraps, '
                       rf'`{re.escape(attribute)}`: it holds the same parameters\.$'):
        call(model)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


COPYING_ENTRY_POINTS = {
    'fuse': (lambda model: fuse(model)[0], 'fuse()'),
    'FusedLRP': (lambda model: FusedLRP(model, engine='captum'), 'FusedLRP'),
    'CompositeLRP': (lambda model: CompositeLRP(model, EpsilonPlusFlat()), 'CompositeLRP'),
}


@pytest.mark.parametrize('when', ['built', 'called'])
@pytest.mark.parametrize('entry', sorted(COPYING_ENTRY_POINTS))
def test_a_composite_registered_on_the_model_is_refused(entry, when, snapshot):
    # the copy carried the composite's hooks, still active: FusedLRP's relevance summed to 12.9 for a logit of -0.003
    model = conv_net().eval()
    input = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    make, caller = COPYING_ENTRY_POINTS[entry]
    made = None if when == 'built' else make(model)
    expected = None if entry == 'fuse' else make(model).attribute(input, target=0)
    composite = EpsilonPlusFlat()
    composite.register(model)  # what entering `with Gradient(model, composite)` does
    before = snapshot(model)
    message = (rf'^{caller.replace("(", r"[(]").replace(")", r"[)]")} got a model with a Zennit composite registered '
               r'on it: its submodule `0` is a Conv2d with the hooks of a Flat rule\..*Remove the composite first')
    with pytest.raises(ValueError, match=message):
        if made is None or entry == 'fuse':
            make(model)
        else:
            made.attribute(input, target=0)
    before.assert_unchanged()
    composite.remove()
    if entry != 'fuse':
        assert torch.equal((made or make(model)).attribute(input, target=0), expected)


GLOBAL_HOOKS = {
    'register_module_forward_hook': lambda module, args, output: output * 1.5 if isinstance(
        module, torch.nn.Conv2d) else None,
    'register_module_forward_pre_hook': lambda module, args: None,
    'register_module_full_backward_hook': lambda module, grad_input, grad_output: None,
    'register_module_full_backward_pre_hook': lambda module, grad_output: None,
}
FOLDING_ENTRY_POINTS = {
    **COPYING_ENTRY_POINTS,
    'FusedLRP': (lambda model: FusedLRP(model).attribute(torch.rand(1, 1, 4, 4, dtype=torch.float64), target=0),
                 'FusedLRP'),
    'CompositeLRP': (lambda model: CompositeLRP(model, EpsilonPlusFlat()).attribute(
        torch.rand(1, 1, 4, 4, dtype=torch.float64), target=0), 'CompositeLRP'),
    'Gradient': (lambda model: Gradient(model, EpsilonPlusFlat(canonizers=[FuseBatchNorm()])).__enter__(),
                 'FuseBatchNorm'),
}


@pytest.mark.parametrize('hook', sorted(GLOBAL_HOOKS))
@pytest.mark.parametrize('entry', sorted(FOLDING_ENTRY_POINTS))
def test_global_module_hooks_are_refused_where_the_model_is_folded_or_prepared(entry, hook, snapshot):
    '''They run on the copy's modules, which compute other things: a forward hook scaling every Conv2d's output ran on
    conv + BatchNorm, and the fused logits were 4e-2 off the model's.'''
    model = conv_net().eval()
    before = snapshot(model)
    make, caller = FOLDING_ENTRY_POINTS[entry]
    handle = getattr(torch.nn.modules.module, hook)(GLOBAL_HOOKS[hook])
    try:
        with pytest.raises(RuntimeError, match=rf'^{caller.replace("(", r"[(]").replace(")", r"[)]")} cannot work '
                                               rf'while global module hooks are registered \({hook} of '
                                               r'torch\.nn\.modules\.module\).*Remove them first'):
            make(model)
    finally:
        handle.remove()
    before.assert_unchanged()


def lazy_net():
    ''':py:func:`conv_net` with a LazyConv2d and a LazyLinear.'''
    return torch.nn.Sequential(torch.nn.LazyConv2d(2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.LazyLinear(3)).eval()


@pytest.mark.parametrize('entry', sorted(ENTRY_POINTS))
def test_uninitialised_lazy_modules_refused_until_the_first_forward(entry):
    # before, fuse() said the LazyConv2d was 'a subclass whose forward may differ' and the others raised torch's
    # error about a data_ptr, naming no module
    model = lazy_net()
    call, caller = ENTRY_POINTS[entry]
    with pytest.raises(ValueError, match=rf'^{caller.replace("(", r"[(]").replace(")", r"[)]")} got a model with '
                       r'uninitialised parameters: its submodule `0` is a LazyConv2d, .* Run the model once on an '
                       r'example batch \(model\(example\)\) before passing it'):
        call(model)
    model(torch.rand(1, 1, 4, 4))  # the lazy modules become a Conv2d and a Linear
    assert len(fuse(model)[1].fused) == 1
    call(model)


@pytest.mark.parametrize('entry', sorted(ENTRY_POINTS))
def test_a_model_on_the_meta_device_is_refused(entry):
    # fuse() and FuseBatchNorm raised 'Tensor.item() cannot be called on meta tensors' from a statistics check
    call, caller = ENTRY_POINTS[entry]
    with pytest.raises(ValueError, match=rf'^{caller.replace("(", r"[(]").replace(")", r"[)]")} got a model on the '
                       r'meta device: `0\.weight` has a shape but no values'):
        call(conv_net().to('meta'))


@pytest.mark.parametrize('entry', sorted(ENTRY_POINTS))
@pytest.mark.parametrize('model', [None, 'resnet18', conv_net().state_dict()])
def test_non_module_refused_by_every_entry_point(entry, model):
    call, caller = ENTRY_POINTS[entry]
    with pytest.raises(TypeError, match=rf'expects the model as a torch\.nn\.Module, not {type(model).__name__}'):
        call(model)


@pytest.mark.parametrize('composite', [None, 'EpsilonPlusFlat', EpsilonPlusFlat])
def test_composite_must_be_a_zennit_composite(composite):
    with pytest.raises(TypeError, match=r'CompositeLRP expects a Zennit composite \(a zennit\.core\.Composite, for '
                       rf'example zennit\.composites\.EpsilonPlusFlat\(\)\), not {type(composite).__name__}'):
        check_composite(composite, 'CompositeLRP')
    with pytest.raises(TypeError, match='CompositeLRP expects a Zennit composite'):
        CompositeLRP(conv_net(), composite)


def test_batch_norm_rule_must_be_a_zennit_rule():
    with pytest.raises(TypeError, match=r'batch_norm_rule must be a Zennit rule .* not str'):
        CompositeLRP(conv_net(), EpsilonPlusFlat(), batch_norm_rule='epsilon')


def test_check_model_accepts_modules():
    check_model(conv_net(), 'fuse()')


@pytest.mark.parametrize('inputs, error, message', [
    ([torch.ones(1, 2)], TypeError, r'^inputs must be a torch\.Tensor .* not list'),
    ((torch.ones(1, 2), 'x'), TypeError, r'^inputs\[1\] must be a torch\.Tensor .* not str'),
    (torch.ones(2, 3, dtype=torch.long), TypeError, r'^inputs has dtype torch\.int64; .*floating-point inputs'),
    ((), ValueError, r'^inputs is an empty tuple'),
    (torch.tensor(1.), ValueError, r'^inputs is a 0-dim tensor; inputs need the batch on dim 0'),
    ((torch.ones(2, 3), torch.ones(3, 3)), ValueError, r'different batch sizes \[2, 3\] on dim 0'),
])
def test_check_inputs(inputs, error, message):
    with pytest.raises(error, match=message):
        check_inputs(inputs)


def inference_tensor():
    with torch.inference_mode():
        return torch.rand(1, 1, 4, 4, dtype=torch.float64)


@pytest.mark.parametrize('explainer', ['FusedLRP', 'CompositeLRP'])
def test_inference_mode_is_named(explainer):
    '''Before: torch's "element 0 of tensors does not require grad", or a message blaming the input's shape.'''
    lrp = FusedLRP(conv_net().eval()) if explainer == 'FusedLRP' else CompositeLRP(conv_net().eval(), EpsilonPlusFlat())
    with pytest.raises(ValueError, match=r'^inputs\[1\] was made under torch\.inference_mode\(\).*'
                                         r'\(inputs\[1\]\.clone\(\)\)'):
        lrp.attribute((torch.rand(1, 1, 4, 4, dtype=torch.float64), inference_tensor()), target=0)
    with pytest.raises(RuntimeError, match=r'^attribute\(\) was called inside torch\.inference_mode\(\)'):
        with torch.inference_mode():
            lrp.attribute(torch.rand(1, 1, 4, 4, dtype=torch.float64), target=0)
    assert lrp.attribute(inference_tensor().clone(), target=0).shape == (1, 1, 4, 4)


def test_check_inputs_accepts_tensors_and_tuples():
    check_inputs(torch.ones(2, 3))
    check_inputs((torch.ones(2, 3), torch.zeros(2, dtype=torch.float16)))


OUTPUT = torch.zeros(2, 3)


@pytest.mark.parametrize('target', [
    0, 2, numpy.int64(1), (1,), [0, 2], [(1,), (2,)], torch.tensor(2), torch.tensor([0, 1]),
])
def test_check_target_accepts_valid_targets(target):
    check_target(target, OUTPUT)


@pytest.mark.parametrize('target, error, message', [
    (-1, ValueError, r'^target -1 is out of range for the model output of shape \(2, 3\): valid indices for dim 1 '
                     r'are 0 to 2\.$'),
    (3, ValueError, r'^target 3 is out of range .* 0 to 2'),
    ([0, -1], ValueError, r'^target -1 is out of range'),
    (torch.tensor([1, 5]), ValueError, r'^target 5 is out of range'),
    ([(0,), (3,)], ValueError, r'^target 3 is out of range'),
    ((0, 1), ValueError, r'^target \(0, 1\) has 2 indices, but the model output of shape \(2, 3\) has 1 dim'),
    ([0, 1, 2], ValueError, r'^a target list needs one entry per example: it has 3 for a batch of 2'),
    (torch.tensor([0, 1, 2]), ValueError, r'^a target tensor must be 0-dim or hold one index per example \(2\)'),
    (torch.zeros(2, 1, dtype=torch.long), ValueError, r'^a target tensor must be 0-dim'),
    (None, ValueError, r'^target is None, but the model output has shape \(2, 3\).*target=0 \(0 to 2\)'),
    (1.5, TypeError, r'^target must be an int class index.*not 1\.5'),
    (True, TypeError, r'^target must be an int class index.*not True'),
    ('cat', TypeError, r"^target must be an int class index.*not 'cat'"),
    ([0, 'a'], TypeError, r'^target must be an int'),
    ((), TypeError, r'^target must be an int'),
    (torch.tensor([0., 1.]), TypeError, r'^a target tensor must hold integer class indices, not torch\.float32'),
])
def test_check_target_rejects(target, error, message):
    with pytest.raises(error, match=message):
        check_target(target, OUTPUT)


@pytest.mark.parametrize('dtype', [torch.uint8, torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize('explainer', [FusedLRP, lambda model: CompositeLRP(model, EpsilonPlusFlat())],
                         ids=['FusedLRP', 'CompositeLRP'])
def test_integer_target_tensors_of_every_dtype(dtype, explainer):
    # a uint8 target tensor failed in Captum's gather ('Expected dtype int32/int64')
    model, input = conv_net().eval(), torch.rand(2, 1, 4, 4, dtype=torch.float64)
    expected = explainer(model).attribute(input, target=torch.tensor([2, 0]))
    assert torch.equal(explainer(model).attribute(input, target=torch.tensor([2, 0], dtype=dtype)), expected)


def test_check_target_needs_one_index_per_output_dim():
    # an int on an output of shape (N, 2, 3) selected 3 values, whose sum CompositeLRP explained without a word
    output = torch.zeros(2, 2, 3)
    check_target((1, 2), output)
    check_target([(0, 1), (1, 2)], output)
    for target in (1, [1, 0], torch.tensor([1, 0])):
        with pytest.raises(ValueError, match=r'^target 1 selects 3 values per example of the model output of shape '
                                             r'\(2, 2, 3\); give one index per dim after the batch, for example '
                                             r'target=\(1, 0\)\.$'):
            check_target(target, output)
    with pytest.raises(ValueError, match=r'^target 1 selects 3 values'):
        CompositeLRP(Lambda(lambda self, x: x.view(-1, 2, 3)), EpsilonPlusFlat()).attribute(torch.rand(2, 6), 1)


def test_check_target_none_for_one_output_per_example():
    check_target(None, torch.zeros(2, 1))
    check_target(None, torch.zeros(2))


@pytest.mark.parametrize('cls', ['FusedLRP', 'CompositeLRP'])
def test_empty_batch_with_target_none(cls):
    # found by the fuzz test: the check of target=None read the first example of an empty output
    check_target(None, torch.zeros(0, 1))
    with pytest.raises(ValueError, match=r'^target is None, but the model output has shape \(0, 3\)'):
        check_target(None, torch.zeros(0, 3))
    model = fuzz_model('valid')
    lrp = FusedLRP(model) if cls == 'FusedLRP' else CompositeLRP(model, EpsilonPlusFlat())
    with pytest.raises(ValueError, match=r'^target is None, but the model output has shape \(0, 3\), more than one '):
        lrp.attribute(torch.rand(0, 1, 4, 4, dtype=torch.float64), target=None)
    assert lrp.attribute(torch.rand(0, 1, 4, 4, dtype=torch.float64), target=0).shape == (0, 1, 4, 4)


def test_checked_forward_names_model_and_input_shapes_and_keeps_the_cause():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    input = torch.ones(4, 5)
    with pytest.raises(ValueError, match=r'^Sequential could not compute its output for inputs of shape \(4, 5\) '
                       r'torch\.float32: mat1 and mat2 shapes cannot be multiplied \(4x5 and 3x2\)\. Pass inputs of '
                       r'the shape and dtype the model takes') as error:
        with checked_forward(model, (input,), 0):
            model(input)
    assert isinstance(error.value.__cause__, RuntimeError)
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_checked_forward_leaves_errors_outside_the_forward_alone():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match='after the forward'):
        with checked_forward(model, (torch.ones(1, 3),), 0):
            model(torch.ones(1, 3))
            raise RuntimeError('after the forward')
    with pytest.raises(ValueError, match=r'^target 2 is out of range'):
        with checked_forward(model, (torch.ones(1, 3),), 2):
            model(torch.ones(1, 3))
    assert not model._forward_hooks and not model._forward_pre_hooks


def fuzz_model(statistics):
    '''conv -> BN2d -> ReLU -> flatten -> BN1d -> linear in float64, its BN2d's statistics made as ``statistics``
    says (valid or not).'''
    torch.manual_seed(0)
    model = randomize_batch_norms(torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)).double())
    batch_norm = model[1]
    if statistics == 'training':
        batch_norm.train()
    elif statistics == 'zero-scale':
        batch_norm.weight.data[0] = 0.
    elif statistics == 'zero-variance':
        batch_norm.running_var[1] = 0.  # valid: eps keeps it positive
    elif statistics == 'zero-variance-zero-eps':
        batch_norm.running_var[1], batch_norm.eps = 0., 0.
    elif statistics == 'negative-variance':
        batch_norm.running_var[0] = -2.
    elif statistics == 'nan-mean':
        batch_norm.running_mean[1] = float('nan')
    return model


def epsilon_composite():
    '''LRP-epsilon on every conv/linear layer, gradient elsewhere: with a tiny epsilon, gradient x input.'''
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon
    from zennit.types import Convolution, Linear
    return LayerMapComposite([(Convolution, Epsilon(epsilon=1e-12)), (Linear, Epsilon(epsilon=1e-12))])


INPUTS = {
    'valid': lambda batch: torch.rand(batch, 1, 4, 4, dtype=torch.float64),
    'rank': lambda batch: torch.rand(batch, 4, 4, dtype=torch.float64),
    'shape': lambda batch: torch.rand(batch, 1, 5, 5, dtype=torch.float64),
    'float32': lambda batch: torch.rand(batch, 1, 4, 4),
    'int64': lambda batch: torch.ones(batch, 1, 4, 4, dtype=torch.long),
    'list': lambda batch: [torch.rand(batch, 1, 4, 4, dtype=torch.float64)],
    'str': lambda batch: 'image.png',
    'none': lambda batch: None,
}
STATISTICS = ['valid', 'training', 'zero-scale', 'zero-variance', 'zero-variance-zero-eps', 'negative-variance',
              'nan-mean']


@st.composite
def api_calls(draw):
    '''A call of the Python API with arguments that are each valid or not.'''
    entry = draw(st.sampled_from(['fuse', 'FuseBatchNorm', 'FusedLRP', 'CompositeLRP']))
    batch = draw(st.sampled_from([0, 1, 3]))
    inputs = draw(st.sampled_from(sorted(INPUTS)))
    target = draw(st.one_of(
        st.integers(-3, 4), st.none(), st.floats(0, 2), st.just('cat'), st.tuples(st.integers(-1, 3)),
        st.lists(st.integers(-1, 3), min_size=max(batch - 1, 0), max_size=batch + 1),
        st.lists(st.integers(0, 2), min_size=batch, max_size=batch).map(torch.tensor)))
    return {
        'entry': entry,
        'model': draw(st.sampled_from(['model', 'model', 'model', None, 'resnet18'])),
        'statistics': draw(st.sampled_from(STATISTICS)),
        'composite': draw(st.sampled_from(['epsilon', 'epsilon-plus-flat', None, 'EpsilonPlusFlat'])),
        'handling': draw(st.sampled_from(['fused', 'unfused', 'naive', 'merged', None])),
        'inputs': inputs,
        'batch': batch,
        'target': target,
        'example_inputs': draw(st.sampled_from([None, 'valid', inputs])),
    }


def selected_targets(target, batch):
    '''The class per example a valid target selects.'''
    if isinstance(target, torch.Tensor):
        target = target.tolist()
    if isinstance(target, tuple):
        target = target[0]
    return target if isinstance(target, list) else [target] * batch


def gradient_times_input(model, input, target):
    input = input.detach().requires_grad_()
    output = model(input)
    selected = output[range(len(input)), selected_targets(target, len(input))]
    gradient, = torch.autograd.grad(selected.sum(), input)
    return gradient * input


def run_call(call, model, inputs, example_inputs):
    '''Run ``call``; return what to check: ``(relevance or output, reference or None)``.'''
    entry, handling, target = call['entry'], call['handling'], call['target']
    if entry == 'fuse':
        fused, _ = fuse(model, example_inputs=example_inputs)
        valid = INPUTS['valid'](2)
        return fused(valid), model(valid)
    if entry == 'FuseBatchNorm':
        valid = INPUTS['valid'](2)
        with Composite(canonizers=[FuseBatchNorm(example_inputs=example_inputs)]).context(model) as modified:
            output = modified(valid)
        return output, model(valid)
    if entry == 'FusedLRP':
        lrp = FusedLRP(model, handling=handling, example_inputs=example_inputs)
    else:
        composite = {'epsilon': epsilon_composite(), 'epsilon-plus-flat': EpsilonPlusFlat()}.get(
            call['composite'], call['composite'])
        lrp = CompositeLRP(model, composite, handling=handling, example_inputs=example_inputs)
    relevance = lrp.attribute(inputs, target=target)
    exact = handling in ('fused', 'unfused') and (entry == 'FusedLRP' or call['composite'] == 'epsilon')
    return relevance, gradient_times_input(model, inputs, target) if exact else None


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(api_calls())
def test_fuzz_python_api_clear_error_or_correct_result(snapshot, call):
    model = fuzz_model(call['statistics']) if call['model'] == 'model' else call['model']
    inputs = INPUTS[call['inputs']](call['batch'])
    example_inputs = None if call['example_inputs'] is None else INPUTS[call['example_inputs']](call['batch'])
    before = snapshot(model) if isinstance(model, torch.nn.Module) else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # Captum's warnings about gradient requirements
            actual, expected = run_call(call, model, inputs, example_inputs)
    except (TypeError, ValueError) as error:
        message = str(error)
        assert len(message) > 40 and '\n' not in message, message
        event(type(error).__name__)
    else:
        event('result checked against a reference' if expected is not None else 'result')
        assert isinstance(model, torch.nn.Module) and call['statistics'] in ('valid', 'zero-scale', 'zero-variance')
        if isinstance(inputs, torch.Tensor):
            assert actual.shape == (inputs.shape if call['entry'] in ('FusedLRP', 'CompositeLRP') else actual.shape)
        assert torch.isfinite(actual).all()
        if expected is not None:
            scale = max(expected.abs().max().item(), 1e-12) if expected.numel() else 1.
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-7 * scale)
    if before is not None:
        before.assert_unchanged()
