'''Loading MNIST and CIFAR-10 as torchvision datasets, from a local copy or by download, image files as tensors
in [0, 1], and the shipped demo images.'''
import contextlib
import io
import os
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import ToTensor
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from .models import CIFAR10_CLASSES, INPUT_SHAPES

DATASETS = ('mnist', 'cifar10')
DATA_ROOT_VARIABLE = 'ZENNIT_BNFUSE_DATA'
# what torchvision's downloads create under the data root, per dataset
DOWNLOADED = {'mnist': ('MNIST',), 'cifar10': ('cifar-10-batches-py', 'cifar-10-python.tar.gz')}
# where a dataset is read from, relative to the data root
LAYOUTS = {'mnist': "torchvision's MNIST/raw/ idx files",
           'cifar10': "CIFAR10-JPEG/{train,test}/<class>/ images or torchvision's cifar-10-batches-py/"}


def default_data_root():
    '''Where the datasets are: ``$ZENNIT_BNFUSE_DATA`` if set, else ``../shared/data`` if it exists (the project's
    local copy), else ``./data``.

    Used by the ``bnfuse`` command, the benchmarks and the tests that need data.

    Returns
    -------
    :py:class:`pathlib.Path`
    '''
    variable = os.environ.get(DATA_ROOT_VARIABLE)
    if variable:
        return Path(variable)
    shared = Path('..') / 'shared' / 'data'
    return shared if shared.is_dir() else Path('data')


def existing_paths(root, names):
    '''Every file and folder under ``root / name`` for ``name`` in ``names`` (the names included).'''
    found = set()
    for name in names:
        path = root / name
        if path.exists():
            found.add(path)
            if path.is_dir():
                found.update(path.rglob('*'))
    return found


def remove_new_paths(root, names, before, root_created):
    '''Undo a failed download: remove what is under ``root / name`` but not in ``before``, and the topmost folder
    ``root_created`` if the download created it.'''
    if root_created is not None:
        shutil.rmtree(root_created, ignore_errors=True)
        return
    for path in sorted(existing_paths(root, names) - before, key=lambda path: len(path.parts)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)


def first_missing(path):
    '''The topmost folder of ``path`` (``path`` included) that does not exist, or None if it exists.'''
    path = Path(os.path.abspath(path))
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


class UnusableFolder(ValueError):
    '''A CIFAR-10 JPEG tree that is there but cannot be used as it is; the message names the folder or file and the
    fix.'''


class UnlabelledFolder(UnusableFolder):
    '''A folder in the CIFAR-10 JPEG tree that is not named after a CIFAR-10 class.'''


class CIFAR10Folder(torchvision.datasets.ImageFolder):
    '''CIFAR-10 as an ImageFolder tree (``<class name>/<image>``) whose labels are CIFAR-10's class indices, found by
    folder name (a tree with some of the classes keeps their labels); hidden folders are left out.

    Raises
    ------
    UnlabelledFolder
        A ValueError, if a folder is not named after a CIFAR-10 class (ImageFolder would number it among them and
        shift every label after it).
    UnusableFolder
        A ValueError, if a class folder holds no image.
    '''
    def find_classes(self, directory):
        names = sorted(entry.name for entry in os.scandir(directory)
                       if entry.is_dir() and not entry.name.startswith('.'))
        unknown = [name for name in names if name not in CIFAR10_CLASSES]
        if unknown:
            raise UnlabelledFolder(
                f'{directory} holds folders that are not CIFAR-10 classes ({", ".join(unknown)}), which would get '
                f'labels of their own; keep one folder per class, named {", ".join(CIFAR10_CLASSES)}.')
        if not names:
            raise FileNotFoundError(f'{directory} holds no class folder')
        return names, {name: CIFAR10_CLASSES.index(name) for name in names}

    @staticmethod
    def make_dataset(directory, *args, **kwargs):
        try:
            return torchvision.datasets.ImageFolder.make_dataset(directory, *args, **kwargs)
        except FileNotFoundError as error:  # 'Found no valid file for the classes dog. Supported extensions are: ...'
            raise UnusableFolder(f'{directory}: {error}; put the images of each class into its folder, or remove the '
                                 'empty folder') from None

    def checked(self, index):
        '''Image ``index`` and its label, as ``self[index]`` gives them, or :py:class:`UnusableFolder` naming the
        file if it cannot be read or is not 32x32.'''
        path = self.samples[index][0]
        try:
            image, label = self[index]
        except MemoryError:
            raise
        except Exception as error:  # PIL's decoders raise many kinds for broken or foreign files
            reason = f'{type(error).__name__}: {error}'.splitlines()[0]
            raise UnusableFolder(f'cannot read {path} as an image ({reason}); the CIFAR-10 JPEG tree holds 32x32 '
                                 'images: replace or remove the file') from None
        if tuple(image.shape[1:]) != INPUT_SHAPES['cifar10'][1:]:
            raise UnusableFolder(f'{path} is {image.shape[2]}x{image.shape[1]} pixels, but the CIFAR-10 JPEG tree '
                                 'holds 32x32 images: resize or remove it')
        return image, label


