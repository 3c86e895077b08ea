'''The study's small MNIST and CIFAR-10 models, with weights shipped in the package (no download).

Every model takes images exactly as torchvision's ``ToTensor()`` gives them (values in [0, 1]). They are trained
with a per-channel normalisation in front; for the shipped weights it is folded into the first layer (exact: that
layer has no padding), so first-layer rules such as ZBox use the bounds 0 and 1.
'''
from collections import OrderedDict
from importlib import resources

import torch

from ..fold import fold_into_next

DATASET_STATS = {
    'mnist': ((0.1307,), (0.3081,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
INPUT_SHAPES = {'mnist': (1, 28, 28), 'cifar10': (3, 32, 32)}
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
MNIST_CLASSES = tuple(str(digit) for digit in range(10))

MODELS = {
    'mnist-cnn-bn': ('mnist', 'cnn', True, False),
    'mnist-cnn': ('mnist', 'cnn', False, False),
    'mnist-mlp-bn': ('mnist', 'mlp', True, False),
    'mnist-mlp': ('mnist', 'mlp', False, False),
    'cifar10-vgg-bn': ('cifar10', 'vgg', True, False),
    'cifar10-vgg': ('cifar10', 'vgg', False, False),
    'cifar10-vgg-bn-fc': ('cifar10', 'vgg', True, True),
    'cifar10-preact-resnet': ('cifar10', 'preact', True, False),
}
VGG_CHANNELS = (32, 64, 128)
# pre-activation ResNet-20: (width, stride of the first block) per stage, three blocks each
PREACT_STAGES = ((16, 1), (32, 2), (64, 2))
PREACT_BLOCKS = 3
SEEDS = (0, 1, 2)


class Normalize(torch.nn.Module):
    '''Per-channel ``(x - mean) / std`` over dim 1; used while training, folded into the first layer afterwards.'''
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean))
        self.register_buffer('std', torch.tensor(std))

    def forward(self, input):
        shape = (1, -1) + (1,) * (input.ndim - 2)
        return (input - self.mean.reshape(shape)) / self.std.reshape(shape)


class PreActBlock(torch.nn.Module):
    '''Pre-activation basic block (He et al. 2016, *Identity Mappings in Deep Residual Networks*):
    ``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``.

    Where the block changes width or stride, the shortcut is a 1x1 convolution of the pre-activated input
    ``relu(bn1(x))``, shared with ``conv1`` as in the paper's code; otherwise it is ``x`` itself.
    '''
    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.bn1 = torch.nn.BatchNorm2d(in_channels)
        self.relu1 = torch.nn.ReLU()
        self.conv1 = torch.nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(out_channels)
        self.relu2 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = torch.nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, input):
        activated = self.relu1(self.bn1(input))
        shortcut = input if self.shortcut is None else self.shortcut(activated)
        return self.conv2(self.relu2(self.bn2(self.conv1(activated)))) + shortcut


class PreActResNet(torch.nn.Module):
    '''Pre-activation ResNet-20 for CIFAR-10: every BatchNorm but the ones after ``conv1`` of a block sits in front
    of a ReLU and a convolution (BN -> ReLU -> conv), after a residual addition.

    The stem convolution has no padding (32 -> 30 pixels), so the input normalisation folds into it exactly.

    Parameters
    ----------
    normalize: bool
        Put a :py:class:`Normalize` first (for training).
    '''
    def __init__(self, normalize=False):
        super().__init__()
        if normalize:
            self.normalize = Normalize(*DATASET_STATS['cifar10'])
        self.stem = torch.nn.Conv2d(3, PREACT_STAGES[0][0], 3, padding=0)
        blocks, channels = [], PREACT_STAGES[0][0]
        for width, stride in PREACT_STAGES:
            for index in range(PREACT_BLOCKS):
                blocks.append(PreActBlock(channels, width, stride if index == 0 else 1))
                channels = width
        self.blocks = torch.nn.Sequential(*blocks)
        self.bn = torch.nn.BatchNorm2d(channels)
        self.relu = torch.nn.ReLU()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.flatten = torch.nn.Flatten()
        self.fc = torch.nn.Linear(channels, 10)

    def forward(self, input):
        if hasattr(self, 'normalize'):
            input = self.normalize(input)
        features = self.relu(self.bn(self.blocks(self.stem(input))))
        return self.fc(self.flatten(self.pool(features)))


def dataset_of(name):
    '''The dataset (``'mnist'`` or ``'cifar10'``) model ``name`` is trained on.

    Raises
    ------
    ValueError
        If ``name`` is not a model of this package.
    '''
    try:
        return MODELS[name][0]
    except KeyError:
        raise ValueError(f'unknown model {name!r}; choose one of {", ".join(MODELS)}') from None


