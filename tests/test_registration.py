'''Tests for KeptRegistration: a composite registered once, its hooks computing rules only inside a call.'''
import pytest
import torch
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat, LayerMapComposite, MixedComposite
from zennit.rules import Epsilon, ReLUGuidedBackprop

from conftest import ModelSnapshot, randomize_batch_norms
from zennit_bnfuse import CompositeLRP, FuseBatchNorm, SinglePass, ThresholdReLU
from zennit_bnfuse.registration import KeptRegistration


def small_net(seed=0):
    torch.manual_seed(seed)
    return randomize_batch_norms(torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.Conv2d(3, 3, 3),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 4),
    ).double(), seed)


def guided_epsilon_plus_flat():
    # ReLUGuidedBackprop is a Zennit Hook SinglePass leaves to Zennit: it stores each call's output gradient
    return MixedComposite([LayerMapComposite([(torch.nn.ReLU, ReLUGuidedBackprop())]), EpsilonPlusFlat()])


COMPOSITES = {
    'singlepass': lambda: SinglePass(guided_epsilon_plus_flat()),
    'zennit': guided_epsilon_plus_flat,
}


def inputs(batch, seed=1):
    return torch.rand(batch, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def fresh_relevance(model, composite, input, target):
    '''The relevance with ``composite`` registered for this call only (Zennit's attributor context).'''
    with Gradient(model, composite) as attributor:
        return attributor(input, torch.eye(4, dtype=torch.float64)[target])[1]


def kept_relevance(kept, model, input, target):
    with kept.call(model):
        input = input.clone().requires_grad_()
        output = model(input)
        return torch.autograd.grad(output, input, torch.eye(4, dtype=torch.float64)[target])[0]


def plain_gradient(model, input):
    input = input.clone().requires_grad_()
    return torch.autograd.grad(model(input).sum(), input)[0]


def hook_states(composite):
    '''What each hook of ``composite`` holds from a call: stored tensors, tensor hooks, calls in progress.'''
    hooks = [*composite.hook_refs, *(getattr(hook, 'zennit_hook', None) for hook in composite.hook_refs)]
    return [(dict(hook.stored_tensors), list(hook.tensor_handles), list(getattr(hook, 'calls', [])))
            for hook in hooks if hook is not None]


@pytest.mark.parametrize('engine', COMPOSITES)
def test_registered_once_and_each_call_equals_a_fresh_registration(engine):
    model, composite = small_net(), COMPOSITES[engine]()
    kept = KeptRegistration(composite)
    first = kept_relevance(kept, model, inputs(2), [0, 3])
    hooks = set(composite.hook_refs)
    second = kept_relevance(kept, model, inputs(3, seed=2), [1, 2, 2])
    assert set(composite.hook_refs) == hooks and len(hooks) == 6
    assert torch.equal(first, fresh_relevance(model, COMPOSITES[engine](), inputs(2), [0, 3]))
    assert torch.equal(second, fresh_relevance(model, COMPOSITES[engine](), inputs(3, seed=2), [1, 2, 2]))
    assert not torch.allclose(second, plain_gradient(model, inputs(3, seed=2)))


@pytest.mark.parametrize('engine', COMPOSITES)
def test_between_calls_the_hooks_hold_nothing_and_leave_gradients_alone(engine):
    model, composite = small_net(), COMPOSITES[engine]()
    plain = plain_gradient(model, inputs(2))
    kept = KeptRegistration(composite)
    kept_relevance(kept, model, inputs(2), [0, 3])
    assert all(state == ({}, [], []) for state in hook_states(composite))
    assert torch.equal(plain_gradient(model, inputs(2)), plain)
    assert kept.model is model and composite.handles


@pytest.mark.parametrize('engine', COMPOSITES)
def test_an_error_in_a_call_leaves_the_hooks_off(engine):
    model, composite = small_net(), COMPOSITES[engine]()
    plain = plain_gradient(model, inputs(2))
    kept = KeptRegistration(composite)
    with pytest.raises(RuntimeError):
        with kept.call(model):
            model(torch.rand(1, 5, 6, 6, dtype=torch.float64, requires_grad=True))
    assert kept.hooks and all(not hook.active for hook in kept.hooks)
    assert all(state == ({}, [], []) for state in hook_states(composite))
    assert torch.equal(plain_gradient(model, inputs(2)), plain)
    assert torch.equal(kept_relevance(kept, model, inputs(2), [0, 3]),
                       fresh_relevance(model, COMPOSITES[engine](), inputs(2), [0, 3]))


def test_registers_again_on_another_model_and_after_being_removed_or_registered_elsewhere():
    first, second = small_net(), small_net(seed=5)
    composite = COMPOSITES['singlepass']()
    untouched = ModelSnapshot(first)
    kept = KeptRegistration(composite)
    kept_relevance(kept, first, inputs(2), [0, 3])
    on_second = kept_relevance(kept, second, inputs(2), [0, 3])
    untouched.assert_unchanged()  # the hooks left the first model
    assert kept.model is second
    assert torch.equal(on_second, fresh_relevance(second, COMPOSITES['singlepass'](), inputs(2), [0, 3]))
    composite.remove()
    assert torch.equal(kept_relevance(kept, second, inputs(2), [0, 3]), on_second)
    composite.register(first)  # the hooks move to the first model
    assert torch.equal(kept_relevance(kept, second, inputs(2), [0, 3]), on_second)
    untouched.assert_unchanged()
    kept.remove()
    assert kept.model is None and not composite.handles and kept.hooks == []


def batch_norm_before_relu(seed=0):
    # conv -> relu -> BatchNorm -> relu -> conv: FuseBatchNorm leaves a ThresholdReLU with a rule of its own
    torch.manual_seed(seed)
    return randomize_batch_norms(torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.Conv2d(3, 3, 3),
        torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 4),
    ).double(), seed)


