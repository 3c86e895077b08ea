'''The ``bnfuse`` command: explain a model with BatchNorm fused, unfused and naive.

    bnfuse demo [--out DIR]
    bnfuse explain --model NAME (--images FILE... | --dataset mnist|cifar10) --out DIR [options]
    bnfuse report --model NAME [--weights FILE]
'''
import argparse
import json
import sys
from pathlib import Path

import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor, resize

from .evaluation.composites import COMPOSITES, make_composite
from .evaluation.data import DATASETS, default_data_root, demo_images, load_tensors
from .evaluation.explain import faithfulness_summary, predicted_classes, relevance_by_handling, summary_markdown
from .handling import HANDLINGS
from .evaluation.models import CIFAR10_CLASSES, INPUT_SHAPES, MNIST_CLASSES, MODELS, dataset_of, pretrained
from .pairs import find_fusable_pairs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRID_ROWS = 8


class CommandError(Exception):
    '''A problem the user can fix; ``bnfuse`` prints it without a traceback and exits with status 1.'''


def imagenet_statistics(device):
    '''ImageNet's per-channel mean and standard deviation, each ``(1, 3, 1, 1)``.'''
    return (torch.tensor(IMAGENET_MEAN, device=device).reshape(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).reshape(1, 3, 1, 1))


class LoadedModel:
    '''A model ready to explain, with how to prepare its input.

    Attributes
    ----------
    name: str
    model: :py:obj:`torch.nn.Module`
        Takes prepared inputs.
    input_shape: tuple[int, int, int]
        ``(C, H, W)`` images must have (shipped models) or are resized to (torchvision models).
    normalize: bool
        Whether inputs are normalised with the ImageNet statistics before the model (torchvision models).
    classes: sequence of str or None
    '''
    def __init__(self, name, model, input_shape, normalize, classes):
        self.name, self.model, self.input_shape, self.normalize, self.classes = \
            name, model, input_shape, normalize, classes

    def prepare(self, images):
        '''Images in [0, 1] as the model takes them.'''
        if not self.normalize:
            return images
        mean, std = imagenet_statistics(images.device)
        return (images - mean) / std

    def box(self, device):
        '''``(low, high)`` of the prepared input, for a first-layer ZBox rule.'''
        if not self.normalize:
            return 0., 1.
        mean, std = imagenet_statistics(device)
        return -mean / std, (1 - mean) / std

    def class_name(self, index):
        return self.classes[index] if self.classes is not None and index < len(self.classes) else str(index)


def read_weights(path):
    '''A state_dict from ``path``, or a CommandError saying what is wrong with the file.'''
    path = Path(path)
    if not path.is_file():
        raise CommandError(f'weights file not found: {path}')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # torch raises many kinds for files that are not state_dicts
        raise CommandError(f'cannot read weights from {path} ({type(error).__name__}); pass a file written by '
                           'torch.save(model.state_dict(), FILE)') from None
    if isinstance(state, dict) and 'state_dict' in state and isinstance(state['state_dict'], dict):
        state = state['state_dict']
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CommandError(f'{path} does not hold a state_dict; save one with torch.save(model.state_dict(), FILE)')
    return state