def open_dataset(dataset, root, train):
    '''The torchvision dataset, as it is on disk (RuntimeError from torchvision if it is not there).'''
    if dataset == 'mnist':
        return torchvision.datasets.MNIST(root, train=train, transform=ToTensor())
    folder = root / 'CIFAR10-JPEG' / ('train' if train else 'test')
    if folder.is_dir():
        return CIFAR10Folder(folder, transform=ToTensor())
    return torchvision.datasets.CIFAR10(root, train=train, transform=ToTensor())


def download_dataset(dataset, root, train):
    '''Let torchvision download ``dataset`` into ``root``; on failure remove what the attempt created.

    Raises
    ------
    FileNotFoundError
        If the download fails (no network?), saying where to put the data instead.
    '''
    names = DOWNLOADED[dataset]
    before, root_created = existing_paths(root, names), first_missing(root)
    kind = torchvision.datasets.MNIST if dataset == 'mnist' else torchvision.datasets.CIFAR10
    messages = io.StringIO()
    try:
        with contextlib.redirect_stdout(messages):  # torchvision prints every failed mirror
            kind(root, train=train, download=True)
    except (RuntimeError, OSError) as error:
        remove_new_paths(root, names, before, root_created)
        reason = str(error).splitlines()[0].rstrip(':') or type(error).__name__
        raise FileNotFoundError(
            f'downloading {dataset} into {root} failed ({reason}; no network?) and left nothing behind; put '
            f'{LAYOUTS[dataset]} into {root} by hand, or point --data-root or {DATA_ROOT_VARIABLE} to a folder that '
            'holds them') from None
    print(messages.getvalue(), end='')


MNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
               't10k-labels-idx1-ubyte')


