'''Faithfulness and complexity metrics for attributions, per example.

- Region perturbation (pixel flipping for 1-pixel patches; Samek et al. 2017): MoRF/LeRF curves, AOPC and the area
  between the curves (ABPC), with removed pixels replaced by 0, the per-channel dataset mean, a Gaussian blur of the
  image itself or uniform noise fixed per image (:py:func:`perturbation_baseline`).
- ROAD (Rong et al. 2022, *A Consistent and Efficient Evaluation Strategy for Attribution Methods*): removed pixels
  are filled by noisy linear imputation from their neighbours (:py:func:`noisy_linear_imputation`), MoRF and LeRF
  curves over a declared list of removal percentages.
- Complexity: the Gini index of ``|R|`` (:py:func:`gini_index`, Quantus' ``Sparseness``) and the entropy of the
  fractional contributions (:py:func:`relevance_entropy`, Quantus' ``Complexity``).
- Conservation: :py:func:`conservation_error` and the share of the explained output that does not arrive at the
  input (:py:func:`relevance_gap`).

Pixels and patches are ranked by the relevance summed over channels. All functions work on batches and on any device;
the perturbed inputs of all steps are evaluated as batches of ``batch_size``. The model's cascading parameter
randomisation lives in :py:mod:`zennit_bnfuse.evaluation.randomisation`, paired statistics in
:py:mod:`zennit_bnfuse.evaluation.statistics`.
'''
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur as torchvision_gaussian_blur
from tqdm.auto import tqdm


ORDERS = ('morf', 'lerf')
BASELINES = ('zero', 'mean', 'blur', 'noise')
OUTPUTS = ('logit', 'probability', 'correct')
# standard deviation (pixels) of the 'blur' replacement; the kernel reaches 3 standard deviations to each side
BLUR_SIGMA = 2.
# removal percentages of ROAD curves unless others are declared
ROAD_PERCENTAGES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
# the noise streams of image_noise this module draws from
NOISE_STREAMS = {'replacement': 0, 'imputation': 1}
# noisy linear imputation (Rong et al. 2022; Quantus' noisy_linear_imputation): the weight of each of the 8
# neighbours of a pixel, 1/6 for the 4 direct and 1/12 for the 4 diagonal ones
NEIGHBOUR_WEIGHTS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0., 1 / 6), (1 / 12, 1 / 6, 1 / 12))
# images whose imputation systems are solved at once (small enough to stay in the CPU caches)
IMPUTATION_CHUNK = 128


def patch_relevance(relevance, patch_size):
    '''Sum relevance over channels and non-overlapping ``patch_size`` x ``patch_size`` patches.

    Parameters
    ----------
    relevance: :py:obj:`torch.Tensor`
        Shape ``(N, C, H, W)``; ``H`` and ``W`` must be multiples of ``patch_size``.
    patch_size: int

    Returns
    -------
    :py:obj:`torch.Tensor`
        Shape ``(N, H // patch_size * W // patch_size)``, patches in row-major order.

    Raises
    ------
    ValueError
        If the image size is not a multiple of ``patch_size``.
    '''
    height, width = relevance.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f'image size {height}x{width} is not a multiple of the patch size {patch_size}')
    summed = F.avg_pool2d(relevance.sum(dim=1, keepdim=True), patch_size) * patch_size ** 2
    return summed.flatten(start_dim=1)


def ranked_masks(scores, counts, order='morf'):
    '''Which units (pixels or patches) are removed after each step, the most (MoRF) or least (LeRF) relevant first.

    Ties keep the units' order (a stable sort), so equal scores are removed in row-major order.

    Parameters
    ----------
    scores: :py:obj:`torch.Tensor`
        ``(N, P)``: one relevance score per unit.
    counts: :py:obj:`torch.Tensor`
        ``(K,)``: how many units are removed at each step.
    order: str
        ``'morf'`` or ``'lerf'``.

    Returns
    -------
    :py:obj:`torch.Tensor`
        Boolean ``(N, K, P)``.

    Raises
    ------
    ValueError
        If ``order`` is neither ``'morf'`` nor ``'lerf'``, or a score is not finite (NaN or infinite relevance has
        no ranking: the metric would score an arbitrary order).
    '''
    if order not in ORDERS:
        raise ValueError(f'order must be one of {ORDERS}, not {order!r}')
    finite = torch.isfinite(scores).all(dim=1)
    if not bool(finite.all()):
        images = (~finite).nonzero().flatten().tolist()
        raise ValueError(f'the relevance of image(s) {images} holds NaN or infinite values, or values whose sums over '
                         'channels (and patches) overflow in its dtype, which have no ranking; fix the explanation (a '
                         'model or rule that overflows?), or pass it in float64, before scoring it')
    count, units = scores.shape
    ranking = scores.argsort(dim=1, descending=(order == 'morf'), stable=True)
    rank = torch.empty_like(ranking)
    rank.scatter_(1, ranking, torch.arange(units, device=scores.device).expand(count, units))
    return rank[:, None, :] < counts.to(scores.device)[None, :, None]


