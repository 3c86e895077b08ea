'''Tests of zennit_bnfuse.evaluation.data: the data root, failed downloads, image files of every PIL mode.'''
import io
import struct
import zlib
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms.functional import to_tensor

from zennit_bnfuse.evaluation import data
from zennit_bnfuse.evaluation.data import (
    DATA_ROOT_VARIABLE, UnsupportedImage, default_data_root, demo_images, image_tensor, load_dataset, load_tensors,
    read_image, unit_range,
)

RNG = np.random.default_rng(0)
GRAYS = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
COLOURS = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
DEEP = RNG.integers(0, 65536, (5, 7), dtype=np.uint16)


def saved(image, tmp_path, suffix='.png', **kwargs):
    '''``image`` written to a file and the file's path.'''
    path = tmp_path / f'image{suffix}'
    image.save(path, **kwargs)
    return path


def read(path):
    return unit_range(read_image(path)).double()


def expected(values, scale):
    '''``(H, W)`` or ``(H, W, C)`` numbers divided by ``scale``, as a float64 ``(C, H, W)`` tensor.'''
    values = torch.tensor(np.asarray(values, dtype=np.float64) / scale)
    return values[None] if values.ndim == 2 else values.permute(2, 0, 1)


def palette_image(palette_rgb, transparency=None):
    '''A mode P image whose pixel (y, x) uses palette entry (y * 7 + x) % len(palette_rgb).'''
    indices = (np.arange(35).reshape(5, 7) % len(palette_rgb)).astype(np.uint8)
    image = Image.fromarray(indices, 'L').convert('P')
    image.putpalette(np.asarray(palette_rgb, dtype=np.uint8).flatten().tolist())
    if transparency is not None:
        image.info['transparency'] = transparency
    return image, indices


def test_default_data_root_prefers_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ROOT_VARIABLE, str(tmp_path / 'mine'))
    assert default_data_root() == tmp_path / 'mine'
    monkeypatch.delenv(DATA_ROOT_VARIABLE)
    monkeypatch.chdir(tmp_path)
    assert default_data_root() == data.Path('data')
    (tmp_path.parent / 'shared' / 'data').mkdir(parents=True, exist_ok=True)
    try:
        assert default_data_root() == data.Path('..') / 'shared' / 'data'
    finally:
        (tmp_path.parent / 'shared' / 'data').rmdir()
        (tmp_path.parent / 'shared').rmdir()


def test_missing_data_names_the_folder_and_the_variable(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf'mnist \(test\) not found under .*{DATA_ROOT_VARIABLE}'):
        load_dataset('mnist', tmp_path)


def test_partial_mnist_names_what_is_missing(tmp_path):
    # torchvision reads all four idx files for either split: a folder with the test files only was 'not found'
    raw = tmp_path / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for name in ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'):
        (raw / name).write_bytes(b'')
    with pytest.raises(FileNotFoundError, match=r'MNIST/raw/ lacks train-images-idx3-ubyte, train-labels-idx1-ubyte, '
                                                r'which torchvision needs for either split'):
        load_dataset('mnist', tmp_path)
    for name in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'):
        (raw / name).write_bytes(b'')
    with pytest.raises(FileNotFoundError, match=r'the four idx files are there, so one may be cut short or damaged'):
        load_dataset('mnist', tmp_path)


def test_an_animation_is_refused(tmp_path):
    # its first frame was explained without a word
    frames = [Image.fromarray(np.full((4, 4), value, dtype=np.uint8)) for value in (0, 255)]
    frames[0].save(tmp_path / 'moving.gif', save_all=True, append_images=frames[1:])
    with pytest.raises(UnsupportedImage, match=r'moving\.gif holds 2 frames; pass one image'):
        read_image(tmp_path / 'moving.gif')
    frames[0].save(tmp_path / 'still.gif')
    assert read_image(tmp_path / 'still.gif').shape[-2:] == (4, 4)


def test_mpo_gives_its_photo(tmp_path):
    # a phone camera's JPEG with an embedded preview (MPO) was refused as 'holds 2 frames'
    preview = Image.fromarray(np.full((8, 12, 3), 200, dtype=np.uint8))
    Image.fromarray(BLOCKS).save(tmp_path / 'phone.jpg', format='MPO', save_all=True, append_images=[preview],
                                 quality=100, subsampling=0)
    with Image.open(tmp_path / 'phone.jpg') as image:
        assert image.format == 'MPO' and image.n_frames == 2
    got = read_image(tmp_path / 'phone.jpg')
    assert got.shape == (3, 16, 24)
    assert (got.permute(1, 2, 0).int() - torch.from_numpy(BLOCKS).int()).abs().max() <= 3


