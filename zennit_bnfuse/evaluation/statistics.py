'''Paired statistics per image for comparing attribution methods, and robust summaries.

Every comparison is paired: two methods are scored on the same images, and each image gives one difference
``a - b``. Across training seeds a seed is a replicate, not more images: the decision uses one test per seed
(:py:func:`verdict`), and the intervals across seeds come from a hierarchical bootstrap that resamples seeds, then
images within each drawn seed (:py:func:`hierarchical_comparison`).

All functions take numpy arrays, sequences or (CPU or GPU) tensors and return Python floats or numpy arrays.
'''
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.stats

QUANTILES = (.05, .25, .75, .95)
VERDICTS = ('better', 'worse', 'mixed', 'no difference')


def as_array(values):
    '''``values`` (sequence, numpy array or tensor on any device) as a float64 numpy array.'''
    if hasattr(values, 'detach'):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


@dataclass(frozen=True)
class QuantileSummary:
    '''Robust summary of a heavy-tailed sample (conservation errors, relevance gaps).

    Attributes
    ----------
    n: int
        Number of finite values summarised.
    nonfinite: int
        Number of NaN or infinite values left out.
    median, mean, minimum, maximum: float
        Of the finite values.
    quantiles: dict[float, float]
        Quantile level -> value (linear interpolation, numpy's default).
    '''
    n: int
    nonfinite: int
    median: float
    mean: float
    minimum: float
    maximum: float
    quantiles: dict = field(default_factory=dict)

    def as_dict(self):
        '''The summary as a JSON-ready dict (quantile keys as ``'q05'``, ``'q25'``, ...).'''
        record = {key: getattr(self, key) for key in ('n', 'nonfinite', 'median', 'mean', 'minimum', 'maximum')}
        record.update({f'q{round(level * 100):02d}': value for level, value in self.quantiles.items()})
        return record


def quantile_summary(values, quantiles=QUANTILES):
    '''Median, quantiles, extremes and mean of the finite values of a sample; non-finite values are counted.

    Parameters
    ----------
    values: array-like
        ``(N,)``.
    quantiles: sequence of float
        Levels in [0, 1].

    Returns
    -------
    :py:class:`QuantileSummary`
        With NaN statistics if no value is finite.
    '''
    values = as_array(values).ravel()
    finite = values[np.isfinite(values)]
    if not len(finite):
        nan = float('nan')
        return QuantileSummary(0, len(values), nan, nan, nan, nan, {level: nan for level in quantiles})
    return QuantileSummary(
        n=len(finite), nonfinite=len(values) - len(finite), median=float(np.median(finite)),
        mean=float(finite.mean()), minimum=float(finite.min()), maximum=float(finite.max()),
        quantiles={level: float(np.quantile(finite, level)) for level in quantiles},
    )


