'''Tests for zennit_bnfuse.evaluation.metrics on hand-made cases with known curves, and against Quantus.'''
import numpy as np
import pytest
import quantus
import torch

from zennit_bnfuse.evaluation.metrics import (
    PerturbationResult, aopc, conservation_error, mean_ci, patch_relevance, perturbation_baseline,
    perturbation_curve, perturbation_masks, region_perturbation,
)


class PixelSum(torch.nn.Module):
    '''Two "classes": the sum of all pixels, and minus that sum.'''
    def forward(self, input):
        total = input.flatten(start_dim=1).sum(dim=1)
        return torch.stack([total, -total], dim=1)


def test_pixel_flipping_known_curve():
    # one 1x2x2 image with pixels 4, 1, 3, 2 and relevance equal to the pixels
    image = torch.tensor([[[[4., 1.], [3., 2.]]]])
    targets = torch.tensor([0])
    morf = perturbation_curve(PixelSum(), image, image, targets, order='morf')
    lerf = perturbation_curve(PixelSum(), image, image, targets, order='lerf')
    assert torch.equal(morf, torch.tensor([[10., 6., 3., 1., 0.]]))
    assert torch.equal(lerf, torch.tensor([[10., 9., 7., 4., 0.]]))
    result = PerturbationResult(morf, lerf)
    assert torch.equal(result.aopc_morf, torch.tensor([(0 + 4 + 7 + 9 + 10) / 5.]))
    assert torch.equal(result.aopc_lerf, torch.tensor([(0 + 1 + 3 + 6 + 10) / 5.]))
    assert torch.equal(result.abpc, torch.tensor([(0 + 3 + 4 + 3 + 0) / 5.]))


def test_patches_steps_baseline_and_probability():
    # 2x4 image of ones in 2x2 patches with relevance 1, 3 (left, right); baseline 0.5, two channels
    image = torch.ones(1, 2, 2, 4)
    relevance = torch.cat([torch.ones(1, 2, 2, 2), 3 * torch.ones(1, 2, 2, 2)], dim=3)
    assert torch.equal(patch_relevance(relevance, 2), torch.tensor([[8., 24.]]))
    curve = perturbation_curve(PixelSum(), image, relevance, torch.tensor([0]), patch_size=2, baseline=.5)
    assert torch.equal(curve, torch.tensor([[16., 12., 8.]]))
    probability = perturbation_curve(PixelSum(), image, relevance, torch.tensor([1]), patch_size=2, baseline=.5,
                                     output='probability', steps=1)
    torch.testing.assert_close(probability, torch.sigmoid(-2 * torch.tensor([[16., 12.]])))


def test_masks_shape_patches_per_step_and_stable_ties():
    relevance = torch.zeros(3, 1, 4, 4)
    masks = perturbation_masks(relevance, patch_size=2, patches_per_step=3)
    assert masks.shape == (3, 3, 1, 4, 4)
    # ties keep row-major order: step 1 removes patches 0, 1, 2 (top-left, top-right, bottom-left)
    expected = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(masks[0, 1, 0], expected) and masks[0, 2].all() and not masks[0, 0].any()


def test_errors():
    with pytest.raises(ValueError, match='multiple of the patch size 3'):
        patch_relevance(torch.zeros(1, 1, 4, 4), 3)
    with pytest.raises(ValueError, match='order'):
        perturbation_masks(torch.zeros(1, 1, 2, 2), order='random')
    with pytest.raises(ValueError, match='baseline'):
        perturbation_baseline(torch.zeros(1, 1, 2, 2), baseline='mean')


def test_noise_baseline_fixed_per_image_seed():
    inputs = torch.zeros(4, 3, 2, 2)
    whole = perturbation_baseline(inputs, 'noise', noise_range=(-1., 1.), seeds=[10, 11, 12, 13])
    part = perturbation_baseline(inputs[2:], 'noise', noise_range=(-1., 1.), seeds=[12, 13])
    assert torch.equal(whole[2:], part)
    assert whole.min() >= -1 and whole.max() <= 1 and not torch.equal(whole[0], whole[1])


def test_curves_independent_of_chunking():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5)).eval()
    inputs, relevance = torch.rand(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    targets = torch.tensor([0, 1, 2, 3, 4])
    big = region_perturbation(model, inputs, relevance, targets, patch_size=2, baseline='noise', batch_size=1000)
    small = region_perturbation(model, inputs, relevance, targets, patch_size=2, baseline='noise', batch_size=7)
    torch.testing.assert_close(big.morf, small.morf)
    torch.testing.assert_close(big.lerf, small.lerf)


def test_aopc_and_conservation():
    curve = torch.tensor([[2., 1., 0.], [1., 1., 1.]])
    assert torch.equal(aopc(curve), torch.tensor([1., 0.]))
    relevance = torch.tensor([[1., 2.], [3., -1.]])
    assert torch.equal(conservation_error(relevance, torch.tensor([3., -4.])), torch.tensor([0., 1.5]))


def test_mean_ci():
    mean, half = mean_ci(torch.tensor([1., 2., 3., 4.]))
    assert mean == 2.5
    assert half == pytest.approx(1.959964 * np.std([1, 2, 3, 4], ddof=1) / 2, rel=1e-5)


def quantus_case(channels=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(channels, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)).eval()
    inputs = torch.rand(4, channels, 8, 8)
    relevance = torch.randn(4, 1, 8, 8).expand(4, channels, 8, 8).contiguous()
    targets = torch.tensor([0, 2, 1, 0])
    return model, inputs, relevance, targets


def test_pixel_flipping_agrees_with_quantus():
    # single-channel images (as MNIST): Quantus flips features_in_step pixels per step
    model, inputs, relevance, targets = quantus_case(channels=1)
    metric = quantus.PixelFlipping(features_in_step=2, perturb_baseline=0., disable_warnings=True)
    scores = metric(model=model, x_batch=inputs.numpy(), y_batch=targets.numpy(),
                    a_batch=relevance.numpy(), device='cpu', softmax=False, channel_first=True)
    ours = perturbation_curve(model, inputs, relevance, targets, order='morf', patch_size=1, patches_per_step=2,
                              baseline=0.)
    np.testing.assert_allclose(np.array(scores), ours[:, 1:].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('order', ['morf', 'lerf'])
def test_region_perturbation_agrees_with_quantus(order):
    model, inputs, relevance, targets = quantus_case()
    metric = quantus.RegionPerturbation(patch_size=2, regions_evaluation=10, order=order, perturb_baseline=0.,
                                        disable_warnings=True)
    drops = metric(model=model, x_batch=inputs.numpy(), y_batch=targets.numpy(), a_batch=relevance.numpy(),
                   device='cpu', softmax=True, channel_first=True)
    curve = perturbation_curve(model, inputs, relevance, targets, order=order, patch_size=2, steps=10,
                               output='probability')
    np.testing.assert_allclose(np.array(drops), (curve[:, :1] - curve[:, 1:]).numpy(), rtol=1e-5, atol=1e-6)
