'''Tests of zennit_bnfuse.explain_func, the explain_func for Quantus metrics.'''
import numpy as np
import pytest
import quantus
import torch
from zennit.composites import EpsilonPlusFlat

from zennit_bnfuse import CompositeLRP, FusedLRP, explain_func
from zennit_bnfuse.evaluation.composites import COMPOSITES
from zennit_bnfuse.evaluation.data import demo_images
from zennit_bnfuse.evaluation.explain import relevance_by_handling
from zennit_bnfuse.evaluation.models import pretrained


@pytest.fixture(scope='module')
def shipped():
    '''The shipped mnist-cnn-bn, four demo digits and their predicted classes.'''
    model = pretrained('mnist-cnn-bn')
    images = demo_images('mnist')[:4]
    with torch.no_grad():
        targets = model(images).argmax(dim=1)
    return model, images, targets


def test_numpy_in_numpy_out_equals_composite_lrp(shipped):
    model, images, targets = shipped
    result = explain_func(model=model, inputs=images.numpy(), targets=targets.numpy(), composite=EpsilonPlusFlat())
    expected = CompositeLRP(model, EpsilonPlusFlat()).attribute(images, target=targets).sum(dim=1, keepdim=True)
    assert isinstance(result, np.ndarray) and result.dtype == np.float32 and result.shape == (4, 1, 28, 28)
    np.testing.assert_allclose(result, expected.numpy(), rtol=1e-5, atol=1e-7)


def test_names_handlings_captum_rules_and_all_axes(shipped):
    model, images, targets = shipped
    inputs, labels = images.numpy(), targets.numpy()
    full = explain_func(model=model, inputs=inputs, targets=labels, composite='captum', reduce_axes=None)
    np.testing.assert_allclose(full, FusedLRP(model).attribute(images, target=targets).detach().numpy(),
                               rtol=1e-5, atol=1e-7)
    fused = explain_func(model=model, inputs=inputs, targets=labels, composite='epsilon-plus-flat')
    naive = explain_func(model=model, inputs=inputs, targets=labels, composite='epsilon-plus-flat', handling='naive')
    assert fused.shape == naive.shape == (4, 1, 28, 28) and not np.allclose(fused, naive)
    one_target = explain_func(model=model, inputs=inputs[:2], targets=3, composite='epsilon-plus-flat')
    assert one_target.shape == (2, 1, 28, 28)


@pytest.mark.parametrize('composite', sorted(COMPOSITES))
def test_bnfuse_explain_computes_what_explain_func_and_the_study_do(shipped, composite):
    # bnfuse explain left the BatchNorms that 'unfused' keeps under LRP-epsilon for the bias-free composites (the
    # study and explain_func pass them relevance unchanged): its heatmaps were 100% of their maximum off
    model, images, targets = shipped
    relevance = relevance_by_handling(model, images, targets, composite, 0., 1., ('fused', 'unfused'), progress=False)
    for handling in ('fused', 'unfused'):
        expected = explain_func(model=model, inputs=images.numpy(), targets=targets.numpy(), composite=composite,
                                handling=handling)
        np.testing.assert_array_equal(relevance[handling].sum(dim=1, keepdim=True).detach().numpy(), expected)


def test_errors(shipped):
    model, images, targets = shipped
    with pytest.raises(TypeError, match='composite must be a Zennit Composite'):
        explain_func(model=model, inputs=images.numpy(), targets=targets.numpy(), composite=object())
    with pytest.raises(ValueError, match='batch axis 0'):
        explain_func(model=model, inputs=images.numpy(), targets=targets.numpy(), reduce_axes=(0, 1))
    with pytest.raises(TypeError, match='torch.nn.Module'):
        explain_func(model='model', inputs=images.numpy(), targets=targets.numpy())
    one_hot = np.eye(10)[targets.numpy()]
    with pytest.raises(ValueError, match=r'^targets must hold one class index per example, not an array of shape '
                       r'\(4, 10\) \(for one-hot labels pass labels\.argmax\(1\)\)\.$'):
        explain_func(model=model, inputs=images.numpy(), targets=one_hot)
    with pytest.raises(ValueError, match=r'^targets must be class indices; \[1\.9, 0\.0\] holds a value that is not '):
        explain_func(model=model, inputs=images.numpy()[:2], targets=np.array([1.9, 0.]))


def test_what_the_captum_classes_refuse_is_refused(shipped):
    '''Before: uint8 images were cast to float unscaled (relevance 200x too large), booleans were classes, rules
    with a Zennit composite were ignored, low above high was taken, and axes out of range or targets=None raised
    bare IndexError/TypeError.'''
    model, images, targets = shipped
    inputs, labels = images.numpy(), targets.numpy()
    with pytest.raises(TypeError, match=r'^inputs has dtype torch\.uint8; explain_func takes the floating-point'):
        explain_func(model=model, inputs=(inputs * 255).astype(np.uint8), targets=labels)
    with pytest.raises(TypeError, match=r'^targets must be class indices, not booleans'):
        explain_func(model=model, inputs=inputs[:2], targets=np.array([True, False]))
    with pytest.raises(ValueError, match=r"^rules are Captum rules for composite='captum'"):
        explain_func(model=model, inputs=inputs, targets=labels, rules={'conv1': None})
    with pytest.raises(ValueError, match=r'^low must not be above high'):
        explain_func(model=model, inputs=inputs, targets=labels, composite='epsilon-gamma-box', low=1., high=0.)
    with pytest.raises(ValueError, match=r'^reduce_axes \(5,\) names an axis the inputs \(of 4 axes\) do not have'):
        explain_func(model=model, inputs=inputs, targets=labels, reduce_axes=(5,))
    with pytest.raises(ValueError, match=r'^explain_func needs targets'):
        explain_func(model=model, inputs=inputs, targets=None)
    assert explain_func(model=model, inputs=inputs, targets=labels, reduce_axes=1).shape == (4, 1, 28, 28)


