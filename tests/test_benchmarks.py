'''Smoke tests of the benchmark scripts: training and speed (the study has tests/test_study.py).'''
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zennit_bnfuse.evaluation.data import default_data_root

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / 'benchmarks'))
HAS_DATA = (default_data_root() / 'MNIST').is_dir()
needs_data = pytest.mark.skipif(not HAS_DATA,
                                reason=f'needs MNIST under {default_data_root()} (set ZENNIT_BNFUSE_DATA)')


def table_rows(path):
    '''The table rows of a results file, without command, machine and date.'''
    return [line for line in path.read_text().splitlines() if line.startswith('|')]


@needs_data
def test_train_smoke(tmp_path):
    import train
    torch.manual_seed(0)
    train.main(['--model', 'mnist-mlp', '--epochs', '1', '--out', str(tmp_path)])
    state = torch.load(tmp_path / 'mnist-mlp.pt', weights_only=True)
    assert 'fc1.weight' in state and 'normalize.mean' not in state


def test_train_out_then_import_ships_weights_and_record(tmp_path, monkeypatch):
    # a run on another machine writes weights and a record to --out; --import-from ships both here
    import train
    runs, package, results = tmp_path / 'runs', tmp_path / 'package', tmp_path / 'results'
    package.mkdir()
    train.main(['--model', 'mnist-mlp', '--epochs', '1', '--seeds', '3', '--out', str(runs)])
    record = json.loads((runs / 'mnist-mlp-seed3.json').read_text())
    assert record['model'] == 'mnist-mlp' and record['seed'] == 3 and '--seeds 3 --out' in record['command']
    assert 'device cpu' in record['machine'] and record['date']
    monkeypatch.setattr(train, 'RESULTS', results)
    monkeypatch.setattr(train, 'weights_path', lambda name, seed: package / f'{name}-seed{seed}.pt')
    train.main(['--import-from', str(runs)])
    assert (package / 'mnist-mlp-seed3.pt').read_bytes() == (runs / 'mnist-mlp-seed3.pt').read_bytes()
    assert json.loads((results / 'models.json').read_text())['mnist-mlp/seed3'] == record
    assert f'| mnist-mlp | 3 | {100 * record["test_accuracy"]:.2f}% |' in (results / 'models.md').read_text()
    (runs / 'mnist-mlp-seed3.pt').unlink()
    with pytest.raises(FileNotFoundError, match='has no weights beside it'):
        train.import_runs(runs)


def test_speed_smoke(tmp_path):
    import speed
    speed.main(['--models', 'resnet18', '--batches', '1', '--extra', '', '--devices', 'cpu', '--repeats', '1',
                '--input-size', '32', '--out', str(tmp_path), '--tag', 'smoke', '--memory', 'none'])
    text = (tmp_path / 'smoke.md').read_text()
    assert '## resnet18, batch 1, cpu' in text and '| LRP fused, SinglePass |' in text
    rows = json.loads((tmp_path / 'smoke.json').read_text())['results'][0]['rows']
    timed = [name for name, row in rows.items() if row['seconds'] is not None]
    assert {'gradient', speed.SINGLE_PASS, speed.ZPLUS_FLOOR, speed.FUSED} <= set(timed)
    assert {speed.COMPOSITE_LRP, "FusedLRP (Captum rules), engine='captum'"} <= set(timed)
    targets = [line for line in table_rows(tmp_path / 'smoke.md') if line.startswith('| resnet18 | 1 | cpu |')]
    assert len(targets) == 1 and len(targets[0].split('|')) == 12  # 10 columns


def test_speed_memory_child_reports_its_own_peak(capsys):
    # in-process here (the benchmark starts it as a new process): the peak resident set after building the model
    # and calling the method, read from VmHWM
    import speed
    speed.memory_child(json.dumps({'arch': 'resnet18', 'batch': 1, 'device': 'cpu', 'input_size': 32,
                                   'method': 'gradient'}))
    peak = json.loads(capsys.readouterr().out.splitlines()[-1])['peak_kib']
    assert peak == speed.own_peak_resident_kib() and peak > 10_000


