'''The ``bnfuse`` command: explain a model with BatchNorm fused, unfused and naive.

    bnfuse demo [--out DIR] [--overwrite]
    bnfuse explain --model NAME (--images FILE... | --dataset mnist|cifar10) --out DIR [options]
    bnfuse report --model NAME [--weights FILE]

Every option is checked before any model work (image files and data are read after the model is loaded). Outputs
are written to a temporary folder next to (or inside) ``--out`` and moved in place only when the run succeeded, so a
failed run leaves nothing behind and an output folder always holds the files of exactly one run.
'''
import argparse
import collections
import contextlib
import difflib
import fnmatch
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torchvision
from torchvision.transforms.functional import resize

from .evaluation.composites import COMPOSITES, DISPLAY_NAMES
from .evaluation.data import (
    DATA_ROOT_VARIABLE, DATASETS, UnsupportedImage, default_data_root, demo_images, first_missing, load_tensors,
    read_image, unit_range,
)
from .evaluation.explain import faithfulness_summary, predicted_classes, relevance_by_handling, summary_markdown
from .evaluation.figures import HEATMAP_SCALE
from .handling import HANDLINGS
from .evaluation.models import CIFAR10_CLASSES, INPUT_SHAPES, MNIST_CLASSES, MODELS, dataset_of, pretrained
from .pairs import find_fusable_pairs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRID_ROWS = 8
DEVICE_TYPES = ('cpu', 'cuda', 'mps')
# the files bnfuse writes into --out; --overwrite replaces a folder that holds only these
OUTPUT_PATTERNS = ('heatmaps-*.png', 'relevance-*.pt', 'report-*.txt', 'metrics.json', 'metrics.md')
STAGING_PREFIX = '.bnfuse-partial-'
# torchvision builders that warn unless told how to initialise weights
INIT_WEIGHTS_ARCHS = ('googlenet', 'inception_v3')
# --normalize: how torchvision:<arch> inputs in [0, 1] are normalised before the model
NORMALIZATIONS = ('imagenet', 'none')


class CommandError(Exception):
    '''A problem the user can fix; ``bnfuse`` prints it without a traceback and exits with status 1.'''


class Parser(argparse.ArgumentParser):
    '''An argument parser whose usage errors are one line, ``bnfuse: error: ...``, as all of bnfuse's errors.'''
    def error(self, message):
        self.exit(2, f'bnfuse: error: {message} (see {self.prog} --help)\n')

    def parse_args(self, args=None, namespace=None):
        '''As argparse's, but arguments a command does not take point to that command's ``--help`` (argparse
        reports them from the top-level parser, after the command has parsed what it knows).'''
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, 'command', None)
            where = f'{self.prog} {command}' if command else self.prog
            self.exit(2, f'bnfuse: error: unrecognized arguments: {" ".join(extras)} (see {where} --help)\n')
        return parsed


def positive_int(text):
    '''An argparse type: an integer of at least 1.'''
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be 1 or more, not {value}')
    return value


# the largest --size: one 4096 x 4096 RGB image in float32 is 200 MB, and every step of the perturbation curves
# evaluates a batch of them
MAX_SIZE = 4096


