'''Tests for zennit_bnfuse.evaluation.randomisation: the cascading model-parameter randomisation check against Quantus'
MPRT on a shipped model, its rank correlation against scipy, and that it can fail a method.'''
import warnings

import numpy as np
import pytest
import quantus
import scipy.stats
import torch

from zennit_bnfuse import CompositeLRP
from zennit_bnfuse.evaluation.composites import make_composite
from zennit_bnfuse.evaluation.models import pretrained
from zennit_bnfuse.evaluation.randomisation import (
    average_ranks, cascading_randomisation, randomisation_layers, spearman,
)


def explain_lrp(model, inputs, targets):
    return CompositeLRP(model, make_composite('epsilon-plus-flat')).attribute(inputs, target=targets)


def mnist_case():
    model = pretrained('mnist-cnn-bn')
    inputs = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return model, inputs, torch.tensor([0, 3, 5, 7])


def test_layers_in_quantus_order():
    model, _, _ = mnist_case()
    assert randomisation_layers(model) == ['fc3', 'bn2', 'conv2', 'bn1', 'conv1']


def test_agrees_with_quantus_mprt(snapshot):
    # the same layers, seed convention and re-initialisation as quantus.MPRT(layer_order='top_down'); Quantus
    # compares a_batch as given (abs=False) or its absolute value (abs=True), without normalising
    model, inputs, targets = mnist_case()
    user = snapshot(model)
    ours = cascading_randomisation(model, explain_lrp, inputs, targets, seed=42, batch_size=3)
    user.assert_unchanged()

    def explain_numpy(model, inputs, targets, **kwargs):
        return explain_lrp(model, torch.as_tensor(inputs), torch.as_tensor(targets)).numpy()

    for use_abs, similarity in ((False, ours.spearman), (True, ours.spearman_abs)):
        metric = quantus.MPRT(layer_order='top_down', seed=42, abs=use_abs, normalise=False, disable_warnings=True)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            scores = metric(model=model, x_batch=inputs.numpy(), y_batch=targets.numpy(), a_batch=None,
                            explain_func=explain_numpy, device='cpu')
        assert list(scores)[1:] == ours.layers
        expected = np.array([scores[layer] for layer in ours.layers]).T
        # float32 relevance of two separate calls can differ in the last bits (summation order), which moves a rank
        # correlation by ~1e-7; a wrong layer order or seed moves it by ~0.1
        np.testing.assert_allclose(similarity.numpy(), expected, rtol=0, atol=1e-6)
    # the trained model's heatmaps are not kept: the correlation falls well below 1 once fc3 is random
    assert ours.spearman.shape == (4, 5) and ours.spearman.abs().max() < .9


def test_input_only_explanation_fails_the_check():
    # an "explanation" that ignores the model (the input itself) stays the same under randomisation
    model, inputs, targets = mnist_case()
    result = cascading_randomisation(model, lambda model, x, y: x * 1., inputs, targets)
    assert torch.equal(result.spearman, torch.ones(4, 5, dtype=torch.float64))


def test_deterministic_given_the_seed_and_keeps_global_random_state():
    model, inputs, targets = mnist_case()
    state = torch.random.get_rng_state()
    first = cascading_randomisation(model, explain_lrp, inputs[:2], targets[:2], layers=['fc3', 'conv2'], seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = cascading_randomisation(model, explain_lrp, inputs[:2], targets[:2], layers=['fc3', 'conv2'], seed=1)
    other = cascading_randomisation(model, explain_lrp, inputs[:2], targets[:2], layers=['fc3', 'conv2'], seed=2)
    assert torch.equal(first.spearman, again.spearman) and first.layers == ['fc3', 'conv2']
    assert not torch.equal(first.spearman, other.spearman)
    with pytest.raises(ValueError, match='cannot randomise `relu1`'):
        cascading_randomisation(model, explain_lrp, inputs, targets, layers=['relu1'])


def test_spearman_with_ties_against_scipy():
    generator = torch.Generator().manual_seed(3)
    first = torch.randint(0, 4, (5, 2, 3, 3), generator=generator).double()  # many ties
    second = first + torch.randint(0, 3, (5, 2, 3, 3), generator=generator)
    second[0] = -first[0]
    ours = spearman(first, second)
    for row in range(5):
        expected = scipy.stats.spearmanr(first[row].flatten(), second[row].flatten()).statistic
        assert ours[row].item() == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(average_ranks(first.flatten(1)).numpy(),
                               scipy.stats.rankdata(first.flatten(1).numpy(), axis=1))
    constant = spearman(torch.ones(1, 4), torch.arange(4.)[None])
    infinite = spearman(torch.tensor([[1., float('inf'), 2.]]), torch.arange(3.)[None])
    assert constant.isnan().all() and infinite.isnan().all()
