'''The study's report: ``faithfulness.md`` (protocol, verdicts, tables) and its figures (heatmaps per class,
perturbation curves per replacement value, a forest plot of the paired differences).'''
import json
import math
import re

import numpy as np
import torch

from zennit_bnfuse.evaluation.composites import DISPLAY_NAMES
from zennit_bnfuse.evaluation.metrics import BASELINES
from zennit_bnfuse.evaluation.models import CIFAR10_CLASSES, MNIST_CLASSES, SEEDS, dataset_of

from provenance import header
from study_analysis import resolve
from study_design import (
    ALPHA, BASELINE_METHODS, CLAIM_MODELS, HANDLINGS, PROTOCOL, REGIME_NAMES, TWINS, claim_of, method_key,
)


def class_names(name):
    '''The class names of model ``name``'s dataset.'''
    return CIFAR10_CLASSES if dataset_of(name) == 'cifar10' else MNIST_CLASSES


def display(composite):
    return DISPLAY_NAMES.get(composite, composite) if composite else ''


def fmt(value, digits=3):
    '''A number for a table.'''
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return '-'
    if abs(value) >= 1e4 or (value != 0 and abs(value) < 10 ** -digits):
        return f'{value:.2e}'
    return f'{value:.{digits}f}'


def p_values(row):
    '''The Holm-corrected p-values of a comparison's seeds, as text.'''
    return ', '.join(fmt(seed['p_holm'], 2) if seed['p_holm'] >= 1e-3 else f'{seed["p_holm"]:.0e}'
                     for seed in row.get('per_seed', {}).values()) or '-'


def seed_outcomes(row):
    '''Each seed's outcome by the decision rule (better, worse or none), as text.'''
    return ', '.join(seed['outcome'] for seed in row.get('per_seed', {}).values()) or '-'


def comparison_table(rows, first_column):
    '''Markdown rows of comparisons with verdict, each seed's outcome, pooled median difference, its interval, win
    rate and p-values.'''
    lines = [f'| {first_column} | verdict | outcome per seed | median difference (pooled) | 95% interval of the mean '
             '(hierarchical) | win rate | Holm p per seed |', '| --- | --- | --- | --- | --- | --- | --- |']
    for label, row in rows:
        pooled = row.get('pooled')
        if pooled is None:
            lines.append(f'| {label} | {row["verdict"]} | - | 0 | - | - | - |')
            continue
        low, high = pooled['mean_interval']
        lines.append(f'| {label} | {row["verdict"]} | {seed_outcomes(row)} | {fmt(pooled["median_difference"])} | '
                     f'[{fmt(low)}, {fmt(high)}] | {pooled["win_rate"]:.2f} | {p_values(row)} |')
    return lines


def excluded_lines(excluded):
    '''The comparisons left out of the family, one line per model, opponent and reason (listing the regimes and
    composites it covers).'''
    grouped = {}
    for name, regime, composite, opponent, reason in excluded:
        grouped.setdefault((name, opponent, reason), []).append(
            f'{REGIME_NAMES.get(regime, regime)} {display(composite)}'.strip())
    return [f'- {name}, {opponent}: {reason} ({"; ".join(cases)})'
            for (name, opponent, reason), cases in grouped.items()]


def what_the_numbers_say(summary):
    '''The claims' readings in words, derived from the verdicts.'''
    lines = ['## What the numbers say', '',
             'Derived by code from the verdicts below with the protocol\'s rules; each count is over the claim\'s '
             'models, composites and regimes (a) and (b) (a comparison in (b) that repeats one in (a) bit for bit is '
             'counted once).', '']
    for key, reading in summary['claims'].items():
        what = ('fusing BatchNorm into conv layers gives more faithful LRP' if reading['claim'] == 1 else
                'fully-connected + BatchNorm stays a problem (fusion does not help it)')
        lines.append(f'- **Claim {reading["claim"]} ({what}), against `{reading["opponent"]}`: {reading["reading"]}.** '
                     f'Fused is better in {reading["better"]} and worse in {reading["worse"]} of '
                     f'{reading["comparisons"]} comparisons ({reading["informative"]} not identical); of its '
                     f'{reading["wins_as_trained"]} wins on the models as trained, '
                     f'{reading["wins_surviving_bias_free_control"]} remain with bias-free rules (c).')
    worse = [row for row in summary['comparisons']['primary'] if row['verdict'] in ('worse', 'mixed')]
    lines += ['', f'- Fused is worse than or mixed against another handling in {len(worse)} primary comparison(s) over '
              'all regimes' + (': ' + '; '.join(f'{row["model"]}, {REGIME_NAMES[row["regime"]]}, '
                                                f'{display(row["composite"])}, vs {row["opponent"]} ({row["verdict"]})'
                                                for row in worse) if worse else '') + '.']
    sanity = summary['comparisons']['sanity']
    random_rows = [row for row in sanity if row['opponent'] == 'random']
    beats = sum(row['verdict'] == 'better' for row in random_rows)
    lines += ['', f'- Against a random heatmap, {beats} of {len(random_rows)} (model, regime, composite, handling) '
              'methods are better in every seed by the same rule; the table "Does each method beat random?" lists '
              'them.']
    return lines + ['']