def perturbation_masks(relevance, order='morf', patch_size=1, patches_per_step=1, steps=None):
    '''Which pixels are perturbed after each step, most (MoRF) or least (LeRF) relevant patches first.

    Parameters
    ----------
    relevance: :py:obj:`torch.Tensor`
        ``(N, C, H, W)``; patches are ranked by their relevance summed over channels and pixels.
    order: str
        ``'morf'`` or ``'lerf'``.
    patch_size, patches_per_step: int
        Patch side length, and patches removed per step.
    steps: int, optional
        Number of steps; default: until every patch is removed.

    Returns
    -------
    :py:obj:`torch.Tensor`
        Boolean ``(N, steps + 1, 1, H, W)``; step 0 perturbs nothing.
    '''
    scores = patch_relevance(relevance, patch_size)
    patches = scores.shape[1]
    steps = math.ceil(patches / patches_per_step) if steps is None else steps
    masks = ranked_masks(scores, torch.arange(steps + 1) * patches_per_step, order)
    height, width = relevance.shape[-2:]
    masks = masks.reshape(len(scores), steps + 1, 1, height // patch_size, width // patch_size)
    return masks.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)


def image_noise(inputs, seeds=None, distribution='uniform', stream=0):
    '''Noise of the shape of ``inputs``, drawn per image from its own seed.

    An image gets the same noise however the data is batched or sharded, on every device (drawn on the CPU). Each
    use draws from its own ``stream`` of the image's seed (generator seed ``seed * 256 + stream``), so noise for
    different purposes is independent even with the same image seeds: :py:data:`NOISE_STREAMS` lists the streams
    this module uses (the replacement values of ``'noise'``, ROAD's imputation noise); others are free, e.g. for
    random heatmaps.

    Parameters
    ----------
    inputs: :py:obj:`torch.Tensor`
        ``(N, ...)``: gives shape, dtype and device.
    seeds: sequence of int, optional
        One non-negative seed per image; default ``0 .. N - 1``.
    distribution: str
        ``'uniform'`` (on [0, 1)) or ``'normal'`` (standard).
    stream: int
        0 .. 255.

    Returns
    -------
    :py:obj:`torch.Tensor`
        Shape, dtype and device of ``inputs``.

    Raises
    ------
    ValueError
        If the number of seeds is not the number of images, or ``stream`` or ``distribution`` is invalid.
    '''
    seeds = range(len(inputs)) if seeds is None else seeds
    if len(seeds) != len(inputs):
        raise ValueError(f'got {len(seeds)} seeds for {len(inputs)} images; pass one seed per image')
    if not 0 <= stream < 256:
        raise ValueError(f'stream must be within 0 .. 255, not {stream}')
    if distribution not in ('uniform', 'normal'):
        raise ValueError(f'distribution must be \'uniform\' or \'normal\', not {distribution!r}')
    draw = torch.rand if distribution == 'uniform' else torch.randn
    noise = torch.stack([
        draw(inputs.shape[1:], generator=torch.Generator().manual_seed(int(seed) * 256 + stream), dtype=inputs.dtype)
        for seed in seeds
    ])
    return noise.to(inputs.device)


