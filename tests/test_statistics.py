'''Tests for zennit_bnfuse.evaluation.statistics: Holm against a hand computation, the verdict rule on hand-made
comparisons, Wilcoxon against scipy, and the coverage of the bootstrap intervals on known distributions.'''
import math
from dataclasses import replace

import numpy as np
import pytest
import scipy.stats
import torch

from zennit_bnfuse.evaluation.statistics import (
    PairedComparison, bootstrap_interval, bootstrap_mean_intervals, hierarchical_bootstrap_interval,
    hierarchical_comparison, holm, holm_adjust, paired_comparison, quantile_summary, seed_outcome, verdict,
    wilcoxon_p, win_rate,
)


def test_holm_by_hand():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, max(0.06, 0.04 * 1) = 0.06
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    # capped at 1, ties keep their order, monotone in the sorted order
    np.testing.assert_allclose(holm([0.5, 0.5, 0.9]), [1., 1., 1.])
    np.testing.assert_allclose(holm([0.01, 0.01]), [0.02, 0.02])
    np.testing.assert_allclose(holm(torch.tensor([0.2])), [0.2])
    with pytest.raises(ValueError, match=r'lie in \[0, 1\]'):
        holm([0.1, float('nan')])


def test_wilcoxon_p_against_scipy_and_zero_handling():
    differences = np.array([0.5, -0.2, 1.1, 0.7, 0., 0.3, -0.1, 0.9, 0., 1.4])
    expected = scipy.stats.wilcoxon(differences, zero_method='pratt').pvalue
    assert wilcoxon_p(differences) == pytest.approx(expected, rel=1e-12)
    # differences within the tolerance count as zero
    assert wilcoxon_p(differences, zero_tolerance=0.25) == pytest.approx(
        scipy.stats.wilcoxon(np.where(np.abs(differences) <= .25, 0, differences), zero_method='pratt').pvalue)
    assert wilcoxon_p(np.zeros(5)) == 1.
    assert wilcoxon_p(torch.full((30,), 1e-9), zero_tolerance=1e-6) == 1.
    assert wilcoxon_p(np.arange(1., 31.)) < 1e-5
    with pytest.raises(ValueError, match='finite'):
        wilcoxon_p([1., float('inf')])


def test_win_rate_counts_ties_half():
    differences = np.array([1., -1., 0., 2., 0.])
    assert win_rate(differences) == pytest.approx((2 + 0.5 * 2) / 5)
    assert win_rate(differences, higher_is_better=False) == pytest.approx((1 + 0.5 * 2) / 5)
    assert win_rate(np.array([1e-9, -1e-9]), zero_tolerance=1e-6) == .5


@pytest.mark.parametrize('statistic', ['mean', 'median'])
def test_bootstrap_coverage_on_known_distribution(statistic):
    # 95 % percentile intervals from 40 draws of N(1, 1) cover the true mean (= median) in about 95 % of 300 samples
    rng = np.random.default_rng(0)
    covered = 0
    for repeat in range(300):
        sample = rng.normal(1., 1., size=40)
        low, high = bootstrap_interval(sample, statistic, resamples=1000, seed=repeat)
        covered += low <= 1. <= high
    assert .90 <= covered / 300 <= .99


def test_bootstrap_is_reproducible_and_centred():
    sample = np.random.default_rng(1).exponential(size=200)
    first = bootstrap_interval(sample, 'median', seed=3, resamples=2000)
    assert first == bootstrap_interval(torch.tensor(sample), 'median', seed=3, resamples=2000)
    assert first != bootstrap_interval(sample, 'median', seed=4, resamples=2000)
    assert first[0] < np.median(sample) < first[1]
    with pytest.raises(ValueError, match="'mean' or 'median'"):
        bootstrap_interval(sample, 'mode')
    with pytest.raises(ValueError, match='finite'):
        bootstrap_interval([1., float('nan')])