def cifar_tree(root, classes):
    '''A CIFAR-10 JPEG test tree with one 32x32 image per class folder, each of the value of its position.'''
    for index, name in enumerate(classes):
        folder = root / 'CIFAR10-JPEG' / 'test' / name
        folder.mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), index * 20, dtype=np.uint8)).save(folder / '0.png')


def test_cifar_folders_are_labelled_by_their_names(tmp_path):
    # ImageFolder numbers the folders it finds: a tree with cat/ and dog/ only labelled them 0 and 1, not 3 and 5
    cifar_tree(tmp_path, ['cat', 'dog'])
    (tmp_path / 'CIFAR10-JPEG' / 'test' / '.ipynb_checkpoints').mkdir()
    images, labels = load_tensors('cifar10', tmp_path, progress=False)
    assert labels.tolist() == [3, 5] and images.shape == (2, 3, 32, 32)


def test_cifar_folder_that_is_not_a_class_is_refused(tmp_path):
    # an extra folder got a label of its own and shifted the labels after it (truck became 10)
    cifar_tree(tmp_path, ['aaa_misc', 'airplane', 'truck'])
    with pytest.raises(ValueError, match=r'test holds folders that are not CIFAR-10 classes \(aaa_misc\), which '
                                         r'would get labels of their own; keep one folder per class, named airplane'):
        load_tensors('cifar10', tmp_path, progress=False)


@pytest.mark.parametrize('name, content, pattern', [
    ('cat/1.jpg', b'not a jpeg', r'cannot read .*CIFAR10-JPEG/test/cat/1\.jpg as an image \(UnidentifiedImageError: '
     r'.*\); the CIFAR-10 JPEG tree holds 32x32 images: replace or remove the file'),
    ('cat/1.png', np.zeros((100, 300, 3), np.uint8), r'.*CIFAR10-JPEG/test/cat/1\.png is 300x100 pixels, but the '
     r'CIFAR-10 JPEG tree holds 32x32 images: resize or remove it'),
])
def test_cifar_image_that_cannot_be_stacked_is_named(name, content, pattern, tmp_path):
    # a traceback from PIL, or from torch.stack ('stack expects each tensor to be equal size')
    cifar_tree(tmp_path, ['cat', 'dog'])
    path = tmp_path / 'CIFAR10-JPEG' / 'test' / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        Image.fromarray(content).save(path)
    with pytest.raises(data.UnusableFolder, match=pattern):
        load_tensors('cifar10', tmp_path, progress=False)


def test_cifar_class_folder_without_images_says_so(tmp_path):
    # was 'cifar10 (test) not found under ...', without ImageFolder's reason
    cifar_tree(tmp_path, ['cat'])
    (tmp_path / 'CIFAR10-JPEG' / 'test' / 'dog').mkdir()
    with pytest.raises(data.UnusableFolder, match=r'CIFAR10-JPEG/test: Found no valid file for the classes dog\. '
                                                  r'Supported extensions are: .*; put the images of each class into '
                                                  r'its folder, or remove the empty folder'):
        load_tensors('cifar10', tmp_path, progress=False)


def test_limit_on_the_cifar_tree_spreads_over_the_classes(tmp_path):
    # as load_tensors documents it: the tree is sorted by class, so the first N would all be airplanes
    for index, name in enumerate(('airplane', 'cat', 'dog')):
        folder = tmp_path / 'CIFAR10-JPEG' / 'test' / name
        folder.mkdir(parents=True)
        for number in range(4):
            Image.fromarray(np.full((32, 32, 3), index * 60 + number, dtype=np.uint8)).save(folder / f'{number}.png')
    images, labels = load_tensors('cifar10', tmp_path, limit=3, progress=False)
    assert labels.tolist() == [0, 3, 5] and images.shape == (3, 3, 32, 32)
    assert 'spread evenly over it' in load_tensors.__doc__ and 'the first ``limit`` of MNIST' in load_tensors.__doc__


def test_limit_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match='limit must be 1 or more, not 0'):
        load_tensors('mnist', tmp_path, limit=0)