def gaussian_blur(inputs, sigma=BLUR_SIGMA):
    '''Each image blurred by a Gaussian of standard deviation ``sigma`` pixels, channel by channel.

    The kernel has ``2 * ceil(3 * sigma) + 1`` taps per axis and sums to 1; the image is extended by reflection at its
    border (``d c b | a b c d``, scipy's ``mode='mirror'``), so a constant image stays constant. Quantus' ``blur``
    replacement (``baseline_replacement_by_blur``) differs: it averages a 15 x 15 box.

    Parameters
    ----------
    inputs: :py:obj:`torch.Tensor`
        ``(N, C, H, W)``.
    sigma: float
        Standard deviation in pixels, > 0.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N, C, H, W)``.

    Raises
    ------
    ValueError
        If ``sigma`` is not positive or the kernel's radius is not smaller than the image.
    '''
    if not sigma > 0:
        raise ValueError(f'blur_sigma must be positive, not {sigma!r}')
    radius = math.ceil(3 * sigma)
    if radius >= min(inputs.shape[-2:]):
        raise ValueError(f'blur_sigma {sigma} needs a kernel radius of {radius} pixels, which reflection padding '
                         f'cannot give an image of {inputs.shape[-2]}x{inputs.shape[-1]}; use a smaller blur_sigma')
    return torchvision_gaussian_blur(inputs, [2 * radius + 1] * 2, [float(sigma)] * 2)


def perturbation_baseline(inputs, baseline='zero', channel_mean=None, blur_sigma=BLUR_SIGMA, noise_range=(0., 1.),
                          seeds=None):
    '''The values that replace perturbed pixels.

    - ``'zero'`` (or any number): that constant. Quantus' ``"black"`` is the per-image minimum, not 0.
    - ``'mean'``: the per-channel dataset mean ``channel_mean`` (in the model's input space). Quantus' ``"mean"`` is
      the mean of each image over all its channels and pixels.
    - ``'blur'``: the image itself blurred by a Gaussian of ``blur_sigma`` pixels (:py:func:`gaussian_blur`).
    - ``'noise'``: uniform noise in ``noise_range``, fixed per image by its seed (:py:func:`image_noise`).

    Parameters
    ----------
    inputs: :py:obj:`torch.Tensor`
        ``(N, C, H, W)``.
    baseline: str or float
        One of :py:data:`BASELINES`, or a constant.
    channel_mean: sequence of float or :py:obj:`torch.Tensor`, optional
        ``C`` values; needed for ``'mean'``.
    blur_sigma: float
        For ``'blur'``.
    noise_range: tuple[float, float]
        For ``'noise'``.
    seeds: sequence of int, optional
        For ``'noise'``: one seed per image, so an image gets the same noise however the data is batched or sharded;
        default ``0 .. N - 1``.

    Returns
    -------
    :py:obj:`torch.Tensor`
        Broadcastable against ``inputs``: ``(1, 1, 1, 1)`` for a constant, ``(1, C, 1, 1)`` for ``'mean'``,
        ``(N, C, H, W)`` otherwise.

    Raises
    ------
    ValueError
        If ``baseline`` is unknown, or ``channel_mean`` is missing or has the wrong length for ``'mean'``.
    '''
    if isinstance(baseline, torch.Tensor) and baseline.numel() == 1:
        baseline = baseline.item()
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool) or baseline == 'zero':
        value = 0. if isinstance(baseline, str) else float(baseline)
        return torch.full((1,) * inputs.ndim, value, dtype=inputs.dtype, device=inputs.device)
    if baseline == 'mean':
        if channel_mean is None:
            raise ValueError('the \'mean\' baseline needs channel_mean, the per-channel dataset mean of the inputs '
                             '(e.g. zennit_bnfuse.evaluation.models.DATASET_STATS[dataset][0])')
        mean = torch.as_tensor(channel_mean, dtype=inputs.dtype, device=inputs.device).flatten()
        if mean.numel() != inputs.shape[1]:
            raise ValueError(f'channel_mean has {mean.numel()} values but the inputs have {inputs.shape[1]} channels')
        return mean.reshape(1, -1, *(1,) * (inputs.ndim - 2))
    if baseline == 'blur':
        return gaussian_blur(inputs, blur_sigma)
    if baseline == 'noise':
        low, high = noise_range
        return image_noise(inputs, seeds, 'uniform', NOISE_STREAMS['replacement']) * (high - low) + low
    raise ValueError(f'baseline must be a number or one of {BASELINES}, not {baseline!r}')


