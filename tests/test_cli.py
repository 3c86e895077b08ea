'''Tests of the bnfuse command: in a subprocess as a user runs it (``python -m zennit_bnfuse`` and the installed
console script), and in-process through :py:func:`zennit_bnfuse.cli.main` where a test needs many runs or has to
break something on purpose (a full disk, Ctrl-C).

Every failing case checks the exit status, a single ``bnfuse: error: ...`` line that names the problem and the fix,
no traceback, and that nothing was left behind.'''
import json
import os
import re
import shutil
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image

from zennit_bnfuse import cli
from zennit_bnfuse.evaluation.data import DATA_ROOT_VARIABLE, default_data_root, read_image, unit_range
from zennit_bnfuse.handling import HANDLINGS

ROOT = Path(__file__).parent.parent
DEMO = ROOT / 'zennit_bnfuse' / 'evaluation' / 'demo'
DIGIT = DEMO / 'mnist-0-7.png'
PNG = b'\x89PNG\r\n\x1a\n'
HAS_MNIST = (default_data_root() / 'MNIST').is_dir()
# urllib takes proxies from the environment: a closed local port makes every download fail at once
NO_NETWORK = {'http_proxy': 'http://127.0.0.1:9', 'https_proxy': 'http://127.0.0.1:9',
              'HTTP_PROXY': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9', 'no_proxy': ''}


def bnfuse(*args, cwd=ROOT, env=None, script=False):
    '''Run ``python -m zennit_bnfuse`` (or, with ``script``, the installed ``bnfuse`` console script on this
    checkout) with ``args``; returns the completed process.'''
    command = [str(Path(sys.executable).parent / 'bnfuse')] if script else [sys.executable, '-m', 'zennit_bnfuse']
    environment = {**os.environ, 'PYTHONPATH': str(ROOT), **(env or {})}
    return subprocess.run([*command, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=environment)


@pytest.fixture
def no_network(monkeypatch):
    '''Downloads fail at once (and no test reads a data root from the environment).'''
    import urllib.request
    for key, value in NO_NETWORK.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(urllib.request, '_opener', None)  # urlopen reads the proxies when it builds its opener
    monkeypatch.delenv(DATA_ROOT_VARIABLE, raising=False)


def in_process(capsys, *args):
    '''Run :py:func:`zennit_bnfuse.cli.main` with ``args``; returns ``(status, stdout, stderr)``.'''
    status = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def files_under(folder):
    return sorted(str(path.relative_to(folder)) for path in Path(folder).rglob('*'))


def assert_one_line_error(status, stderr, expected_status, pattern):
    '''``stderr`` is a single ``bnfuse: error: ...`` line matching ``pattern``; no traceback.'''
    assert status == expected_status, stderr
    assert 'Traceback' not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert re.fullmatch(r'bnfuse: error: ' + pattern, lines[0]), lines[0]


# --- inputs the cases make in tmp_path ---

def image(tmp, name, array):
    path = tmp / name
    Image.fromarray(array).save(path)
    return path


def write(tmp, name, content):
    path = tmp / name
    path.write_bytes(content)
    return path


def huge_png(tmp):
    '''A PNG header declaring 14000 x 14000 pixels (PIL refuses it before decoding).'''
    import struct
    import zlib

    def chunk(kind, content):
        return struct.pack('>I', len(content)) + kind + content + struct.pack('>I', zlib.crc32(kind + content))
    header = chunk(b'IHDR', struct.pack('>IIBBBBB', 14000, 14000, 8, 0, 0, 0, 0))
    return write(tmp, 'huge.png', PNG + header + chunk(b'IEND', b''))


def squeezenet_weights(tmp):
    '''A small torchvision classifier's state_dict (10 classes).'''
    import torchvision
    path = tmp / 'squeezenet.pt'
    torch.save(torchvision.models.squeezenet1_1(weights=None, num_classes=10).state_dict(), path)
    return path


def whole_model(tmp):
    '''A file written by torch.save(model), not torch.save(model.state_dict()).'''
    path = tmp / 'whole.pt'
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), path)
    return path


def nan_statistics(tmp):
    from zennit_bnfuse.evaluation.models import pretrained
    state = pretrained('mnist-cnn-bn').state_dict()
    state['bn1.running_var'][0] = float('nan')
    path = tmp / 'nan.pt'
    torch.save(state, path)
    return path


def nan_weight(tmp):
    '''The shipped mnist-cnn-bn with an infinite convolution weight (the model computes NaN with it).'''
    from zennit_bnfuse.evaluation.models import pretrained
    state = pretrained('mnist-cnn-bn').state_dict()
    state['conv1.weight'][0, 0, 0, 0] = float('inf')
    path = tmp / 'inf.pt'
    torch.save(state, path)
    return path


def occupied(tmp, *names):
    '''An existing --out folder holding ``names`` (a trailing / makes a folder).'''
    out = tmp / 'out'
    out.mkdir()
    for name in names:
        if name.endswith('/'):
            (out / name).mkdir()
        else:
            (out / name).write_text('earlier')
    return ()


def explain(*args):
    return ('explain', '--model', 'mnist-cnn-bn', *args)


def cifar_tree(tmp, name=None, content=None):
    '''``explain`` of cifar10-vgg-bn on a CIFAR-10 JPEG tree in ``tmp/data`` with a 32x32 image in airplane/ and
    cat/, and ``content`` (bytes, an array, or None for a folder) at ``name`` under test/.'''
    test = tmp / 'data' / 'CIFAR10-JPEG' / 'test'
    for folder in ('airplane', 'cat'):
        (test / folder).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(test / folder / '0000.jpg')
    if content is None and name is not None:
        (test / name).mkdir()
    elif isinstance(content, bytes):
        (test / name).write_bytes(content)
    elif content is not None:
        Image.fromarray(content).save(test / name)
    return ('explain', '--model', 'cifar10-vgg-bn', '--dataset', 'cifar10', '--data-root', tmp / 'data')


