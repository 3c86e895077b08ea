'''Smoke tests of the benchmark scripts: faithfulness (one process and torchrun with 2 processes), training and
speed.'''
import json
import os
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
def test_faithfulness_smoke(tmp_path):
    import faithfulness
    faithfulness.main(['--models', 'mnist-cnn-bn,mnist-mlp', '--images', '6',
                       '--composites', 'epsilon,epsilon-plus-flat',
                       '--out', str(tmp_path), '--tag', 'smoke', '--device', 'cpu'])
    text = (tmp_path / 'smoke.md').read_text()
    assert '## mnist-cnn-bn' in text and '| EpsilonPlusFlat: fused - naive |' in text
    assert '**Claim 1' in text and '- command: `python ' in text
    summary = json.loads((tmp_path / 'smoke.json').read_text())['summary']
    assert set(summary['mnist-cnn-bn']['methods']) == {
        'random', 'gradient-x-input', *(f'{c}/{h}' for c in ('epsilon', 'epsilon-plus-flat')
                                        for h in ('fused', 'unfused', 'naive'))}
    assert summary['mnist-cnn-bn']['images'] == 6
    # mnist-mlp has no BatchNorm: the three handlings give the same numbers
    rows = summary['mnist-mlp']['methods']
    assert rows['epsilon-plus-flat/fused'] == rows['epsilon-plus-flat/unfused'] == rows['epsilon-plus-flat/naive']
    for name in ('smoke-curves.png', 'smoke-heatmaps-mnist.png'):
        assert (tmp_path / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@needs_data
def test_torchrun_two_processes_give_the_same_tables(tmp_path):
    common = ['benchmarks/faithfulness.py', '--models', 'mnist-cnn-bn', '--images', '8', '--composites',
              'epsilon-plus-flat', '--no-figures', '--device', 'cpu', '--out', str(tmp_path)]
    environment = {**os.environ, 'OMP_NUM_THREADS': '1'}
    subprocess.run([sys.executable, *common, '--tag', 'single'], cwd=ROOT, check=True, env=environment,
                   capture_output=True)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29517',
                    *common, '--tag', 'sharded'], cwd=ROOT, check=True, env=environment, capture_output=True)
    assert table_rows(tmp_path / 'single.md') == table_rows(tmp_path / 'sharded.md')
    assert '2 process(es)' in (tmp_path / 'sharded.md').read_text()
    assert 'torchrun --nproc_per_node=2' in (tmp_path / 'sharded.md').read_text()


@needs_data
def test_train_smoke(tmp_path):
    import train
    torch.manual_seed(0)
    train.main(['--model', 'mnist-mlp', '--epochs', '1', '--out', str(tmp_path)])
    state = torch.load(tmp_path / 'mnist-mlp.pt', weights_only=True)
    assert 'fc1.weight' in state and 'normalize.mean' not in state


def test_speed_smoke(tmp_path):
    import speed
    speed.main(['--models', 'resnet18', '--batches', '1', '--extra', '', '--devices', 'cpu', '--repeats', '1',
                '--input-size', '32', '--out', str(tmp_path), '--tag', 'smoke'])
    text = (tmp_path / 'smoke.md').read_text()
    assert '## resnet18, batch 1, cpu' in text and '| LRP fused, SinglePass |' in text
    rows = json.loads((tmp_path / 'smoke.json').read_text())['results'][0]['rows']
    timed = [name for name, row in rows.items() if row['seconds'] is not None]
    assert {'gradient', speed.SINGLE_PASS, speed.ZPLUS_FLOOR, speed.FUSED} <= set(timed)
    targets = [line for line in table_rows(tmp_path / 'smoke.md') if line.startswith('| resnet18 | 1 | cpu |')]
    assert len(targets) == 1 and len(targets[0].split('|')) == 12  # 10 columns


def test_speed_interleaved_smoke(tmp_path):
    import speed_interleaved
    speed_interleaved.main(['--models', 'resnet18', '--batches', '1', '--extra', '', '--devices', 'cpu',
                            '--repeats', '2', '--input-size', '32', '--out', str(tmp_path), '--tag', 'smoke'])
    rows = json.loads((tmp_path / 'smoke.json').read_text())['results'][0]['rows']
    assert set(rows) == {'gradient (fused model)', *speed_interleaved.METHODS}
    assert all(len(row['seconds']) == 2 and row['median_ratio'] > 0 for row in rows.values())
    assert rows['gradient (fused model)']['median_ratio'] == 1
    table = [line for line in table_rows(tmp_path / 'smoke.md') if line.startswith('| resnet18 | 1 | cpu |')]
    assert len(table) == 1