def missing_files(dataset, root):
    '''For MNIST with some idx files in place: ``'; MNIST/raw/ lacks ...'`` naming the others (torchvision reads all
    four, whichever split is asked for), or ``'; ... are all there: one may be cut short'``; else an empty string.'''
    raw = root / 'MNIST' / 'raw'
    present = [name for name in MNIST_FILES if (raw / name).is_file()]
    if dataset != 'mnist' or not present:
        return ''
    missing = [name for name in MNIST_FILES if name not in present]
    if missing:
        return f'; MNIST/raw/ lacks {", ".join(missing)}, which torchvision needs for either split'
    return '; the four idx files are there, so one may be cut short or damaged'


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
        Let torchvision download the data if it is missing. A failed download leaves nothing behind.

    Returns
    -------
    :py:obj:`torch.utils.data.Dataset`

    Raises
    ------
    ValueError
        For an unknown dataset name; :py:class:`UnusableFolder` for a CIFAR-10 JPEG tree with a folder that is not
        a class or a class folder without images.
    FileNotFoundError
        If the data is not under ``root`` and ``download`` is False, or the download failed.
    '''
    if dataset not in DATASETS:
        raise ValueError(f'unknown dataset {dataset!r}; choose one of {", ".join(DATASETS)}')
    root = Path(root) if root is not None else default_data_root()
    split = 'train' if train else 'test'
    try:
        return open_dataset(dataset, root, train)
    except UnusableFolder:
        raise
    except (RuntimeError, OSError, ValueError):  # torchvision's "Dataset not found", and what damaged files give
        if not download:
            raise FileNotFoundError(
                f'{dataset} ({split}) not found under {root} (looked for {LAYOUTS[dataset]}'
                f'{missing_files(dataset, root)}); pass --data-root or set {DATA_ROOT_VARIABLE} to the folder that '
                'holds them, or --download to fetch them') from None
    download_dataset(dataset, root, train)
    return open_dataset(dataset, root, train)


def load_tensors(dataset, root=None, train=False, download=False, limit=None, progress=True):
    '''A dataset split as two tensors, for fast training and evaluation in memory.

    Parameters
    ----------
    dataset, root, train, download:
        As for :py:func:`load_dataset`.
    limit: int, optional
        Only ``limit`` examples (all of them if the split has fewer): the first ``limit`` of MNIST and of
        torchvision's CIFAR-10 files (``cifar-10-batches-py``, in CIFAR-10's own order); from the CIFAR-10 JPEG
        tree, which ImageFolder sorts by class, ``limit`` spread evenly over it (in class order; as many of each
        class, within one, where the class folders hold as many images).
    progress: bool
        Show a progress bar while decoding images.

    Returns
    -------
    tuple[:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`]
        Images ``(N, C, H, W)`` float32 in [0, 1] and labels ``(N,)`` int64.

    Raises
    ------
    ValueError
        If ``limit`` is less than 1, or as :py:func:`load_dataset`; :py:class:`UnusableFolder` naming an image of
        the CIFAR-10 JPEG tree that cannot be read or is not 32x32.
    FileNotFoundError
        As :py:func:`load_dataset`.
    '''
    if limit is not None and limit < 1:
        raise ValueError(f'limit must be 1 or more, not {limit}')
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
        image, label = data.checked(index)
        images.append(image)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')
ALPHA_MODES = {'LA': 'L', 'RGBA': 'RGB', 'La': 'L', 'RGBa': 'RGB'}
# modes PIL converts exactly (or by its standard formulas) to one of the stored modes
CONVERTED = {'1': 'L', 'CMYK': 'RGB', 'YCbCr': 'RGB', 'LAB': 'RGB', 'HSV': 'RGB', 'RGBX': 'RGB'}


EXIF_ORIENTATION = 0x0112
# EXIF orientation -> how to turn a (C, H, W) tensor of the decoded pixels upright, as PIL's ImageOps.exif_transpose
# turns the image (on the tensor of the decoded pixels)
UPRIGHT = {
    2: lambda tensor: tensor.flip(-1), 3: lambda tensor: tensor.flip(-1, -2), 4: lambda tensor: tensor.flip(-2),
    5: lambda tensor: tensor.transpose(-1, -2), 6: lambda tensor: torch.rot90(tensor, -1, (-2, -1)),
    7: lambda tensor: tensor.transpose(-1, -2).flip(-1, -2), 8: lambda tensor: torch.rot90(tensor, 1, (-2, -1)),
}


class UnsupportedImage(ValueError):
    '''An image file whose pixels cannot be mapped to [0, 1] without guessing; the message names the file and the
    fix.'''


def raw_modes(image):
    '''How the pixels of an image, not loaded yet, are stored (PIL's raw modes of its tiles, such as ``'L;2'``).'''
    return [str(tile.args if isinstance(tile.args, str) else tile.args[0])
            for tile in getattr(image, 'tile', ()) if tile.args]  # images made in memory have no tiles


def declares_16_bits(image):
    '''Whether a mode ``'I'`` image, not loaded yet, was stored with 16 bits per pixel (0 .. 65535).'''
    # PIL scales PGM files with maxval > 255 to 0 .. 65535
    return image.format == 'PPM' or any(rawmode.startswith('I;16') for rawmode in raw_modes(image))


def stored_bits(image):
    '''The bits per sample of an ``'L'`` or ``'RGB'`` image, not loaded yet, that PIL stores with other than 8 and
    decodes to 8 (1, 2 and 4-bit grey scaled up to 0 .. 255, 16-bit to its high byte), else 8.'''
    for rawmode in raw_modes(image):
        if image.mode == 'L' and rawmode in ('L;1', 'L;2', 'L;4'):
            return int(rawmode[-1])
        if image.mode in ('L', 'RGB') and ';16' in rawmode:
            return 16
    return 8


def transparent(name, count, kind):
    '''The :py:class:`UnsupportedImage` for ``count`` transparent pixels in image ``name`` of ``kind``.'''
    return UnsupportedImage(
        f'{name} has {count} transparent pixel(s) ({kind}) and the model needs every pixel\'s colour; flatten it '
        'onto a background first (e.g. PIL\'s Image.alpha_composite)')


def opaque(image, name):
    '''``image`` without its alpha channel, or :py:class:`UnsupportedImage` if any pixel is not fully opaque.'''
    if image.mode in ('La', 'RGBa'):  # premultiplied alpha: equal to straight alpha where opaque
        image = image.convert(image.mode[:-1] + 'A')
    alpha = np.asarray(image.getchannel('A'))
    if (alpha < 255).any():
        raise transparent(name, int((alpha < 255).sum()), f'mode {image.mode}')
    return image.convert(ALPHA_MODES[image.mode])


def without_colour_key(image, name, bits=8):
    '''``image`` (loaded, not a palette image) if its colour key, if any, matches no pixel, else
    :py:class:`UnsupportedImage`: a PNG's tRNS chunk makes the pixels of one grey value or RGB colour transparent
    (``image.info['transparency']``, in the stored ``bits`` per sample, see :py:func:`stored_bits`: the key is
    compared with the decoded pixels as PIL decoded them, a 16-bit key by its high byte, which may count pixels
    whose low byte differs, so refusing rather than missing one).'''
    stored = image.info.get('transparency')
    if stored is None or image.mode in ('P', 'PA') or image.mode in ALPHA_MODES:
        return image
    key = np.asarray(stored, dtype=np.int64)
    if bits == 16:
        key = key >> 8
    elif bits < 8:
        key = key * 255 // (2 ** bits - 1)
    values = np.asarray(image).astype(np.int64)  # bool for mode 1: 0 or 1, as the key
    matches = values == key
    count = int((matches.all(-1) if values.ndim == 3 else matches).sum())
    if count:
        raise transparent(name, count, f'mode {image.mode} with the transparent colour key {stored}')
    return image


def image_tensor(image, name='image'):
    '''The pixels of an open PIL image as a ``(C, H, W)`` tensor, every PIL mode mapped exactly to [0, 1] or
    refused.

    ===========================================  ==========================================================
    mode                                         result
    ===========================================  ==========================================================
    ``L``, ``RGB``                               as stored, uint8 (255 means 1); refused if a colour key
                                                 (PNG tRNS) makes any pixel transparent, as in every mode
    ``1`` (bilevel)                              0 or 255, uint8
    ``P``, ``PA`` (palette)                      the palette's colours: 1 channel if they are all gray, else 3
    ``LA``, ``RGBA``, ``La``, ``RGBa``           alpha dropped where every pixel is opaque, else refused
    ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``        converted to RGB by PIL (no colour profile)
    ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``    value / 65535, float32
    ``I`` (32-bit integers)                      value / 65535 where the file declares 16 bits (16-bit PNG
                                                 or PGM), else refused: its range is unknown
    ``F`` (32-bit floats)                        as stored if all values are finite and in [0, 1], else
                                                 refused
    ===========================================  ==========================================================

    8-bit images stay uint8 so that resizing treats them as torchvision always has; :py:func:`unit_range` makes
    floats of either.

    Parameters
    ----------
    image: :py:class:`PIL.Image.Image`
        Opened, not necessarily loaded.
    name: str or Path
        Names the image in error messages.

    Returns
    -------
    :py:obj:`torch.Tensor`
        ``(C, H, W)`` with ``C`` 1 or 3: uint8 (0 .. 255) or float32 (0 .. 1).

    Raises
    ------
    UnsupportedImage
        For transparent pixels (by alpha, palette or colour key), a 32-bit integer image without a declared bit
        depth, floats outside [0, 1] and modes PIL has no conversion for.
    '''
    sixteen_bits = image.mode == 'I' and declares_16_bits(image)
    bits = stored_bits(image)
    image.load()
    image = without_colour_key(image, name, bits)
    if image.mode in ('P', 'PA'):
        image = image.convert('RGBA' if image.mode == 'PA' or 'transparency' in image.info else 'RGB')
        bands = np.asarray(image)
        if (bands[..., :1] == bands[..., 1:3]).all():  # a gray palette: one channel, exactly
            image = image.convert('LA' if image.mode == 'RGBA' else 'L')
    if image.mode in ALPHA_MODES:
        image = opaque(image, name)
    if image.mode in CONVERTED:
        image = image.convert(CONVERTED[image.mode])
    if image.mode in ('L', 'RGB'):
        return pil_to_tensor(image)
    if image.mode in SIXTEEN_BIT_MODES or sixteen_bits:
        values = np.asarray(image).astype(np.float32)
        if values.min() < 0 or values.max() > 65535:
            raise UnsupportedImage(f'{name} declares 16 bits per pixel but holds values from {values.min():g} to '
                                   f'{values.max():g}; save it as an 8- or 16-bit PNG')
        return torch.from_numpy(values / np.float32(65535))[None]
    if image.mode == 'I':
        raise UnsupportedImage(f'{name} holds 32-bit integers (PIL mode I) without a declared range, so bnfuse '
                               'cannot tell what 1.0 is; save it as an 8- or 16-bit PNG')
    if image.mode == 'F':
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise UnsupportedImage(f'{name} holds floats (PIL mode F) from {values.min():g} to {values.max():g}, '
                                   'but bnfuse takes values in [0, 1]; rescale it, or save it as an 8- or 16-bit '
                                   'PNG')
        return torch.from_numpy(values.copy())[None]
    raise UnsupportedImage(f'{name} has PIL mode {image.mode}, which bnfuse does not map to [0, 1]; save it as an '
                           '8-bit grayscale or RGB PNG')


def unit_range(tensor):
    '''A tensor from :py:func:`image_tensor` as float32 in [0, 1] (uint8 is divided by 255).'''
    return tensor.float() / 255 if tensor.dtype == torch.uint8 else tensor


def read_image(path):
    '''An image file as a ``(C, H, W)`` tensor, as :py:func:`image_tensor` returns it, turned upright as its EXIF
    orientation says (what image viewers show; phone cameras store photos sideways with that tag). Of an MPO file
    (a phone camera's JPEG with embedded previews), the photo: its first frame.

    Parameters
    ----------
    path: str or Path

    Returns
    -------
    :py:obj:`torch.Tensor`
        uint8 or float32; see :py:func:`image_tensor`.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    UnsupportedImage
        If PIL cannot decode the file, it is too large to decode safely (PIL's decompression bomb limit), it holds
        several frames (an animated GIF, a multi-page TIFF; not an MPO), or its mode is refused by
        :py:func:`image_tensor`.
    '''
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'image file not found: {path}')
    try:
        with Image.open(path) as image:
            frames = getattr(image, 'n_frames', 1)
            if frames > 1 and image.format != 'MPO':
                # an animation or a multi-page file: which frame is meant is not ours to guess (an MPO, as phone
                # cameras write, is the photo and its previews: frame 0, open now, is the photo)
                raise UnsupportedImage(f'{path} holds {frames} frames; pass one image (save the frame you mean as '
                                       'PNG)')
            tensor = image_tensor(image, path)
            # read after decoding: PIL turns TIFF images upright while decoding them and then drops the tag
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            return UPRIGHT.get(orientation, lambda tensor: tensor)(tensor)
    except UnsupportedImage:
        raise
    except Image.DecompressionBombError as error:
        raise UnsupportedImage(f'{path} is too large to decode safely ({str(error).split(",")[0]}); downscale it '
                               'first') from None
    except MemoryError:
        raise
    except Exception as error:  # PIL's decoders raise many kinds for broken or foreign files
        reason = f'{type(error).__name__}: {error}'.splitlines()[0]
        raise UnsupportedImage(f'cannot read {path} as an image ({reason}); pass PNG or JPEG files') from None


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
            images.append(unit_range(image_tensor(image, entry.name)))
    return torch.stack(images)
