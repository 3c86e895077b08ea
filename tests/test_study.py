'''Tests of the study (benchmarks/study.py, study_analysis.py, study_report.py): a quick run end to end, the same
tables from two torchrun processes, and the decision rules on hand-made numbers.'''
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from zennit_bnfuse.evaluation.data import default_data_root

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / 'benchmarks'))
needs_data = pytest.mark.skipif(not (default_data_root() / 'MNIST').is_dir(),
                                reason=f'needs MNIST under {default_data_root()} (set ZENNIT_BNFUSE_DATA)')

from study_analysis import claim_verdicts, compare, comparison_plan  # noqa: E402
from study_design import method_key  # noqa: E402


def table_rows(path):
    '''The table rows of a results file.'''
    return [line for line in path.read_text().splitlines() if line.startswith('|')]


@needs_data
def test_quick_study_end_to_end(tmp_path):
    import study
    study.main(['--quick', '--out', str(tmp_path), '--fresh'])
    text = (tmp_path / 'faithfulness.md').read_text()
    for section in ('## What the numbers say', '## Primary comparisons', '## Secondary metrics',
                    '## Does each method beat random', '## Conservation, bias share and complexity',
                    '## Cascading randomisation', '## Checks', 'The protocol, as declared before the numbers'):
        assert section in text, section
    assert '**Claim 1' in text and '**Claim 2' in text and '- command: `python ' in text
    # EpsilonPlusFlat's heatmaps on the MLP are constant: ROAD and the randomisation check measure nothing there
    assert 'not measurable: ROAD ABPC is 0 on every image under both handlings' in text
    assert 'A `-` is a correlation that is not defined' in text
    # each unit names the command that computed it (kept in the cache, so later reports still name it)
    computed = [line for line in text.splitlines() if line.startswith('  - `python ')]
    assert len(computed) == 1 and '--fresh' in computed[0] and 'mnist-cnn-bn seed 0 (' in computed[0]
    from study_report import read_results
    results = read_results((tmp_path / 'faithfulness.json').read_text())
    record = results['records'][0]
    assert {'model', 'seed', 'regime', 'composite', 'handling', 'metric', 'replacement', 'n', 'mean', 'median',
            'q05', 'q95'} <= set(record)
    assert {row['replacement'] for row in results['records']} >= {'road', 'zero', 'mean', 'blur', 'noise'}
    faithfulness = [row for row in results['records'] if row['replacement'] is not None]
    assert faithfulness and all(row['mean_interval'][0] <= row['mean'] <= row['mean_interval'][1]
                                for row in faithfulness)
    primary = results['comparisons']['primary']
    assert primary and all(row['verdict'] in ('better', 'worse', 'mixed', 'no difference', 'identical')
                           for row in primary)
    decided = [row for row in primary if row['verdict'] != 'identical']
    assert decided and {'p_holm', 'win_rate', 'median_difference', 'mean_interval'} <= set(
        next(iter(decided[0]['per_seed'].values())))
    # the sign-flip regime keeps the function, and every seed's check says so
    assert all(check['negative_scales']['function_error'] < 1e-5 for check in results['checks'].values())
    for name in ('faithfulness-curves.png', 'faithfulness-forest.png', 'faithfulness-heatmaps-mnist-cnn-bn.png'):
        assert (tmp_path / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    # a second run reuses the per-unit cache and writes the same tables
    first = table_rows(tmp_path / 'faithfulness.md')
    study.main(['--quick', '--out', str(tmp_path), '--no-figures'])
    assert table_rows(tmp_path / 'faithfulness.md') == first
    # --rerender rewrites the same report from the results file alone (nothing recomputed)
    written = (tmp_path / 'faithfulness.md').read_text()
    (tmp_path / 'faithfulness.md').unlink()
    study.main(['--quick', '--out', str(tmp_path), '--no-figures', '--rerender'])
    rewritten = (tmp_path / 'faithfulness.md').read_text().splitlines(keepends=True)
    said = [line for line in rewritten if line.startswith('- report and figures rewritten from the JSON by `')]
    assert len(said) == 1 and '--rerender' in said[0]
    assert ''.join(line for line in rewritten if line not in said) == written
    # the protocol sits in a <details> block without headings of its own (they would break the docs' outline)
    protocol = written.split('<details>', 1)[1].split('</details>', 1)[0]
    assert '**Questions**' in protocol and not any(line.startswith('#') for line in protocol.splitlines())


@needs_data
def test_torchrun_two_processes_give_the_same_tables(tmp_path):
    common = ['benchmarks/study.py', '--quick', '--images', '8', '--randomisation-images', '0', '--no-figures',
              '--fresh', '--device', 'cpu', '--regimes', 'trained,negative-scales', '--handlings', 'fused,naive']
    environment = {**os.environ, 'OMP_NUM_THREADS': '1'}
    subprocess.run([sys.executable, *common, '--out', str(tmp_path / 'single')], cwd=ROOT, check=True,
                   env=environment, capture_output=True)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29518',
                    *common, '--out', str(tmp_path / 'sharded')], cwd=ROOT, check=True, env=environment,
                   capture_output=True)
    single, sharded = tmp_path / 'single' / 'faithfulness.md', tmp_path / 'sharded' / 'faithfulness.md'
    assert table_rows(single) == table_rows(sharded) and table_rows(single)
    assert '2 process(es)' in sharded.read_text() and 'torchrun --nproc_per_node=2' in sharded.read_text()