def test_hierarchical_bootstrap_resamples_seeds():
    rng = np.random.default_rng(2)
    # one seed: the ordinary bootstrap
    sample = rng.normal(size=50)
    assert hierarchical_bootstrap_interval([sample], seed=5, resamples=500) == \
        bootstrap_interval(sample, seed=5, resamples=500)
    # seeds that differ by much more than the spread of their images: pooling the images as if independent gives a
    # narrow interval, resampling seeds a wide one
    seeds = [rng.normal(offset, .1, size=100) for offset in (-1., 0., 1.)]
    pooled = bootstrap_interval(np.concatenate(seeds), resamples=2000)
    nested = hierarchical_bootstrap_interval(seeds, resamples=2000)
    assert nested[1] - nested[0] > 10 * (pooled[1] - pooled[0])
    # unequal numbers of images per seed
    low, high = hierarchical_bootstrap_interval([seeds[0][:30], seeds[1], seeds[2][:70]], resamples=2000)
    assert -1. < low < high < 1.


def test_hierarchical_bootstrap_coverage():
    # 30 seeds with a random offset each (sd 1) and 20 images (sd 1) around it: intervals cover the mean 0
    rng = np.random.default_rng(3)
    covered = 0
    for repeat in range(200):
        seeds = [rng.normal(rng.normal(), 1., size=20) for _ in range(30)]
        low, high = hierarchical_bootstrap_interval(seeds, resamples=500, seed=repeat)
        covered += low <= 0. <= high
    assert .88 <= covered / 200 <= .99


def test_paired_comparison_fields():
    a = np.array([3., 2., 5., 1., 4., 6., 2., 3.])
    b = np.array([1., 2., 3., 2., 1., 1., 1., 0.])
    comparison = paired_comparison(a, b, resamples=2000)
    differences = a - b
    assert comparison.n == 8 and comparison.seeds == 1
    assert comparison.mean_difference == pytest.approx(differences.mean())
    assert comparison.median_difference == pytest.approx(np.median(differences))
    assert comparison.win_rate == pytest.approx((6 + .5) / 8)
    assert comparison.p_value == pytest.approx(scipy.stats.wilcoxon(differences, zero_method='pratt').pvalue)
    assert comparison.mean_interval[0] < differences.mean() < comparison.mean_interval[1]
    assert comparison.favours == 'a' and comparison.p_holm is None
    lower_better = paired_comparison(a, b, higher_is_better=False, resamples=100)
    assert lower_better.favours == 'b' and lower_better.win_rate == pytest.approx(1.5 / 8)
    record = comparison.as_dict()
    assert record['favours'] == 'a' and len(record['median_interval']) == 2
    with pytest.raises(ValueError, match='one value per image'):
        paired_comparison(a, b[:3])


def test_hierarchical_comparison_pools_and_has_no_p_value():
    rng = np.random.default_rng(4)
    a = [rng.normal(1., 1., size=50) for _ in range(3)]
    b = [rng.normal(0., 1., size=50) for _ in range(3)]
    comparison = hierarchical_comparison(a, b, resamples=500)
    assert comparison.seeds == 3 and comparison.n == 150 and comparison.p_value is None
    assert comparison.mean_difference == pytest.approx(np.mean(np.concatenate(a) - np.concatenate(b)))
    with pytest.raises(ValueError, match='needs a p-value'):
        holm_adjust([comparison])
    with pytest.raises(ValueError, match='same \\(non-zero\\) number of seeds'):
        hierarchical_comparison(a, b[:2])


def made(median, p_holm, higher_is_better=True):
    '''A hand-made comparison: only the median difference, direction and corrected p-value matter to the verdict.'''
    return PairedComparison(n=10, seeds=1, mean_difference=median, median_difference=median,
                            mean_interval=(0., 0.), median_interval=(0., 0.), win_rate=.5,
                            higher_is_better=higher_is_better, p_value=p_holm, p_holm=p_holm)


@pytest.mark.parametrize('per_seed, expected', [
    ([made(.3, .001), made(.1, .01), made(.2, .04)], 'better'),
    ([made(-.3, .001), made(-.1, .01), made(-.2, .001)], 'worse'),
    # lower is better: a negative median difference favours a
    ([made(-.3, .001, False), made(-.1, .01, False)], 'better'),
    ([made(.3, .2), made(-.1, .06), made(.2, .5)], 'no difference'),
    # significant in two seeds only
    ([made(.3, .001), made(.1, .01), made(.2, .06)], 'no difference'),
    # significant everywhere, in opposite directions
    ([made(.3, .001), made(-.1, .01), made(.2, .001)], 'mixed'),
    # better in one seed, worse in another, nothing in the third
    ([made(.3, .001), made(-.1, .01), made(.2, .3)], 'mixed'),
    # significant, but the median difference is 0 in one seed
    ([made(.3, .001), made(0., .01)], 'no difference'),
    # alpha is strict: p = alpha is not significant
    ([made(.3, .05)], 'no difference'),
])
def test_verdict_rule(per_seed, expected):
    assert verdict(per_seed, alpha=.05) == expected