def image_size(text):
    '''An argparse type: an image side of 1 to :py:data:`MAX_SIZE` pixels.'''
    value = positive_int(text)
    if value > MAX_SIZE:
        raise argparse.ArgumentTypeError(f'{value} is more than {MAX_SIZE} pixels a side, more than an explanation '
                                         'needs and than memory holds; pass the size the model was trained at')
    return value


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
    resized: bool
        Whether images are resized to ``input_shape`` and grey images repeated to RGB (torchvision models), rather
        than refused if they do not have it (shipped models).
    normalize: bool
        Whether inputs are normalised with the ImageNet statistics before the model (torchvision models, unless
        ``--normalize none``).
    classes: sequence of str or None
    '''
    def __init__(self, name, model, input_shape, resized, normalize, classes):
        self.name, self.model, self.input_shape, self.resized, self.normalize, self.classes = \
            name, model, input_shape, resized, normalize, classes

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
        pickled = re.search(r'Unsupported global: GLOBAL ([\w.]+)', str(error))
        if pickled:  # a whole model (torch.save(model)) or a checkpoint with other objects
            raise CommandError(
                f'{path} holds a pickled {pickled.group(1)}, not only tensors (a whole model saved with '
                'torch.save(model)?); bnfuse loads tensors only, as unpickling objects can run code from the file. '
                'Load it where you trust it and pass torch.save(model.state_dict(), FILE)') from None
        raise CommandError(f'cannot read weights from {path} ({type(error).__name__}); pass a file written by '
                           'torch.save(model.state_dict(), FILE)') from None
    # a checkpoint that holds the state_dict under a key, as training scripts save it
    for key in ('state_dict', 'model_state_dict', 'model'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if isinstance(state, dict) and state and all(isinstance(key, str) and key.startswith('module.') for key in state):
        # saved from DataParallel or DistributedDataParallel: the wrapped model's keys, prefixed
        state = {key[len('module.'):]: value for key, value in state.items()}
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CommandError(f'{path} does not hold a state_dict; save one with torch.save(model.state_dict(), FILE)')
    broken = [key for key, value in state.items() if value.is_floating_point() and not bool(value.isfinite().all())]
    if broken:  # the model would compute NaN, and every heatmap and metric with it
        raise CommandError(f'the weights in {path} hold NaN or infinite values ({listed(broken)}); fix or retrain '
                           'the model before explaining it')
    return state


def listed(keys, limit=3):
    """``'a, b, c and 4 more'``."""
    keys = list(keys)
    more = f' and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def with_batch_counts(state, expected):
    '''``state`` with the BatchNorm counters (``*.num_batches_tracked``) it lacks taken from ``expected``, as
    torch's ``load_state_dict`` fills them in for older state_dicts; they do not change what the model computes.'''
    untracked = [key for key in expected if key.endswith('num_batches_tracked') and key not in state]
    if not untracked:
        return state
    filled = collections.OrderedDict(state)
    filled.update((key, expected[key]) for key in untracked)
    if hasattr(state, '_metadata'):  # the modules' versions, which load_state_dict reads
        filled._metadata = state._metadata
    return filled


def load_state(model, state, description, path):
    """Load ``state`` into ``model`` or raise a CommandError saying what does not fit."""
    expected = model.state_dict()
    state = with_batch_counts(state, expected)
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


# torchvision classifiers with auxiliary classifiers (aux_logits), by the prefix of their keys
AUX_PREFIXES = {'inception_v3': 'AuxLogits.', 'googlenet': 'aux1.'}


def did_you_mean(name, choices):
    '''`` (did you mean 'x'?)`` for the choice closest to ``name``, ignoring case, or an empty string.'''
    lowered = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(name.lower(), lowered, n=1, cutoff=.75)
    return f' (did you mean {lowered[close[0]]!r}?)' if close else ''


def classifier_key(arch, kwargs):
    '''The state_dict key of torchvision classifier ``arch``'s last conv or linear weight, its classifier (``fc``,
    ``classifier.1``, ``heads.head``, ...), from the architecture built on the meta device (nothing allocated); the
    order of a weights file's keys need not be the model's.'''
    with torch.device('meta'):
        reference = getattr(torchvision.models, arch)(weights=None, **kwargs)
    keys = [key for key, value in reference.state_dict().items() if key.endswith('weight') and value.ndim >= 2]
    return keys[-1] if keys else None