@pytest.mark.parametrize('existed', [False, True])
def test_failed_download_leaves_nothing_behind(monkeypatch, tmp_path, existed):
    root = tmp_path / 'data' / 'deeper'
    if existed:  # what was there before stays
        (root / 'MNIST' / 'raw').mkdir(parents=True)
        (root / 'MNIST' / 'raw' / 'mine').write_text('kept')

    def no_network(url, download_root, filename, md5):
        (data.Path(download_root) / filename).write_bytes(b'partial')
        raise URLError('no network')

    monkeypatch.setattr('torchvision.datasets.mnist.download_and_extract_archive', no_network)
    with pytest.raises(FileNotFoundError, match=r'downloading mnist into .* failed \(Error downloading '
                       r'train-images-idx3-ubyte\.gz; no network\?\) and left nothing behind; put .*MNIST/raw/ '
                       rf'idx files into .* by hand, or point --data-root or {DATA_ROOT_VARIABLE}'):
        load_dataset('mnist', root, download=True)
    if existed:
        assert sorted(path.name for path in root.rglob('*')) == ['MNIST', 'mine', 'raw']
    else:
        assert list(tmp_path.iterdir()) == []


# mode -> (make the image file from tmp_path, expected tensor in [0, 1]); expectations come from the generated
# numbers, not from PIL
MODES = {
    'L': (lambda tmp: saved(Image.fromarray(GRAYS), tmp), expected(GRAYS, 255)),
    'RGB': (lambda tmp: saved(Image.fromarray(COLOURS), tmp), expected(COLOURS, 255)),
    '1': (lambda tmp: saved(Image.fromarray(GRAYS > 127), tmp), expected(GRAYS > 127, 1)),
    'I;16 PNG': (lambda tmp: saved(Image.fromarray(DEEP), tmp), expected(DEEP, 65535)),
    'I;16B TIFF': (lambda tmp: saved(Image.frombytes('I;16B', (7, 5), DEEP.astype('>u2').tobytes()), tmp, '.tif'),
                   expected(DEEP, 65535)),
    'I from a 16-bit PGM': (lambda tmp: write(tmp / 'image.pgm', b'P5\n7 5\n65535\n' + DEEP.astype('>u2').tobytes()),
                            expected(DEEP, 65535)),
    'F in [0, 1]': (lambda tmp: saved(Image.fromarray((DEEP / 65535).astype(np.float32)), tmp, '.tif'),
                    expected((DEEP / 65535).astype(np.float32), 1)),
    'P gray palette': (lambda tmp: saved(palette_image([(value,) * 3 for value in (0, 90, 255)])[0], tmp),
                       expected(np.array([0, 90, 255])[np.arange(35).reshape(5, 7) % 3], 255)),
    'P colour palette': (lambda tmp: saved(palette_image([(255, 0, 0), (10, 20, 30)])[0], tmp),
                         expected(np.array([(255, 0, 0), (10, 20, 30)])[np.arange(35).reshape(5, 7) % 2], 255)),
    'P transparency unused': (lambda tmp: saved(palette_image([(255, 0, 0), (10, 20, 30), (1, 2, 3)])[0], tmp,
                                                transparency=7),
                              expected(np.array([(255, 0, 0), (10, 20, 30), (1, 2, 3)])[
                                  np.arange(35).reshape(5, 7) % 3], 255)),
    'L colour key unused': (lambda tmp: saved(Image.fromarray(GRAYS | 1), tmp, transparency=0),
                            expected(GRAYS | 1, 255)),
    'RGB colour key unused': (lambda tmp: saved(Image.fromarray(COLOURS | 1), tmp, transparency=(0, 0, 0)),
                              expected(COLOURS | 1, 255)),
    'LA opaque': (lambda tmp: saved(Image.fromarray(np.stack([GRAYS, np.full_like(GRAYS, 255)], -1)), tmp),
                  expected(GRAYS, 255)),
    'RGBA opaque': (lambda tmp: saved(Image.fromarray(np.concatenate([COLOURS, np.full_like(COLOURS[..., :1], 255)],
                                                                     -1)), tmp), expected(COLOURS, 255)),
    'CMYK': (lambda tmp: saved(Image.frombytes('CMYK', (7, 5), np.concatenate([COLOURS, GRAYS[..., None]], -1)
                                               .tobytes()), tmp, '.tif'),
             expected((255 - COLOURS.astype(float)) * (255 - GRAYS[..., None].astype(float)) / 255, 255)),
}


@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_turns_the_image_upright(orientation, tmp_path):
    # a phone photo stored sideways (Orientation=6: turn 90 degrees clockwise to view) was explained sideways
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / 'oriented.png'
    Image.fromarray(COLOURS).save(path, exif=exif)
    with Image.open(path) as image:
        upright = np.asarray(ImageOps.exif_transpose(image))
    assert np.array_equal(read_image(path).permute(1, 2, 0).numpy(), upright)