def target_scores(model, inputs, targets, output='logit'):
    '''The model's score for each example's target class.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
    inputs: :py:obj:`torch.Tensor`
        ``(N, ...)``.
    targets: :py:obj:`torch.Tensor`
        ``(N,)`` class indices.
    output: str
        ``'logit'``, ``'probability'`` (softmax) or ``'correct'`` (1 where the target is the top class, else 0; ROAD's
        accuracy curves).

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N,)``.
    '''
    if output not in OUTPUTS:
        raise ValueError(f'output must be one of {OUTPUTS}, not {output!r}')
    with torch.no_grad():
        logits = model(inputs)
    if output == 'correct':
        return (logits.argmax(dim=1) == targets).to(logits.dtype)
    if output == 'probability':
        logits = logits.softmax(dim=1)
    return logits.gather(1, targets[:, None])[:, 0]


def curve_scores(model, targets, points, perturbed, output='logit', batch_size=512, progress=False):
    '''The target score of every (image, step) pair of perturbed inputs, evaluated in batches.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
    targets: :py:obj:`torch.Tensor`
        ``(N,)``.
    points: int
        Steps per image (``K + 1``, step 0 included).
    perturbed: callable
        ``perturbed(image, step)`` with two ``(B,)`` index tensors returns the ``B`` perturbed inputs.
    output, batch_size:
        See :py:func:`target_scores`; ``batch_size`` perturbed inputs per forward pass.
    progress: bool
        Show a progress bar.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N, K + 1)``.
    '''
    count = len(targets)
    image = torch.arange(count, device=targets.device).repeat_interleave(points)
    step = torch.arange(points, device=targets.device).repeat(count)
    scores = []
    for start in tqdm(range(0, count * points, batch_size), desc='perturbing', disable=not progress, leave=False):
        index, at = image[start:start + batch_size], step[start:start + batch_size]
        scores.append(target_scores(model, perturbed(index, at), targets[index], output))
    return torch.cat(scores).reshape(count, points)


def check_batch(inputs, relevance, targets):
    '''Raise unless ``relevance`` has one map per image of ``inputs``, of its size, and ``targets`` one class each.

    Raises
    ------
    ValueError
        Naming the shapes that disagree.
    '''
    if relevance.ndim != inputs.ndim or relevance.shape[0] != inputs.shape[0] \
            or relevance.shape[-2:] != inputs.shape[-2:]:
        raise ValueError(f'relevance of shape {tuple(relevance.shape)} does not fit inputs of shape '
                         f'{tuple(inputs.shape)}: give one map of the image size per image, with a channel axis '
                         '((N, C, H, W), or (N, 1, H, W) for a map summed over channels)')
    count = torch.as_tensor(targets).numel()
    if count != inputs.shape[0]:
        raise ValueError(f'got {count} targets for {inputs.shape[0]} images; give one class per image')


def perturbation_curve(model, inputs, relevance, targets, order='morf', patch_size=1, patches_per_step=1,
                       steps=None, baseline='zero', channel_mean=None, blur_sigma=BLUR_SIGMA, noise_range=(0., 1.),
                       seeds=None, output='logit', batch_size=512):
    '''Region perturbation (pixel flipping for ``patch_size=1``): the target score after each step.

    Pixels (patches) are ranked by their relevance summed over channels and removed with all their channels. Quantus'
    ``PixelFlipping`` ranks and flips single channel values of per-channel relevance: pass it the channel sum to
    compare.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The classifier, in eval mode.
    inputs, relevance: :py:obj:`torch.Tensor`
        ``(N, C, H, W)`` each.
    targets: :py:obj:`torch.Tensor`
        ``(N,)`` class indices.
    order, patch_size, patches_per_step, steps:
        See :py:func:`perturbation_masks`.
    baseline, channel_mean, blur_sigma, noise_range, seeds:
        The replacement values, see :py:func:`perturbation_baseline`.
    output: str
        ``'logit'``, ``'probability'`` or ``'correct'``, see :py:func:`target_scores`.
    batch_size: int
        Perturbed inputs evaluated per forward pass.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N, steps + 1)``: the score of the unperturbed input, then after each step.
    '''
    check_batch(inputs, relevance, targets)
    masks = perturbation_masks(relevance, order, patch_size, patches_per_step, steps)
    values = perturbation_baseline(inputs, baseline, channel_mean, blur_sigma, noise_range, seeds)

    def perturbed(image, step):
        replacement = values if values.shape[0] == 1 else values[image]
        return torch.where(masks[image, step], replacement, inputs[image])

    return curve_scores(model, targets, masks.shape[1], perturbed, output, batch_size)