def load_model(name, weights=None, size=None, device='cpu', untrained=False, normalize=None):
    '''A shipped model or ``torchvision:<arch>`` with user weights, as a :py:class:`LoadedModel`.

    ``untrained=True`` allows ``torchvision:<arch>`` without weights (randomly initialised, for the fusion
    report); ``size`` (default 224) and ``normalize`` (one of :py:data:`NORMALIZATIONS`, default ``'imagenet'``)
    apply to torchvision models only: shipped models take their own size and images in [0, 1].

    Raises
    ------
    CommandError
        For an unknown model, ``normalize`` not None nor one of :py:data:`NORMALIZATIONS`, ``size`` or
        ``normalize`` given for a shipped model, or weights that do not fit.
    '''
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise CommandError(f'--normalize must be one of {", ".join(NORMALIZATIONS)}, not {normalize!r}')
    if name.startswith('torchvision:'):
        arch = name.split(':', 1)[1]
        architectures = torchvision.models.list_models(module=torchvision.models)
        if arch not in architectures:
            raise CommandError(f'unknown torchvision classifier {arch!r}{did_you_mean(arch, architectures)}; see '
                               'torchvision.models.list_models(), e.g. torchvision:resnet18')
        if weights is None and not untrained:
            raise CommandError(f'{name} needs --weights FILE (a state_dict you trained); weights are never '
                               'downloaded')
        state = read_weights(weights) if weights is not None else {}
        kwargs = {'init_weights': False} if arch in INIT_WEIGHTS_ARCHS else {}
        head = classifier_key(arch, kwargs)
        if head in state:
            kwargs.update(num_classes=state[head].shape[0])
        if arch in AUX_PREFIXES and weights is not None:  # trained with or without the auxiliary classifiers
            kwargs.update(aux_logits=any(key.startswith(AUX_PREFIXES[arch]) for key in state))
        model = getattr(torchvision.models, arch)(weights=None, **kwargs)
        if weights is not None:
            load_state(model, state, name, weights)
        size = 224 if size is None else size
        return LoadedModel(name, model.to(device).eval(), (3, size, size), True, normalize != 'none', None)
    if name not in MODELS:
        architectures = torchvision.models.list_models(module=torchvision.models)
        choices = [*MODELS, *(f'torchvision:{arch}' for arch in architectures)]
        guess = did_you_mean(f'torchvision:{name}' if name.lower() in architectures else name, choices)
        raise CommandError(f'unknown model {name!r}{guess}; choose one of {", ".join(MODELS)} or torchvision:<arch> '
                           'with --weights FILE')
    if size is not None:
        shape = INPUT_SHAPES[dataset_of(name)]
        raise CommandError(f'--size applies to torchvision:<arch> models only; {name} takes {shape[2]}x{shape[1]} '
                           'images: leave --size out')
    if normalize is not None:
        raise CommandError(f'--normalize applies to torchvision:<arch> models only; {name} takes images in [0, 1] '
                           '(its normalisation is folded into its first layer): leave --normalize out')
    try:
        model = pretrained(name, device='cpu')
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    if weights is not None:
        load_state(model, read_weights(weights), name, weights)
    dataset = dataset_of(name)
    classes = CIFAR10_CLASSES if dataset == 'cifar10' else MNIST_CLASSES
    return LoadedModel(name, model.to(device).eval(), INPUT_SHAPES[dataset], False, False, classes)


def read_images(paths, loaded):
    '''Image files as a ``(N, C, H, W)`` tensor in [0, 1], checked against what the model takes.'''
    channels, height, width = loaded.input_shape
    images = []
    for path in map(Path, paths):
        try:
            tensor = read_image(path)
        except (FileNotFoundError, UnsupportedImage) as error:
            raise CommandError(str(error)) from None
        if loaded.resized and tensor.shape[0] == 1 and channels == 3:
            tensor = tensor.expand(3, -1, -1)  # a grey image in RGB, as --dataset mnist gives torchvision models
        if tensor.shape[0] != channels:
            kind = {1: 'grayscale (1 channel)', 3: 'RGB (3 channels)'}.get(channels, f'{channels} channels')
            raise CommandError(f'{path} has {tensor.shape[0]} channel(s) but {loaded.name} takes {kind} images; '
                               'convert it first')
        if loaded.resized:
            tensor = resize(tensor, [height, width], antialias=True)
        elif tuple(tensor.shape[1:]) != (height, width):
            raise CommandError(f'{path} is {tensor.shape[2]}x{tensor.shape[1]} pixels but {loaded.name} takes '
                               f'{width}x{height}; resize it first')
        images.append(unit_range(tensor))
    return torch.stack(images)


def dataset_images(dataset, loaded, data_root, count, download=False):
    '''``count`` test images of ``dataset`` for the model, as :py:func:`load_tensors` picks them (the first
    ``count``, or spread evenly over the CIFAR-10 JPEG tree); all of them, with a note, if it has fewer.'''
    if not loaded.resized and dataset != dataset_of(loaded.name):
        raise CommandError(f'{loaded.name} takes {dataset_of(loaded.name)} images, not {dataset}')
    try:
        # a progress bar only on a terminal, where an error message overwrites it
        images, _ = load_tensors(dataset, data_root, train=False, download=download, limit=count,
                                 progress=sys.stderr.isatty())
    except (FileNotFoundError, ValueError) as error:  # ValueError: a CIFAR-10 tree with other folders
        raise CommandError(str(error)) from None
    if len(images) < count:
        print(f'bnfuse: note: --n {count} is more than the {len(images)} {dataset} test images; explaining all '
              f'{len(images)}', file=sys.stderr)
    if loaded.resized:
        images = resize(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images,
                        list(loaded.input_shape[1:]), antialias=True)
    return images


