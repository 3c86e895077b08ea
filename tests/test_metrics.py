'''Tests for zennit_bnfuse.evaluation.metrics on hand-made cases with known curves, and against Quantus and scipy.

Every cross-check with Quantus uses relevance that differs per channel and asserts that ranking by one channel only
would fail it. Quantus' conventions that differ from ours: its "black" baseline is the per-image minimum, not 0; its
"mean" is the mean of the image; its blur is a 15 x 15 box; its ROAD takes one-channel attributions and draws fresh
noise per call; its Sparseness adds 1e-7 to |R|.
'''
import math

import numpy as np
import pytest
import quantus
import scipy.ndimage
import torch
from quantus.functions.perturb_func import noisy_linear_imputation as quantus_noisy_linear_imputation

from zennit_bnfuse.evaluation import metrics
from zennit_bnfuse.evaluation.metrics import (
    PerturbationResult, aopc, conservation_error, gaussian_blur, gini_index, image_noise, linear_imputation, mean_ci,
    noisy_linear_imputation, patch_relevance, perturbation_baseline, perturbation_curve, perturbation_masks,
    region_perturbation, relevance_entropy, relevance_gap, removal_counts, road, road_curve, road_masks, target_scores,
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


@pytest.mark.parametrize('curve', [perturbation_curve, road_curve])
def test_non_finite_relevance_and_mismatched_batches_are_refused(curve):
    # NaN relevance was ranked as if it were constant (ABPC 0), infinite relevance gave finite scores, and 2 targets
    # for 3 images gave 2 results
    images = torch.rand(3, 1, 4, 4)
    targets = torch.tensor([0, 1, 0])
    for value in (float('nan'), float('inf'), -float('inf')):
        relevance = torch.rand(3, 1, 4, 4)
        relevance[1, 0, 2, 3] = value
        with pytest.raises(ValueError, match=r'^the relevance of image\(s\) \[1\] holds NaN or infinite values'):
            curve(PixelSum(), images, relevance, targets)
    with pytest.raises(ValueError, match=r'^got 2 targets for 3 images; give one class per image'):
        curve(PixelSum(), images, images, targets[:2])
    with pytest.raises(ValueError, match=r'^relevance of shape \(2, 1, 4, 4\) does not fit inputs of shape '
                                         r'\(3, 1, 4, 4\)'):
        curve(PixelSum(), images, images[:2], targets)
    # a map without a channel axis (relevance.sum(1)) failed deep inside with a reshape or pooling error
    with pytest.raises(ValueError, match=r'^relevance of shape \(3, 4, 4\) does not fit .* with a channel axis'):
        curve(PixelSum(), images, images[:, 0], targets)
    # finite float32 values whose channel sum overflows
    relevance = torch.full((3, 3, 4, 4), 3e38)
    with pytest.raises(ValueError, match=r'values whose sums over channels \(and patches\) overflow in its dtype'):
        curve(PixelSum(), images.expand(3, 3, 4, 4), relevance, targets)


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
    # NaN where the output is 0, as relevance_gap (a huge finite number skewed means and maxima)
    assert conservation_error(relevance, torch.tensor([0., -4.]))[0].isnan()


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


# ---- replacement values --------------------------------------------------------------------------------------------

def test_constant_and_mean_baselines():
    inputs = torch.rand(2, 3, 4, 4)
    assert torch.equal(perturbation_baseline(inputs, 'zero'), torch.zeros(1, 1, 1, 1))
    assert torch.equal(perturbation_baseline(inputs, .25), torch.full((1, 1, 1, 1), .25))
    # NumPy scalars and one-element tensors were refused as unknown baselines
    for value in (np.float32(.25), np.int64(2), torch.tensor(.25)):
        assert torch.equal(perturbation_baseline(inputs, value), torch.full((1, 1, 1, 1), float(value)))
    mean = perturbation_baseline(inputs, 'mean', channel_mean=(.1, .2, .3))
    assert torch.equal(mean, torch.tensor([.1, .2, .3]).reshape(1, 3, 1, 1))


def test_blur_baseline_equals_scipy_gaussian_filter():
    # scipy's 'mirror' mode is torch's reflection padding (d c b | a b c d); the kernel reaches 3 sigma
    inputs = torch.rand(2, 3, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sigma in (.7, 2.):
        blurred = perturbation_baseline(inputs, 'blur', blur_sigma=sigma)
        radius = math.ceil(3 * sigma)
        expected = scipy.ndimage.gaussian_filter(inputs.numpy(), sigma=(0, 0, sigma, sigma), mode='mirror',
                                                 truncate=radius / sigma)
        np.testing.assert_allclose(blurred.numpy(), expected, rtol=0, atol=1e-12)
    constant = torch.full((1, 2, 8, 8), .3, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(constant, 1.), constant, rtol=0, atol=1e-15)


def test_baseline_errors():
    inputs = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match='needs channel_mean'):
        perturbation_baseline(inputs, 'mean')
    with pytest.raises(ValueError, match='channel_mean has 1 values but the inputs have 3 channels'):
        perturbation_baseline(inputs, 'mean', channel_mean=[.5])
    with pytest.raises(ValueError, match='blur_sigma must be positive'):
        perturbation_baseline(inputs, 'blur', blur_sigma=0)
    with pytest.raises(ValueError, match='kernel radius of 9 pixels'):
        perturbation_baseline(inputs, 'blur', blur_sigma=3)
    with pytest.raises(ValueError, match='one of .*zero'):
        perturbation_baseline(inputs, 'black')
    with pytest.raises(ValueError, match='got 2 seeds for 1 images'):
        perturbation_baseline(inputs, 'noise', seeds=[1, 2])


def per_channel_case(channels=3, size=8):
    '''A tiny CNN and relevance that differs per channel, so that ranking by one channel gives other curves (float32:
    Quantus casts inputs to float32).'''
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(channels, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(4 * (size // 2) ** 2, 3)).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.rand(4, channels, size, size, generator=generator)
    relevance = torch.randn(4, channels, size, size, generator=generator)
    targets = torch.tensor([0, 2, 1, 0])
    return model, inputs, relevance, targets


def replace_by(values):
    '''A Quantus perturb_func that writes ``values`` (N, F) at the indices Quantus chose.'''
    def perturb(arr, indices, **kwargs):
        rows = np.arange(len(arr))[:, None]
        arr = arr.copy()
        arr[rows, indices] = values[rows, indices]
        return arr
    return perturb


@pytest.mark.parametrize('baseline', ['zero', 'mean', 'blur', 'noise'])
@pytest.mark.parametrize('order', ['morf', 'lerf'])
def test_region_perturbation_agrees_with_quantus_per_channel(baseline, order):
    # Quantus ranks patches by the relevance summed over the patch and all channels, as we do; our values replace the
    # removed pixels inside Quantus' own loop (its "black" would be the per-image minimum, its "mean" the image mean)
    model, inputs, relevance, targets = per_channel_case()
    options = dict(channel_mean=(.2, .5, .7), blur_sigma=1., seeds=[5, 6, 7, 8])
    values = perturbation_baseline(inputs, baseline, **options).expand_as(inputs).reshape(len(inputs), -1).numpy()
    metric = quantus.RegionPerturbation(patch_size=2, regions_evaluation=8, order=order,
                                        perturb_func=replace_by(values), disable_warnings=True)
    drops = np.array(metric(model=model, x_batch=inputs.numpy(), y_batch=targets.numpy(), a_batch=relevance.numpy(),
                            device='cpu', softmax=False, channel_first=True))
    curve = perturbation_curve(model, inputs, relevance, targets, order=order, patch_size=2, steps=8,
                               baseline=baseline, **options)
    np.testing.assert_allclose(drops, (curve[:, :1] - curve[:, 1:]).numpy(), rtol=0, atol=1e-6)
    # the check can fail: ranking by the first channel only gives other curves
    one_channel = relevance[:, :1].expand_as(relevance)
    wrong = perturbation_curve(model, inputs, one_channel, targets, order=order, patch_size=2, steps=8,
                               baseline=baseline, **options)
    assert np.abs(drops - (wrong[:, :1] - wrong[:, 1:]).numpy()).max() > 1e-2


# ---- ROAD ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('share', [.05, .5, .95, .995])
def test_linear_imputation_equals_quantus(share):
    generator = torch.Generator().manual_seed(2)
    inputs = torch.rand(3, 3, 9, 7, dtype=torch.float64, generator=generator)
    removed = torch.rand(3, 1, 9, 7, generator=generator) < share
    removed[:, 0, 4, 3] = False  # at least one kept pixel per image
    ours = linear_imputation(inputs, removed)
    for image, mask in zip(range(3), removed):
        indices = np.flatnonzero(mask.numpy().ravel())
        expected = quantus_noisy_linear_imputation(inputs[image].numpy(), indices, noise=0.)
        np.testing.assert_allclose(ours[image].numpy(), expected, rtol=0, atol=1e-12)
    assert torch.equal(ours[~removed.expand_as(inputs)], inputs[~removed.expand_as(inputs)])


def test_imputation_chunks_and_dtype(monkeypatch):
    generator = torch.Generator().manual_seed(4)
    inputs = torch.rand(5, 2, 6, 5, generator=generator)
    removed = torch.rand(5, 1, 6, 5, generator=generator) < .6
    removed[:, 0, 0, 0] = False
    removed[3] = False  # nothing to impute in image 3
    whole = linear_imputation(inputs, removed)
    monkeypatch.setattr(metrics, 'IMPUTATION_CHUNK', 2)
    assert torch.equal(linear_imputation(inputs, removed), whole)
    assert whole.dtype == torch.float32 and torch.equal(whole[3], inputs[3])


def test_imputation_of_constant_image_and_noise():
    inputs = torch.full((2, 3, 6, 6), .4, dtype=torch.float64)
    removed = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    removed[:, :, 1:4, 2:5] = True
    torch.testing.assert_close(linear_imputation(inputs, removed), inputs, rtol=0, atol=1e-15)
    noisy = noisy_linear_imputation(inputs, removed, noise=.1, seeds=[3, 4])
    changed = noisy != inputs
    assert torch.equal(changed, removed.expand_as(inputs))
    # the noise of an image comes from its seed alone
    alone = noisy_linear_imputation(inputs[1:], removed[1:], noise=.1, seeds=[4])
    assert torch.equal(alone, noisy[1:])
    assert .05 < (noisy - inputs)[changed].std() < .2
    # independent of the replacement noise of the same image seeds
    uniform = perturbation_baseline(inputs, 'noise', seeds=[3, 4])
    correlation = torch.corrcoef(torch.stack([uniform[changed], (noisy - inputs)[changed]]))[0, 1]
    assert abs(correlation) < .2
    with pytest.raises(ValueError, match='stream must be within'):
        image_noise(inputs, stream=256)


def test_road_masks_counts_and_errors():
    relevance = torch.arange(16.).reshape(1, 1, 4, 4)
    masks = road_masks(relevance, 'morf', (25, 50))
    assert masks.shape == (1, 3, 1, 4, 4)
    assert masks[0, :, 0].flatten(start_dim=1).sum(dim=1).tolist() == [0, 4, 8]
    assert masks[0, 1, 0].flatten()[-4:].all()  # the 4 largest
    assert masks[0, 1, 0].flatten().tolist() == road_masks(-relevance, 'lerf', (25, 50))[0, 1, 0].flatten().tolist()
    assert removal_counts(1024, (10, 30)).tolist() == [0, 102, 307]
    for bad in ((0, 10), (10, 100), (20, 10), ()):
        with pytest.raises(ValueError, match='strictly increasing and within'):
            road_masks(relevance, 'morf', bad)
    with pytest.raises(ValueError, match='nothing to impute it from'):
        linear_imputation(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2, dtype=torch.bool))


class Recording:
    '''Quantus' noisy_linear_imputation, recording each perturbed image.'''
    def __init__(self):
        self.images = []

    def __call__(self, arr, indices, **kwargs):
        result = quantus_noisy_linear_imputation(arr, indices, **kwargs)
        self.images.append(result)
        return result


@pytest.mark.parametrize('order', ['morf', 'lerf'])
def test_road_agrees_with_quantus_one_channel(order):
    # end to end through Quantus' ROAD, which works on one-channel inputs only (for C > 1 it broadcasts the
    # attribution over the channels, ranks C*H*W entries and indexes the H*W pixels: IndexError); it ranks MoRF only,
    # so LeRF gets the negated relevance; noise 0 on both sides (Quantus draws fresh noise per call)
    model, inputs, relevance, targets = per_channel_case(channels=1)
    percentages = [10, 35, 60, 85]
    recording = Recording()
    metric = quantus.ROAD(percentages=percentages, noise=0., perturb_func=recording, normalise=False,
                          disable_warnings=True)
    metric(model=model, x_batch=inputs.numpy(), y_batch=targets.numpy(),
           a_batch=(relevance if order == 'morf' else -relevance).numpy(), device='cpu', channel_first=True)
    quantus_images = np.stack(recording.images).reshape(len(percentages), len(inputs), *inputs.shape[1:])
    masks = road_masks(relevance, order, percentages)
    ours = torch.stack([noisy_linear_imputation(inputs, masks[:, step], noise=0.)
                        for step in range(1, len(percentages) + 1)])
    np.testing.assert_allclose(ours.numpy(), quantus_images, rtol=0, atol=1e-6)
    correct = road_curve(model, inputs, relevance, targets, order, percentages, noise=0., output='correct')
    # Quantus' accuracy over the images at each percentage
    expected = np.array(list(metric.evaluation_scores.values()))
    np.testing.assert_allclose(correct[:, 1:].mean(dim=0).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize('order', ['morf', 'lerf'])
def test_road_agrees_with_quantus_per_channel(order):
    # three channels: the pixels Quantus' ROAD would remove from the channel-summed relevance (its ranking,
    # argsort(-a)[:int(H * W * p / 100)]), filled by Quantus' own noisy_linear_imputation
    _, inputs, relevance, _ = per_channel_case()
    percentages = [10, 35, 60, 85]
    summed = relevance.sum(dim=1).flatten(start_dim=1).numpy()
    masks = road_masks(relevance, order, percentages)
    for step, percentage in enumerate(percentages, start=1):
        ours = noisy_linear_imputation(inputs, masks[:, step], noise=0.)
        for image in range(len(inputs)):
            ranking = np.argsort(-summed[image] if order == 'morf' else summed[image])
            removed = ranking[:int(summed.shape[1] * percentage / 100)]
            expected = quantus_noisy_linear_imputation(inputs[image].numpy(), removed, noise=0.)
            np.testing.assert_allclose(ours[image].numpy(), expected, rtol=0, atol=1e-6)
    wrong = road_masks(relevance[:, :1].expand_as(relevance), order, percentages)
    assert (wrong != masks).sum() > 20


def test_road_result_and_batching():
    model, inputs, relevance, targets = per_channel_case()
    result = road(model, inputs, relevance, targets, percentages=(20, 50, 80), noise=.01, seeds=[1, 2, 3, 4],
                  batch_size=5)
    assert result.morf.shape == result.lerf.shape == (4, 4)
    torch.testing.assert_close(result.removed, torch.tensor([0, 12, 32, 51]) / 64)
    torch.testing.assert_close(result.morf[:, 0], target_scores(model, inputs, targets))
    again = road_curve(model, inputs[2:], relevance[2:], targets[2:], 'lerf', (20, 50, 80), noise=.01, seeds=[3, 4],
                       batch_size=64)
    torch.testing.assert_close(again, result.lerf[2:], rtol=0, atol=1e-6)
    torch.testing.assert_close(result.abpc, (result.lerf - result.morf).mean(dim=1))


# ---- complexity and conservation ------------------------------------------------------------------------------------

def test_gini_and_entropy_by_hand():
    one_hot = torch.zeros(1, 2, 2, 2)
    one_hot[0, 1, 0, 1] = -3.
    uniform = torch.full((1, 2, 2, 2), -.5)
    cases = torch.cat([one_hot, uniform, torch.zeros(1, 2, 2, 2)])
    gini = gini_index(cases)
    torch.testing.assert_close(gini[:2], torch.tensor([1 - 1 / 8, 0.]))
    entropy = relevance_entropy(cases)
    torch.testing.assert_close(entropy[:2], torch.tensor([0., math.log(8)]))
    assert gini[2].isnan() and entropy[2].isnan()
    # two values 1 and 3: G = ((2 - 2 - 1) 1 + (4 - 2 - 1) 3) / (2 * 4) = 1/4
    torch.testing.assert_close(gini_index(torch.tensor([[3., -1.]])), torch.tensor([.25]))


def test_gini_and_entropy_agree_with_quantus_per_channel():
    # Quantus adds 1e-7 to |R| (Sparseness) and 1e-12 inside the log (Complexity); relevance of order 1e3 makes that
    # negligible at the tolerance
    _, inputs, relevance, _ = per_channel_case()
    relevance = relevance.double() * 1e3
    sparseness = quantus.Sparseness(normalise=False, disable_warnings=True)
    complexity = quantus.Complexity(normalise=False, disable_warnings=True)
    arguments = dict(model=None, x_batch=inputs.numpy(), y_batch=np.zeros(4, dtype=int),
                     a_batch=relevance.numpy().copy(), channel_first=True)
    np.testing.assert_allclose(gini_index(relevance).numpy(), sparseness(**arguments), rtol=1e-8)
    arguments['a_batch'] = relevance.numpy().copy()
    np.testing.assert_allclose(relevance_entropy(relevance).numpy(), complexity(**arguments), rtol=1e-8)
    one_channel = relevance[:, :1].expand_as(relevance)
    assert np.abs(gini_index(one_channel).numpy() - gini_index(relevance).numpy()).max() > 1e-3


def test_relevance_gap_and_correct_output():
    relevance = torch.tensor([[1., 2.], [3., -1.], [1., 1.]])
    gap = relevance_gap(relevance, torch.tensor([4., -4., 0.]))
    torch.testing.assert_close(gap[:2], torch.tensor([.25, 1.5]))
    assert gap[2].isnan()
    correct = target_scores(PixelSum(), torch.tensor([[1.], [-1.]]), torch.tensor([0, 0]), 'correct')
    assert torch.equal(correct, torch.tensor([1., 0.]))
    with pytest.raises(ValueError, match='output must be one of'):
        target_scores(PixelSum(), torch.zeros(1, 1), torch.tensor([0]), 'accuracy')