def _percentile_interval(statistics, confidence):
    low, high = np.quantile(statistics, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def _bootstrap_intervals(values_per_seed, statistics, confidence, resamples, seed, chunk):
    '''Hierarchical percentile bootstrap intervals of several statistics from the same resamples (see
    :py:func:`hierarchical_bootstrap_interval`); returns statistic name -> ``(low, high)``.'''
    unknown = set(statistics) - {'mean', 'median'}
    if unknown:
        raise ValueError(f'statistic must be \'mean\' or \'median\', not {unknown.pop()!r}')
    samples = [as_array(values).ravel() for values in values_per_seed]
    if not samples or any(not len(sample) or not np.isfinite(sample).all() for sample in samples):
        raise ValueError('every seed needs at least one value, and all values must be finite')
    seeds, longest = len(samples), max(len(sample) for sample in samples)
    sizes = np.array([len(sample) for sample in samples])
    equal = bool((sizes == longest).all())
    padded = np.full((seeds, longest), np.nan)  # NaN pads shorter seeds and is left out of the statistics
    for index, sample in enumerate(samples):
        padded[index, :len(sample)] = sample
    # the median goes last: it may partition the drawn values in place
    statistics = sorted(statistics, key=lambda name: name == 'median')
    reducers = {'mean': np.mean, 'median': lambda values, axis: np.median(values, axis, overwrite_input=True)}
    if not equal:
        reducers = {'mean': np.nanmean, 'median': lambda values, axis: np.nanmedian(values, axis, overwrite_input=True)}
    rng = np.random.default_rng(seed)
    drawn_statistics = {name: [] for name in statistics}
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        drawn = rng.integers(0, seeds, size=(count, seeds, 1)) if seeds > 1 else np.zeros((count, 1, 1), dtype=int)
        if equal:
            pooled = padded[drawn, rng.integers(0, longest, size=(count, seeds, longest), dtype=np.int32)]
        else:
            size = sizes[drawn]
            inner = np.minimum((rng.random((count, seeds, longest)) * size).astype(int), size - 1)
            pooled = np.where(np.arange(longest) < size, padded[drawn, inner], np.nan)
        pooled = pooled.reshape(count, -1)
        for name in statistics:
            drawn_statistics[name].append(reducers[name](pooled, axis=1))
    return {name: _percentile_interval(np.concatenate(values), confidence)
            for name, values in drawn_statistics.items()}


def bootstrap_interval(values, statistic='mean', confidence=.95, resamples=10000, seed=0, chunk=500):
    '''Percentile bootstrap confidence interval of the mean or median of a sample.

    Draws ``resamples`` samples of the same size with replacement (numpy's ``default_rng(seed)``) and returns the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the statistic over them.

    Parameters
    ----------
    values: array-like
        ``(N,)``, finite, ``N >= 1``.
    statistic: str
        ``'mean'`` or ``'median'``.
    confidence: float
    resamples: int
    seed: int
        Fixed, so the interval is reproducible.
    chunk: int
        Resamples drawn at once (memory ``chunk * N`` floats).

    Returns
    -------
    tuple[float, float]
        ``(low, high)``.

    Raises
    ------
    ValueError
        If ``values`` is empty or not finite, or ``statistic`` is unknown.
    '''
    return hierarchical_bootstrap_interval([values], statistic, confidence, resamples, seed, chunk)


def bootstrap_mean_intervals(samples, confidence=.95, resamples=10000, seed=0, chunk=1000):
    '''Percentile bootstrap intervals of the mean of many samples of the same images at once.

    Every resample draws the same ``N`` images with replacement for all columns (as a multinomial count per image),
    so one matrix product gives the resampled means of every column; the intervals are those of
    :py:func:`bootstrap_interval` with ``statistic='mean'`` up to the random draws.

    Parameters
    ----------
    samples: array-like
        ``(N, K)``: ``K`` samples (e.g. one per method and metric) of the same ``N >= 1`` images, finite.
    confidence, resamples, seed:
        See :py:func:`bootstrap_interval`.
    chunk: int
        Resamples drawn at once (memory ``chunk * (N + K)`` floats).

    Returns
    -------
    :py:obj:`numpy.ndarray`
        ``(K, 2)``: ``(low, high)`` per column.

    Raises
    ------
    ValueError
        If ``samples`` is not two-dimensional, has no image, or a value is not finite.
    '''
    samples = as_array(samples)
    if samples.ndim != 2 or not samples.shape[0] or not np.isfinite(samples).all():
        raise ValueError(f'samples must be (N, K) with N >= 1 finite values per column, got shape {samples.shape}')
    images = samples.shape[0]
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, chunk):
        counts = rng.multinomial(images, np.full(images, 1. / images), size=min(chunk, resamples - start))
        means.append(counts @ samples / images)
    means = np.concatenate(means)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return np.stack([low, high], axis=1)


def hierarchical_bootstrap_interval(values_per_seed, statistic='mean', confidence=.95, resamples=10000, seed=0,
                                    chunk=500):
    '''Percentile bootstrap interval over replicates: resample the seeds, then the images within each drawn seed.

    Each resample draws ``S`` seeds with replacement from the ``S`` given, then for every drawn seed its ``n_s``
    images with replacement, pools the drawn values and takes the statistic (each seed weighs with its number of
    images). With one seed this is the ordinary percentile bootstrap (:py:func:`bootstrap_interval`). With few
    seeds (3) the interval shows the spread between seeds but its coverage is only approximate.

    Parameters
    ----------
    values_per_seed: sequence of array-like
        One ``(n_s,)`` sample per seed (for a paired comparison: the per-image differences).
    statistic, confidence, resamples, seed, chunk:
        See :py:func:`bootstrap_interval`.

    Returns
    -------
    tuple[float, float]
        ``(low, high)``.

    Raises
    ------
    ValueError
        If a sample is empty or not finite, or ``statistic`` is unknown.
    '''
    return _bootstrap_intervals(values_per_seed, (statistic,), confidence, resamples, seed, chunk)[statistic]