def unit(scores, duplicates=None):
    '''A hand-made unit: ``scores`` maps a method key to its per-image primary metric.'''
    return {'methods': {key: {'metrics': {'road_abpc': list(values)}} for key, values in scores.items()},
            'duplicates': duplicates or {}, 'not_applicable': {},
            'image': list(range(len(next(iter(scores.values())))))}


def settings():
    return SimpleNamespace(regimes=['trained'], composites=['epsilon-plus-flat'], handlings=['fused', 'unfused'])


def test_comparisons_follow_the_declared_rules():
    '''fused beats unfused in both seeds by a clear margin -> better; a duplicate -> identical; the baselines are
    compared in their own family; one seed going the other way -> mixed.'''
    rng = np.random.default_rng(0)
    fused = method_key('trained', 'epsilon-plus-flat', 'fused')
    unfused = method_key('trained', 'epsilon-plus-flat', 'unfused')

    def scores(shift):
        base = rng.normal(1, .1, 200)
        return {fused: base + shift, unfused: base, 'random': base - 1, 'gradient-x-input': base - 1}

    units = {('mnist-cnn-bn', 0): unit(scores(.2)), ('mnist-cnn-bn', 1): unit(scores(.2))}
    plan, excluded = comparison_plan(units, settings())
    assert ('primary', 'mnist-cnn-bn', 'trained', 'epsilon-plus-flat', 'fused', 'unfused') in plan and not excluded
    rows = compare(units, [item for item in plan if item[0] == 'primary'], 'road_abpc', [0, 1])
    assert [row['verdict'] for row in rows] == ['better']
    assert all(seed['p_holm'] < .05 and seed['win_rate'] == 1 for seed in rows[0]['per_seed'].values())
    sanity = compare(units, [item for item in plan if item[0] == 'sanity'], 'road_abpc', [0, 1])
    assert {row['verdict'] for row in sanity} == {'better'}

    units[('mnist-cnn-bn', 1)] = unit(scores(-.2))
    assert compare(units, [item for item in plan if item[0] == 'primary'], 'road_abpc', [0, 1])[0]['verdict'] == \
        'mixed'

    same = scores(0.)
    units = {('mnist-cnn-bn', 0): unit({key: value for key, value in same.items() if key != unfused},
                                       duplicates={unfused: fused})}
    rows = compare(units, [item for item in plan if item[0] == 'primary'], 'road_abpc', [0])
    assert rows[0]['verdict'] == 'identical'