def aopc(curve):
    '''Area over the perturbation curve: the mean drop ``f(x_0) - f(x_k)`` over steps ``k = 0 .. K``.

    Parameters
    ----------
    curve: :py:obj:`torch.Tensor`
        ``(N, K + 1)`` from :py:func:`perturbation_curve` or :py:func:`road_curve`.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N,)``.
    '''
    return (curve[:, :1] - curve).mean(dim=1)


@dataclass
class PerturbationResult:
    '''MoRF and LeRF perturbation curves and their summaries, per example.

    Attributes
    ----------
    morf, lerf: :py:obj:`torch.Tensor`
        ``(N, K + 1)`` curves; column 0 is the unperturbed input.
    removed: :py:obj:`torch.Tensor` or None
        ``(K + 1,)``: the fraction of the pixels removed at each point (for plots).
    '''
    morf: torch.Tensor
    lerf: torch.Tensor
    removed: torch.Tensor = None

    @property
    def aopc_morf(self):
        '''AOPC of the MoRF curve, ``(N,)``: higher means the most relevant regions matter more.'''
        return aopc(self.morf)

    @property
    def aopc_lerf(self):
        '''AOPC of the LeRF curve, ``(N,)``: lower means the least relevant regions matter less.'''
        return aopc(self.lerf)

    @property
    def abpc(self):
        '''Area between the LeRF and MoRF curves, ``(N,)``: the mean of ``lerf - morf`` over the points.'''
        return (self.lerf - self.morf).mean(dim=1)


def region_perturbation(model, inputs, relevance, targets, **kwargs):
    '''MoRF and LeRF region perturbation curves of the same inputs and relevance.

    Parameters
    ----------
    model, inputs, relevance, targets, kwargs:
        As for :py:func:`perturbation_curve` (without ``order``).

    Returns
    -------
    :py:class:`PerturbationResult`
    '''
    morf = perturbation_curve(model, inputs, relevance, targets, order='morf', **kwargs)
    lerf = perturbation_curve(model, inputs, relevance, targets, order='lerf', **kwargs)
    patch_size, patches_per_step = kwargs.get('patch_size', 1), kwargs.get('patches_per_step', 1)
    patches = relevance.shape[-2] * relevance.shape[-1] // patch_size ** 2
    removed = (torch.arange(morf.shape[1]) * patches_per_step).clamp(max=patches) / patches
    return PerturbationResult(morf=morf, lerf=lerf, removed=removed)


def removal_counts(pixels, percentages):
    '''How many of ``pixels`` pixels ROAD removes at 0 % and at each of ``percentages``: ``int(pixels * p / 100)``,
    as Quantus' ROAD counts them.

    Raises
    ------
    ValueError
        If the percentages are not strictly increasing within (0, 100): at 100 % nothing is left to impute from.
    '''
    percentages = [float(percentage) for percentage in percentages]
    if not percentages or any(not 0 < p < 100 for p in percentages) \
            or any(a >= b for a, b in zip(percentages, percentages[1:])):
        raise ValueError(f'percentages must be strictly increasing and within (0, 100), not {percentages}')
    return torch.tensor([0] + [int(pixels * percentage / 100) for percentage in percentages])


def road_masks(relevance, order='morf', percentages=ROAD_PERCENTAGES):
    '''The pixels ROAD removes at 0 % and at each percentage, most (MoRF) or least (LeRF) relevant first.

    Pixels are ranked by their relevance summed over channels (ties in row-major order). Quantus' ROAD ranks the
    entries of the attribution as given, so it needs one channel: pass it the channel sum to compare.

    Parameters
    ----------
    relevance: :py:obj:`torch.Tensor`
        ``(N, C, H, W)``.
    order: str
        ``'morf'`` or ``'lerf'``.
    percentages: sequence of float
        Strictly increasing, within (0, 100); see :py:func:`removal_counts`.

    Returns
    -------
    :py:obj:`torch.Tensor`
        Boolean ``(N, len(percentages) + 1, 1, H, W)``; point 0 removes nothing.
    '''
    scores = relevance.sum(dim=1).flatten(start_dim=1)
    masks = ranked_masks(scores, removal_counts(scores.shape[1], percentages), order)
    return masks.reshape(len(scores), -1, 1, *relevance.shape[-2:])