def wilcoxon_p(differences, zero_tolerance=0.):
    '''Two-sided p-value of the Wilcoxon signed-rank test that the paired differences are symmetric about 0.

    Zero differences (``|d| <= zero_tolerance``) are handled by Pratt's method (ranked with the others, then their
    ranks dropped; ``scipy.stats.wilcoxon(zero_method='pratt')``); tied ``|d|`` get average ranks, and scipy picks
    the exact distribution for small samples without ties or zeros and the normal approximation with tie correction
    otherwise. If every difference is zero, there is no evidence of a difference and the p-value is 1.

    Parameters
    ----------
    differences: array-like
        ``(N,)`` per-image differences ``a - b``, finite.
    zero_tolerance: float
        Differences this small in magnitude count as ties (0: only exact zeros).

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If there are no differences or some are not finite.
    '''
    differences = as_array(differences).ravel()
    if not len(differences) or not np.isfinite(differences).all():
        raise ValueError('the Wilcoxon test needs at least one difference, and all must be finite')
    differences = np.where(np.abs(differences) <= zero_tolerance, 0., differences)
    if not differences.any():
        return 1.
    return float(scipy.stats.wilcoxon(differences, zero_method='pratt', alternative='two-sided').pvalue)


def holm(p_values):
    '''Holm's step-down correction of a family of p-values (controls the family-wise error rate).

    With the ``m`` p-values sorted, ``p_(1) <= ... <= p_(m)``, the adjusted ``p_(i)`` is
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``; a hypothesis is rejected at level alpha where its adjusted p-value is
    below alpha.

    Parameters
    ----------
    p_values: array-like
        ``(m,)``, each in [0, 1]: the declared family.

    Returns
    -------
    :py:obj:`numpy.ndarray`
        ``(m,)`` adjusted p-values, in the input's order.

    Raises
    ------
    ValueError
        If a p-value is NaN or outside [0, 1].
    '''
    p_values = as_array(p_values).ravel()
    if not ((p_values >= 0) & (p_values <= 1)).all():
        raise ValueError(f'p-values must lie in [0, 1], got {p_values}')
    count = len(p_values)
    order = np.argsort(p_values, kind='stable')
    scaled = np.minimum(1., (count - np.arange(count)) * p_values[order])
    adjusted = np.empty(count)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def win_rate(differences, higher_is_better=True, zero_tolerance=0.):
    '''Share of the images on which ``a`` is better than ``b``, ties (``|a - b| <= zero_tolerance``) counted half.

    Parameters
    ----------
    differences: array-like
        ``(N,)`` per-image ``a - b``.
    higher_is_better: bool
        Whether a higher score is better (False for, e.g., AOPC of LeRF curves).
    zero_tolerance: float

    Returns
    -------
    float
        In [0, 1]; 0.5 when the two are equal everywhere.
    '''
    differences = as_array(differences).ravel()
    better = differences if higher_is_better else -differences
    ties = np.abs(differences) <= zero_tolerance
    return float(((better > 0) & ~ties).mean() + .5 * ties.mean())