@pytest.mark.parametrize('engine', ['singlepass', 'zennit'])
def test_hooks_that_canonizers_register_are_switched_off_and_cleared_too(engine):
    def make():
        composite = EpsilonPlusFlat(canonizers=[FuseBatchNorm()])
        return SinglePass(composite) if engine == 'singlepass' else composite
    model = batch_norm_before_relu()
    plain = plain_gradient(model, inputs(2))
    kept = KeptRegistration(make())
    for batch, target in ((2, [0, 3]), (3, [1, 1, 2]), (2, [2, 0])):
        relevance = kept_relevance(kept, model, inputs(batch, seed=batch), target)
        # the reference on a model of its own: the kept composite's canonizer stays applied to ``model``
        assert torch.equal(relevance, fresh_relevance(batch_norm_before_relu(), make(), inputs(batch, seed=batch),
                                                      target))
    thresholds = [module for module in model.modules() if isinstance(module, ThresholdReLU)]
    canonizer_hooks = [hook for hook in kept.hooks if hook not in set(kept.composite.hook_refs)]
    assert len(thresholds) == 1 and len(canonizer_hooks) == 1 and isinstance(canonizer_hooks[0], Epsilon)
    assert all(not hook.active and not hook.stored_tensors and not hook.tensor_handles for hook in kept.hooks)
    torch.testing.assert_close(plain_gradient(model, inputs(2)), plain, rtol=1e-12, atol=1e-14)  # the fused model


@pytest.mark.parametrize('engine', ['singlepass', 'zennit'])
def test_composite_lrp_explains_an_empty_batch_after_a_call(engine):
    lrp = CompositeLRP(small_net(), guided_epsilon_plus_flat(), engine=engine)
    lrp.attribute(inputs(2), target=[0, 3])
    relevance, delta = lrp.attribute(inputs(2)[:0], target=[], return_convergence_delta=True)
    assert relevance.shape == (0, 2, 6, 6) and delta.shape == (0,)


def test_composite_lrp_keeps_its_hooks_on_the_prepared_copy_until_the_model_changes():
    model = small_net()
    lrp = CompositeLRP(model, EpsilonPlusFlat())
    first = lrp.attribute(inputs(2), target=[0, 3])
    prepared, hooks = lrp.prepared.get(), set(lrp.composite.hook_refs)
    assert torch.equal(lrp.attribute(inputs(2), target=[0, 3]), first)
    assert set(lrp.composite.hook_refs) == hooks and lrp.registration.model is prepared
    between_calls = plain_gradient(prepared, inputs(2))
    with torch.no_grad():
        model[3].weight.mul_(-1)
    changed = lrp.attribute(inputs(2), target=[0, 3])
    assert lrp.prepared.builds == 2 and lrp.registration.model is lrp.prepared.get() is not prepared
    assert sum(map(ModelSnapshot.hook_count, prepared.modules())) == 0
    assert torch.equal(plain_gradient(prepared, inputs(2)), between_calls)  # the hooks were off between calls
    assert torch.equal(changed, CompositeLRP(model, EpsilonPlusFlat()).attribute(inputs(2), target=[0, 3]))