def test_speed_interleaved_smoke(tmp_path):
    import speed_interleaved
    speed_interleaved.main(['--models', 'resnet18', '--batches', '1', '--extra', '', '--devices', 'cpu',
                            '--repeats', '2', '--input-size', '32', '--out', str(tmp_path), '--tag', 'smoke'])
    rows = json.loads((tmp_path / 'smoke.json').read_text())['results'][0]['rows']
    assert set(rows) == {speed_interleaved.GRADIENT, *(name for name, _ in speed_interleaved.METHODS.values())}
    assert all(len(row['seconds']) == len(row['cpu_seconds']) == len(row['minor_page_faults']) == 2
               and row['median_ratio'] > 0 and all(isinstance(faults, int) and faults >= 0
                                                   for faults in row['minor_page_faults'])
               for row in rows.values())
    assert rows['gradient (fused model)']['median_ratio'] == rows['gradient (fused model)']['median_cpu_ratio'] == 1
    # one row per clock, the page faults, the FusedLRP target (the z+ targets name other models) and the
    # registration comparison
    table = [line for line in table_rows(tmp_path / 'smoke.md') if line.startswith('| resnet18 | 1 | cpu |')]
    assert len(table) == 5 and 'FusedLRP(), default engine' in table[3]
    faults = table[2].strip('|').split('|')[3:]
    assert [int(cell.replace(',', '')) for cell in faults] == [
        round(statistics.median(rows[name]['minor_page_faults']))
        for name in (*(name for name, _ in speed_interleaved.METHODS.values()), speed_interleaved.GRADIENT)]
    assert 'composite registered per call' in table[4] and table[4].endswith('| - | - |')


def test_speed_interleaved_methods_subset(tmp_path):
    import speed_interleaved
    speed_interleaved.main(['--models', 'resnet18', '--batches', '1', '--extra', '', '--devices', 'cpu',
                            '--repeats', '1', '--input-size', '32', '--out', str(tmp_path), '--tag', 'subset',
                            '--methods', 'floor,composite'])
    rows = json.loads((tmp_path / 'subset.json').read_text())['results'][0]['rows']
    assert set(rows) == {speed_interleaved.GRADIENT, speed_interleaved.FLOOR, speed_interleaved.COMPOSITE_LRP}
    with pytest.raises(SystemExit):
        speed_interleaved.main(['--methods', 'floor,nothing'])


def test_command_line_names_the_allocator_settings(monkeypatch):
    # glibc's malloc settings change how often freed memory is faulted in again, so LRP's speed ratios: the recorded
    # command carries them
    import provenance
    for name in provenance.ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, 'argv', ['benchmarks/speed_interleaved.py'])
    assert provenance.command_line(['--repeats', '3']) == 'python benchmarks/speed_interleaved.py --repeats 3'
    # an empty argument was written as nothing, so the recorded command failed as written (`--extra  --repeats`)
    assert provenance.command_line(['--extra', '', '--repeats', '3']) == (
        "python benchmarks/speed_interleaved.py --extra '' --repeats 3")
    monkeypatch.setenv('MALLOC_TRIM_THRESHOLD_', '68719476736')
    monkeypatch.setenv('MALLOC_MMAP_THRESHOLD_', '33554432')
    assert provenance.command_line(['--repeats', '3']) == (
        'MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736 python benchmarks/speed_interleaved.py '
        '--repeats 3')
    # PyTorch's own: its CPU allocator asks for transparent huge pages
    monkeypatch.delenv('MALLOC_TRIM_THRESHOLD_')
    monkeypatch.delenv('MALLOC_MMAP_THRESHOLD_')
    monkeypatch.setenv('THP_MEM_ALLOC_ENABLE', '1')
    assert provenance.command_line([]) == 'THP_MEM_ALLOC_ENABLE=1 python benchmarks/speed_interleaved.py'