def rounded(value, digits=6):
    '''``value`` (nested dicts, lists and tuples of numbers) with every float kept to ``digits`` significant digits,
    numpy scalars as Python numbers: what the results file holds, and what its report is written from.'''
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [rounded(item, digits) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isfinite(value):
        return float(f'{value:.{digits}g}')
    return value


def records_table(records):
    '''Records (dicts) as ``{'columns': [key, ...], 'rows': [[value, ...], ...]}``: one row per record, the key
    names once (every key of any record, in the order first seen; null where a record lacks it).'''
    columns = list(dict.fromkeys(key for record in records for key in record))
    return {'columns': columns, 'rows': [[record.get(column) for column in columns] for record in records]}


def read_results(text):
    '''The results file's text (:py:func:`results_json`) as the dict it was written from, records as dicts (with
    every column: None where the record had no such key).'''
    results = json.loads(text)
    table = results.get('records')
    if isinstance(table, dict):
        results['records'] = [dict(zip(table['columns'], row)) for row in table['rows']]
    return results


def results_json(results):
    '''The results file's text: the top-level entries and their entries indented, every record (a dict or list
    inside a list, or a dict two levels down) on one line, so that the file stays small and diffs by record; the
    list of ``records`` as a table of rows (:py:func:`records_table`, read back by :py:func:`read_results`).'''
    if isinstance(results.get('records'), list):
        results = {**results, 'records': records_table(results['records'])}

    def dump(value, depth):
        if isinstance(value, dict) and depth < 2 and value:
            inner = [f'{" " * (depth + 1)}{json.dumps(key)}: {dump(item, depth + 1)}' for key, item in value.items()]
        elif isinstance(value, list) and value and any(isinstance(item, (dict, list)) for item in value):
            inner = [' ' * (depth + 1) + json.dumps(item, separators=(',', ':')) for item in value]
        else:
            return json.dumps(value, separators=(',', ':'))
        opening, closing = ('{', '}') if isinstance(value, dict) else ('[', ']')
        return opening + '\n' + ',\n'.join(inner) + '\n' + ' ' * depth + closing
    return dump(results, 0) + '\n'


def unit_provenance(checks):
    '''Lines naming the command, machine and date that computed each unit (from the cache); units cached before the
    cache stored them are listed as not recorded.'''
    by_run = {}
    for unit, check in checks.items():
        run = check.get('computed_by')
        key = (run['command'], run['machine'], run.get('duplicates')) if run else None
        by_run.setdefault(key, []).append(f'{unit} ({run["date"]})' if run else unit)
    lines = ['- units computed by:' if by_run else '- no units']
    for key, units in by_run.items():
        if key is None:
            lines.append(f'  - command, machine and date not recorded (cached before the cache stored them): '
                         f'{", ".join(units)}')
        else:
            lines.append(f'  - `{key[0]}` on {key[1]}: {", ".join(units)}' +
                         (f'; duplicates {key[2]}' if key[2] else ''))
    return lines


def report_markdown(summary, args, command, host, date, rewritten=None):
    '''The whole results file (``rewritten``: the command that rewrote it from its JSON and
    when, if one did).'''
    protocol = PROTOCOL.read_text()
    protocol = protocol.split('\n', 1)[1] if protocol.startswith('# ') else protocol
    # the protocol's section titles as bold lines: headings inside <details> would break the report's outline
    protocol = re.sub(r'^#+ (.*)$', r'**\1**', protocol, flags=re.MULTILINE)
    lines = header('Faithfulness of LRP under four BatchNorm handlings (study)', command, host, date)
    if rewritten:
        lines.append(f'- report and figures rewritten from the JSON by `{rewritten[0]}` on {rewritten[1]} (nothing '
                     'recomputed)')
    declared = [f'{name} seed {seed}' for seed in SEEDS for name in (*CLAIM_MODELS[1], *CLAIM_MODELS[2],
                                                                     *TWINS.values())]
    missing = [unit for unit in declared if unit not in summary['checks']]
    if missing:
        lines.append(f'- **incomplete: {len(missing)} of the protocol\'s {len(declared)} (model, seed) units are not '
                     f'in these tables** ({", ".join(missing)}); every verdict below is over the units present')
    lines += [f'- models and seeds: {", ".join(sorted({key.rsplit(" seed ", 1)[0] for key in summary["checks"]}))}; '
              f'seeds {", ".join(map(str, summary["seeds"]))}; {args.images} images per model and seed',
              '- run time per model and seed (s): ' + ', '.join(
                  f'{key} {value["seconds"]}' for key, value in summary['checks'].items())]
    lines += unit_provenance(summary['checks']) + ['']
    lines += ['<details><summary>The protocol, as declared before the numbers</summary>', '', protocol.strip(), '',
              '</details>', '']
    lines += what_the_numbers_say(summary)

    lines += ['## Primary comparisons: fused against each handling (ROAD ABPC, higher is better)', '',
              'Paired per image; the difference is fused minus the other handling; win rate = share of images where '
              'fused is better (ties half); a seed\'s outcome is better or worse where its Holm-corrected p < 0.05 and '
              'its median difference reaches 1% of fused\'s median |ROAD ABPC|, none otherwise.', '']
    primary = summary['comparisons']['primary']
    for name in dict.fromkeys(row['model'] for row in primary):
        lines += [f'### {name}', '']
        rows = [(f'{REGIME_NAMES[row["regime"]]}, {display(row["composite"])}, vs {row["opponent"]}', row)
                for row in primary if row['model'] == name]
        lines += comparison_table(rows, 'regime, composite, opponent') + ['']
    if summary['excluded']:
        lines += ['Comparisons left out of the family:', ''] + excluded_lines(summary['excluded']) + ['']

    lines += ['## Secondary metrics: do they agree with the primary verdict?', '',
              'Each secondary metric is compared the same way (its own Holm family); a cell counts the comparisons '
              'whose verdict equals the primary one, out of the non-identical ones.', '',
              '| metric | agrees | better | worse | mixed | no difference |', '| --- | --- | --- | --- | --- | --- |']
    by_key = {(row['model'], row['regime'], row['composite'], row['opponent']): row for row in primary}
    for metric, rows in summary['comparisons'].items():
        if metric in ('primary', 'sanity'):
            continue
        informative = [row for row in rows if row['verdict'] != 'identical']
        agrees = sum(row['verdict'] == by_key[(row['model'], row['regime'], row['composite'], row['opponent'])][
            'verdict'] for row in informative)
        counts = [sum(row['verdict'] == kind for row in informative)
                  for kind in ('better', 'worse', 'mixed', 'no difference')]
        lines.append(f'| {metric} | {agrees} of {len(informative)} | ' + ' | '.join(map(str, counts)) + ' |')
    lines.append('')

    lines += ['## Does each method beat random, and gradient x input?', '',
              'ROAD ABPC of the method minus that of the baseline, paired per image (Holm over this family per '
              'seed).', '']
    sanity = summary['comparisons']['sanity']
    for name in dict.fromkeys(row['model'] for row in sanity):
        rows = [(f'{REGIME_NAMES[row["regime"]]}, {display(row["composite"])}, {row["arm"]} vs {row["opponent"]}',
                 row) for row in sanity if row['model'] == name]
        lines += [f'### {name}', ''] + comparison_table(rows, 'regime, composite, handling vs baseline') + ['']

    lines += ['## Per-method summaries', '',
              'Median and mean per image over all seeds pooled (per-seed values are in the JSON); ROAD ABPC, its '
              'MoRF AOPC, and region-perturbation ABPC per replacement value.', '']
    table = {}
    for record in summary['records']:
        key = (record['model'], record['regime'], record['composite'], record['handling'])
        table.setdefault(key, {}).setdefault(record['metric'], []).append(record)
    # models in the order they come, then baselines, regimes, composites and handlings in the protocol's order
    models = list(dict.fromkeys(key[0] for key in table))
    regimes, composites = ['baseline', *REGIME_NAMES], [''] + list(dict.fromkeys(key[2] for key in table if key[2]))
    handlings = [*BASELINE_METHODS, *HANDLINGS]
    table = dict(sorted(table.items(), key=lambda item: (
        models.index(item[0][0]), regimes.index(item[0][1]), composites.index(item[0][2]),
        handlings.index(item[0][3]) if item[0][3] in handlings else len(handlings))))
    columns = ('road_abpc', 'road_aopc_morf', 'abpc_zero', 'abpc_mean', 'abpc_blur', 'abpc_noise')
    lines += ['| model | regime | composite | handling | ' + ' | '.join(columns) + ' |',
              '| --- | --- | --- | --- | ' + ' | '.join('---' for _ in columns) + ' |']
    for (name, regime, composite, handling), metrics in table.items():
        cells = [fmt(float(np.mean([record['median'] for record in metrics[column]]))) if column in metrics else '-'
                 for column in columns]
        lines.append(f'| {name} | {REGIME_NAMES.get(regime, regime)} | {display(composite)} | {handling} | '
                     + ' | '.join(cells) + ' |')
    lines += ['', 'Cells: the mean over seeds of the per-seed median.', '']

    lines += ['## Conservation, bias share and complexity', '',
              'Heavy-tailed: the median per seed averaged over seeds, and the widest 5%-95% range of any seed. gap = '
              'share of the explained logit that does not reach the input, (logit - sum of relevance) / logit '
              '(absorbed by biases and stabilisers; negative = injected; the conservation error with the opposite '
              'sign). Gini and entropy of |heatmap| (higher Gini = sparser).', '',
              '| model | regime | composite | handling | gap median | gap 5%-95% | Gini | entropy |',
              '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for (name, regime, composite, handling), metrics in table.items():
        gap = metrics['gap']
        lines.append(
            f'| {name} | {REGIME_NAMES.get(regime, regime)} | {display(composite)} | {handling} | '
            f'{fmt(float(np.mean([r["median"] for r in gap])))} | '
            f'[{fmt(float(np.min([r["q05"] for r in gap])))}, {fmt(float(np.max([r["q95"] for r in gap])))}] | '
            f'{fmt(float(np.mean([r["median"] for r in metrics["gini"]])))} | '
            f'{fmt(float(np.mean([r["median"] for r in metrics["entropy"]])))} |')
    lines.append('')

    if summary['randomisation']:
        lines += ['## Cascading randomisation (Adebayo et al. 2018)', '',
                  'Median Spearman correlation of |heatmap| with the trained model\'s, after the top layer and after '
                  'every layer is re-initialised (a heatmap that explains the model should move towards 0).', '',
                  '| model / method | after the top layer | after all layers |', '| --- | --- | --- |']
        for key, per_seed in summary['randomisation'].items():
            tops = [seed['median_per_layer'][0] for seed in per_seed.values() if seed['median_per_layer']]
            lasts = [seed['median_per_layer'][-1] for seed in per_seed.values() if seed['median_per_layer']]
            if tops:
                lines.append(f'| {key} | {fmt(float(np.mean(tops)))} | {fmt(float(np.mean(lasts)))} |')
        if any(line.endswith('| - | - |') for line in lines):
            lines += ['', 'A `-` is a correlation that is not defined: heatmaps whose |relevance| is the same at every '
                      'pixel (the Flat rule on the first layer of an MLP, under EpsilonPlusFlat, makes them so).']
        lines.append('')

    lines += ['## Checks', '']
    for key, check in summary['checks'].items():
        parts = [f'accuracy on the images {100 * check["accuracy_on_images"]:.1f}%']
        flip = check.get('negative_scales')
        if flip:
            parts.append(f'negative scales: {len(flip["flipped"])} BatchNorms flipped (share of negative scales '
                         f'{fmt(flip["negative_share"], 2)}), function changed by {fmt(flip["function_error"])} '
                         f'(relative), ' + (f'{len(flip["skipped"])} left: ' + '; '.join(
                             f'`{bn}` {reason}' for bn, reason in flip['skipped'].items()) if flip['skipped'] else
                                           'none left'))
        if 'conv_batch_norms_fused' in check:
            parts.append(f'{check["conv_batch_norms_fused"]} conv BatchNorms fused in every arm')
        for method, reason in check['not_applicable'].items():
            parts.append(f'`{method}` not applicable: {reason}')
        lines.append(f'- {key}: ' + '; '.join(parts))
    return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------------------------------------------
# figures

def write_figures(units, summary, args):
    '''Heatmap grids (one image per class), perturbation curves per replacement value and a forest plot.'''
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from zennit_bnfuse.evaluation.figures import heatmap_grid

    composite = 'epsilon-plus-flat'
    for name in args.heatmap_models:
        unit = units.get((name, SEEDS[0]))
        if unit is None or 'heatmaps' not in unit:
            continue
        examples = list(unit['heatmaps'].values())
        images = torch.tensor([example['image'] for example in examples])
        columns = {handling: torch.tensor([example['relevance'][method_key('trained', composite, handling)]
                                           for example in examples])[:, None]
                   for handling in HANDLINGS if method_key('trained', composite, handling) in examples[0]['relevance']}
        heatmap_grid(images, columns, args.out / f'{args.tag}-heatmaps-{name}.png',
                     [class_names(name)[example['target']] for example in examples],
                     f'{name} (seed {SEEDS[0]}), {display(composite)}: one image per predicted class',
                     max_rows=len(examples))

    curves = ('road_morf', *(f'morf_{baseline}' for baseline in BASELINES))
    models = [name for name in dict.fromkeys(name for name, _ in units) if claim_of(name)]
    if models:
        figure, axes = plt.subplots(len(models), len(curves), figsize=(3.2 * len(curves), 2.6 * len(models)),
                                    squeeze=False)
        for row, name in enumerate(models):
            unit = units[(name, args.seeds[0])] if (name, args.seeds[0]) in units else None
            if unit is None:
                continue
            count = len(unit['image'])
            for column, curve in enumerate(curves):
                axis = axes[row, column]
                for label, key in [*((handling, method_key('trained', composite, handling)) for handling in HANDLINGS),
                                   *((baseline, baseline) for baseline in BASELINE_METHODS)]:
                    measured = resolve(unit, key)
                    if measured is None:
                        continue
                    curves_of = unit['methods'][measured]['curves']
                    removed = np.asarray(curves_of['road_removed' if curve.startswith('road') else 'removed']) / count
                    axis.plot(100 * removed, np.asarray(curves_of[curve]) / count, label=label,
                              linestyle='--' if key in BASELINE_METHODS else '-')
                title = 'ROAD (noisy linear imputation)' if curve.startswith('road') else \
                    f'region perturbation, {curve.split("_")[1]}'
                axis.set_title(f'{name}: {title}', fontsize='small')
                axis.set_xlabel('% of pixels removed, most relevant first')
                axis.set_ylabel('target logit')
        axes[0, 0].legend(fontsize='x-small')
        figure.suptitle(f'Mean MoRF curves per replacement value (seed {args.seeds[0]}, {display(composite)})')
        figure.tight_layout()
        figure.savefig(args.out / f'{args.tag}-curves.png', dpi=90)
        plt.close(figure)

    rows = [row for row in summary['comparisons']['primary'] if row.get('pooled')]
    if rows:
        from scipy.stats import norm
        # Bonferroni-corrected intervals over the family: the hierarchical bootstrap's standard error (from its
        # 95% interval) times the normal quantile at alpha / (2 m)
        quantile = norm.ppf(1 - ALPHA / (2 * len(rows)))
        figure, axis = plt.subplots(figsize=(10, 0.22 * len(rows) + 1.2))
        colours = {'better': 'tab:green', 'worse': 'tab:red', 'mixed': 'tab:orange', 'no difference': 'tab:gray'}
        for index, row in enumerate(rows):
            mean = row['pooled']['mean_difference']
            low, high = row['pooled']['mean_interval']
            half = (high - low) / 2 / 1.96 * quantile
            axis.errorbar(mean, index, xerr=half, fmt='o', markersize=3, color=colours.get(row['verdict'], 'black'))
        axis.axvline(0, color='black', linewidth=.8)
        axis.set_yticks(range(len(rows)))
        axis.set_yticklabels([f'{row["model"]} {row["regime"]} {row["composite"]} vs {row["opponent"]}'
                              for row in rows], fontsize=6)
        axis.invert_yaxis()
        axis.set_xlabel('fused - other, ROAD ABPC in logits (mean over images and seeds,\nBonferroni-corrected '
                        'interval; colour: verdict)', fontsize='small')
        figure.tight_layout()
        figure.savefig(args.out / f'{args.tag}-forest.png', dpi=110)
        plt.close(figure)