# case -> (arguments from tmp_path, exit status, the error line after "bnfuse: error: "); explain cases get
# --out tmp_path/out unless they give one
CASES = {
    # usage errors (argparse, exit 2)
    'n negative': (lambda tmp: explain('--dataset', 'mnist', '--n', '-1'), 2,
                   r'argument --n: must be 1 or more, not -1 \(see bnfuse explain --help\)'),
    'n zero on cifar10': (lambda tmp: ('explain', '--model', 'cifar10-vgg-bn', '--dataset', 'cifar10', '--n', '0'),
                          2, r'argument --n: must be 1 or more, not 0 \(see bnfuse explain --help\)'),
    'n not a number': (lambda tmp: explain('--dataset', 'mnist', '--n', 'ten'), 2,
                       r"argument --n: 'ten' is not a whole number \(see bnfuse explain --help\)"),
    'patch size zero': (lambda tmp: explain('--images', DIGIT, '--patch-size', '0'), 2,
                        r'argument --patch-size: must be 1 or more, not 0 \(see bnfuse explain --help\)'),
    'patch size negative': (lambda tmp: explain('--images', DIGIT, '--patch-size', '-4'), 2,
                            r'argument --patch-size: must be 1 or more, not -4 \(see bnfuse explain --help\)'),
    'size zero': (lambda tmp: ('explain', '--model', 'torchvision:resnet18', '--images', DIGIT, '--size', '0'), 2,
                  r'argument --size: must be 1 or more, not 0 \(see bnfuse explain --help\)'),
    'size too large': (lambda tmp: ('explain', '--model', 'torchvision:resnet18', '--images', DIGIT, '--size',
                                    '1000000'), 2,  # a traceback from allocating a blank input of that size
                       r'argument --size: 1000000 is more than 4096 pixels a side, .* pass the size the model was '
                       r'trained at \(see bnfuse explain --help\)'),
    'normalize unknown': (lambda tmp: ('explain', '--model', 'torchvision:resnet18', '--images', DIGIT, '--normalize',
                                       'cifar10'), 2,
                          r"argument --normalize: invalid choice: 'cifar10' \(choose from '?imagenet'?, '?none'?\) "
                          r'\(see bnfuse explain --help\)'),
    'argument of another command': (lambda tmp: ('report', '--model', 'mnist-cnn-bn', '--size', '64'), 2,
                                    r'unrecognized arguments: --size 64 \(see bnfuse report --help\)'),
    'model missing': (lambda tmp: ('explain', '--dataset', 'mnist'), 2,
                      r'the following arguments are required: --model \(see bnfuse explain --help\)'),
    'unknown dataset': (lambda tmp: explain('--dataset', 'svhn'), 2,
                        r"argument --dataset: invalid choice: 'svhn'.*\(see bnfuse explain --help\)"),
    # problems with the input (exit 1)
    'unknown model': (lambda tmp: ('explain', '--model', 'resnet', '--dataset', 'mnist'), 1,
                      r"unknown model 'resnet'; choose one of mnist-cnn-bn.*torchvision:<arch> with --weights FILE"),
    'model in capitals': (lambda tmp: ('report', '--model', 'MNIST-CNN-BN'), 1,
                          r"unknown model 'MNIST-CNN-BN' \(did you mean 'mnist-cnn-bn'\?\); choose one of .*"),
    'torchvision arch without prefix': (lambda tmp: ('report', '--model', 'resnet18'), 1,
                                        r"unknown model 'resnet18' \(did you mean 'torchvision:resnet18'\?\); .*"),
    'torchvision typo': (lambda tmp: ('report', '--model', 'torchvision:resnt18'), 1,
                         r"unknown torchvision classifier 'resnt18' \(did you mean 'resnet18'\?\); see .*"),
    'unknown composite': (lambda tmp: explain('--images', DIGIT, '--composite', 'lrp'), 1,
                          r"unknown composite 'lrp'; choose one of epsilon, .*"),
    'unknown handling': (lambda tmp: explain('--images', DIGIT, '--handling', 'merged'), 1,
                         r'unknown handling merged; choose from fused, unfused, naive'),
    'images and dataset': (lambda tmp: explain('--images', DIGIT, '--dataset', 'mnist'), 1,
                           r'give either --images FILE\.\.\. or --dataset mnist\|cifar10'),
    'n with images': (lambda tmp: explain('--images', DIGIT, '--n', '3'), 1,
                      r'--n counts dataset images; with --images every file given is explained: leave --n out'),
    'device tpu': (lambda tmp: explain('--images', DIGIT, '--device', 'tpu'), 1,
                   r'--device tpu is not a device bnfuse can use; choose cpu, cuda, cuda:N or mps'),
    'device cuda:7': (lambda tmp: explain('--images', DIGIT, '--device', 'cuda:7'), 1,
                      r'--device cuda:7 (was asked for but no CUDA device is available; use --device cpu|: there are '
                      r'only \d CUDA device\(s\) .*)'),
    'size for a shipped model': (lambda tmp: explain('--images', DIGIT, '--size', '64'), 1,
                                 r'--size applies to torchvision:<arch> models only; mnist-cnn-bn takes 28x28 images: '
                                 r'leave --size out'),
    'normalize for a shipped model': (lambda tmp: explain('--images', DIGIT, '--normalize', 'none'), 1,
                                      r'--normalize applies to torchvision:<arch> models only; mnist-cnn-bn takes '
                                      r'images in \[0, 1\] \(its normalisation is folded into its first layer\): '
                                      r'leave --normalize out'),
    'target negative': (lambda tmp: explain('--images', DIGIT, '--target', '-1'), 1,
                        r'--target -1 is not a class of mnist-cnn-bn \(0 to 9\)'),
    'target too large': (lambda tmp: explain('--images', DIGIT, '--target', '10'), 1,
                         r'--target 10 is not a class of mnist-cnn-bn \(0 to 9\)'),
    'patch size does not divide': (lambda tmp: explain('--images', DIGIT, '--patch-size', '5'), 1,
                                   r'--patch-size 5 does not divide the image size 28x28; pass --patch-size with one '
                                   r'of 1, 2, 4, 7, 14, 28'),
    'default patch size does not divide': (
        lambda tmp: ('explain', '--model', 'torchvision:squeezenet1_1', '--weights', squeezenet_weights(tmp),
                     '--images', DEMO / 'cifar10-0-0.png', '--size', '72'), 1,
        r'the default patch size 16 does not divide the image size 72x72; pass --patch-size with one of 1, 2, 3, 4, '
        r'6, 8, 9, 12 and 4 more'),
    'size too small for the model': (
        lambda tmp: ('explain', '--model', 'torchvision:squeezenet1_1', '--weights', squeezenet_weights(tmp),
                     '--images', DEMO / 'cifar10-0-0.png', '--size', '8'), 1,
        r'torchvision:squeezenet1_1 does not run on 8x8 inputs \(.*Output size is too small\); pass a larger --size'),
    'torchvision without weights': (lambda tmp: ('explain', '--model', 'torchvision:resnet18', '--images', DIGIT), 1,
                                    r'torchvision:resnet18 needs --weights FILE \(a state_dict you trained\); weights '
                                    r'are never downloaded'),
    'missing weights file': (lambda tmp: ('report', '--model', 'mnist-cnn-bn', '--weights', tmp / 'none.pt'), 1,
                             r'weights file not found: .*none\.pt'),
    'not weights': (lambda tmp: ('report', '--model', 'mnist-cnn-bn', '--weights', write(tmp, 'w.pt', b'no')), 1,
                    r'cannot read weights from .*w\.pt \(.*\); pass a file written by '
                    r'torch\.save\(model\.state_dict\(\), FILE\)'),
    'a whole model': (lambda tmp: ('report', '--model', 'mnist-cnn-bn', '--weights', whole_model(tmp)), 1,
                      r'.*whole\.pt holds a pickled torch\.nn\.modules\.container\.Sequential, not only tensors \(a '
                      r'whole model saved with torch\.save\(model\)\?\); bnfuse loads tensors only, .* pass '
                      r'torch\.save\(model\.state_dict\(\), FILE\)'),
    'weights do not fit': (lambda tmp: ('report', '--model', 'mnist-cnn-bn', '--weights',
                                        ROOT / 'zennit_bnfuse' / 'evaluation' / 'weights' / 'mnist-cnn.pt'), 1,
                           r'the weights in .*mnist-cnn\.pt do not fit mnist-cnn-bn: 8 missing \(bn1\.weight, .*\)\. '
                           r'Pass weights saved from that architecture'),
    'non-finite statistics': (lambda tmp: explain('--weights', nan_statistics(tmp), '--images', DIGIT), 1,
                              r'the weights in .* hold NaN or infinite values \(bn1\.running_var\); fix or retrain '
                              r'the model before explaining it'),
    'non-finite weight': (lambda tmp: explain('--weights', nan_weight(tmp), '--images', DIGIT), 1,
                          r'the weights in .* hold NaN or infinite values \(conv1\.weight\); fix or retrain the model '
                          r'before explaining it'),
    'missing image': (lambda tmp: explain('--images', tmp / 'none.png'), 1, r'image file not found: .*none\.png'),
    'folder as image': (lambda tmp: explain('--images', tmp), 1,
                        r'.* is a folder; --images takes image files \(e\.g\. .*\*\.png\)'),
    'not an image': (lambda tmp: explain('--images', write(tmp, 'notes.png', b'not an image')), 1,
                     r'cannot read .*notes\.png as an image \(UnidentifiedImageError: .*\); pass PNG or JPEG files'),
    'huge image': (lambda tmp: explain('--images', huge_png(tmp)), 1,
                   r'.*huge\.png is too large to decode safely \(Image size \(196000000 pixels\) exceeds limit of '
                   r'\d+ pixels\); downscale it first'),
    'transparent image': (lambda tmp: explain('--images', image(tmp, 'a.png', np.full((28, 28, 2), 100, np.uint8))),
                          1, r'.*a\.png has 784 transparent pixel\(s\) \(mode LA\) and the model needs every pixel\'s '
                          r'colour; flatten it onto a background first.*'),
    'float image outside [0, 1]': (lambda tmp: explain('--images', float_tiff(tmp)), 1,
                                   r'.*f\.tif holds floats \(PIL mode F\) from 0 to 2, but bnfuse takes values in '
                                   r'\[0, 1\]; rescale it.*'),
    'wrong size': (lambda tmp: explain('--images', image(tmp, 'big.png', np.zeros((30, 40), np.uint8))), 1,
                   r'.*big\.png is 40x30 pixels but mnist-cnn-bn takes 28x28; resize it first'),
    'wrong channels': (lambda tmp: explain('--images', DEMO / 'cifar10-0-0.png'), 1,
                       r'.*cifar10-0-0\.png has 3 channel\(s\) but mnist-cnn-bn takes grayscale \(1 channel\) images; '
                       r'convert it first'),
    'dataset of another model': (lambda tmp: explain('--dataset', 'cifar10'), 1,
                                 r'mnist-cnn-bn takes mnist images, not cifar10'),
    'missing data': (lambda tmp: explain('--dataset', 'mnist', '--data-root', tmp / 'nodata'), 1,
                     r'mnist \(test\) not found under .*nodata \(looked for torchvision\'s MNIST/raw/ idx files\); '
                     rf'pass --data-root or set {DATA_ROOT_VARIABLE} to the folder that holds them, or --download to '
                     r'fetch them'),
    'download without network': (lambda tmp: explain('--dataset', 'mnist', '--download', '--data-root',
                                                     tmp / 'new' / 'data'), 1,
                                 r'downloading mnist into .*new/data failed \(Error downloading '
                                 r'train-images-idx3-ubyte\.gz; no network\?\) and left nothing behind; put '
                                 r'torchvision\'s MNIST/raw/ idx files into .*new/data by hand, or point --data-root '
                                 rf'or {DATA_ROOT_VARIABLE} to a folder that holds them'),
    # a damaged CIFAR-10 JPEG tree: tracebacks from PIL and torch.stack, and 'not found' for an empty class folder
    'corrupt image in the cifar10 tree': (lambda tmp: cifar_tree(tmp, 'cat/0001.jpg', b'not a jpeg'), 1,
                                          r'cannot read .*data/CIFAR10-JPEG/test/cat/0001\.jpg as an image '
                                          r'\(UnidentifiedImageError: .*\); the CIFAR-10 JPEG tree holds 32x32 images: '
                                          r'replace or remove the file'),
    'image of another size in the cifar10 tree': (
        lambda tmp: cifar_tree(tmp, 'cat/0001.png', np.zeros((100, 300, 3), np.uint8)), 1,
        r'.*data/CIFAR10-JPEG/test/cat/0001\.png is 300x100 pixels, but the CIFAR-10 JPEG tree holds 32x32 images: '
        r'resize or remove it'),
    'empty class folder in the cifar10 tree': (lambda tmp: cifar_tree(tmp, 'dog'), 1,
                                               r'.*data/CIFAR10-JPEG/test: Found no valid file for the classes dog\. '
                                               r'Supported extensions are: .*; put the images of each class into its '
                                               r'folder, or remove the empty folder'),
    'out is a file': (lambda tmp: explain('--images', DIGIT, '--out', write(tmp, 'out.txt', b'x')), 1,
                      r'--out .*out\.txt is a file; pass a folder'),
    'out under a file': (lambda tmp: explain('--images', DIGIT, '--out', write(tmp, 'f', b'x') / 'a' / 'b'), 1,
                         r'--out .*f/a/b cannot be made: .*f is a file; choose another --out'),
    'out not empty': (lambda tmp: occupied(tmp, 'metrics.json') + explain('--images', DIGIT), 1,
                      r'--out .*out is not empty; pass --overwrite to replace the outputs of an earlier bnfuse run in '
                      r'it, or choose a new folder'),
    'overwrite with foreign files': (
        lambda tmp: occupied(tmp, 'metrics.json', 'relevance-mnist-cnn-bn.pt/', 'thesis.tex')
        + explain('--images', DIGIT, '--overwrite'), 1,
        r'--out .*out holds files bnfuse does not write \(relevance-mnist-cnn-bn\.pt/, thesis\.tex\); --overwrite '
        r'replaces only bnfuse outputs: choose a new or empty folder'),
}