def listed(keys, limit=3):
    """``'a, b, c and 4 more'``."""
    keys = list(keys)
    more = f' and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def load_state(model, state, description, path):
    """Load ``state`` into ``model`` or raise a CommandError saying what does not fit."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [f'{key} is {tuple(state[key].shape)} in the file, {tuple(expected[key].shape)} in the model'
                for key in expected if key in state and state[key].shape != expected[key].shape]
    problems = [f'{len(missing)} missing ({listed(missing)})'] if missing else []
    problems += [f'{len(unexpected)} unexpected ({listed(unexpected)})'] if unexpected else []
    problems += [listed(reshaped, 2)] if reshaped else []
    if problems:
        raise CommandError(f'the weights in {path} do not fit {description}: {"; ".join(problems)}. Pass weights '
                           'saved from that architecture')
    model.load_state_dict(state)


def load_model(name, weights=None, size=224, device='cpu'):
    '''A shipped model or ``torchvision:<arch>`` with user weights, as a :py:class:`LoadedModel`.'''
    if name.startswith('torchvision:'):
        arch = name.split(':', 1)[1]
        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise CommandError(f'unknown torchvision classifier {arch!r}; see torchvision.models.list_models(), '
                               'e.g. torchvision:resnet18')
        if weights is None:
            raise CommandError(f'{name} needs --weights FILE (a state_dict you trained); weights are never '
                               'downloaded')
        state = read_weights(weights)
        classifier = [value for key, value in state.items() if key.endswith('weight') and value.ndim == 2]
        kwargs = {'num_classes': classifier[-1].shape[0]} if classifier else {}
        if arch == 'inception_v3':
            kwargs.update(aux_logits=any(key.startswith('AuxLogits.') for key in state), init_weights=False)
        model = getattr(torchvision.models, arch)(weights=None, **kwargs)
        load_state(model, state, name, weights)
        return LoadedModel(name, model.to(device).eval(), (3, size, size), True, None)
    if name not in MODELS:
        raise CommandError(f'unknown model {name!r}; choose one of {", ".join(MODELS)} or torchvision:<arch> '
                           'with --weights FILE')
    try:
        model = pretrained(name, device='cpu')
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    if weights is not None:
        load_state(model, read_weights(weights), name, weights)
    dataset = dataset_of(name)
    classes = CIFAR10_CLASSES if dataset == 'cifar10' else MNIST_CLASSES
    return LoadedModel(name, model.to(device).eval(), INPUT_SHAPES[dataset], False, classes)


def read_images(paths, loaded):
    '''Image files as a ``(N, C, H, W)`` tensor in [0, 1], checked against what the model takes.'''
    channels, height, width = loaded.input_shape
    images = []
    for path in map(Path, paths):
        if not path.is_file():
            raise CommandError(f'image file not found: {path}')
        try:
            with Image.open(path) as image:
                image.load()
                if image.mode == 'P':
                    image = image.convert('RGBA' if 'transparency' in image.info else 'RGB')
                tensor = pil_to_tensor(image)
        except (UnidentifiedImageError, OSError):
            raise CommandError(f'cannot read {path} as an image; pass PNG or JPEG files') from None
        if tensor.shape[0] != channels:
            kind = {1: 'grayscale (1 channel)', 3: 'RGB (3 channels)'}.get(channels, f'{channels} channels')
            raise CommandError(f'{path} has {tensor.shape[0]} channel(s) but {loaded.name} takes {kind} images; '
                               'convert it first')
        if loaded.normalize:
            tensor = resize(tensor, [height, width], antialias=True)
        elif tuple(tensor.shape[1:]) != (height, width):
            raise CommandError(f'{path} is {tensor.shape[2]}x{tensor.shape[1]} pixels but {loaded.name} takes '
                               f'{width}x{height}; resize it first')
        images.append(tensor.float() / 255)
    return torch.stack(images)


def dataset_images(dataset, loaded, data_root, count, download=False):
    '''The first ``count`` test images of ``dataset`` for the model.'''
    if not loaded.normalize and dataset != dataset_of(loaded.name):
        raise CommandError(f'{loaded.name} takes {dataset_of(loaded.name)} images, not {dataset}')
    try:
        images, _ = load_tensors(dataset, data_root, train=False, download=download, limit=count)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    if loaded.normalize:
        images = resize(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images,
                        list(loaded.input_shape[1:]), antialias=True)
    return images


def explain_to_outputs(loaded, images, composite, handlings, target, device, patch_size, progress=True):
    '''Everything ``explain`` and ``demo`` write, computed in memory (nothing is written on failure).'''
    images = images.to(device)
    inputs = loaded.prepare(images)
    if target is None:
        targets = predicted_classes(loaded.model, inputs)
    else:
        with torch.no_grad():
            classes = loaded.model(inputs[:1]).shape[1]
        if not 0 <= target < classes:
            raise CommandError(f'--target {target} is not a class of {loaded.name} (0 to {classes - 1})')
        targets = torch.full((len(images),), target, device=device)
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise CommandError(f'--patch-size {patch_size} does not divide the image size {width}x{height}')
    low, high = loaded.box(device)
    relevance = relevance_by_handling(loaded.model, inputs, targets, lambda: make_composite(composite, low, high),
                                      handlings, progress=progress)
    summary = faithfulness_summary(loaded.model, inputs, targets, relevance, patch_size, progress=progress)
    return targets, relevance, summary


def write_outputs(out, name, loaded, images, targets, relevance, composite):
    '''Heatmap grid, relevance tensors and the metrics of one model in ``out``.'''
    from .evaluation.figures import heatmap_grid
    out.mkdir(parents=True, exist_ok=True)
    rows = slice(0, GRID_ROWS)
    heatmap_grid(images[rows], {handling: values[rows] for handling, values in relevance.items()},
                 out / f'heatmaps-{name}.png', [loaded.class_name(target) for target in targets[rows].tolist()],
                 f'{loaded.name}, {composite}')
    torch.save({handling: values.cpu() for handling, values in relevance.items()}, out / f'relevance-{name}.pt')


def write_metrics(out, summaries, settings):
    '''metrics.json and metrics.md for all explained models.'''
    (out / 'metrics.json').write_text(json.dumps({'settings': settings, 'models': summaries}, indent=1) + '\n')
    text = ['# AOPC per BatchNorm handling', '',
            'Region perturbation of the explained class: 4 patches of the given size per step, replaced by 0. '
            'Means ± 95% half-width over the images.', '',
            *(f'- {key}: {value}' for key, value in settings.items()), '']
    text += [summary_markdown(summary, name) for name, summary in summaries.items()]
    (out / 'metrics.md').write_text('\n'.join(text))


def check_out(out):
    '''Fail early if ``out`` cannot be an output folder.'''
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CommandError(f'--out {out} exists and is not a folder')
    return out


def check_device(device):
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise CommandError('--device cuda was asked for but no CUDA device is available; use --device cpu')
    return torch.device(device)


def parse_handlings(text):
    handlings = [item.strip() for item in text.split(',') if item.strip()]
    unknown = [item for item in handlings if item not in HANDLINGS]
    if unknown or not handlings:
        raise CommandError(f'unknown handling {", ".join(unknown) or repr(text)}; choose from {", ".join(HANDLINGS)}')
    return handlings


def check_composite(name):
    if name not in COMPOSITES:
        raise CommandError(f'unknown composite {name!r}; choose one of {", ".join(COMPOSITES)}')
    return name


def command_demo(args):
    out = check_out(args.out)
    device = check_device(args.device)
    summaries, results = {}, []
    for dataset, name in (('mnist', 'mnist-cnn-bn'), ('cifar10', 'cifar10-vgg-bn')):
        loaded = load_model(name, device=device)
        print(f'== {name}\n{find_fusable_pairs(loaded.model)}\n')
        images = demo_images(dataset)
        targets, relevance, summary = explain_to_outputs(
            loaded, images, 'epsilon-plus-flat', tuple(HANDLINGS)[::-1], None, device, patch_size=4)
        results.append((dataset, loaded, images, targets, relevance))
        summaries[name] = summary
    for dataset, loaded, images, targets, relevance in results:
        write_outputs(out, dataset, loaded, images.to(device), targets, relevance, 'EpsilonPlusFlat')
    write_metrics(out, summaries, {'composite': 'epsilon-plus-flat', 'patch size': 4,
                                   'images': 'the shipped demo images (6 MNIST, 6 CIFAR-10)'})
    print(f'wrote {", ".join(sorted(path.name for path in out.iterdir()))} to {out}')
    return 0


def command_explain(args):
    out = check_out(args.out)
    device = check_device(args.device)
    composite = check_composite(args.composite)
    handlings = parse_handlings(args.handling)
    if bool(args.images) == bool(args.dataset):
        raise CommandError('give either --images FILE... or --dataset mnist|cifar10')
    loaded = load_model(args.model, args.weights, args.size, device)
    if args.images:
        images = read_images(args.images, loaded)
    else:
        images = dataset_images(args.dataset, loaded, args.data_root, args.n, args.download)
    patch_size = args.patch_size or (4 if images.shape[-1] <= 64 else 16)
    targets, relevance, summary = explain_to_outputs(loaded, images, composite, handlings, args.target, device,
                                                     patch_size)
    name = args.model.replace(':', '-')
    write_outputs(out, name, loaded, images.to(device), targets, relevance, composite)
    write_metrics(out, {args.model: summary}, {'model': args.model, 'composite': composite,
                                               'patch size': patch_size, 'images': len(images)})
    (out / f'report-{name}.txt').write_text(str(find_fusable_pairs(loaded.model)) + '\n')
    print(summary_markdown(summary, args.model))
    print(f'wrote {", ".join(sorted(path.name for path in out.iterdir()))} to {out}')
    return 0


def command_report(args):
    loaded = load_model(args.model, args.weights, args.size)
    print(find_fusable_pairs(loaded.model))
    return 0


def parser():
    '''The argument parser of ``bnfuse``.'''
    main = argparse.ArgumentParser(
        prog='bnfuse', description='Explain models with LRP, with BatchNorm fused, unfused or ignored (naive).')
    commands = main.add_subparsers(dest='command', required=True, metavar='COMMAND')

    demo = commands.add_parser('demo', help='explain the shipped MNIST and CIFAR-10 models on shipped images',
                               description='Explain the shipped BatchNorm models on a few shipped test images (no '
                               'data, no network): print their fusion reports, write a heatmap grid per dataset '
                               '(input | naive | unfused | fused, EpsilonPlusFlat) and AOPC per handling.')
    demo.add_argument('--out', default='bnfuse-demo', help='output folder (default: bnfuse-demo)')
    demo.add_argument('--device', default='cpu', help='cpu or cuda')
    demo.set_defaults(run=command_demo)

    explain = commands.add_parser('explain', help='heatmaps and metrics for your images or a dataset slice',
                                  description='Explain a shipped model or torchvision:<arch> with your weights on '
                                  'image files or the first N test images of a dataset.')
    explain.add_argument('--model', required=True,
                         help=f'{", ".join(MODELS)}, or torchvision:<arch> with --weights FILE')
    explain.add_argument('--weights', help='a state_dict file (required for torchvision:<arch>)')
    source = explain.add_argument_group('images (one of)')
    source.add_argument('--images', nargs='+', metavar='FILE', help='PNG/JPEG files')
    source.add_argument('--dataset', choices=DATASETS, help='use test images of this dataset')
    explain.add_argument('--data-root', default=str(default_data_root()), help='folder holding the dataset')
    explain.add_argument('--download', action='store_true', help='let torchvision download the dataset if missing')
    explain.add_argument('--n', type=int, default=16, help='number of dataset images (default 16)')
    explain.add_argument('--composite', default='epsilon-plus-flat', help=f'one of {", ".join(COMPOSITES)}')
    explain.add_argument('--handling', default='fused,unfused,naive', help='comma-separated BatchNorm handlings')
    explain.add_argument('--target', type=int, help='class to explain (default: the predicted class)')
    explain.add_argument('--device', default='cpu', help='cpu or cuda')
    explain.add_argument('--size', type=int, default=224, help='input size for torchvision models (default 224)')
    explain.add_argument('--patch-size', type=int, help='perturbation patch size (default 4, or 16 above 64 px)')
    explain.add_argument('--out', required=True, help='output folder')
    explain.set_defaults(run=command_explain)

    report = commands.add_parser('report', help='print the fusion report of a model',
                                 description='Print which BatchNorms of a model fold into which layers, and why '
                                 'the others do not.')
    report.add_argument('--model', required=True, help=f'{", ".join(MODELS)}, or torchvision:<arch>')
    report.add_argument('--weights', help='a state_dict file (required for torchvision:<arch>)')
    report.add_argument('--size', type=int, default=224, help=argparse.SUPPRESS)
    report.set_defaults(run=command_report)
    return main


def main(argv=None):
    '''Run ``bnfuse``; returns the exit status (0 success, 1 a problem with the input, 2 bad usage).'''
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except CommandError as error:
        print(f'bnfuse: error: {error}', file=sys.stderr)
        return 1