def test_negative_scales_repeating_the_trained_model_are_counted_once():
    '''Where both handlings give in (b) bitwise the relevance they give in (a), the (b) comparison (and the (b)
    method's baseline comparisons) would repeat (a)'s: left out with the reason; a (b) that differs stays.'''
    key = {(regime, handling): method_key(regime, 'epsilon-plus-flat', handling)
           for regime in ('trained', 'negative-scales') for handling in ('fused', 'unfused')}
    rng = np.random.default_rng(1)
    scores = {key['trained', handling]: rng.normal(1, .1, 50) for handling in ('fused', 'unfused')}
    scores.update({'random': rng.normal(0, .1, 50), 'gradient-x-input': rng.normal(0, .1, 50),
                   key['negative-scales', 'unfused']: rng.normal(1, .1, 50)})
    options = SimpleNamespace(regimes=['trained', 'negative-scales'], composites=['epsilon-plus-flat'],
                              handlings=['fused', 'unfused'])
    # fused is the same in (b) (it always is); unfused differs: both (b) comparisons stay
    units = {('mnist-cnn-bn', 0): unit(scores, duplicates={key['negative-scales', 'fused']: key['trained', 'fused']})}
    plan, excluded = comparison_plan(units, options)
    assert ('primary', 'mnist-cnn-bn', 'negative-scales', 'epsilon-plus-flat', 'fused', 'unfused') in plan
    assert [item[3] for item in excluded] == ['fused vs the baselines']
    # unfused the same in (b) as well: the (b) comparison repeats (a)'s and is left out
    scores.pop(key['negative-scales', 'unfused'])
    units = {('mnist-cnn-bn', 0): unit(scores, duplicates={key['negative-scales', handling]: key['trained', handling]
                                                           for handling in ('fused', 'unfused')})}
    plan, excluded = comparison_plan(units, options)
    assert [item for item in plan if item[2] == 'negative-scales'] == []
    assert ('mnist-cnn-bn', 'negative-scales', 'epsilon-plus-flat', 'unfused',
            'same relevance as (a) as trained (counted once, under (a))') in excluded
    assert ('primary', 'mnist-cnn-bn', 'trained', 'epsilon-plus-flat', 'fused', 'unfused') in plan


def test_a_pair_identical_in_one_seed_only_gets_no_difference_there():
    '''compare() raised KeyError: the identical seed is outside the Holm family, and its comparison was missing.'''
    rng = np.random.default_rng(2)
    fused = method_key('trained', 'epsilon-plus-flat', 'fused')
    unfused = method_key('trained', 'epsilon-plus-flat', 'unfused')
    base = rng.normal(1, .1, 100)
    scores = {fused: base + .2, unfused: base, 'random': base - 1, 'gradient-x-input': base - 1}
    units = {('mnist-cnn-bn', 0): unit({key: value for key, value in scores.items() if key != unfused},
                                       duplicates={unfused: fused}),
             ('mnist-cnn-bn', 1): unit(scores)}
    plan, _ = comparison_plan(units, settings())
    row, = compare(units, [item for item in plan if item[0] == 'primary'], 'road_abpc', [0, 1])
    assert [(seed['outcome'], seed['p_holm']) for seed in row['per_seed'].values()] == [
        ('none', 1.), ('better', row['per_seed'][1]['p_holm'])]
    assert row['verdict'] == 'no difference'