def float_tiff(tmp):
    path = tmp / 'f.tif'
    Image.fromarray(np.linspace(0, 2, 28 * 28, dtype=np.float32).reshape(28, 28)).save(path)
    return path


def case_arguments(case, tmp):
    arguments, status, pattern = CASES[case]
    args = tuple(arguments(tmp))
    if args[0] == 'explain' and '--out' not in args:
        args += ('--out', tmp / 'out')
    return args, status, pattern


@pytest.mark.parametrize('case', sorted(CASES))
def test_errors_in_process(case, tmp_path, capsys, no_network):
    args, status, pattern = case_arguments(case, tmp_path)
    before = files_under(tmp_path)
    assert_one_line_error(*in_process(capsys, *args)[::2], status, pattern)
    assert files_under(tmp_path) == before


def test_every_error_case_through_the_console_script(tmp_path):
    """Every case of CASES, run as a user runs it: the installed ``bnfuse`` script in its own process (two at a
    time, each costs seconds of imports), with one-line messages, the exit status, no traceback and no files left."""
    from concurrent.futures import ThreadPoolExecutor

    def run(case):
        folder = tmp_path / case.replace(' ', '-')
        folder.mkdir()
        args, status, pattern = case_arguments(case, folder)
        before = files_under(folder)
        result = bnfuse(*args, env=NO_NETWORK, script=True)
        return case, result, status, pattern, before, files_under(folder)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for case, result, status, pattern, before, after in pool.map(run, sorted(CASES)):
            try:
                assert_one_line_error(result.returncode, result.stderr, status, pattern)
                assert after == before, 'files left behind'
            except AssertionError as error:
                raise AssertionError(f'case {case!r}: {error}') from None


