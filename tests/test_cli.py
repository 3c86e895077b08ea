'''Tests of the bnfuse command, run in a subprocess as a user runs it.'''
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zennit_bnfuse.evaluation.data import default_data_root

ROOT = Path(__file__).parent.parent
DEMO = ROOT / 'zennit_bnfuse' / 'evaluation' / 'demo'
PNG = b'\x89PNG\r\n\x1a\n'


def bnfuse(*args, cwd=ROOT):
    '''Run ``python -m zennit_bnfuse`` with ``args``; returns the completed process.'''
    return subprocess.run([sys.executable, '-m', 'zennit_bnfuse', *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_demo_writes_valid_files(tmp_path):
    out = tmp_path / 'demo'
    result = bnfuse('demo', '--out', out)
    assert result.returncode == 0, result.stderr
    assert 'BatchNorm fusion: 6 of 6 folded' in result.stdout and '== cifar10-vgg-bn' in result.stdout
    for dataset in ('mnist', 'cifar10'):
        assert (out / f'heatmaps-{dataset}.png').read_bytes()[:8] == PNG
        relevance = torch.load(out / f'relevance-{dataset}.pt', weights_only=True)
        assert set(relevance) == {'fused', 'unfused', 'naive'} and relevance['fused'].shape[0] == 6
    metrics = json.loads((out / 'metrics.json').read_text())
    assert set(metrics['models']) == {'mnist-cnn-bn', 'cifar10-vgg-bn'}
    assert set(metrics['models']['cifar10-vgg-bn']) == {'fused', 'unfused', 'naive'}
    assert '| fused |' in (out / 'metrics.md').read_text()


@pytest.mark.parametrize('command', [(), ('demo',), ('explain',), ('report',)])
def test_help(command):
    result = bnfuse(*command, '--help')
    assert result.returncode == 0 and 'usage: bnfuse' in result.stdout


def test_report():
    result = bnfuse('report', '--model', 'mnist-mlp-bn')
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == 'BatchNorm fusion: 2 of 2 folded'


def test_explain_user_images(tmp_path):
    images = sorted(DEMO.glob('cifar10-*.png'))[:2]
    result = bnfuse('explain', '--model', 'cifar10-vgg-bn-fc', '--images', *images, '--handling', 'fused,naive',
                    '--composite', 'epsilon-gamma-box', '--target', '3', '--out', tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert set(metrics['models']['cifar10-vgg-bn-fc']) == {'fused', 'naive'}
    assert (tmp_path / 'heatmaps-cifar10-vgg-bn-fc.png').read_bytes()[:8] == PNG
    assert 'folded' in (tmp_path / 'report-cifar10-vgg-bn-fc.txt').read_text()


@pytest.mark.skipif(not (default_data_root() / 'MNIST').is_dir(), reason='needs ../shared/data/MNIST')
def test_explain_dataset_slice(tmp_path):
    result = bnfuse('explain', '--model', 'mnist-cnn-bn', '--dataset', 'mnist', '--n', '3', '--out', tmp_path)
    assert result.returncode == 0, result.stderr
    assert torch.load(tmp_path / 'relevance-mnist-cnn-bn.pt', weights_only=True)['unfused'].shape == (3, 1, 28, 28)


def test_explain_torchvision_with_user_weights(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / 'resnet.pt'
    import torchvision
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), weights)
    out = tmp_path / 'out'
    result = bnfuse('explain', '--model', 'torchvision:resnet18', '--weights', weights, '--images',
                    DEMO / 'cifar10-0-0.png', '--size', '64', '--out', out)
    assert result.returncode == 0, result.stderr
    assert (out / 'heatmaps-torchvision-resnet18.png').is_file()
    assert 'BatchNorm fusion: 20 of 20 folded' in (out / 'report-torchvision-resnet18.txt').read_text()


def wrong_size_image(tmp_path):
    from PIL import Image
    path = tmp_path / 'big.png'
    Image.new('L', (40, 30)).save(path)
    return path


def not_an_image(tmp_path):
    path = tmp_path / 'notes.png'
    path.write_text('not an image')
    return path


def not_weights(tmp_path):
    path = tmp_path / 'weights.pt'
    path.write_text('not weights')
    return path


ERRORS = {
    'unknown model': (lambda tmp: ('explain', '--model', 'resnet', '--dataset', 'mnist'),
                      r"unknown model 'resnet'; choose one of mnist-cnn-bn"),
    'unknown composite': (lambda tmp: ('explain', '--model', 'mnist-cnn-bn', '--images', DEMO / 'mnist-0-7.png',
                                       '--composite', 'lrp'), r"unknown composite 'lrp'; choose one of epsilon"),
    'unknown handling': (lambda tmp: ('explain', '--model', 'mnist-cnn-bn', '--images', DEMO / 'mnist-0-7.png',
                                      '--handling', 'merged'), r'unknown handling merged; choose from fused'),
    'missing image': (lambda tmp: ('explain', '--model', 'mnist-cnn-bn', '--images', tmp / 'none.png'),
                      r'image file not found: .*none\.png'),
    'not an image': (lambda tmp: ('explain', '--model', 'mnist-cnn-bn', '--images', not_an_image(tmp)),
                     r'cannot read .*notes\.png as an image; pass PNG or JPEG'),
    'wrong size': (lambda tmp: ('explain', '--model', 'mnist-cnn-bn', '--images', wrong_size_image(tmp)),
                   r'.*big\.png is 40x30 pixels but mnist-cnn-bn takes 28x28; resize it first'),
    'wrong channels': (lambda tmp: ('explain', '--model', 'mnist-cnn-bn', '--images', DEMO / 'cifar10-0-0.png'),
                       r'.*cifar10-0-0\.png has 3 channel\(s\) but mnist-cnn-bn takes grayscale \(1 channel\) '
                       r'images; convert it'),
    'missing weights file': (lambda tmp: ('report', '--model', 'mnist-cnn-bn', '--weights', tmp / 'none.pt'),
                             r'weights file not found'),
    'not weights': (lambda tmp: ('report', '--model', 'mnist-cnn-bn', '--weights', not_weights(tmp)),
                    r'cannot read weights from .*weights\.pt.*torch\.save\(model\.state_dict\(\), FILE\)'),
    'weights do not fit': (lambda tmp: ('report', '--model', 'mnist-cnn-bn', '--weights',
                                        ROOT / 'zennit_bnfuse' / 'evaluation' / 'weights' / 'mnist-cnn.pt'),
                           r'the weights in .*mnist-cnn\.pt do not fit mnist-cnn-bn: 10 missing \(bn1\.weight, .*\)\. '
                           r'Pass weights saved'),
    'torchvision without weights': (lambda tmp: ('report', '--model', 'torchvision:resnet18'),
                                    r'torchvision:resnet18 needs --weights FILE'),
    'dataset of another model': (lambda tmp: ('explain', '--model', 'mnist-cnn-bn', '--dataset', 'cifar10'),
                                 r'mnist-cnn-bn takes mnist images, not cifar10'),
    'missing data': (lambda tmp: ('explain', '--model', 'mnist-cnn-bn', '--dataset', 'mnist', '--data-root', tmp),
                     r'mnist \(test\) not found under .*--data-root'),
    'target out of range': (lambda tmp: ('explain', '--model', 'mnist-cnn-bn', '--images',
                                         DEMO / 'mnist-0-7.png', '--target', '10'),
                            r'--target 10 is not a class of mnist-cnn-bn \(0 to 9\)'),
    'images and dataset': (lambda tmp: ('explain', '--model', 'mnist-cnn-bn', '--images', DEMO / 'mnist-0-7.png',
                                        '--dataset', 'mnist'), r'give either --images FILE\.\.\. or --dataset'),
}


@pytest.mark.parametrize('case', sorted(ERRORS))
def test_errors_name_problem_and_fix_without_traceback(case, tmp_path):
    arguments, pattern = ERRORS[case]
    out = tmp_path / 'out'
    args = arguments(tmp_path)
    if args[0] == 'explain':
        args = (*args, '--out', out)
    result = bnfuse(*args)
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    import re
    assert re.search(r'^bnfuse: error: ' + pattern, result.stderr.strip(), re.MULTILINE), result.stderr
    assert not out.exists()


def test_usage_errors_exit_2():
    result = bnfuse('explain', '--dataset', 'mnist')
    assert result.returncode == 2 and 'the following arguments are required: --model' in result.stderr
    result = bnfuse('explain', '--model', 'mnist-cnn-bn', '--dataset', 'svhn', '--out', 'x')
    assert result.returncode == 2 and "invalid choice: 'svhn'" in result.stderr


def test_console_script_installed():
    script = Path(sys.executable).parent / 'bnfuse'
    result = subprocess.run([str(script), '--help'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and 'usage: bnfuse' in result.stdout