@dataclass(frozen=True)
class PairedComparison:
    '''``a`` against ``b`` on the same images (one training seed, or several pooled by
    :py:func:`hierarchical_comparison`).

    Attributes
    ----------
    n: int
        Images (summed over seeds).
    seeds: int
        Training seeds pooled (1 for :py:func:`paired_comparison`).
    mean_difference, median_difference: float
        Mean and median of the per-image differences ``a - b`` (the median difference, not the difference of the
        medians).
    mean_interval, median_interval: tuple[float, float]
        Percentile bootstrap intervals of those (hierarchical over seeds where ``seeds > 1``).
    win_rate: float
        Share of images where ``a`` is better, ties counted half (:py:func:`win_rate`).
    higher_is_better: bool
        The direction of the score.
    p_value: float or None
        Two-sided Wilcoxon signed-rank p-value (:py:func:`wilcoxon_p`); None for pooled seeds, where images of
        different seeds are not exchangeable.
    p_holm: float or None
        The p-value after Holm's correction over the declared family (:py:func:`holm_adjust`); None before.
    '''
    n: int
    seeds: int
    mean_difference: float
    median_difference: float
    mean_interval: tuple
    median_interval: tuple
    win_rate: float
    higher_is_better: bool
    p_value: float = None
    p_holm: float = None

    @property
    def favours(self):
        '''``'a'`` or ``'b'``: which one the median difference favours, or None if it is 0.'''
        if self.median_difference == 0:
            return None
        return 'a' if (self.median_difference > 0) == self.higher_is_better else 'b'

    def as_dict(self):
        '''The comparison as a JSON-ready dict.'''
        record = {key: getattr(self, key) for key in (
            'n', 'seeds', 'mean_difference', 'median_difference', 'win_rate', 'higher_is_better', 'p_value',
            'p_holm')}
        record.update(mean_interval=list(self.mean_interval), median_interval=list(self.median_interval),
                      favours=self.favours)
        return record


def _differences(a, b):
    a, b = as_array(a).ravel(), as_array(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f'paired scores need one value per image for both methods, got {len(a)} and {len(b)}')
    differences = a - b
    if not len(differences) or not np.isfinite(differences).all():
        raise ValueError('paired scores must be finite and non-empty; drop or report the images where a score is '
                         'not finite before comparing')
    return differences


def paired_comparison(a, b, higher_is_better=True, zero_tolerance=0., confidence=.95, resamples=10000, seed=0):
    '''Compare the per-image scores of two methods on the same images of one training seed.

    Parameters
    ----------
    a, b: array-like
        ``(N,)`` scores of the two methods, image ``i`` in both at the same position.
    higher_is_better: bool
        Whether a higher score is better.
    zero_tolerance: float
        Differences this small count as ties (win rate, Wilcoxon).
    confidence, resamples, seed:
        Of the bootstrap intervals (:py:func:`bootstrap_interval`).

    Returns
    -------
    :py:class:`PairedComparison`

    Raises
    ------
    ValueError
        If the lengths differ or a difference is not finite.
    '''
    differences = _differences(a, b)
    intervals = _bootstrap_intervals([differences], ('mean', 'median'), confidence, resamples, seed, chunk=500)
    return PairedComparison(
        n=len(differences), seeds=1, mean_difference=float(differences.mean()),
        median_difference=float(np.median(differences)), mean_interval=intervals['mean'],
        median_interval=intervals['median'],
        win_rate=win_rate(differences, higher_is_better, zero_tolerance), higher_is_better=higher_is_better,
        p_value=wilcoxon_p(differences, zero_tolerance),
    )


def hierarchical_comparison(a_per_seed, b_per_seed, higher_is_better=True, zero_tolerance=0., confidence=.95,
                            resamples=10000, seed=0):
    '''Compare two methods over several training seeds: pooled estimates with hierarchical bootstrap intervals.

    The mean, median and win rate pool the images of all seeds; the intervals resample seeds, then images within
    each drawn seed (:py:func:`hierarchical_bootstrap_interval`). There is no pooled p-value (``p_value`` is None):
    decide with one :py:func:`paired_comparison` per seed and :py:func:`verdict`.

    Parameters
    ----------
    a_per_seed, b_per_seed: sequence of array-like
        Per seed, the ``(n_s,)`` scores of each method on the same images.
    higher_is_better, zero_tolerance, confidence, resamples, seed:
        See :py:func:`paired_comparison`.

    Returns
    -------
    :py:class:`PairedComparison`
        With ``seeds = len(a_per_seed)``.
    '''
    if len(a_per_seed) != len(b_per_seed) or not len(a_per_seed):
        raise ValueError(f'need the same (non-zero) number of seeds for both methods, got {len(a_per_seed)} and '
                         f'{len(b_per_seed)}')
    per_seed = [_differences(a, b) for a, b in zip(a_per_seed, b_per_seed)]
    pooled = np.concatenate(per_seed)
    intervals = _bootstrap_intervals(per_seed, ('mean', 'median'), confidence, resamples, seed, chunk=500)
    return PairedComparison(
        n=len(pooled), seeds=len(per_seed), mean_difference=float(pooled.mean()),
        median_difference=float(np.median(pooled)), mean_interval=intervals['mean'],
        median_interval=intervals['median'],
        win_rate=win_rate(pooled, higher_is_better, zero_tolerance), higher_is_better=higher_is_better,
    )