def linear_imputation(inputs, removed):
    '''Fill the removed pixels of each image by linear imputation from their neighbours (no noise).

    Every removed pixel takes the weighted mean of its (up to 8) neighbours inside the image, with weight 1/6 for
    the 4 direct and 1/12 for the 4 diagonal ones (Rong et al. 2022); kept pixels keep their values. This is the
    sparse linear system of Quantus' ``noisy_linear_imputation``, solved here for many images at once
    (:py:data:`IMPUTATION_CHUNK`): with the
    kept pixels as identity rows, the system of an ``H x W`` image is symmetric positive definite and
    block-tridiagonal with one ``W x W`` block per image row, and a block Cholesky factorisation solves it
    exactly, in float64, on the device of ``inputs``.

    Parameters
    ----------
    inputs: :py:obj:`torch.Tensor`
        ``(N, C, H, W)``.
    removed: :py:obj:`torch.Tensor`
        Boolean ``(N, 1, H, W)`` or ``(N, H, W)``: the pixels to impute (all channels of a pixel together).

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N, C, H, W)`` in the dtype of ``inputs``.

    Raises
    ------
    ValueError
        If every pixel of an image is removed (there is nothing to impute from).
    '''
    count, channels, height, width = inputs.shape
    removed = removed.reshape(count, height, width)
    if bool(removed.flatten(start_dim=1).all(dim=1).any()):
        raise ValueError('every pixel of an image is removed, so there is nothing to impute it from')
    output = inputs.clone()
    todo = removed.flatten(start_dim=1).any(dim=1).nonzero()[:, 0]
    for chunk in todo.split(IMPUTATION_CHUNK):
        output[chunk] = _solve_imputation(inputs[chunk].double(), removed[chunk]).to(inputs.dtype)
    return output


def _solve_imputation(values, removed):
    '''The linear imputation system of :py:func:`linear_imputation`, solved by block Cholesky over image rows.

    ``values`` is float64 ``(B, C, H, W)``, ``removed`` boolean ``(B, H, W)``. A removed pixel ``p`` gives the
    equation ``sum_q w_pq (x_p - x_q) = 0`` over its in-image neighbours ``q``; a kept pixel ``x_p = v_p``.
    '''
    count, channels, height, width = values.shape
    kernel = torch.tensor(NEIGHBOUR_WEIGHTS, dtype=torch.float64, device=values.device)
    removed_ = removed.to(torch.float64)
    kept = 1 - removed_
    in_image_weight = F.conv2d(torch.ones(1, 1, height, width, dtype=torch.float64, device=values.device),
                               kernel[None, None], padding=1)[0, 0]
    from_kept = F.conv2d((values * kept[:, None]).reshape(count * channels, 1, height, width), kernel[None, None],
                         padding=1).reshape(count, channels, height, width)
    rhs = torch.where(removed[:, None], from_kept, values).permute(0, 2, 3, 1)  # (B, H, W, C): a block per row
    diagonal = removed_ * in_image_weight + kept
    # within an image row: the diagonal, and -w between horizontal neighbours that are both removed
    beside = -kernel[1, 2] * removed_[..., :-1] * removed_[..., 1:]
    # between row y + 1 (entry x) and row y (entry x + dx), both removed: -w(-1, dx)
    lower, upper = removed_[:, 1:], removed_[:, :-1]
    straight = -kernel[0, 1] * lower * upper
    left = -kernel[0, 0] * lower[..., 1:] * upper[..., :-1]
    right = -kernel[0, 2] * lower[..., :-1] * upper[..., 1:]

    def tridiagonal(main, below, above):
        matrix = main.new_zeros(*main.shape, width)
        for offset, values in ((0, main), (-1, below), (1, above)):
            matrix.diagonal(offset, dim1=-2, dim2=-1).copy_(values)
        return matrix

    factors, transfers, reduced = [], [], []
    schur, carried = tridiagonal(diagonal[:, 0], beside[:, 0], beside[:, 0]), rhs[:, 0]
    for row in range(height):
        factor = torch.linalg.cholesky(schur)
        factors.append(factor)
        reduced.append(torch.linalg.solve_triangular(factor, carried, upper=False))
        if row + 1 < height:
            between = tridiagonal(straight[:, row], left[:, row], right[:, row])
            transfer = torch.linalg.solve_triangular(factor, between.mT, upper=False)
            transfers.append(transfer)
            within = tridiagonal(diagonal[:, row + 1], beside[:, row + 1], beside[:, row + 1])
            schur = within - transfer.mT @ transfer
            carried = rhs[:, row + 1] - transfer.mT @ reduced[-1]
    solution = [None] * height
    following = torch.zeros_like(reduced[0])
    for row in reversed(range(height)):
        if row + 1 < height:
            following = transfers[row] @ solution[row + 1]
        solution[row] = torch.linalg.solve_triangular(factors[row].mT, reduced[row] - following, upper=True)
    return torch.stack(solution, dim=1).permute(0, 3, 1, 2)


