'''Loading MNIST and CIFAR-10 as torchvision datasets, from a local copy or by download, and the shipped demo
images.'''
from importlib import resources
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision.transforms import ToTensor
from torchvision.transforms.functional import to_tensor
from tqdm.auto import tqdm

DATASETS = ('mnist', 'cifar10')


def default_data_root():
    '''``../shared/data`` if it exists (the project's local copy), else ``./data``.'''
    shared = Path('..') / 'shared' / 'data'
    return shared if shared.is_dir() else Path('data')


def load_dataset(dataset, root=None, train=False, download=False):
    '''A torchvision dataset of ``(image in [0, 1], label)`` pairs.

    MNIST is read with :py:class:`torchvision.datasets.MNIST` (``root/MNIST/raw``). CIFAR-10 is read from the JPEG
    copy ``root/CIFAR10-JPEG/{train,test}/<class>/`` with :py:class:`torchvision.datasets.ImageFolder` where it
    exists, else with :py:class:`torchvision.datasets.CIFAR10` (``download=True`` fetches it).

    Parameters
    ----------
    dataset: str
        ``'mnist'`` or ``'cifar10'``.
    root: str or Path, optional
        The data folder; :py:func:`default_data_root` if None.
    train: bool
        The training split instead of the test split.
    download: bool
        Let torchvision download the data if it is missing.

    Returns
    -------
    :py:obj:`torch.utils.data.Dataset`

    Raises
    ------
    ValueError
        For an unknown dataset name.
    FileNotFoundError
        If the data is not under ``root`` and ``download`` is False.
    '''
    root = Path(root) if root is not None else default_data_root()
    split = 'train' if train else 'test'
    try:
        if dataset == 'mnist':
            return torchvision.datasets.MNIST(root, train=train, transform=ToTensor(), download=download)
        if dataset == 'cifar10':
            folder = root / 'CIFAR10-JPEG' / split
            if folder.is_dir():
                return torchvision.datasets.ImageFolder(folder, transform=ToTensor())
            return torchvision.datasets.CIFAR10(root, train=train, transform=ToTensor(), download=download)
    except RuntimeError as error:  # torchvision's "Dataset not found" errors
        raise FileNotFoundError(
            f'{dataset} ({split}) not found under {root} ({str(error).rstrip(".")}); pass --data-root with the '
            'folder that holds it, or --download to fetch it') from None
    raise ValueError(f'unknown dataset {dataset!r}; choose one of {", ".join(DATASETS)}')


def load_tensors(dataset, root=None, train=False, download=False, limit=None, progress=True):
    '''A dataset split as two tensors, for fast training and evaluation in memory.

    Parameters
    ----------
    dataset, root, train, download:
        As for :py:func:`load_dataset`.
    limit: int, optional
        Only the first ``limit`` examples.
    progress: bool
        Show a progress bar while decoding images.

    Returns
    -------
    tuple[:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`]
        Images ``(N, C, H, W)`` float32 in [0, 1] and labels ``(N,)`` int64.
    '''
    data = load_dataset(dataset, root, train, download)
    count = len(data) if limit is None else min(limit, len(data))
    if isinstance(data, torchvision.datasets.MNIST):
        return data.data[:count, None].float() / 255, data.targets[:count].clone()
    if isinstance(data, torchvision.datasets.CIFAR10):
        images = torch.from_numpy(data.data[:count]).permute(0, 3, 1, 2).float() / 255
        return images, torch.tensor(data.targets[:count])
    if limit is not None:
        # ImageFolder sorts by class: take an evenly spread, class-balanced subset
        indices = torch.linspace(0, len(data) - 1, count).round().long().tolist()
    else:
        indices = range(count)
    images, labels = [], []
    for index in tqdm(indices, desc=f'loading {dataset} {"train" if train else "test"}', disable=not progress,
                      leave=False):
        image, label = data[index]
        images.append(image)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def demo_images(dataset):
    """The few test images shipped in the package for ``dataset``, ``(N, C, H, W)`` in [0, 1].

    Parameters
    ----------
    dataset: str
        ``'mnist'`` or ``'cifar10'``.
    """
    folder = resources.files('zennit_bnfuse.evaluation') / 'demo'
    files = sorted((entry for entry in folder.iterdir() if entry.name.startswith(f'{dataset}-')),
                   key=lambda entry: int(entry.name.split('-')[1]))
    images = []
    for entry in files:
        with entry.open('rb') as file, Image.open(file) as image:
            images.append(to_tensor(image))
    return torch.stack(images)