def output_classes(loaded, device):
    '''The number of classes of the model, from one forward pass on a blank input (which also checks that the
    model runs at its input size).'''
    blank = torch.zeros(1, *loaded.input_shape, device=device)
    try:
        with torch.no_grad():
            output = loaded.model(loaded.prepare(blank))
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        raise CommandError(f'{loaded.name} does not run on {loaded.input_shape[2]}x{loaded.input_shape[1]} '
                           f'inputs ({reason}); pass a larger --size') from None
    if output.ndim != 2:
        raise CommandError(f'{loaded.name} returns shape {tuple(output.shape)}, not (batch, classes); bnfuse '
                           'explains classifiers')
    return output.shape[1]


def check_target(target, loaded, classes):
    '''``target`` if it is a class index of the model, else a CommandError with the range.'''
    if target is not None and not 0 <= target < classes:
        raise CommandError(f'--target {target} is not a class of {loaded.name} (0 to {classes - 1})')
    return target


def choose_patch_size(patch_size, input_shape):
    '''The perturbation patch size: ``patch_size``, or 4 up to 64 pixels and 16 above; it must divide the image.'''
    height, width = input_shape[1:]
    default = patch_size is None
    patch_size = (4 if width <= 64 else 16) if default else patch_size
    if height % patch_size or width % patch_size:
        which = 'the default patch size' if default else '--patch-size'
        divisors = [size for size in range(1, min(height, width) + 1) if not height % size and not width % size]
        raise CommandError(f'{which} {patch_size} does not divide the image size {width}x{height}; pass '
                           f'--patch-size with one of {listed(map(str, divisors), 8)}')
    return patch_size


def fusion_report(model):
    '''The fusion report of ``model``, or a CommandError if its BatchNorms cannot be folded at all.'''
    try:
        return find_fusable_pairs(model)
    except ValueError as error:  # e.g. non-finite statistics in the user's weights
        raise CommandError(str(error)) from None


def explain_to_outputs(loaded, images, composite, handlings, target, device, patch_size, progress=True):
    '''Everything ``explain`` and ``demo`` write, computed in memory (nothing is written on failure).'''
    images = images.to(device)
    inputs = loaded.prepare(images)
    if target is None:
        targets = predicted_classes(loaded.model, inputs)
    else:
        targets = torch.full((len(images),), target, device=device)
    low, high = loaded.box(device)
    relevance = relevance_by_handling(loaded.model, inputs, targets, composite, low, high, handlings, progress=progress)
    summary = faithfulness_summary(loaded.model, inputs, targets, relevance, patch_size, progress=progress)
    return targets, relevance, summary


def write_outputs(out, name, loaded, images, targets, relevance, composite, title=None):
    '''Heatmap grid and relevance tensors of one model in ``out``; the grid's title is ``title`` (default: the
    model and the composite).

    Returns
    -------
    list[str]
        A note to print if the grid shows only some of the images.
    '''
    from .evaluation.figures import heatmap_grid
    figure = f'heatmaps-{name}.png'
    drawn = heatmap_grid(images, relevance, out / figure,
                         [loaded.class_name(target) for target in targets[:GRID_ROWS].tolist()],
                         title or f'{loaded.name}, {DISPLAY_NAMES[composite]}', max_rows=GRID_ROWS)
    torch.save({handling: values.cpu() for handling, values in relevance.items()}, out / f'relevance-{name}.pt')
    if drawn == len(images):
        return []
    return [f'{figure} shows the first {drawn} of {len(images)} images; relevance-{name}.pt and the metrics cover '
            f'all {len(images)}']


