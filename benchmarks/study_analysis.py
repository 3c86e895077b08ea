'''The study's analysis: per-method summaries, the declared comparisons (Wilcoxon per seed, Holm over each family,
bootstrap intervals, win rates), verdicts and the claims' readings, from the per-image results of
``benchmarks/study.py``.'''
import numpy as np

from zennit_bnfuse.evaluation.metrics import BASELINES
from zennit_bnfuse.evaluation.models import MODELS
from zennit_bnfuse.evaluation.statistics import (
    PairedComparison, bootstrap_mean_intervals, hierarchical_comparison, holm_adjust, paired_comparison,
    quantile_summary, seed_outcome, verdict,
)

from study_design import (
    ALPHA, BASELINE_METHODS, CLAIM_MODELS, COMPOSITES, DESCRIPTIVE_METRICS, FAITHFULNESS_METRICS, HANDLINGS,
    MIN_EFFECT_SHARE, OPPONENTS, PRIMARY, REGIMES, claim_of, method_key, split_key,
)


def resolve(unit, key):
    '''The measured method a key stands for (itself, or the method it duplicates), or None if not applicable.'''
    key = unit['duplicates'].get(key, key)
    return key if key in unit['methods'] else None


def values(unit, key, metric):
    '''Per-image values of a metric for a method of a unit, as float64 numpy.'''
    return np.asarray(unit['methods'][resolve(unit, key)]['metrics'][metric], dtype=float)


def records(units):
    '''One summary record per (model, seed, regime, composite, handling, metric): n, mean, median, quantiles and,
    for the faithfulness metrics, the 95% bootstrap interval of the mean (all methods of a unit resampled together).'''
    rows = []
    for (name, seed), unit in units.items():
        keys = [*BASELINE_METHODS, *unit['methods'], *unit['duplicates']]
        unit_rows, columns = [], []
        for key in dict.fromkeys(keys):
            if resolve(unit, key) is None:
                continue
            regime, composite, handling = split_key(key)
            measured = unit['methods'][resolve(unit, key)]['metrics']
            for metric in (metric for metric in (*FAITHFULNESS_METRICS, *DESCRIPTIVE_METRICS) if metric in measured):
                sample = values(unit, key, metric)
                kind, _, replacement = metric.rpartition('_')
                row = {'model': name, 'seed': seed, 'regime': regime, 'composite': composite, 'handling': handling,
                       'metric': metric, 'replacement': replacement if replacement in BASELINES else
                       ('road' if metric.startswith('road') else None),
                       'duplicate_of': unit['duplicates'].get(key), **quantile_summary(sample).as_dict()}
                if metric in FAITHFULNESS_METRICS and np.isfinite(sample).all():
                    columns.append((row, sample))
                unit_rows.append(row)
        for length in {len(sample) for _, sample in columns}:
            same = [(row, sample) for row, sample in columns if len(sample) == length]
            intervals = bootstrap_mean_intervals(np.stack([sample for _, sample in same], axis=1))
            for (row, _), interval in zip(same, intervals):
                row['mean_interval'] = interval.tolist()
        rows += unit_rows
    return rows


def identical(unit, first, second):
    '''Whether two methods of a unit gave bitwise equal relevance on every image.'''
    return resolve(unit, first) is not None and resolve(unit, first) == resolve(unit, second)


def duplicate_composites(units, name):
    '''Composites that give the same relevance as an earlier composite under every handling and regime of every
    seed of a model: ``{duplicate: original}``.'''
    found = {}
    model_units = [unit for (model, _), unit in units.items() if model == name]
    for index, composite in enumerate(COMPOSITES):
        for earlier in COMPOSITES[:index]:
            if earlier in found or composite in found:
                continue
            same = all(identical(unit, method_key(regime, composite, handling), method_key(regime, earlier, handling))
                       for unit in model_units for regime in REGIMES for handling in HANDLINGS
                       if resolve(unit, method_key(regime, composite, handling)) is not None)
            if same and model_units:
                found[composite] = earlier
    return found


def same_as_trained(model_units, regime, composite, handling):
    '''Whether ``handling`` under ``composite`` gives bitwise the same relevance in ``regime`` as on the models as
    trained, on every image of every seed (negated BatchNorm scales reach no rule that sees signs: the epsilon rule
    everywhere, or only fused BatchNorms), so that a comparison in ``regime`` would repeat one in (a).'''
    return regime == 'negative-scales' and all(
        identical(unit, method_key(regime, composite, handling), method_key('trained', composite, handling))
        for unit in model_units)