# EXIF orientation -> the stored pixels of an upright (H, W, C) array, as the EXIF standard defines the tag
STORED = {1: lambda upright: upright, 2: lambda upright: upright[:, ::-1], 3: lambda upright: upright[::-1, ::-1],
          4: lambda upright: upright[::-1], 5: lambda upright: upright.swapaxes(0, 1),
          6: lambda upright: np.rot90(upright, 1), 7: lambda upright: upright.swapaxes(0, 1)[::-1, ::-1],
          8: lambda upright: np.rot90(upright, -1)}
# 16x24 pixels in 8x8 blocks of one colour each, so that JPEG keeps them within a few levels
BLOCKS = np.kron(RNG.integers(0, 256, (2, 3, 3), dtype=np.uint8), np.ones((8, 8, 1), dtype=np.uint8))


@pytest.mark.parametrize('orientation', range(1, 9))
@pytest.mark.parametrize('suffix, options, tolerance', [('.png', {}, 0), ('.tif', {}, 0),
                                                        ('.jpg', {'quality': 100, 'subsampling': 0}, 3)])
def test_exif_orientation_gives_the_upright_image_in_every_format(suffix, options, tolerance, orientation, tmp_path):
    # TIFFs were turned twice: PIL turns them upright while decoding, and read_image turned them again
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](BLOCKS)))
    got = read_image(saved(stored, tmp_path, suffix, exif=exif, **options))
    assert got.shape == (3, 16, 24)
    assert (got.permute(1, 2, 0).int() - torch.from_numpy(BLOCKS).int()).abs().max() <= tolerance


def write(path, content):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize('mode', sorted(MODES))
def test_every_mode_maps_to_unit_range(mode, tmp_path):
    make, want = MODES[mode]
    got = read(make(tmp_path))
    tolerance = 1.01 / 255 if mode == 'CMYK' else 1e-7  # PIL rounds CMYK -> RGB to 8 bits
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=tolerance)


def test_sixteen_bit_png_equals_the_same_eight_bit_png(tmp_path):
    eight = read(saved(Image.fromarray(GRAYS), tmp_path))
    sixteen = read(saved(Image.fromarray(GRAYS.astype(np.uint16) * 257), tmp_path, '-16.png'))
    assert torch.equal(eight, sixteen)


@pytest.mark.parametrize('mode, colour, want', [
    ('YCbCr', (255, 128, 128), (1., 1., 1.)),
    ('HSV', (0, 255, 255), (1., 0., 0.)),
    ('RGBX', (10, 20, 30), (10 / 255, 20 / 255, 30 / 255)),
    ('RGBa', (10, 20, 30, 255), (10 / 255, 20 / 255, 30 / 255)),
    ('La', (40, 255), (40 / 255,)),
    ('PA', (0, 255), (0.,)),
])
def test_other_modes_in_memory(mode, colour, want):
    got = unit_range(image_tensor(Image.new(mode, (3, 2), colour))).double()
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64)[:, None, None].expand(-1, 2, 3), atol=1e-7)


def raw_png(path, width, height, depth, colour, rows=(), transparency=None):
    '''A PNG written byte by byte: its header (``colour`` 0 grey, 2 RGB), a tRNS chunk holding ``transparency`` (the
    colour key, packed) if given, and ``rows`` of packed samples (none: no image data).'''
    def chunk(kind, content):
        return struct.pack('>I', len(content)) + kind + content + struct.pack('>I', zlib.crc32(kind + content))
    data = b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, depth, colour, 0, 0, 0))
    if transparency is not None:
        data += chunk(b'tRNS', transparency)
    if rows:
        data += chunk(b'IDAT', zlib.compress(b''.join(b'\x00' + row for row in rows)))
    return write(path, data + chunk(b'IEND', b''))


def bomb(tmp_path):
    '''A PNG header declaring 14000 x 14000 pixels (PIL refuses it before decoding).'''
    return raw_png(tmp_path / 'huge.png', 14000, 14000, 8, 0)