def write_metrics(out, summaries, settings):
    '''metrics.json and metrics.md for all explained models.'''
    (out / 'metrics.json').write_text(json.dumps({'settings': settings, 'models': summaries}, indent=1) + '\n')
    patch = settings['patch size']
    fill = ('the ImageNet mean colour, as the inputs are normalised with ImageNet\'s mean and std'
            if settings.get('normalize') == 'imagenet' else 'black')
    text = ['# Faithfulness per BatchNorm handling', '',
            'Region perturbation of the explained class: the image is split into patches of '
            f'{patch}x{patch} pixels, ranked by their summed relevance; step by step 4 more patches are replaced by '
            f'0 in the model\'s input ({fill}), and the explained logit is recorded after each step.', '',
            '- **AOPC** (area over the perturbation curve): the mean drop of the logit from the unperturbed image '
            'over all steps. **MoRF** removes the most relevant patches first: higher is better (the heatmap found '
            'what the model uses). **LeRF** removes the least relevant first: lower is better.',
            '- **ABPC** (area between the perturbation curves): the mean of the LeRF curve minus the MoRF curve; '
            'higher is better.',
            '- Each cell: mean ± 95% half-width (normal approximation) over the images; the half-width is 0 for a '
            'single image.', '',
            *(f'- {key}: {value}' for key, value in settings.items()), '']
    text += [summary_markdown(summary, name) for name, summary in summaries.items()]
    (out / 'metrics.md').write_text('\n'.join(text))


def is_output(path):
    '''Whether ``path`` is a file bnfuse writes, or the temporary folder of a bnfuse run that was killed.'''
    if path.name.startswith(STAGING_PREFIX):
        return path.is_dir() and not path.is_symlink()
    return path.is_file() and not path.is_symlink() and \
        any(fnmatch.fnmatchcase(path.name, pattern) for pattern in OUTPUT_PATTERNS)


def current_umask():
    '''The process's umask (the permission bits new files and folders do not get).'''
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


class StagedOutput:
    '''An output folder written all at once.

    The run writes into :py:attr:`path`, a temporary folder inside ``out`` (if it exists) or next to it;
    :py:meth:`commit` moves the files into ``out``. Leaving the ``with`` block without a commit (an error, Ctrl-C)
    removes the temporary folder and any folder the run created, so a failed run leaves nothing behind.

    ``out`` must not exist, or be empty, or (with ``overwrite``) hold only the outputs of earlier bnfuse runs,
    which the commit removes: the folder always holds the files of exactly one run.

    Raises
    ------
    CommandError
        If ``out`` is a file, is not empty (without ``overwrite``), holds files bnfuse does not write, or cannot
        be written.
    '''
    def __init__(self, out, overwrite=False):
        self.out = Path(out)
        self.earlier = self.earlier_outputs(overwrite)
        self.path = None
        self.created = None

    def earlier_outputs(self, overwrite):
        '''What is in ``out`` now, if the commit may replace it.'''
        if not self.out.exists():
            return []
        if not self.out.is_dir():
            raise CommandError(f'--out {self.out} is a file; pass a folder')
        try:
            entries = sorted(self.out.iterdir())
        except OSError as error:
            raise CommandError(f'cannot read --out {self.out} ({error.strerror}); choose a folder you can write '
                               'to') from None
        if entries and not overwrite:
            raise CommandError(f'--out {self.out} is not empty; pass --overwrite to replace the outputs of an '
                               'earlier bnfuse run in it, or choose a new folder')
        foreign = [entry.name + ('/' if entry.is_dir() else '') for entry in entries if not is_output(entry)]
        if foreign:
            raise CommandError(f'--out {self.out} holds files bnfuse does not write ({listed(foreign)}); '
                               '--overwrite replaces only bnfuse outputs: choose a new or empty folder')
        return entries

    def __enter__(self):
        try:
            if self.out.is_dir():
                parent = self.out
            else:
                parent = self.out.parent
                self.created = first_missing(parent)
                existing = self.created.parent if self.created is not None else parent
                if not existing.is_dir():
                    self.created = None
                    raise CommandError(f'--out {self.out} cannot be made: {existing} is a file; choose another --out')
                parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
            self.path.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; a new --out is not
        except OSError as error:
            self.discard()
            raise CommandError(f'cannot write to --out {self.out} ({error.strerror or error}); choose a folder you '
                               'can write to') from None
        return self

    def __exit__(self, kind, error, trace):
        if self.path is not None:
            self.discard()
        return False

    @contextlib.contextmanager
    def writing(self):
        '''A block that writes into :py:attr:`path` and commits; an OSError in it (disk full, a file that cannot be
        replaced) becomes a CommandError, and nothing is kept.'''
        try:
            yield self.path
        except OSError as error:
            where = f': {error.filename}' if error.filename else ''
            raise CommandError(f'writing the outputs failed ({error.strerror or error}{where}); nothing was kept in '
                               f'--out {self.out}') from None

    def commit(self):
        '''Move the written files into ``out`` (replacing the earlier outputs there); returns their names.'''
        names = sorted(entry.name for entry in self.path.iterdir())
        if self.out.is_dir():
            for entry in self.earlier:
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink(missing_ok=True)
            for name in names:
                os.replace(self.path / name, self.out / name)
            self.path.rmdir()
        else:
            os.rename(self.path, self.out)
        self.path = self.created = None
        return names

    def discard(self):
        '''Remove the temporary folder and any folder this run created.'''
        for path in (self.path, self.created):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
        self.path = self.created = None