REPEATS_TRAINED = 'same relevance as (a) as trained (counted once, under (a))'
NOT_MEASURABLE = ('not measurable: ROAD ABPC is 0 on every image under both handlings (MoRF and LeRF remove the '
                  'pixels in the same order: the heatmaps rank no pixel above another, as a Flat rule on the only '
                  'layer that sees the input makes them)')


def ranks_nothing(model_units, key):
    '''Whether a method's primary metric (ROAD ABPC) is exactly 0 on every image of every seed: its MoRF and LeRF
    curves coincide, so its heatmaps order no pixel before another (a constant heatmap) and ROAD measures nothing.'''
    return all(resolve(unit, key) is not None and not np.any(values(unit, key, PRIMARY)) for unit in model_units)


def comparison_plan(units, args):
    '''The declared comparisons: ``(family, model, regime, composite, arm, opponent)`` tuples, and the excluded ones
    with the reason.'''
    plan, excluded = [], []
    models = sorted({name for name, _ in units}, key=list(MODELS).index)
    for name in models:
        model_units = [unit for (model, _), unit in units.items() if model == name]
        claim = claim_of(name)
        duplicates = duplicate_composites(units, name)
        for regime in args.regimes:
            for composite in args.composites:
                if composite in duplicates:
                    excluded.append((name, regime, composite, 'all', f'same relevance as {duplicates[composite]}'))
                    continue
                for handling in args.handlings:
                    key = method_key(regime, composite, handling)
                    if any(resolve(unit, key) is None for unit in model_units):
                        continue
                    if same_as_trained(model_units, regime, composite, handling):
                        excluded.append((name, regime, composite, f'{handling} vs the baselines',
                                         REPEATS_TRAINED))
                        continue
                    for baseline in BASELINE_METHODS:
                        plan.append(('sanity', name, regime, composite, handling, baseline))
                if claim is None or 'fused' not in args.handlings:
                    continue
                for opponent in OPPONENTS:
                    if opponent not in args.handlings:
                        continue
                    key = method_key(regime, composite, opponent)
                    missing = [unit['not_applicable'].get(key) for unit in model_units if resolve(unit, key) is None]
                    if missing:
                        excluded.append((name, regime, composite, opponent, f'not applicable: {missing[0]}'))
                        continue
                    if all(same_as_trained(model_units, regime, composite, handling)
                           for handling in ('fused', opponent)):
                        excluded.append((name, regime, composite, opponent, REPEATS_TRAINED))
                        continue
                    if all(ranks_nothing(model_units, method_key(regime, composite, handling))
                           for handling in ('fused', opponent)):
                        excluded.append((name, regime, composite, opponent, NOT_MEASURABLE))
                        continue
                    if opponent == 'zennit' and all(
                            identical(unit, key, method_key(regime, composite, 'naive')) for unit in model_units):
                        excluded.append((name, regime, composite, opponent, 'same relevance as naive (Zennit '
                                         'merges no BatchNorm here)'))
                        continue
                    plan.append(('primary', name, regime, composite, 'fused', opponent))
    return plan, excluded


def compare(units, plan, metric, seeds):
    '''Per-seed paired comparisons of every planned pair on ``metric``, Holm-corrected per seed and family, with the
    verdict and pooled estimates: one dict per planned comparison.'''
    per_seed = {}
    for seed in seeds:
        family = {}
        for item in plan:
            _, name, regime, composite, arm, opponent = item
            unit = units.get((name, seed))
            if unit is None:
                continue
            arm_key = method_key(regime, composite, arm)
            other = opponent if opponent in BASELINE_METHODS else method_key(regime, composite, opponent)
            if identical(unit, arm_key, other):
                continue
            family[item] = paired_comparison(values(unit, arm_key, metric), values(unit, other, metric))
        for kind in ('primary', 'sanity'):
            items = [item for item in family if item[0] == kind]
            for item, adjusted in zip(items, holm_adjust([family[item] for item in items])):
                per_seed.setdefault(item, {})[seed] = adjusted
    rows = []
    for item in plan:
        _, name, regime, composite, arm, opponent = item
        model_seeds = [seed for seed in seeds if (name, seed) in units]
        arm_key = method_key(regime, composite, arm)
        other = opponent if opponent in BASELINE_METHODS else method_key(regime, composite, opponent)
        row = {'family': item[0], 'model': name, 'regime': regime, 'composite': composite, 'arm': arm,
               'opponent': opponent, 'metric': metric, 'seeds': model_seeds}
        if all(identical(units[(name, seed)], arm_key, other) for seed in model_seeds):
            row['verdict'] = 'identical'
            rows.append(row)
            continue
        # a seed where both arms gave bitwise the same relevance is outside that seed's Holm family: no difference
        comparisons = [per_seed[item][seed] if seed in per_seed.get(item, {})
                       else same_relevance(units[(name, seed)], arm_key, metric) for seed in model_seeds]
        effects = [MIN_EFFECT_SHARE * float(np.median(np.abs(values(units[(name, seed)], arm_key, metric))))
                   for seed in model_seeds]
        pooled = hierarchical_comparison([values(units[(name, seed)], arm_key, metric) for seed in model_seeds],
                                         [values(units[(name, seed)], other, metric) for seed in model_seeds])
        row.update(verdict=verdict(comparisons, ALPHA, effects),
                   per_seed={seed: {**comparison.as_dict(), 'outcome': seed_outcome(comparison, ALPHA, effect),
                                    'min_effect': effect}
                             for seed, comparison, effect in zip(model_seeds, comparisons, effects)},
                   pooled=pooled.as_dict())
        rows.append(row)
    return rows