REFUSED = {
    'transparent RGBA': (lambda tmp: saved(Image.fromarray(np.concatenate(
        [COLOURS, np.full_like(COLOURS[..., :1], 128)], -1)), tmp), r'has 35 transparent pixel\(s\) \(mode RGBA\) .*'
        r'flatten it onto a background first'),
    'transparent LA': (lambda tmp: saved(Image.fromarray(np.stack([GRAYS, (GRAYS > 100).astype(np.uint8) * 255],
                                                                  -1)), tmp), r'transparent pixel\(s\) \(mode LA\)'),
    'transparent palette entry used': (lambda tmp: saved(palette_image([(255, 0, 0), (10, 20, 30)])[0], tmp,
                                                         transparency=1), r'transparent pixel\(s\) \(mode RGBA\)'),
    # a PNG tRNS colour key: the pixels of that value are transparent (was read as if opaque)
    'L colour key used': (lambda tmp: saved(Image.fromarray(GRAYS), tmp, transparency=int(GRAYS[0, 0])),
                          r'has [1-9]\d* transparent pixel\(s\) \(mode L with the transparent colour key \d+\) .*'
                          r'flatten it onto a background first'),
    'RGB colour key used': (lambda tmp: saved(Image.fromarray(COLOURS), tmp,
                                              transparency=tuple(COLOURS[1, 2].tolist())),
                            r'has [1-9]\d* transparent pixel\(s\) \(mode RGB with the transparent colour key '
                            r'\(\d+, \d+, \d+\)\)'),
    'I;16 colour key used': (lambda tmp: saved(Image.fromarray(DEEP), tmp, transparency=int(DEEP[4, 6])),
                             r'has [1-9]\d* transparent pixel\(s\) \(mode I;16 with the transparent colour key'),
    # stored in other than 8 bits, decoded to 8 by PIL, which keeps the key as stored (it matched no pixel)
    '16-bit RGB colour key used': (lambda tmp: raw_png(
        tmp / 'rgb16.png', 2, 1, 16, 2, [struct.pack('>6H', 0xFFFF, 0, 0, 0x1234, 0x1234, 0x1234)],
        struct.pack('>3H', 0xFFFF, 0, 0)), r'has 1 transparent pixel\(s\) \(mode RGB with the transparent colour key'),
    '2-bit grey colour key used': (lambda tmp: raw_png(tmp / 'grey2.png', 4, 1, 2, 0, [bytes([0b11000110])],
                                                       struct.pack('>H', 3)),
                                   r'has 1 transparent pixel\(s\) \(mode L with the transparent colour key 3\)'),
    'I without a bit depth': (lambda tmp: saved(Image.fromarray(DEEP.astype(np.int32) * 1000), tmp, '.tif'),
                              r'holds 32-bit integers \(PIL mode I\) without a declared range'),
    'F above 1': (lambda tmp: saved(Image.fromarray(DEEP.astype(np.float32)), tmp, '.tif'),
                  r'holds floats \(PIL mode F\) from \d+ to \d+, but bnfuse takes values in \[0, 1\]'),
    'F with NaN': (lambda tmp: saved(Image.fromarray(np.full((2, 2), np.nan, np.float32)), tmp, '.tif'),
                   r'holds floats \(PIL mode F\) from nan to nan, but bnfuse takes values in \[0, 1\]'),
    'decompression bomb': (bomb, r'huge\.png is too large to decode safely \(Image size \(196000000 pixels\) exceeds '
                           r'limit of \d+ pixels\); downscale it first'),
    'not an image': (lambda tmp: write(tmp / 'notes.png', b'not an image'),
                     r'cannot read .*notes\.png as an image \(UnidentifiedImageError: .*\); pass PNG or JPEG files'),
    'truncated PNG': (lambda tmp: write(tmp / 'cut.png', saved(Image.fromarray(COLOURS), tmp).read_bytes()[:60]),
                      r'cannot read .*cut\.png as an image \(OSError: .*\); pass PNG or JPEG files'),
}


@pytest.mark.parametrize('case', sorted(REFUSED))
def test_refused_by_name(case, tmp_path):
    make, pattern = REFUSED[case]
    with pytest.raises(UnsupportedImage, match=pattern):
        read_image(make(tmp_path))


def test_missing_image_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='image file not found: .*none.png'):
        read_image(tmp_path / 'none.png')


def test_eight_bit_images_stay_uint8_for_resizing():
    image = Image.fromarray(COLOURS)
    tensor = image_tensor(image)
    assert tensor.dtype == torch.uint8 and torch.equal(unit_range(tensor), to_tensor(image))


def test_demo_images_are_unchanged():
    images = demo_images('mnist')
    folder = data.resources.files('zennit_bnfuse.evaluation') / 'demo'
    with (folder / 'mnist-0-7.png').open('rb') as file:
        first = to_tensor(Image.open(io.BytesIO(file.read())))
    assert images.shape == (6, 1, 28, 28) and torch.equal(images[0], first)