def check_device(device):
    '''``device`` as a :py:class:`torch.device` if bnfuse can run there, else a CommandError.'''
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise CommandError(f'--device {device} is not a device bnfuse can use; choose cpu, cuda, cuda:N or mps')
    if parsed.type == 'cuda' and not torch.cuda.is_available():
        raise CommandError(f'--device {device} was asked for but no CUDA device is available; use --device cpu')
    if parsed.type == 'cuda' and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise CommandError(f'--device {device}: there are only {torch.cuda.device_count()} CUDA device(s) '
                           f'(cuda:0 to cuda:{torch.cuda.device_count() - 1})')
    if parsed.type == 'mps' and not torch.backends.mps.is_available():
        raise CommandError(f'--device {device} was asked for but MPS is not available; use --device cpu')
    return parsed


def parse_handlings(text):
    '''The handlings named in ``text`` (comma-separated), in the order of :py:data:`HANDLINGS`.'''
    handlings = [item.strip() for item in text.split(',') if item.strip()]
    unknown = [item for item in handlings if item not in HANDLINGS]
    if unknown or not handlings:
        raise CommandError(f'unknown handling {", ".join(unknown) or repr(text)}; choose from {", ".join(HANDLINGS)}')
    return [handling for handling in HANDLINGS if handling in handlings]


def check_composite(name):
    if name not in COMPOSITES:
        raise CommandError(f'unknown composite {name!r}; choose one of {", ".join(COMPOSITES)}')
    return name


def print_written(names, out, notes=()):
    print(f'wrote {", ".join(names)} to {out}')
    for note in notes:
        print(f'note: {note}')


def command_demo(args):
    device = check_device(args.device)
    summaries, results = {}, []
    composite = 'epsilon-plus-flat'
    with StagedOutput(args.out, args.overwrite) as output:
        for dataset, name in (('mnist', 'mnist-cnn-bn'), ('cifar10', 'cifar10-vgg-bn')):
            loaded = load_model(name, device=device)
            print(f'== {name}\n{fusion_report(loaded.model)}\n')
            images = demo_images(dataset)
            targets, relevance, summary = explain_to_outputs(
                loaded, images, composite, tuple(HANDLINGS), None, device, patch_size=4)
            results.append((dataset, loaded, images, targets, relevance))
            summaries[name] = summary
        notes = []
        with output.writing() as folder:
            for dataset, loaded, images, targets, relevance in results:
                notes += write_outputs(folder, dataset, loaded, images.to(device), targets, relevance, composite)
            write_metrics(folder, summaries, {'composite': composite, 'patch size': 4,
                                              'images': 'the shipped demo images (6 MNIST, 6 CIFAR-10)'})
            names = output.commit()
    print_written(names, args.out, notes)
    return 0


def explain_settings(args, loaded, composite, patch_size, count):
    '''The settings of an ``explain`` run, as metrics.json and metrics.md record them.'''
    settings = {'model': args.model, 'weights': Path(args.weights).name if args.weights else 'shipped'}
    if loaded.resized:  # torchvision:<arch>
        settings['normalize'] = 'imagenet' if loaded.normalize else 'none'
    return {**settings, 'composite': composite, 'target': 'predicted class' if args.target is None else args.target,
            'patch size': patch_size, 'images': count}