def same_relevance(unit, key, metric):
    '''The comparison of a method with one that gave bitwise the same relevance in a seed: every difference 0, p = 1
    (no evidence of a difference, outside the seed's Holm family).'''
    n = len(values(unit, key, metric))
    return PairedComparison(n=n, seeds=1, mean_difference=0., median_difference=0., mean_interval=(0., 0.),
                            median_interval=(0., 0.), win_rate=.5, higher_is_better=True, p_value=1., p_holm=1.)


def claim_verdicts(primary, args):
    '''The claims' readings by the protocol's rules, from the primary comparisons.'''
    readings = {}
    for claim in CLAIM_MODELS:
        for opponent in OPPONENTS:
            rows = [row for row in primary if claim_of(row['model']) == claim and row['opponent'] == opponent
                    and row['regime'] in ('trained', 'negative-scales')]
            if not rows:
                continue
            better = sum(row['verdict'] == 'better' for row in rows)
            worse = sum(row['verdict'] == 'worse' for row in rows)
            informative = sum(row['verdict'] != 'identical' for row in rows)
            if claim == 1:
                if better and not worse:
                    reading = 'supported'
                elif worse and worse >= better:
                    reading = 'contradicted'
                elif better > worse:
                    reading = 'partly supported'
                else:
                    reading = 'not shown'
            else:
                if not better:
                    reading = 'supported'
                elif better >= informative / 2 and not worse:
                    reading = 'not supported'
                else:
                    reading = 'partly supported'
            control = [row for row in primary if claim_of(row['model']) == claim and row['opponent'] == opponent
                       and row['regime'] == 'bias-free']
            wins = {(row['model'], row['composite']) for row in rows
                    if row['regime'] == 'trained' and row['verdict'] == 'better'}
            kept = {(row['model'], row['composite']) for row in control if row['verdict'] == 'better'}
            readings[f'claim {claim} vs {opponent}'] = {
                'claim': claim, 'opponent': opponent, 'reading': reading, 'better': better, 'worse': worse,
                'comparisons': len(rows), 'informative': informative,
                'wins_as_trained': len(wins), 'wins_surviving_bias_free_control': len(wins & kept)}
    return readings


def summarise(units, args):
    '''Records, comparisons, claims and checks as one JSON-ready dict.'''
    seeds = sorted({seed for _, seed in units})
    plan, excluded = comparison_plan(units, args)
    primary_plan = [item for item in plan if item[0] == 'primary']
    comparisons = {'primary': compare(units, primary_plan, PRIMARY, seeds),
                   'sanity': compare(units, [item for item in plan if item[0] == 'sanity'], PRIMARY, seeds)}
    # the secondary metrics are measured on the models as trained (regime (a)) only
    secondary_plan = [item for item in primary_plan if item[2] == 'trained']
    for metric in FAITHFULNESS_METRICS:
        if metric != PRIMARY:
            comparisons[metric] = compare(units, secondary_plan, metric, seeds)
    checks = {f'{name} seed {seed}': {**unit['checks'], 'not_applicable': unit['not_applicable'],
                                      'seconds': round(unit['seconds']), 'computed_by': unit.get('provenance'),
                                      'accuracy_on_images': float(np.mean(unit['correct']))}
              for (name, seed), unit in units.items()}
    randomisation = {}
    for (name, seed), unit in units.items():
        for key, method in unit['methods'].items():
            if 'randomisation' in method:
                correlations = np.asarray(method['randomisation']['spearman_abs'], dtype=float)
                randomisation.setdefault(f'{name}/{key}', {})[seed] = {
                    'layers': method['randomisation']['layers'],
                    'median_per_layer': np.median(correlations, axis=0).tolist() if correlations.size else []}
    return {'records': records(units), 'comparisons': comparisons, 'excluded': [list(item) for item in excluded],
            'claims': claim_verdicts(comparisons['primary'], args), 'checks': checks,
            'randomisation': randomisation, 'seeds': seeds}