def noisy_linear_imputation(inputs, removed, noise=0.01, seeds=None):
    '''ROAD's replacement: :py:func:`linear_imputation` plus Gaussian noise on the removed pixels.

    The noise has standard deviation ``noise`` in the model's input space and is fixed per image by its seed
    (:py:func:`image_noise`), so the same image gets the same noise at every percentage and in both orders. Rong et
    al. and Quantus add 0.01 standard normal noise freshly drawn on each call.

    Parameters
    ----------
    inputs, removed:
        See :py:func:`linear_imputation`.
    noise: float
        Standard deviation of the noise; 0 for none.
    seeds: sequence of int, optional
        One seed per image; default ``0 .. N - 1``.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N, C, H, W)``.
    '''
    imputed = linear_imputation(inputs, removed)
    if noise == 0:
        return imputed
    removed = removed.reshape(len(inputs), 1, *inputs.shape[-2:])
    noise = noise * image_noise(inputs, seeds, 'normal', NOISE_STREAMS['imputation'])
    return torch.where(removed, imputed + noise, imputed)


def road_curve(model, inputs, relevance, targets, order='morf', percentages=ROAD_PERCENTAGES, noise=0.01, seeds=None,
               output='logit', batch_size=256, progress=False):
    '''ROAD (remove and debias): the target score after removing each percentage of the pixels by noisy linear
    imputation, most (MoRF) or least (LeRF) relevant first.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The classifier, in eval mode.
    inputs, relevance: :py:obj:`torch.Tensor`
        ``(N, C, H, W)`` each.
    targets: :py:obj:`torch.Tensor`
        ``(N,)`` class indices.
    order, percentages:
        See :py:func:`road_masks`.
    noise, seeds:
        See :py:func:`noisy_linear_imputation`.
    output: str
        ``'logit'``, ``'probability'`` or ``'correct'`` (Rong et al.'s accuracy), see :py:func:`target_scores`.
    batch_size: int
        Images imputed and evaluated at once.
    progress: bool
        Show a progress bar.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N, len(percentages) + 1)``: the score of the unperturbed input, then at each percentage.
    '''
    check_batch(inputs, relevance, targets)
    masks = road_masks(relevance, order, percentages)
    seeds = torch.as_tensor(range(len(inputs)) if seeds is None else seeds)

    def perturbed(image, step):
        return noisy_linear_imputation(inputs[image], masks[image, step], noise, seeds[image.cpu()].tolist())

    return curve_scores(model, targets, masks.shape[1], perturbed, output, batch_size, progress)


def road(model, inputs, relevance, targets, percentages=ROAD_PERCENTAGES, **kwargs):
    '''ROAD's MoRF and LeRF curves of the same inputs and relevance, with their summaries.

    ``aopc_morf`` and ``aopc_lerf`` of the result are the mean drop of the score over the points (0 % and each
    percentage), ``abpc`` the mean of ``lerf - morf`` over the points (the area between the curves with the points
    equally weighted).

    Parameters
    ----------
    model, inputs, relevance, targets, percentages, kwargs:
        As for :py:func:`road_curve` (without ``order``).

    Returns
    -------
    :py:class:`PerturbationResult`
    '''
    morf = road_curve(model, inputs, relevance, targets, 'morf', percentages, **kwargs)
    lerf = road_curve(model, inputs, relevance, targets, 'lerf', percentages, **kwargs)
    pixels = inputs.shape[-2] * inputs.shape[-1]
    return PerturbationResult(morf=morf, lerf=lerf, removed=removal_counts(pixels, percentages) / pixels)