def test_console_script(tmp_path):
    result = bnfuse('explain', '--model', 'mnist-cnn-bn', '--images', DIGIT, '--n', '-1', '--out', tmp_path / 'out',
                    script=True)
    assert_one_line_error(result.returncode, result.stderr, 2, r'argument --n: must be 1 or more, not -1 .*')
    assert files_under(tmp_path) == []


def test_demo_writes_valid_files(tmp_path):
    out = tmp_path / 'demo'
    result = bnfuse('demo', '--out', out)
    assert result.returncode == 0, result.stderr
    assert 'BatchNorm fusion: 6 of 6 folded' in result.stdout and '== cifar10-vgg-bn' in result.stdout
    names = files_under(out)
    assert names == ['heatmaps-cifar10.png', 'heatmaps-mnist.png', 'metrics.json', 'metrics.md',
                     'relevance-cifar10.pt', 'relevance-mnist.pt']
    assert f'wrote {", ".join(names)} to {out}' in result.stdout
    for dataset in ('mnist', 'cifar10'):
        assert (out / f'heatmaps-{dataset}.png').read_bytes()[:8] == PNG
        relevance = torch.load(out / f'relevance-{dataset}.pt', weights_only=True)
        assert list(relevance) == list(HANDLINGS) and relevance['fused'].shape[0] == 6
    metrics = json.loads((out / 'metrics.json').read_text())
    assert list(metrics['models']) == ['mnist-cnn-bn', 'cifar10-vgg-bn']
    assert list(metrics['models']['cifar10-vgg-bn']) == list(HANDLINGS)
    text = (out / 'metrics.md').read_text()
    assert '| fused |' in text and 'patches of 4x4 pixels' in text and 'replaced by 0' in text
    assert 'AOPC** (area over the perturbation curve)' in text
    assert 'ABPC** (area between the perturbation curves)' in text
    assert 'MoRF** removes the most relevant patches first: higher is better' in text
    assert 'LeRF** removes the least relevant first: lower is better' in text
    assert out.stat().st_mode & 0o777 == 0o777 & ~cli.current_umask()  # not the private mode of a temporary folder