def figure_title(args, loaded, composite):
    '''The title of the heatmap grid: the model, its weights file, the composite and a fixed --target.'''
    weights = f' ({Path(args.weights).name})' if args.weights else ''
    target = '' if args.target is None else f', target {loaded.class_name(args.target)}'
    return f'{loaded.name}{weights}, {DISPLAY_NAMES[composite]}{target}'


def command_explain(args):
    device = check_device(args.device)
    composite = check_composite(args.composite)
    handlings = parse_handlings(args.handling)
    if bool(args.images) == bool(args.dataset):
        raise CommandError('give either --images FILE... or --dataset mnist|cifar10')
    if args.images and args.n is not None:
        raise CommandError('--n counts dataset images; with --images every file given is explained: leave --n out')
    for path in args.images or ():
        if Path(path).is_dir():
            raise CommandError(f'{path} is a folder; --images takes image files (e.g. {Path(path) / "*.png"})')
        if not Path(path).is_file():
            raise CommandError(f'image file not found: {path}')
    with StagedOutput(args.out, args.overwrite) as output:
        loaded = load_model(args.model, args.weights, args.size, device, normalize=args.normalize)
        target = check_target(args.target, loaded, output_classes(loaded, device))
        patch_size = choose_patch_size(args.patch_size, loaded.input_shape)
        report = fusion_report(loaded.model)
        if args.images:
            images = read_images(args.images, loaded)
        else:
            images = dataset_images(args.dataset, loaded, args.data_root, args.n or 16, args.download)
        targets, relevance, summary = explain_to_outputs(loaded, images, composite, handlings, target, device,
                                                         patch_size)
        name = args.model.replace(':', '-')
        settings = explain_settings(args, loaded, composite, patch_size, len(images))
        with output.writing() as folder:
            notes = write_outputs(folder, name, loaded, images.to(device), targets, relevance, composite,
                                  figure_title(args, loaded, composite))
            write_metrics(folder, {args.model: summary}, settings)
            (folder / f'report-{name}.txt').write_text(f'{report}\n')
            names = output.commit()
    print(summary_markdown(summary, args.model))
    print_written(names, args.out, notes)
    return 0


def command_report(args):
    loaded = load_model(args.model, args.weights, untrained=True)
    if args.weights is None and args.model.startswith('torchvision:'):
        print(f'note: no --weights, so this is the report of the untrained {args.model}; which BatchNorms fold '
              'depends on the architecture, not on the weights (trained weights with invalid statistics, such as '
              'non-finite ones, would be refused)\n')
    print(fusion_report(loaded.model))
    return 0


OUTPUT_HELP = ('The run writes into a temporary folder and moves the files into --out only when it succeeded: a '
               'failed run leaves nothing. --out must be new or empty; with --overwrite, a folder that holds only '
               'the outputs of an earlier bnfuse run (heatmaps-*.png, relevance-*.pt, report-*.txt, metrics.*) is '
               'replaced by this run\'s files, and a folder with other files is refused.')


def add_common(command, out_default=None):
    '''--out, --overwrite and --device, as ``demo`` and ``explain`` take them.'''
    if out_default is None:
        command.add_argument('--out', required=True, help='output folder (see below)')
    else:
        command.add_argument('--out', default=out_default, help=f'output folder (default: {out_default})')
    command.add_argument('--overwrite', action='store_true',
                         help='replace the outputs of an earlier bnfuse run in --out')
    command.add_argument('--device', default='cpu', help='cpu, cuda, cuda:N or mps (default: cpu)')