def gini_index(relevance):
    '''Sparseness of each explanation: the Gini index of ``|R|`` over all its entries (Chalasani et al. 2020).

    ``G = sum_k (2k - n - 1) a_(k) / (n sum_k a_(k))`` with ``a_(1) <= ... <= a_(n)`` the sorted magnitudes: 0 when
    all entries are equal, ``1 - 1/n`` when one entry holds everything. Quantus' ``Sparseness`` computes the same
    after adding 1e-7 to every entry (and, by default, normalising the whole batch by its maximum).

    Parameters
    ----------
    relevance: :py:obj:`torch.Tensor`
        ``(N, ...)``; every entry counts (sum over channels first for a per-pixel index).

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N,)``; NaN for an explanation that is 0 everywhere.
    '''
    magnitude = relevance.flatten(start_dim=1).abs().sort(dim=1).values
    entries = magnitude.shape[1]
    rank = torch.arange(1, entries + 1, dtype=magnitude.dtype, device=magnitude.device)
    total = magnitude.sum(dim=1)
    gini = ((2 * rank - entries - 1) * magnitude).sum(dim=1) / (entries * total)
    return torch.where(total > 0, gini, torch.nan)


def relevance_entropy(relevance):
    '''Complexity of each explanation: the Shannon entropy (in nats) of the fractional contributions
    ``p_i = |R_i| / sum_j |R_j|`` (Bhatt et al. 2020), with ``0 log 0 = 0``.

    0 when one entry holds everything, ``log n`` when all ``n`` entries are equal. Quantus' ``Complexity`` computes
    ``-sum p log(p + 1e-12)``.

    Parameters
    ----------
    relevance: :py:obj:`torch.Tensor`
        ``(N, ...)``; every entry counts.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N,)``; NaN for an explanation that is 0 everywhere.
    '''
    magnitude = relevance.flatten(start_dim=1).abs()
    total = magnitude.sum(dim=1, keepdim=True)
    share = magnitude / total
    return torch.where(total[:, 0] > 0, -torch.special.xlogy(share, share).sum(dim=1), torch.nan)


def conservation_error(relevance, output):
    '''Relative relevance conservation error per example: ``(sum(relevance) - output) / |output|``.

    Parameters
    ----------
    relevance: :py:obj:`torch.Tensor`
        ``(N, ...)``.
    output: :py:obj:`torch.Tensor`
        ``(N,)``: the explained logit.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N,)``; 0 for perfect conservation, NaN where the output is 0.
    '''
    error = relevance.flatten(start_dim=1).sum(dim=1) - output
    return torch.where(output != 0, error / output.abs(), torch.nan)


def relevance_gap(relevance, output):
    '''The share of the explained output that does not arrive at the input: ``(output - sum(relevance)) / output``.

    Positive where relevance is lost on the way (absorbed by the bias terms, and by the stabilisers of the rules),
    negative where more arrives than was explained (injected, e.g. by negative biases, or blown up by a small
    denominator); 0.6 means 60 % of the logit never reaches the input. Heavy-tailed: summarise it by median and
    quantiles (:py:func:`zennit_bnfuse.evaluation.statistics.quantile_summary`).

    Parameters
    ----------
    relevance: :py:obj:`torch.Tensor`
        ``(N, ...)``.
    output: :py:obj:`torch.Tensor`
        ``(N,)``: the explained output.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(N,)``; NaN where the output is 0.
    '''
    gap = output - relevance.flatten(start_dim=1).sum(dim=1)
    return torch.where(output != 0, gap / output, torch.nan)


def mean_ci(values, confidence=.95):
    '''Mean and normal-approximation confidence interval half-width of a sample.

    For heavy-tailed values (conservation errors), use the median and quantiles or the bootstrap intervals of
    :py:mod:`zennit_bnfuse.evaluation.statistics` instead.

    Parameters
    ----------
    values: :py:obj:`torch.Tensor`
        ``(N,)`` with ``N >= 2``.
    confidence: float

    Returns
    -------
    tuple[float, float]
        ``(mean, half_width)``.
    '''
    values = values.double()
    quantile = torch.distributions.Normal(0., 1.).icdf(torch.tensor(.5 + confidence / 2)).item()
    return values.mean().item(), quantile * values.std().item() / math.sqrt(len(values))