def test_column_order_is_the_same_in_demo_and_explain(tmp_path, capsys):
    status, _, error = in_process(
        capsys, *explain('--images', DIGIT, '--handling', 'naive, fused', '--out', tmp_path / 'out'))
    assert status == 0, error
    assert list(torch.load(tmp_path / 'out' / 'relevance-mnist-cnn-bn.pt', weights_only=True)) == ['fused', 'naive']
    metrics = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    assert list(metrics['models']['mnist-cnn-bn']) == ['fused', 'naive']


@pytest.mark.parametrize('command', [(), ('demo',), ('explain',), ('report',)])
def test_help(command, capsys):
    status, out, _ = in_process(capsys, *command, '--help')
    assert status == 0 and 'usage: bnfuse' in out


def test_help_documents_the_data_variable_and_the_output_folder(capsys):
    text = ' '.join(in_process(capsys, 'explain', '--help')[1].split())
    assert f'${DATA_ROOT_VARIABLE} if set, else ../shared/data if it exists, else ./data' in text
    assert 'a failed run leaves nothing' in text and '--out must be new or empty; with --overwrite' in text
    assert 'input | fused | unfused | naive (always in this order)' in text


def test_help_says_how_torchvision_inputs_are_normalised_and_which_images_n_takes(capsys):
    # ImageNet's mean and std were applied to every torchvision:<arch> input without a word; --n said 'the first N'
    # where the CIFAR-10 JPEG tree gives N spread over it
    text = ' '.join(in_process(capsys, 'explain', '--help')[1].split())
    assert 'torchvision:<arch> with --weights FILE (its inputs are resized to --size and normalised with ImageNet\'s ' \
        'mean and std unless --normalize none)' in text
    assert 'imagenet (default) subtracts ImageNet\'s mean (0.485, 0.456, 0.406)' in text
    assert 'the first N of MNIST and of torchvision\'s CIFAR-10 files (cifar-10-batches-py); N spread evenly over ' \
        'the CIFAR10-JPEG tree' in text
    assert 'the first N test images' not in text


def test_report(capsys):
    status, out, _ = in_process(capsys, 'report', '--model', 'mnist-mlp-bn')
    assert status == 0 and out.splitlines()[0] == 'BatchNorm fusion: 2 of 2 folded'


def test_report_of_an_untrained_torchvision_architecture():
    result = bnfuse('report', '--model', 'torchvision:resnet18')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith('note: no --weights, so this is the report of the untrained torchvision:resnet18; '
                               'which BatchNorms fold depends on the architecture, not on the weights')
    assert 'BatchNorm fusion: 20 of 20 folded' in lines


def test_output_pipe_closed_early():
    process = subprocess.Popen([sys.executable, '-m', 'zennit_bnfuse', 'report', '--model', 'torchvision:resnet18'],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, 'PYTHONPATH': str(ROOT)})
    process.stdout.close()  # as `| head` does when it has read enough; here before anything was written
    assert process.wait(timeout=300) == 1
    assert process.stderr.read() == ''