def build(name, normalize=False):
    '''An untrained model ``name`` (see :py:data:`MODELS`), in eval mode.

    Parameters
    ----------
    name: str
        A key of :py:data:`MODELS`.
    normalize: bool
        Whether to put a :py:class:`Normalize` first (for training); the shipped architecture has none.

    Returns
    -------
    :py:obj:`torch.nn.Module`
        A :py:obj:`torch.nn.Sequential` with readable module names (``conv1``, ``bn1``, ``relu1``, ...), or a
        :py:class:`PreActResNet`.
    '''
    dataset = dataset_of(name)
    _, kind, batch_norm, fc_head = MODELS[name]
    if kind == 'preact':
        return PreActResNet(normalize).eval()
    channels = INPUT_SHAPES[dataset][0]
    layers = OrderedDict()
    if normalize:
        layers['normalize'] = Normalize(*DATASET_STATS[dataset])

    def block(index, layer, norm):
        layers[f'{"conv" if isinstance(layer, torch.nn.Conv2d) else "fc"}{index}'] = layer
        if batch_norm:
            layers[f'bn{index}'] = norm
        layers[f'relu{index}'] = torch.nn.ReLU()

    if kind == 'mlp':
        layers['flatten'] = torch.nn.Flatten()
        block(1, torch.nn.Linear(28 * 28, 256), torch.nn.BatchNorm1d(256))
        block(2, torch.nn.Linear(256, 256), torch.nn.BatchNorm1d(256))
        layers['fc3'] = torch.nn.Linear(256, 10)
        return torch.nn.Sequential(layers).eval()

    if kind == 'cnn':
        widths, size = (32, 64), 28
    else:
        widths, size = tuple(width for width in VGG_CHANNELS for _ in range(2)), 32
    index = 0
    for width in widths:
        index += 1
        # the first conv has no padding, so the input normalisation folds into it exactly
        block(index, torch.nn.Conv2d(channels, width, 3, padding=0 if index == 1 else 1), torch.nn.BatchNorm2d(width))
        size -= 2 if index == 1 else 0
        channels = width
        if kind == 'cnn' or index % 2 == 0:
            layers[f'pool{index}'] = torch.nn.MaxPool2d(2)
            size //= 2
    layers['flatten'] = torch.nn.Flatten()
    features = channels * size * size
    if fc_head:
        block(index + 1, torch.nn.Linear(features, 256), torch.nn.BatchNorm1d(256))
        layers[f'fc{index + 2}'] = torch.nn.Linear(256, 10)
    else:
        layers[f'fc{index + 1}'] = torch.nn.Linear(features, 10)
    return torch.nn.Sequential(layers).eval()


def fold_normalization(model, name):
    """The shipped form of a training model: its leading :py:class:`Normalize` folded into the first layer.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Sequential`
        Model ``name`` built with ``normalize=True``; its first layer has no padding, so the fold is exact.
    name: str
        The model's name.

    Returns
    -------
    :py:obj:`torch.nn.Sequential`
        A new model as :py:func:`build` makes it without ``normalize``; ``model`` is not changed.
    """
    shipped = build(name).to(model.normalize.std.dtype)
    state = {key: value for key, value in model.state_dict().items() if not key.startswith('normalize.')}
    shipped.load_state_dict(state)
    first = next(module for module in shipped.children() if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)))
    scale = 1 / model.normalize.std.double()
    shift = -model.normalize.mean.double() * scale
    if isinstance(first, torch.nn.Linear):
        repeats = first.in_features // scale.numel()
        scale, shift = scale.repeat_interleave(repeats), shift.repeat_interleave(repeats)
    weight, bias, _ = fold_into_next(first.weight.detach().double(), first.bias.detach().double(), scale, shift)
    with torch.no_grad():
        first.weight.copy_(weight)
        first.bias.copy_(bias)
    return shipped.eval()


def weights_path(name, seed=0):
    '''Where the shipped state_dict of model ``name`` trained from ``seed`` lies inside the package
    (``weights/<name>.pt`` for seed 0, ``weights/<name>-seed<seed>.pt`` otherwise).'''
    suffix = '' if seed == 0 else f'-seed{seed}'
    return resources.files('zennit_bnfuse.evaluation') / 'weights' / f'{name}{suffix}.pt'


def pretrained(name, device='cpu', seed=0):
    '''Model ``name`` with its shipped weights, in eval mode.

    Parameters
    ----------
    name: str
        A key of :py:data:`MODELS`: ``mnist-cnn-bn``, ``mnist-cnn``, ``mnist-mlp-bn``, ``mnist-mlp``,
        ``cifar10-vgg-bn``, ``cifar10-vgg``, ``cifar10-vgg-bn-fc``, ``cifar10-preact-resnet``.
    device: str or :py:obj:`torch.device`
        Where to put it.
    seed: int
        Which training run (one of :py:data:`SEEDS`); seed 0 is the default model.

    Returns
    -------
    :py:obj:`torch.nn.Module`
        Takes ``N x 1 x 28 x 28`` (MNIST) or ``N x 3 x 32 x 32`` (CIFAR-10) images in [0, 1] and returns 10 logits.

    Raises
    ------
    ValueError
        If ``name`` is unknown.
    FileNotFoundError
        If the weights are not shipped (run ``benchmarks/train.py``).
    '''
    model = build(name)
    path = weights_path(name, seed)
    if not path.is_file():
        raise FileNotFoundError(f'no shipped weights for {name!r} (seed {seed}) at {path}; train them with '
                                f'benchmarks/train.py --model {name} --seeds {seed}')
    with resources.as_file(path) as file:
        model.load_state_dict(torch.load(file, map_location='cpu', weights_only=True))
    return model.to(device).eval()