def test_bounds_given_as_tensors_are_compared_by_value(shipped):
    # the cache compared its key with ==, which is ambiguous for tensors: the second call raised a RuntimeError
    model, images, targets = shipped
    calls = [explain_func(model=model, inputs=images.numpy(), targets=targets.numpy(), composite='epsilon-gamma-box',
                          low=torch.zeros(1, 1, 28, 28) + shift, high=np.ones((1, 1, 28, 28)))
             for shift in (0., 0., -1.)]
    np.testing.assert_array_equal(calls[0], calls[1])
    assert not np.array_equal(calls[0], calls[2])


def test_whole_float_and_column_targets_are_indices(shipped):
    model, images, targets = shipped
    expected = explain_func(model=model, inputs=images.numpy(), targets=targets.numpy())
    for form in (targets.numpy().astype(np.float32), targets.numpy()[:, None]):
        np.testing.assert_array_equal(explain_func(model=model, inputs=images.numpy(), targets=form), expected)
    # an empty batch with a column of targets (the shape check reads the shape, not a first example)
    empty = explain_func(model=model, inputs=images.numpy()[:0], targets=targets.numpy()[:0, None])
    assert empty.shape == (0, 1, 28, 28)


def test_unknown_keyword_is_named_in_a_warning(shipped):
    model, images, targets = shipped
    with pytest.warns(UserWarning, match=r'^explain_func ignores the keyword\(s\) composit; it takes composite, '):
        relevance = explain_func(model=model, inputs=images.numpy(), targets=targets.numpy(), composit='naive')
    np.testing.assert_array_equal(relevance, explain_func(model=model, inputs=images.numpy(), targets=targets.numpy()))


def test_quantus_faithfulness_metric_through_explain_func(shipped, snapshot):
    '''Quantus' RegionPerturbation gives the same scores through explain_func as on relevance computed beforehand.'''
    model, images, targets = shipped
    before = snapshot(model)
    kwargs = {'composite': 'epsilon-plus-flat', 'handling': 'fused'}
    metric = quantus.RegionPerturbation(patch_size=7, regions_evaluation=4, disable_warnings=True,
                                        display_progressbar=False)
    through = metric(model=model, x_batch=images.numpy(), y_batch=targets.numpy(), a_batch=None,
                     explain_func=explain_func, explain_func_kwargs=kwargs, device='cpu')
    relevance = explain_func(model=model, inputs=images.numpy(), targets=targets.numpy(), **kwargs)
    given = metric(model=model, x_batch=images.numpy(), y_batch=targets.numpy(), a_batch=relevance, device='cpu')
    assert np.isfinite(np.asarray(through)).all()
    np.testing.assert_allclose(np.asarray(through), np.asarray(given), rtol=1e-6)
    before.assert_unchanged()


def test_quantus_randomisation_metric_through_explain_func(shipped, snapshot):
    '''Quantus' MPRT randomises copies of the model layer by layer and explains each through explain_func; fused LRP
    heatmaps change once the weights are random (correlation with the original below 1), and the model itself is
    left unchanged.'''
    model, images, targets = shipped
    before = snapshot(model)
    metric = quantus.MPRT(seed=0, return_last_correlation=True, disable_warnings=True, display_progressbar=False)
    scores = metric(model=model, x_batch=images.numpy(), y_batch=targets.numpy(), a_batch=None,
                    explain_func=explain_func, explain_func_kwargs={'composite': 'epsilon-plus-flat'}, device='cpu')
    scores = np.asarray(scores, dtype=float)
    assert scores.shape == (4,) and np.isfinite(scores).all() and (scores < .9).all()
    before.assert_unchanged()


def test_rules_changed_in_place_are_used(shipped):
    from captum.attr._utils.lrp_rules import EpsilonRule, GammaRule
    model, images, targets = shipped
    inputs, labels = images.numpy(), targets.numpy()
    rules = {}
    plain = explain_func(model=model, inputs=inputs, targets=labels, composite='captum', rules=rules)
    rules[torch.nn.Conv2d] = GammaRule()
    gamma = explain_func(model=model, inputs=inputs, targets=labels, composite='captum', rules=rules)
    expected = FusedLRP(model, rules={torch.nn.Conv2d: GammaRule()}).attribute(images, target=targets)
    np.testing.assert_allclose(gamma, expected.sum(dim=1, keepdim=True).detach().numpy(), rtol=1e-5, atol=1e-7)
    assert not np.allclose(gamma, plain)
    rules[torch.nn.Conv2d] = EpsilonRule()
    np.testing.assert_allclose(
        explain_func(model=model, inputs=inputs, targets=labels, composite='captum', rules=rules), plain,
        rtol=1e-5, atol=1e-7)