@pytest.mark.parametrize('flat_handlings, measurable', [(('fused', 'unfused'), False), (('unfused',), True)])
def test_a_comparison_of_heatmaps_that_rank_no_pixel_is_not_measurable(flat_handlings, measurable):
    '''EpsilonPlusFlat on an MLP: constant heatmaps, ABPC exactly 0 on every image under every handling; the
    comparison said "no difference" and counted for claim 2.'''
    rng = np.random.default_rng(3)
    scores = {method_key('trained', 'epsilon-plus-flat', handling): (
        np.zeros(50) if handling in flat_handlings else rng.normal(1, .1, 50)) for handling in ('fused', 'unfused')}
    scores.update({'random': rng.normal(0, .1, 50), 'gradient-x-input': rng.normal(0, .1, 50)})
    units = {('mnist-mlp-bn', seed): unit(scores) for seed in (0, 1)}
    plan, excluded = comparison_plan(units, settings())
    assert (('primary', 'mnist-mlp-bn', 'trained', 'epsilon-plus-flat', 'fused', 'unfused') in plan) is measurable
    assert [reason.startswith('not measurable: ROAD ABPC is 0 on every image under both handlings')
            for *_, reason in excluded] == ([] if measurable else [True])


def test_a_tiny_effect_is_no_difference():
    '''Significant but below 1% of fused's median: no difference (the protocol's minimum effect).'''
    fused = method_key('trained', 'epsilon-plus-flat', 'fused')
    unfused = method_key('trained', 'epsilon-plus-flat', 'unfused')
    base = np.linspace(1, 2, 300)
    units = {('mnist-cnn-bn', 0): unit({fused: base + 1e-3, unfused: base, 'random': base, 'gradient-x-input': base})}
    plan, _ = comparison_plan(units, settings())
    row = compare(units, [item for item in plan if item[0] == 'primary'], 'road_abpc', [0])[0]
    assert row['per_seed'][0]['p_holm'] < .05 and row['verdict'] == 'no difference'


@pytest.mark.parametrize('claim, verdicts, reading', [
    (1, ['better', 'no difference'], 'supported'),
    (1, ['better', 'better', 'worse'], 'partly supported'),
    (1, ['better', 'worse'], 'contradicted'),
    (1, ['no difference', 'identical'], 'not shown'),
    (2, ['no difference', 'worse'], 'supported'),
    (2, ['better', 'no difference'], 'not supported'),
    (2, ['better', 'no difference', 'no difference', 'worse'], 'partly supported'),
])
def test_claim_readings(claim, verdicts, reading):
    model = 'cifar10-vgg-bn' if claim == 1 else 'mnist-mlp-bn'
    rows = [{'model': model, 'opponent': 'naive', 'regime': 'trained', 'composite': f'c{index}', 'verdict': verdict}
            for index, verdict in enumerate(verdicts)]
    readings = claim_verdicts(rows, settings())
    assert readings[f'claim {claim} vs naive']['reading'] == reading


def test_unit_provenance_groups_units_by_command_and_names_the_unrecorded():
    from study_report import unit_provenance
    run = {'command': 'python benchmarks/study.py --models a', 'machine': 'host, 1 CPU threads', 'date': 'D'}
    lines = unit_provenance({'a seed 0': {'computed_by': run}, 'a seed 1': {'computed_by': run},
                             'b seed 0': {'computed_by': None}})
    assert lines == ['- units computed by:',
                     '  - `python benchmarks/study.py --models a` on host, 1 CPU threads: a seed 0 (D), a seed 1 (D)',
                     '  - command, machine and date not recorded (cached before the cache stored them): b seed 0']