def test_allocators_script_records_each_setting(tmp_path):
    # one process per allocator setting, each table's command naming its settings (the ratios are compared across
    # these files, so a file that said "defaults" for a run with other settings would mislead)
    script = Path(__file__).parents[1] / 'benchmarks' / 'allocators.sh'
    environment = {'PATH': os.environ['PATH'], 'HOME': os.environ.get('HOME', str(tmp_path)), 'PYTHON': sys.executable,
                   'MODELS': 'resnet18', 'BATCHES': '1', 'REPEATS': '1', 'INPUT_SIZE': '32', 'OUT': str(tmp_path),
                   'LIBRARIES': str(tmp_path / 'none')}
    result = subprocess.run(['bash', str(script)], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'jemalloc: ' + str(tmp_path / 'none' / 'libjemalloc.so.2') + ' not installed, left out' in result.stdout
    commands = {name: json.loads((tmp_path / f'speed-interleaved-allocators-{name}.json').read_text())['command']
                for name in ('default', 'thp', 'glibc-keep', 'glibc-keep-below-32mib', 'keep-freed-memory')}
    assert commands['default'].startswith('python benchmarks/speed_interleaved.py --methods floor,composite')
    assert commands['thp'].startswith('THP_MEM_ALLOC_ENABLE=1 python ')
    assert commands['glibc-keep'].startswith(
        'MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 python ')
    assert commands['glibc-keep-below-32mib'].startswith(
        'MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736 python ')
    # the one set inside the process says so in its command, with no settings before it
    assert commands['keep-freed-memory'].startswith('python benchmarks/speed_interleaved.py ')
    assert commands['keep-freed-memory'].endswith(
        '--keep-freed-memory --tag speed-interleaved-allocators-keep-freed-memory')
    assert sorted(path.name for path in tmp_path.glob('*.md')) == [
        f'speed-interleaved-allocators-{name}.md'
        for name in ('default', 'glibc-keep-below-32mib', 'glibc-keep', 'keep-freed-memory', 'thp')]


def test_allocators_script_fails_naming_the_failed_runs(tmp_path):
    # a run that fails (here every run: a Python that exits 1) fails the script, which still tries the others
    script = Path(__file__).parents[1] / 'benchmarks' / 'allocators.sh'
    failing = tmp_path / 'python'
    failing.write_text('#!/bin/sh\necho "no torch here" >&2\nexit 1\n')
    failing.chmod(0o755)
    environment = {'PATH': os.environ['PATH'], 'PYTHON': str(failing), 'LIBRARIES': str(tmp_path / 'none')}
    result = subprocess.run(['bash', str(script)], env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert 'failed: default thp glibc-keep glibc-keep-below-32mib keep-freed-memory' in result.stderr
    assert result.stdout.count('== ') == 7
    # an allocator library that is there but cannot be preloaded (ld.so would run the benchmark on glibc's malloc
    # under the library's name) is not run, and counts as failed
    for library in ('libjemalloc.so.2', 'libtcmalloc_minimal.so.4'):
        (tmp_path / library).write_text('not a shared object')
    environment.update(PYTHON=sys.executable, LIBRARIES=str(tmp_path), MODELS='no-such-model')
    result = subprocess.run(['bash', str(script)], env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and (
        'failed: default thp glibc-keep glibc-keep-below-32mib keep-freed-memory jemalloc tcmalloc' in result.stderr)
    assert result.stdout.count('cannot be preloaded, not run') == 2


def test_large_allocations_count_new_tensors_only():
    from allocations import LargeAllocations
    a, b, c = (torch.ones(1024) for _ in range(3))
    with LargeAllocations(threshold=a.untyped_storage().nbytes()) as allocations:
        torch.add(a, b)  # new: counted
        a.add_(b)  # in place
        torch.mul(a, b, out=c)  # into a given tensor
        a.view(32, 32)  # a view of a's memory
        a[:10].clone()  # new, but below the threshold
        torch.cat([a, b])  # new, twice the threshold: counted
        torch.mul(a, b, out=torch.empty(0))  # into a given tensor that had to grow: new memory, counted
    assert sum(allocations.counts.values()) == 3
    assert {operator for operator, _ in allocations.counts} == {'add', 'cat', 'mul'}
    assert sum(allocations.bytes.values()) == 4 * a.untyped_storage().nbytes()


def test_allocations_smoke(tmp_path):
    import allocations
    from speed_interleaved import METHODS
    allocations.main(['--models', 'resnet18', '--batches', '2', '--input-size', '32', '--threshold', '0.1',
                      '--repeats', '2', '--out', str(tmp_path), '--tag', 'smoke'])
    rows = json.loads((tmp_path / 'smoke.json').read_text())['results']
    assert [row['method'] for row in rows] == [METHODS['floor'][0], METHODS['composite'][0]]
    floor, composite = rows
    assert floor['allocations'] > 0 and composite['allocations'] > 0
    assert len(composite['page_faults_per_call']) == 2
    # SinglePass's own allocations are attributed to its lines; the floor (the fused model's gradient) has none
    assert any(site['caller'].startswith('zennit_bnfuse/singlepass.py:') for site in composite['by_site'])
    assert not any(site['caller'].startswith('zennit_bnfuse/singlepass.py:') for site in floor['by_site'])
    assert any(site['caller'] == 'autograd / the model' for site in floor['by_site'])
    assert sum(site['count'] for site in composite['by_site']) == composite['allocations']
    # two tables, each with a header and a separator row
    assert len(table_rows(tmp_path / 'smoke.md')) == 4 + 2 + len(floor['by_site']) + len(composite['by_site'])


def test_levers_smoke(tmp_path, monkeypatch):
    # the table's plumbing, with torch.compile replaced by the eager function (so 'compiled' here is the eager tail
    # against itself; the compiled kernel's bits are the next test's)
    import levers
    monkeypatch.setattr(torch, 'compile', lambda function, **options: function)
    levers.main(['--batches', '1', '--repeats', '1', '--input-size', '32', '--out', str(tmp_path), '--tag', 'smoke'])
    result = json.loads((tmp_path / 'smoke.json').read_text())['results'][0]
    # resnet50: 53 convolutions, the first reads the image
    assert result['model'] == 'resnet50' and result['rows']['layers'] == 52
    assert result['rows']['same_bits'] == {'stacked': True, 'compiled': True}
    assert set(result['rows']['seconds']) == {'separate', 'stacked', 'eager tail', 'compiled tail'}
    assert len(table_rows(tmp_path / 'smoke.md')) == 3


@pytest.mark.skipif(shutil.which('c++') is None and shutil.which('g++') is None,
                    reason='torch.compile on the CPU needs a C++ compiler')
def test_levers_compiled_tail_gives_the_eager_tails_bits():
    # the real compiled kernel, compiled once for every shape as levers.py compiles it
    import levers
    compiled = torch.compile(levers.tail, dynamic=True)
    conv = torch.nn.Conv2d(3, 4, 3)
    for shape in [(1, 3, 8, 8), (2, 3, 11, 9)]:
        layer = levers.Layer(conv, torch.rand(shape), torch.Generator().manual_seed(1))
        assert torch.equal(compiled(layer.grad, layer.z_plus), layer.eager_tail())


@pytest.mark.skipif(not any((default_data_root() / name).is_dir() for name in ('CIFAR10-JPEG', 'CIFAR10')),
                    reason=f'needs CIFAR-10 under {default_data_root()} (set ZENNIT_BNFUSE_DATA)')
def test_throughput_smoke(tmp_path):
    import throughput
    throughput.main(['--images', '6', '--batch', '4', '--cifar10-models', 'cifar10-vgg-bn', '--resnet50-images', '1',
                     '--resnet50-batch', '1', '--devices', 'cpu', '--out', str(tmp_path), '--tag', 'smoke'])
    results = json.loads((tmp_path / 'smoke.json').read_text())['results']
    assert [(result['workload'], result['batch']) for result in results] == [
        ('cifar10-vgg-bn (CIFAR-10 test set, 32x32)', 4), ('resnet50 (random weights, 224x224)', 1)]
    for result in results:
        assert set(result['rows']) == {throughput.GRADIENT, *throughput.METHODS}
        assert all(row['seconds'] > 0 and row['peak_mb'] is None for row in result['rows'].values())
        assert {row['images'] for row in result['rows'].values()} == {6 if result['batch'] == 4 else 1}
    assert len(table_rows(tmp_path / 'smoke.md')) == 2 + 2 * 5  # header, separator, a row per method and workload
    with pytest.raises(SystemExit):
        throughput.main(['--workloads', 'imagenet'])


def test_zoo_table_where_no_model_is_clean_in_float32():
    '''The summary took max() over the models whose float32 logits are within 1e-5 of their float64 ones: a run of
    efficientnetv2_rw_t alone raised ValueError after measuring it, and wrote nothing.'''
    import zoo
    rows = [row for row in json.loads((ROOT / 'benchmarks/results/zoo.json').read_text())['suites']['timm']
            if row['model'] == 'efficientnetv2_rw_t']
    assert rows and rows[0]['float32_noise'] > 1e-5
    assert "no model's float32 logits are within 1e-5 of its float64 ones" in '\n'.join(zoo.table('timm', rows))


@pytest.mark.parametrize('script', ['study', 'metric_costs'])
def test_data_loading_benchmarks_take_the_options_their_message_names(script, tmp_path):
    '''The message for missing data names --data-root and --download; study.py had no --download, metric_costs.py
    neither option.'''
    module = __import__(script)
    argv = ['--data-root', str(tmp_path)] + ([] if script == 'metric_costs' else [
        '--quick', '--out', str(tmp_path / 'out'), '--fresh', '--no-figures'])
    with pytest.raises(FileNotFoundError, match=rf'not found under {tmp_path}.*pass --data-root.*or --download'):
        module.main(argv)
    assert module.parse_args(['--download']).download


def test_road_tie_breaking_keeps_every_strict_order():
    from road_ties import tie_breaking
    relevance = torch.tensor([[[[3., 0.], [0., -1e-3]]], [[[0., 0.], [0., 0.]]]], dtype=torch.float64)
    broken = tie_breaking(relevance).flatten(1)
    assert broken.unique(dim=1).shape == broken.shape  # no ties left
    assert torch.equal(broken[0].argsort(), torch.tensor([3, 1, 2, 0])) or torch.equal(
        broken[0].argsort(), torch.tensor([3, 2, 1, 0]))
    assert (broken[0] - relevance.flatten(1)[0]).abs().max() < 1e-8


@needs_data
def test_road_ties_smoke(tmp_path):
    import road_ties
    road_ties.main(['--images', '2', '--composites', 'captum-epsilon', '--handlings', 'fused', '--out', str(tmp_path)])
    text = (tmp_path / 'road-ties.md').read_text()
    assert '- command: `python' in text and '| captum-epsilon | fused |' in text
    assert json.loads((tmp_path / 'road-ties.json').read_text())['rows'][0]['zero_share'] > 0


def test_engine_agreement_smoke(tmp_path):
    '''resnet18: both classes' default engines equal the libraries' own hooks bit for bit (as the tests of the
    engines hold); the table says so, with the command, machine and date.'''
    import engine_agreement
    engine_agreement.main(['--suites', 'torchvision', '--models', 'resnet18', '--input-size', '32',
                           '--results', str(tmp_path)])
    assert table_rows(tmp_path / 'engine-agreement.md')[2:] == ['| torchvision | resnet18 | 32 | equal | equal |']
    record = json.loads((tmp_path / 'engine-agreement.json').read_text())
    assert record['command'].endswith('--models resnet18 --input-size 32 --results ' + str(tmp_path))
    assert record['machine'] and record['date']


def test_fold_check_rounding_smoke(tmp_path):
    '''resnet18: the check keeps its exact folds on logits, whose values need no rounding allowance, and refuses them
    on a Siamese difference of a near-duplicate pair, saying that it cancels; the most epsilons an exact fold took
    stay far below the allowance.'''
    import fold_check_rounding
    from zennit_bnfuse.verification import ROUNDING_ALLOWANCE
    fold_check_rounding.main(['--models', 'resnet18', '--heads', 'logits,siamese', '--results', str(tmp_path)])
    record = json.loads((tmp_path / 'fold-check-rounding.json').read_text())
    rows = {(row['head'], row['batch']): row for row in record['rows']}  # batch 2: the 1e-12 pair
    assert [rows['logits', batch]['kept'] for batch in (1, 2, 4)] == ['yes'] * 3
    assert rows['logits', 1]['epsilons'] == 0.
    assert 'they cancel' in rows['siamese', 2]['kept']
    assert 0 < max(row['epsilons'] for row in record['rows']) < ROUNDING_ALLOWANCE / 10
    assert record['command'].endswith('--heads logits,siamese --results ' + str(tmp_path))