def test_verdict_minimum_effect():
    per_seed = [made(.3, .001), made(.1, .01), made(-.2, .001)]
    assert verdict(per_seed) == 'mixed'
    # effects below the minimum do not count: per seed, or one for all
    assert verdict(per_seed, min_effect=[.2, .05, .5]) == 'no difference'
    assert verdict(per_seed[:2], min_effect=[.2, .05]) == 'better'
    assert verdict(per_seed[:2], min_effect=.1) == 'better' and verdict(per_seed[:2], min_effect=.11) == 'no difference'
    assert seed_outcome(per_seed[2]) == 'worse' and seed_outcome(per_seed[2], min_effect=.3) == 'none'
    with pytest.raises(ValueError, match='one per seed \\(3\\), got 2'):
        verdict(per_seed, min_effect=[.1, .2])


def test_verdict_needs_holm_and_holm_adjust_uses_the_family():
    raw = [replace(made(.3, None), p_value=p) for p in (.02, .03)]
    with pytest.raises(ValueError, match='Holm-corrected'):
        verdict(raw)
    adjusted = holm_adjust(raw)
    assert [item.p_holm for item in adjusted] == pytest.approx([.04, .04])
    assert verdict(adjusted) == 'better'
    # in a family of four the same two seeds are no longer significant: 0.02 * 4, max(0.08, 0.03 * 3)
    family = holm_adjust(raw + [replace(made(0., None), p_value=.9)] * 2)
    assert [item.p_holm for item in family[:2]] == pytest.approx([.08, .09])
    assert verdict(family[:2]) == 'no difference'
    with pytest.raises(ValueError, match='at least one'):
        verdict([])


def test_quantile_summary_heavy_tail():
    values = torch.tensor([1., 2., 3., 4., 1e9, float('nan'), float('inf')])
    summary = quantile_summary(values, quantiles=(.25, .75))
    assert summary.n == 5 and summary.nonfinite == 2
    assert summary.median == 3. and summary.maximum == 1e9 and summary.minimum == 1.
    assert summary.quantiles == {.25: 2., .75: 4.}
    assert summary.as_dict()['q25'] == 2. and summary.as_dict()['q75'] == 4.
    assert math.isnan(quantile_summary([float('nan')]).median)


def test_bootstrap_mean_intervals_of_many_columns_match_the_one_column_bootstrap():
    rng = np.random.default_rng(6)
    samples = np.stack([rng.normal(size=300), rng.exponential(size=300), np.full(300, 2.5)], axis=1)
    intervals = bootstrap_mean_intervals(samples, resamples=4000, seed=1)
    assert intervals.shape == (3, 2)
    for column, (low, high) in zip(samples.T, intervals):
        reference_low, reference_high = bootstrap_interval(column, 'mean', resamples=4000, seed=2)
        width = reference_high - reference_low
        # different random draws: the ends agree to a small share of the width (a few % from Monte Carlo error)
        assert abs(low - reference_low) <= .1 * width + 1e-12 and abs(high - reference_high) <= .1 * width + 1e-12
        assert low <= column.mean() <= high
    assert tuple(intervals[2]) == pytest.approx((2.5, 2.5))
    # the columns are resampled together: a column and its shifted copy get the shifted interval
    shifted = bootstrap_mean_intervals(np.stack([samples[:, 0], samples[:, 0] + 1.], axis=1), resamples=500)
    assert shifted[1] == pytest.approx(shifted[0] + 1.)
    with pytest.raises(ValueError, match=r'\(N, K\)'):
        bootstrap_mean_intervals(samples[:, 0])
    with pytest.raises(ValueError, match='finite'):
        bootstrap_mean_intervals(np.array([[1.], [float('nan')]]))