def test_results_file_rounds_to_six_digits_and_keeps_a_record_per_line():
    from study_report import read_results, records_table, results_json, rounded
    results = rounded({'command': 'c', 'seeds': (0, 1),
                       'records': [{'mean': np.float64(1 / 3), 'n': np.int64(5), 'interval': None},
                                   {'mean': float('nan'), 'n': 2, 'interval': [1e-300, 2.]}],
                       'claims': {'claim 1': {'better': 2, 'share': 0.123456789}},
                       'excluded': [['a', 'b'], ['c', 'd']]})
    assert results['records'][0] == {'mean': 0.333333, 'n': 5, 'interval': None}
    assert results['claims']['claim 1']['share'] == 0.123457
    assert results['records'][1]['interval'] == [1e-300, 2.] and results['seeds'] == [0, 1]
    text = results_json(results)
    lines = text.splitlines()
    # the records as a table: the column names once, a row per record
    assert ' "records": {' in lines and '  "columns": ["mean","n","interval"],' in lines
    assert '   [0.333333,5,null],' in lines and '   [NaN,2,[1e-300,2.0]]' in lines
    assert '  "claim 1": {"better":2,"share":0.123457}' in lines
    assert '  ["a","b"],' in lines and ' "seeds": [0,1],' in lines
    again = read_results(text)
    assert np.isnan(again['records'][1].pop('mean')) and again['records'][1] == {'n': 2, 'interval': [1e-300, 2.]}
    assert again['records'][0] == results['records'][0] and again['claims'] == results['claims']
    assert json.loads(text)['records']['rows'][0] == [0.333333, 5, None]
    # records with other keys share the columns; a key a record lacks reads back as None
    assert records_table([{'a': 1}, {'b': 2, 'a': 3}]) == {'columns': ['a', 'b'], 'rows': [[1, None], [3, 2]]}


@needs_data
def test_units_from_cuda_get_their_duplicates_decided_on_the_cpu(tmp_path):
    # a unit computed on CUDA measures every method: its backward is not bit-reproducible, so repeats of a method
    # need not be bitwise equal there. --recheck-duplicates decides them on the CPU and drops their measurements,
    # giving the unit a run on the CPU would have written.
    import torch
    import study
    common = ['--quick', '--images', '8', '--randomisation-images', '0', '--no-figures', '--device', 'cpu',
              '--regimes', 'trained,negative-scales', '--handlings', 'fused,naive', '--out', str(tmp_path)]
    study.main([*common, '--fresh'])
    files = sorted((tmp_path / 'study-cache').glob('*.pt'))
    expected = {}
    for file in files:
        stored = torch.load(file, weights_only=False)
        results = stored['results']
        expected[file] = (dict(results['duplicates']), set(results['methods']))
        assert results['duplicates'], file  # negative scales with fused BN repeat the trained model
        for key, first in results['duplicates'].items():  # as on CUDA: measured, with different last bits
            measured = json.loads(json.dumps(results['methods'][first]))
            measured['metrics']['road_abpc'][0] += 1e-12
            results['methods'][key] = measured
        results['duplicates'] = {}
        results['provenance']['machine'] += ', device cuda (a GPU)'
        torch.save(stored, file)
    study.main([*common, '--recheck-duplicates'])
    for file in files:
        results = torch.load(file, weights_only=False)['results']
        assert (results['duplicates'], set(results['methods'])) == expected[file]
        assert 'decided on the CPU by `python ' in results['provenance']['duplicates']
    modified = [file.stat().st_mtime_ns for file in files]
    study.main([*common, '--recheck-duplicates'])  # nothing left to do: the units stay as they are
    assert [file.stat().st_mtime_ns for file in files] == modified
    study.main(common)
    assert 'duplicates decided on the CPU by `python ' in (tmp_path / 'faithfulness.md').read_text()


@needs_data
def test_a_unit_moved_to_the_cpu_explains_the_same_images_alike():
    import torch
    import study
    args = study.parse_args(['--quick', '--images', '4', '--device', 'cpu', '--handlings', 'fused,naive'])
    images, labels, channel_mean = study.load_data('mnist', args, False)
    unit = study.UnitEvaluation('mnist-cnn-bn', 0, images, labels, torch.arange(len(images)), channel_mean, args)
    moved = unit.on_cpu()
    assert moved.results is not unit.results and moved.model is not unit.model
    first, second = unit.explain_all()[0], moved.explain_all()[0]
    assert list(first) == list(second) and all(torch.equal(first[key], second[key]) for key in first)