def holm_adjust(comparisons):
    '''Holm-correct the p-values of a declared family of comparisons.

    Parameters
    ----------
    comparisons: sequence of :py:class:`PairedComparison`
        The whole family (for example every (handling, reference, metric) comparison of a model, for every seed).

    Returns
    -------
    list[:py:class:`PairedComparison`]
        Copies with ``p_holm`` set, in the same order.

    Raises
    ------
    ValueError
        If a comparison has no p-value (pooled over seeds).
    '''
    if any(comparison.p_value is None for comparison in comparisons):
        raise ValueError('every comparison of the family needs a p-value; compare each seed with '
                         'paired_comparison(), not pooled seeds')
    adjusted = holm([comparison.p_value for comparison in comparisons]) if comparisons else []
    return [replace(comparison, p_holm=float(p)) for comparison, p in zip(comparisons, adjusted)]


def seed_outcome(comparison, alpha=.05, min_effect=0.):
    '''What one Holm-corrected comparison of one seed says: ``'better'`` (for ``a``), ``'worse'`` or ``'none'``.

    ``'better'`` where the corrected p-value is below ``alpha`` and the median difference favours ``a`` by at least
    ``min_effect`` (and by more than 0); ``'worse'`` likewise for ``b``; ``'none'`` otherwise.

    Raises
    ------
    ValueError
        If the comparison is not Holm-corrected.
    '''
    if comparison.p_holm is None:
        raise ValueError('verdict needs Holm-corrected comparisons; run holm_adjust() over the declared family first')
    effect = abs(comparison.median_difference)
    if comparison.p_holm >= alpha or comparison.favours is None or effect < min_effect:
        return 'none'
    return 'better' if comparison.favours == 'a' else 'worse'


def verdict(per_seed, alpha=.05, min_effect=0.):
    '''The verdict on ``a`` against ``b`` from one Holm-corrected comparison per training seed.

    Each seed's outcome is :py:func:`seed_outcome`. Then:

    - ``'better'``: every seed is better (Holm-corrected p < ``alpha`` and a median difference in favour of ``a`` of
      at least ``min_effect``);
    - ``'worse'``: every seed is worse;
    - ``'mixed'``: some seeds are better and others worse;
    - ``'no difference'``: anything else (no seed decided, or some seeds decided one way and the rest not at all).

    Parameters
    ----------
    per_seed: sequence of :py:class:`PairedComparison`
        One per seed, from :py:func:`holm_adjust`.
    alpha: float
        Family-wise error rate; a corrected p-value equal to ``alpha`` is not significant.
    min_effect: float or sequence of float
        The smallest median difference (in magnitude) that counts, per seed or for all, e.g. 1 % of the median
        score of ``a`` in that seed.

    Returns
    -------
    str
        One of :py:data:`VERDICTS`.

    Raises
    ------
    ValueError
        If ``per_seed`` is empty, a comparison is not Holm-corrected, or ``min_effect`` has another length.
    '''
    if not per_seed:
        raise ValueError('verdict needs at least one comparison')
    effects = np.broadcast_to(np.asarray(min_effect, dtype=float), (len(per_seed),)) \
        if np.ndim(min_effect) == 0 or len(min_effect) == len(per_seed) else None
    if effects is None:
        raise ValueError(f'min_effect needs one value or one per seed ({len(per_seed)}), got {len(min_effect)}')
    outcomes = {seed_outcome(comparison, alpha, effect) for comparison, effect in zip(per_seed, effects)}
    if outcomes == {'better'}:
        return 'better'
    if outcomes == {'worse'}:
        return 'worse'
    if {'better', 'worse'} <= outcomes:
        return 'mixed'
    return 'no difference'