def test_explain_user_images(tmp_path):
    images = sorted(DEMO.glob('cifar10-*.png'))[:2]
    result = bnfuse('explain', '--model', 'cifar10-vgg-bn-fc', '--images', *images, '--handling', 'fused,naive',
                    '--composite', 'epsilon-gamma-box', '--target', '3', '--out', tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert set(metrics['models']['cifar10-vgg-bn-fc']) == {'fused', 'naive'}
    assert (tmp_path / 'heatmaps-cifar10-vgg-bn-fc.png').read_bytes()[:8] == PNG
    assert 'folded' in (tmp_path / 'report-cifar10-vgg-bn-fc.txt').read_text()


def test_sixteen_bit_image_gives_the_same_results_as_eight_bit(tmp_path):
    digit = np.asarray(Image.open(DIGIT))
    sixteen = image(tmp_path, 'digit16.png', digit.astype(np.uint16) * 257)
    assert Image.open(sixteen).mode == 'I;16'
    result = bnfuse(*explain('--images', DIGIT, sixteen, '--handling', 'fused', '--out', tmp_path / 'out'))
    assert result.returncode == 0, result.stderr
    relevance = torch.load(tmp_path / 'out' / 'relevance-mnist-cnn-bn.pt', weights_only=True)['fused']
    assert torch.equal(relevance[0], relevance[1])  # the same input, so the same relevance and AOPC
    aopc = json.loads((tmp_path / 'out' / 'metrics.json').read_text())['models']['mnist-cnn-bn']['fused']['aopc_morf']
    assert aopc[1] == 0 and 0 < aopc[0] < 100  # was 3225.9 for the 16-bit digit alone


@pytest.mark.skipif(not HAS_MNIST, reason=f'needs MNIST under {default_data_root()} (set {DATA_ROOT_VARIABLE})')
def test_explain_dataset_slice(tmp_path):
    result = bnfuse(*explain('--dataset', 'mnist', '--n', '3', '--out', tmp_path / 'out'))
    assert result.returncode == 0, result.stderr
    relevance = torch.load(tmp_path / 'out' / 'relevance-mnist-cnn-bn.pt', weights_only=True)
    assert relevance['unfused'].shape == (3, 1, 28, 28)


def test_data_root_variable_reaches_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(DATA_ROOT_VARIABLE, str(tmp_path / 'elsewhere'))
    status, _, error = in_process(capsys, *explain('--dataset', 'mnist', '--out', tmp_path / 'out'))
    assert_one_line_error(status, error, 1, r'mnist \(test\) not found under .*elsewhere .*')


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


@pytest.mark.parametrize('layout', ['sorted keys', 'DataParallel', 'checkpoint'])
def test_torchvision_weights_as_training_scripts_save_them(layout, tmp_path, capsys):
    # sorted keys: the classes were read from the last weight in the file's order ('fc.weight is (10, 512) in the
    # file, (512, 512) in the model'); DataParallel's 'module.' prefix and a checkpoint dict were refused
    import torchvision
    state = torchvision.models.squeezenet1_1(weights=None, num_classes=7).state_dict()
    state = {'sorted keys': lambda: dict(sorted(state.items())),
             'DataParallel': lambda: {f'module.{key}': value for key, value in state.items()},
             'checkpoint': lambda: {'epoch': 3, 'model': state}}[layout]()
    torch.save(state, tmp_path / 'weights.pt')
    status, stdout, error = in_process(capsys, 'report', '--model', 'torchvision:squeezenet1_1', '--weights',
                                       tmp_path / 'weights.pt')
    assert status == 0, error
    loaded = cli.load_model('torchvision:squeezenet1_1', tmp_path / 'weights.pt')
    assert loaded.model.classifier[1].out_channels == 7


@pytest.mark.parametrize('normalize', [None, 'imagenet', 'none'])
def test_normalize_option_of_torchvision_models(normalize, tmp_path, capsys, monkeypatch):
    # inputs were always normalised with ImageNet's statistics, also for weights trained on [0, 1]
    import torchvision
    torch.save(torchvision.models.squeezenet1_1(weights=None, num_classes=10).state_dict(), tmp_path / 'w.pt')
    seen = []
    forward = torchvision.models.SqueezeNet.forward
    monkeypatch.setattr(torchvision.models.SqueezeNet, 'forward', lambda self, x: seen.append(x) or forward(self, x))
    option = () if normalize is None else ('--normalize', normalize)
    status, _, error = in_process(capsys, 'explain', '--model', 'torchvision:squeezenet1_1', '--weights',
                                  tmp_path / 'w.pt', '--images', DEMO / 'cifar10-0-0.png', '--size', '32',
                                  '--handling', 'fused', *option, '--out', tmp_path / 'out')
    assert status == 0, error
    image = unit_range(cli.resize(read_image(DEMO / 'cifar10-0-0.png'), [32, 32], antialias=True))
    mean, std = cli.imagenet_statistics('cpu')
    want = image[None] if normalize == 'none' else (image[None] - mean) / std
    assert torch.allclose(seen[1], want, atol=1e-6)  # seen[0] is the blank input that counts the classes
    settings = json.loads((tmp_path / 'out' / 'metrics.json').read_text())['settings']
    assert settings['normalize'] == (normalize or 'imagenet')
    fill = 'black' if normalize == 'none' else 'the ImageNet mean colour'
    assert f'replaced by 0 in the model\'s input ({fill}' in (tmp_path / 'out' / 'metrics.md').read_text()


@pytest.mark.parametrize('metadata', [False, True])
def test_weights_without_batch_counters_are_loaded(metadata, tmp_path, capsys):
    # refused as '6 missing (bn1.num_batches_tracked, ...)', though torch's load_state_dict takes such files
    from zennit_bnfuse.evaluation.models import pretrained
    state = pretrained('mnist-cnn-bn').state_dict()
    for key in [key for key in state if key.endswith('num_batches_tracked')]:
        del state[key]
    if not metadata:  # rebuilt, as scripts that filter keys do: torch fills the counters in only without it
        state = {key: value for key, value in state.items()}
    torch.save(state, tmp_path / 'w.pt')
    status, stdout, error = in_process(capsys, 'report', '--model', 'mnist-cnn-bn', '--weights', tmp_path / 'w.pt')
    assert status == 0, error
    loaded = cli.load_model('mnist-cnn-bn', tmp_path / 'w.pt')
    assert torch.equal(loaded.model.state_dict()['conv1.weight'], state['conv1.weight'])


def test_weights_and_target_are_recorded(tmp_path, capsys, monkeypatch):
    # metrics.json and the heatmap title named neither the weights file nor a fixed --target
    from zennit_bnfuse.evaluation import figures
    from zennit_bnfuse.evaluation.models import pretrained
    torch.save(pretrained('mnist-cnn-bn').state_dict(), tmp_path / 'mine.pt')
    titles = []
    draw = figures.heatmap_grid
    monkeypatch.setattr(figures, 'heatmap_grid',
                        lambda *args, **kwargs: titles.append(args[4]) or draw(*args, **kwargs))
    for target, out in ((None, 'default'), (3, 'fixed')):
        option = () if target is None else ('--target', target)
        status, _, error = in_process(capsys, *explain('--weights', tmp_path / 'mine.pt', '--images', DIGIT,
                                                       '--handling', 'fused', *option, '--out', tmp_path / out))
        assert status == 0, error
    settings = [json.loads((tmp_path / out / 'metrics.json').read_text())['settings'] for out in ('default', 'fixed')]
    assert [(entry['weights'], entry['target']) for entry in settings] == [
        ('mine.pt', 'predicted class'), ('mine.pt', 3)]
    assert titles == ['mnist-cnn-bn (mine.pt), EpsilonPlusFlat', 'mnist-cnn-bn (mine.pt), EpsilonPlusFlat, target 3']
    assert '- weights: mine.pt' in (tmp_path / 'fixed' / 'metrics.md').read_text()


def test_grey_images_are_rgb_for_torchvision_models(tmp_path):
    # refused as '1 channel(s)', while --dataset mnist gave the same models the same digits in RGB
    import torchvision
    torch.save(torchvision.models.squeezenet1_1(weights=None, num_classes=10).state_dict(), tmp_path / 'w.pt')
    loaded = cli.load_model('torchvision:squeezenet1_1', tmp_path / 'w.pt', size=28)
    grey = cli.read_images([DIGIT], loaded)
    expected = unit_range(cli.resize(read_image(DIGIT).expand(3, -1, -1), [28, 28], antialias=True))
    assert grey.shape == (1, 3, 28, 28) and torch.equal(grey[0], expected)


@pytest.mark.parametrize('aux_logits', [False, True])
def test_googlenet_weights_with_or_without_auxiliary_classifiers(aux_logits, tmp_path):
    # without them it was refused as 'not that architecture' (inception_v3's were already handled)
    import torchvision
    torch.save(torchvision.models.googlenet(weights=None, aux_logits=aux_logits, init_weights=False,
                                            num_classes=5).state_dict(), tmp_path / 'googlenet.pt')
    loaded = cli.load_model('torchvision:googlenet', tmp_path / 'googlenet.pt')
    assert (loaded.model.aux1 is not None) == aux_logits and loaded.model.fc.out_features == 5


def test_overwrite_replaces_the_earlier_run_entirely(tmp_path, capsys):
    out = tmp_path / 'out'
    assert in_process(capsys, *explain('--images', DIGIT, '--handling', 'fused', '--out', out))[0] == 0
    status, stdout, error = in_process(capsys, 'explain', '--model', 'mnist-mlp-bn', '--images', DIGIT, '--handling',
                                       'fused', '--out', out, '--overwrite')
    assert status == 0, error
    names = ['heatmaps-mnist-mlp-bn.png', 'metrics.json', 'metrics.md', 'relevance-mnist-mlp-bn.pt',
             'report-mnist-mlp-bn.txt']
    assert files_under(out) == names
    assert stdout.splitlines()[-1] == f'wrote {", ".join(names)} to {out}'
    assert list(json.loads((out / 'metrics.json').read_text())['models']) == ['mnist-mlp-bn']


def test_existing_empty_folder_is_used(tmp_path, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    assert in_process(capsys, *explain('--images', DIGIT, '--handling', 'fused', '--out', out))[0] == 0
    assert len(files_under(out)) == 5


def test_note_when_only_the_first_rows_are_drawn(tmp_path, capsys):
    images = [shutil.copy(DIGIT, tmp_path / f'{index}.png') for index in range(9)]
    status, stdout, error = in_process(capsys, *explain('--images', *images, '--handling', 'fused', '--out',
                                                        tmp_path / 'out'))
    assert status == 0, error
    assert 'note: heatmaps-mnist-cnn-bn.png shows the first 8 of 9 images; relevance-mnist-cnn-bn.pt and the metrics ' \
        'cover all 9' in stdout


def test_n_beyond_the_dataset_is_capped_with_a_note(tmp_path, capsys, monkeypatch):
    def three_images(dataset, root, train, download, limit, progress):
        return torch.rand(min(limit, 3), 1, 28, 28), torch.zeros(min(limit, 3), dtype=torch.long)
    monkeypatch.setattr(cli, 'load_tensors', three_images)
    status, _, error = in_process(capsys, *explain('--dataset', 'mnist', '--n', '1000000000', '--handling', 'fused',
                                                   '--out', tmp_path / 'out'))
    assert status == 0, error
    assert 'bnfuse: note: --n 1000000000 is more than the 3 mnist test images; explaining all 3' in error
    assert torch.load(tmp_path / 'out' / 'relevance-mnist-cnn-bn.pt', weights_only=True)['fused'].shape[0] == 3


def test_a_write_that_fails_part_way_leaves_nothing(tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, 'No space left on device', 'relevance-mnist-cnn-bn.pt')
    monkeypatch.setattr(cli.torch, 'save', disk_full)
    status, _, error = in_process(capsys, *explain('--images', DIGIT, '--handling', 'fused', '--out',
                                                   tmp_path / 'new' / 'out'))
    assert status == 1 and 'Traceback' not in error
    assert error.splitlines()[-1] == ('bnfuse: error: writing the outputs failed (No space left on device: '
                                      f'relevance-mnist-cnn-bn.pt); nothing was kept in --out {tmp_path}/new/out')
    assert files_under(tmp_path) == []


def test_interrupt_leaves_nothing(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, 'relevance_by_handling', interrupted)
    status, _, error = in_process(capsys, *explain('--images', DIGIT, '--out', tmp_path / 'out'))
    assert status == 130 and error.splitlines()[-1] == 'bnfuse: interrupted; nothing was written'
    assert files_under(tmp_path) == []


def test_out_that_cannot_be_written_is_refused_up_front(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(cli.tempfile, 'mkdtemp', read_only)
    explained = []
    monkeypatch.setattr(cli, 'relevance_by_handling', lambda *args, **kwargs: explained.append(1))
    status, _, error = in_process(capsys, *explain('--images', DIGIT, '--out', tmp_path / 'new' / 'out'))
    assert_one_line_error(status, error, 1, r'cannot write to --out .*new/out \(Permission denied\); choose a folder '
                          r'you can write to')
    assert explained == [] and files_under(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, 'geteuid') else True, reason='root can write anywhere')
def test_read_only_out(tmp_path):
    (tmp_path / 'locked').mkdir(mode=0o555)
    result = bnfuse(*explain('--images', DIGIT, '--out', tmp_path / 'locked' / 'out'))
    assert_one_line_error(result.returncode, result.stderr, 1, r'cannot write to --out .*Permission denied.*')


# --- random bad arguments ---

WORDS = st.text(string.ascii_letters + string.digits + ':-_., ', max_size=12)
NUMBERS = st.one_of(st.integers(-3, 40).map(str), st.integers().map(str), WORDS)
GOOD = {  # values that work for the MNIST models on the digit images
    '--patch-size': st.sampled_from(['1', '2', '4', '7', '14']), '--target': st.integers(0, 9).map(str),
    '--device': st.just('cpu'), '--handling': st.sampled_from(['fused', 'naive,unfused', ' unfused ,fused,,']),
    '--composite': st.sampled_from(['epsilon', 'epsilon-plus-flat', 'epsilon-gamma-box']),
}
ANY = {
    '--n': NUMBERS, '--patch-size': NUMBERS, '--target': NUMBERS, '--size': NUMBERS,
    '--device': st.one_of(st.sampled_from(['cpu', 'cuda', 'cuda:1', 'mps', 'tpu', 'meta', 'xla', 'cpu:0']), WORDS),
    '--handling': st.one_of(st.sampled_from(['fused', 'naive,unfused', 'fused,,naive', ',']), WORDS),
    '--composite': st.one_of(st.sampled_from(['epsilon', 'epsilon-gamma-box', 'lrp']), WORDS),
    '--weights': st.sampled_from(['missing.pt', 'notes.png']),
    '--data-root': st.sampled_from(['.', 'nodata']),
}


def options(choices, most):
    '''Up to ``most`` options from ``choices`` (option -> strategy of its value), as a flat argument list.'''
    return st.lists(st.sampled_from(sorted(choices)), max_size=most, unique=True).flatmap(
        lambda keys: st.tuples(*(choices[key].map(lambda value, key=key: (key, value)) for key in keys))).map(
        lambda pairs: [item for pair in pairs for item in pair])


GOOD_RUNS = st.tuples(st.sampled_from(['mnist-cnn-bn', 'mnist-mlp-bn']),
                      st.lists(st.sampled_from([str(DIGIT), 'digit16.png']), min_size=1, max_size=2),
                      options(GOOD, 3)).map(lambda run: ['--model', run[0], '--images', *run[1], *run[2]])
ANY_RUNS = st.tuples(
    st.one_of(st.sampled_from(['mnist-cnn-bn', 'cifar10-vgg-bn', 'torchvision:resnet18', 'torchvision:nothing']),
              WORDS),
    st.one_of(st.lists(st.sampled_from([str(DIGIT), 'missing.png', 'notes.png', 'digit16.png',
                                        str(DEMO / 'cifar10-0-0.png')]), min_size=1, max_size=2)
              .map(lambda files: ['--images', *files]),
              st.sampled_from(['mnist', 'cifar10', 'svhn']).map(lambda dataset: ['--dataset', dataset])),
    options(ANY, 4)).map(lambda run: ['--model', run[0], *run[1], *run[2]])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arguments=st.one_of(GOOD_RUNS, ANY_RUNS))
def test_random_arguments_give_a_clear_error_or_correct_outputs(arguments, capsys, monkeypatch, no_network):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        monkeypatch.chdir(folder)
        try:
            check_random_run(folder, arguments, capsys)
        finally:
            os.chdir(ROOT)  # out of the folder before it is removed


def check_random_run(folder, arguments, capsys):
    '''Run ``bnfuse explain`` in ``folder`` and check: exit 0 with correct outputs, or a one-line error and no
    new files.'''
    (folder / 'notes.png').write_text('not an image')
    Image.fromarray(np.asarray(Image.open(DIGIT)).astype(np.uint16) * 257).save(folder / 'digit16.png')
    (folder / 'nodata').mkdir()
    before = files_under(folder)
    args = ['explain', *arguments, '--out', 'out']
    status, stdout, error = in_process(capsys, *args)
    event(f'exit {status}')
    if status == 0:
        model = arguments[1]
        handlings = cli.parse_handlings(dict(zip(args, args[1:])).get('--handling', ','.join(HANDLINGS)))
        name = model.replace(':', '-')
        assert files_under(folder / 'out') == sorted([f'heatmaps-{name}.png', 'metrics.json', 'metrics.md',
                                                      f'relevance-{name}.pt', f'report-{name}.txt'])
        relevance = torch.load(folder / 'out' / f'relevance-{name}.pt', weights_only=True)
        assert list(relevance) == handlings and all(torch.isfinite(value).all() for value in relevance.values())
        assert list(json.loads((folder / 'out' / 'metrics.json').read_text())['models'][model]) == handlings
    else:
        assert status in (1, 2), (args, error)
        lines = [line for line in error.splitlines() if line.strip()]
        assert 'Traceback' not in error and len(lines) == 1 and lines[0].startswith('bnfuse: error: '), \
            (args, error)
        assert files_under(folder) == before, args


@pytest.mark.parametrize('normalize', ['None', False, 'ImageNet'])
def test_load_model_refuses_an_unknown_normalisation(normalize):
    # from Python, any value but 'none' turned ImageNet normalisation on
    with pytest.raises(cli.CommandError, match=r"--normalize must be one of imagenet, none, not"):
        cli.load_model('torchvision:squeezenet1_1', untrained=True, normalize=normalize)