def parser():
    '''The argument parser of ``bnfuse``.'''
    main = Parser(prog='bnfuse',
                  description='Explain models with LRP, with BatchNorm fused, unfused or ignored (naive).')
    commands = main.add_subparsers(dest='command', required=True, metavar='COMMAND')
    grid = (f'Heatmap grids: input | {" | ".join(HANDLINGS)} (always in this order), the first {GRID_ROWS} '
            f'images; red positive, blue negative, {HEATMAP_SCALE}.')

    demo = commands.add_parser(
        'demo', help='explain the shipped MNIST and CIFAR-10 models on shipped images',
        description='Explain the shipped BatchNorm models on a few shipped test images (no data, no network): '
        'print their fusion reports, write a heatmap grid per dataset (EpsilonPlusFlat) and AOPC/ABPC per '
        'handling (metrics.md explains them). ' + grid + ' ' + OUTPUT_HELP)
    add_common(demo, out_default='bnfuse-demo')
    demo.set_defaults(run=command_demo)

    explain = commands.add_parser(
        'explain', help='heatmaps and metrics for your images or a dataset slice',
        description='Explain a shipped model or torchvision:<arch> with your weights on image files or N test '
        'images of a dataset (see --n). Writes heatmaps-NAME.png, relevance-NAME.pt (all relevance), metrics.json '
        'and metrics.md (AOPC/ABPC per handling, explained there) and report-NAME.txt (the fusion report). '
        + grid + ' ' + OUTPUT_HELP)
    explain.add_argument('--model', required=True,
                         help=f'{", ".join(MODELS)}, or torchvision:<arch> with --weights FILE (its inputs are '
                         'resized to --size and normalised with ImageNet\'s mean and std unless --normalize none)')
    explain.add_argument('--weights', help='a state_dict file (required for torchvision:<arch>, which gets inputs '
                         'normalised with ImageNet\'s mean and std, see --normalize)')
    explain.add_argument('--normalize', choices=NORMALIZATIONS,
                         help='for torchvision:<arch>: imagenet (default) subtracts ImageNet\'s mean '
                         f'{IMAGENET_MEAN} from the images in [0, 1] and divides by its std {IMAGENET_STD}, as '
                         'torchvision\'s ImageNet weights expect; none passes [0, 1]. Pass the normalisation the '
                         'weights were trained with; shipped models take [0, 1]')
    source = explain.add_argument_group('images (one of)')
    source.add_argument('--images', nargs='+', metavar='FILE',
                        help='image files (PNG, JPEG, ...; 8- or 16-bit, grayscale, RGB or palette; transparent '
                        'pixels are refused)')
    source.add_argument('--dataset', choices=DATASETS, help='use test images of this dataset')
    explain.add_argument('--data-root', default=str(default_data_root()),
                         help=f'folder holding the dataset (default: ${DATA_ROOT_VARIABLE} if set, else '
                         f'../shared/data if it exists, else ./data; now {default_data_root()})')
    explain.add_argument('--download', action='store_true',
                         help='let torchvision download the dataset into --data-root if it is missing')
    explain.add_argument('--n', type=positive_int,
                         help='number of dataset test images (default 16): the first N of MNIST and of torchvision\'s '
                         'CIFAR-10 files (cifar-10-batches-py); N spread evenly over the CIFAR10-JPEG tree, which is '
                         'sorted by class (so that 10 or more cover every class); all of them, with a note, if the '
                         'dataset has fewer')
    explain.add_argument('--composite', default='epsilon-plus-flat', help=f'one of {", ".join(COMPOSITES)}')
    explain.add_argument('--handling', default=','.join(HANDLINGS),
                         help=f'comma-separated BatchNorm handlings, from {", ".join(HANDLINGS)} (default: all)')
    explain.add_argument('--target', type=int, help='class to explain (default: the predicted class)')
    explain.add_argument('--size', type=image_size,
                         help='input size for torchvision models (default 224); shipped models take their own')
    explain.add_argument('--patch-size', type=positive_int,
                         help='perturbation patch size, must divide the image size (default 4, or 16 above 64 px)')
    add_common(explain)
    explain.set_defaults(run=command_explain)

    report = commands.add_parser(
        'report', help='print the fusion report of a model',
        description='Print which BatchNorms of a model fold into which layers, and why the others do not. For '
        'torchvision:<arch> without --weights, the report is of the untrained architecture (which BatchNorms '
        'fold does not depend on the weights).')
    report.add_argument('--model', required=True, help=f'{", ".join(MODELS)}, or torchvision:<arch>')
    report.add_argument('--weights', help='a state_dict file (optional)')
    report.set_defaults(run=command_report)
    return main


def main(argv=None):
    '''Run ``bnfuse``; returns the exit status (0 success, 1 a problem with the input or a closed output pipe, 2 bad
    usage, 130 interrupted).'''
    try:
        args = parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error already printed
        return exit.code
    try:
        return args.run(args)
    except CommandError as error:
        print(f'bnfuse: error: {error}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('bnfuse: interrupted; nothing was written', file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output went away (bnfuse report ... | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit flush does not fail
        return 1
