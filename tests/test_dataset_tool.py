"""dataset_tool.py: official source formats built in tmp_path -> exact archive names, labels and pixels."""

import gzip
import io
import json
import os
import pickle
import struct
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool

CIFAR_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']

# ----------------------------------------------------------------------------
# Source files in their official formats.

# A pickle as the official (Python 2) CIFAR files spell it: numpy arrays via numpy.core.multiarray._reconstruct.
def cifar_pickle(obj):
    return pickle.dumps(obj, protocol=2).replace(b'numpy._core.multiarray', b'numpy.core.multiarray')


# cifar-10-python.tar.gz with n images per batch; returns (HWC images of the 5 training batches, labels).
def make_cifar(tmp_path, n=4, seed=0):
    rng = np.random.default_rng(seed)
    hwc = rng.integers(0, 256, size=[6 * n, 32, 32, 3], dtype=np.uint8)
    labels = rng.integers(0, 10, size=[6 * n]).tolist()
    path = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(path, 'w:gz') as tar:
        def add(name, obj):
            data = cifar_pickle(obj)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add('batches.meta', {b'num_cases_per_batch': n, b'num_vis': 3072,
                             b'label_names': [x.encode() for x in CIFAR_NAMES]})
        for b, name in enumerate([f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']):
            sl = slice(b * n, (b + 1) * n)
            rows = hwc[sl].transpose(0, 3, 1, 2).reshape(n, 3072)  # official layout: CHW flattened
            add(name, {b'batch_label': name.encode(), b'labels': labels[sl], b'data': rows,
                       b'filenames': [f'{name}_{i}.png'.encode() for i in range(n)]})
    return str(path), hwc[:5 * n], labels[:5 * n]


def write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f'>{arr.ndim}I', *arr.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def make_mnist(tmp_path, n=5, with_labels=True):
    rng = np.random.default_rng(1)
    images = rng.integers(1, 256, size=[n, 28, 28], dtype=np.uint8)  # no zeros, so padding is visible
    labels = rng.integers(0, 10, size=[n])
    write_idx(tmp_path / 'train-images-idx3-ubyte.gz', images)
    if with_labels:
        write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', labels)
    return str(tmp_path / 'train-images-idx3-ubyte.gz'), images, labels.tolist()


def save_png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr).save(path)


def run(*args):
    return CliRunner().invoke(dataset_tool.main, [str(a) for a in args])


# Read a dataset (zip or folder) back: {name: bytes}.
def read_entries(dest):
    if str(dest).endswith('.zip'):
        with zipfile.ZipFile(dest) as zf:
            assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
            return {name: zf.read(name) for name in zf.namelist()}
    out = {}
    for root, _dirs, files in os.walk(dest):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, dest).replace(os.sep, '/')] = open(path, 'rb').read()
    return out


def decode(data):
    arr = np.asarray(PIL.Image.open(io.BytesIO(data)))
    return arr[:, :, np.newaxis] if arr.ndim == 2 else arr


def names(n):
    return [f'{i:08d}'[:5] + f'/img{i:08d}.png' for i in range(n)]

# ----------------------------------------------------------------------------
# Sources.

@pytest.mark.parametrize('dest_name', ['cifar10-32x32.zip', 'cifar10-32x32'])
def test_cifar10_exact(tmp_path, dest_name):
    src, hwc, labels = make_cifar(tmp_path)
    dest = tmp_path / dest_name
    result = run('--source', src, '--dest', dest)
    assert result.exit_code == 0, result.output
    entries = read_entries(dest)
    assert sorted(entries) == sorted(names(20) + ['dataset.json'])
    assert json.loads(entries['dataset.json']) == {'labels': [[n, l] for n, l in zip(names(20), labels)],
                                                   'label_names': CIFAR_NAMES}
    pixels = np.stack([decode(entries[n]) for n in names(20)])
    np.testing.assert_array_equal(pixels, hwc)  # lossless, batches 1..5 in order, test_batch left out
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith('.tmp')] == []


def test_cifar10_max_images(tmp_path):
    src, hwc, labels = make_cifar(tmp_path)
    result = run('--source', src, '--dest', tmp_path / 'out.zip', '--max-images', 7)
    assert result.exit_code == 0, result.output
    entries = read_entries(tmp_path / 'out.zip')
    assert sorted(entries) == sorted(names(7) + ['dataset.json'])
    assert [l for _n, l in json.loads(entries['dataset.json'])['labels']] == labels[:7]
    np.testing.assert_array_equal(decode(entries[names(7)[6]]), hwc[6])


def test_cifar10_refuses_foreign_pickle(tmp_path):
    path = tmp_path / 'cifar-10-python.tar.gz'
    data = pickle.dumps({b'data': os.getcwd}, protocol=2)  # a pickle that would call a function
    with tarfile.open(path, 'w:gz') as tar:
        for i in range(1, 6):
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{i}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = run('--source', path, '--dest', tmp_path / 'out.zip')
    assert result.exit_code == 1
    assert 'unexpected object posix.getcwd' in result.output or 'unexpected object nt.getcwd' in result.output
    assert not (tmp_path / 'out.zip').exists()


@pytest.mark.parametrize('with_labels', [True, False])
def test_mnist_padding_and_labels(tmp_path, with_labels):
    src, images, labels = make_mnist(tmp_path, with_labels=with_labels)
    result = run('--source', src, '--dest', tmp_path / 'mnist.zip')
    assert result.exit_code == 0, result.output
    entries = read_entries(tmp_path / 'mnist.zip')
    assert sorted(entries) == sorted(names(5) + ['dataset.json'])
    expected = {'labels': [[n, l] for n, l in zip(names(5), labels)] if with_labels else None}
    assert json.loads(entries['dataset.json']) == expected
    for i, n in enumerate(names(5)):
        img = PIL.Image.open(io.BytesIO(entries[n]))
        assert img.mode == 'L' and img.size == (32, 32)
        padded = np.zeros([32, 32], np.uint8)
        padded[2:30, 2:30] = images[i]
        np.testing.assert_array_equal(np.asarray(img), padded)


def make_class_folder(root):
    rng = np.random.default_rng(2)
    files = {'dog/b.png': None, 'cat/z.png': None, 'dog/sub/a.png': None, 'cat/a.png': None, 'bird/x.png': None}
    for rel in files:
        files[rel] = rng.integers(0, 256, size=[8, 8, 3], dtype=np.uint8)
        save_png(os.path.join(root, *rel.split('/')), files[rel])
    (root / 'notes.txt').write_text('not an image')
    return files


@pytest.mark.parametrize('as_zip', [False, True])
def test_image_folder_subfolder_labels(tmp_path, as_zip):
    files = make_class_folder(tmp_path / 'imgs')
    src = tmp_path / 'imgs'
    if as_zip:
        src = tmp_path / 'imgs.zip'
        with zipfile.ZipFile(src, 'w', compression=zipfile.ZIP_DEFLATED) as zf:
            for rel in files:
                zf.write(tmp_path / 'imgs' / rel, rel)
    result = run('--source', src, '--dest', tmp_path / 'out.zip')
    assert result.exit_code == 0, result.output
    entries = read_entries(tmp_path / 'out.zip')
    order = ['bird/x.png', 'cat/a.png', 'cat/z.png', 'dog/b.png', 'dog/sub/a.png']  # sorted relative paths
    class_of = {'bird': 0, 'cat': 1, 'dog': 2}
    assert json.loads(entries['dataset.json']) == {
        'labels': [[n, class_of[rel.split('/')[0]]] for n, rel in zip(names(5), order)],
        'label_names': ['bird', 'cat', 'dog']}
    for n, rel in zip(names(5), order):
        np.testing.assert_array_equal(decode(entries[n]), files[rel])


def test_image_folder_dataset_json_and_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / 'src'
    imgs = {f'p{i}.png': rng.integers(0, 256, size=[4, 4, 1], dtype=np.uint8) for i in range(3)}
    for rel, arr in imgs.items():
        save_png(str(src / rel), arr)
    (src / 'dataset.json').write_text(json.dumps({'labels': [['p0.png', 5], ['p1.png', 0], ['p2.png', 7]]}))
    assert run('--source', src, '--dest', tmp_path / 'a.zip').exit_code == 0
    a = read_entries(tmp_path / 'a.zip')
    assert json.loads(a['dataset.json']) == {'labels': [[names(3)[0], 5], [names(3)[1], 0], [names(3)[2], 7]]}
    for n, rel in zip(names(3), sorted(imgs)):
        assert PIL.Image.open(io.BytesIO(a[n])).mode == 'L'
        np.testing.assert_array_equal(decode(a[n]), imgs[rel])
    # A dataset fed back in keeps its labels (dataset.json wins over the 00000/ folder names) and pixels.
    assert run('--source', tmp_path / 'a.zip', '--dest', tmp_path / 'b').exit_code == 0
    assert read_entries(tmp_path / 'b') == a


def test_image_folder_null_labels(tmp_path):
    save_png(str(tmp_path / 'src' / 'x' / 'a.png'), np.zeros([4, 4, 3], np.uint8))
    save_png(str(tmp_path / 'src' / 'y' / 'b.png'), np.zeros([4, 4, 3], np.uint8))
    (tmp_path / 'src' / 'dataset.json').write_text('{"labels": null}')
    assert run('--source', tmp_path / 'src', '--dest', tmp_path / 'o.zip').exit_code == 0
    assert json.loads(read_entries(tmp_path / 'o.zip')['dataset.json']) == {'labels': None}

# ----------------------------------------------------------------------------
# Transforms, on images with known answers.

def test_center_crop_exact_and_constant():
    img = np.random.default_rng(4).integers(0, 256, size=[16, 25, 3], dtype=np.uint8)
    np.testing.assert_array_equal(dataset_tool.center_crop(img, 16, 16), img[:, 4:20])  # (25 - 16) // 2 = 4
    tall = np.zeros([40, 20, 1], np.uint8)
    tall[10:30] = 200  # the centered 20x20 square is uniform, the rest differs
    np.testing.assert_array_equal(dataset_tool.center_crop(tall, 4, 4), np.full([4, 4, 1], 200, np.uint8))


def test_center_crop_wide_exact():
    img = np.random.default_rng(5).integers(0, 256, size=[12, 16, 3], dtype=np.uint8)
    out = dataset_tool.center_crop_wide(img, 16, 8)
    expected = np.zeros([16, 16, 3], np.uint8)
    expected[4:12] = img[2:10]  # crop rows (12 - 8) // 2 = 2.., pad (16 - 8) // 2 = 4 black rows on top
    np.testing.assert_array_equal(out, expected)
    wide = np.random.default_rng(6).integers(0, 256, size=[8, 20, 1], dtype=np.uint8)
    expected = np.zeros([16, 16, 1], np.uint8)
    expected[4:12] = wide[:, 2:18]  # too wide: trim (20 - 16) // 2 = 2 columns each side
    np.testing.assert_array_equal(dataset_tool.center_crop_wide(wide, 16, 8), expected)


def checkerboard(h, w, block):
    yy, xx = np.meshgrid(np.arange(h) // block, np.arange(w) // block, indexing='ij')
    return (((yy + xx) % 2) * 255).astype(np.uint8)[:, :, np.newaxis].repeat(3, axis=2)


def test_imagenet_recipe_box_halving():
    # 8x8 blocks survive box halving exactly: 32 -> 16 -> 8 -> 4 (stop: 4 < 2*4), so the 4x4 result is the block grid.
    out = dataset_tool.center_crop_imagenet(checkerboard(32, 32, 8), 4, 4)
    np.testing.assert_array_equal(out, checkerboard(4, 4, 1))
    # Non-square: 48x32 (HxW) -> 24x16 -> 12x8 -> 6x4; then the centered 4 of 6 block rows (starting at row 1).
    out = dataset_tool.center_crop_imagenet(checkerboard(48, 32, 8), 4, 4)
    np.testing.assert_array_equal(out, checkerboard(6, 4, 1)[1:5])
    # Lanczos center-crop does not reproduce the blocks, so the test tells the recipes apart.
    assert not np.array_equal(dataset_tool.center_crop(checkerboard(32, 32, 8), 4, 4), checkerboard(4, 4, 1))


def test_imagenet_recipe_bicubic_scale():
    # 30x21 (HxW), target 8: 21 >= 16 halves once to 15x10; scale 8/10 -> 12x8 bicubic; centered rows 2..10.
    img = np.full([30, 21, 3], 77, np.uint8)
    img[:, :, 1] = 140
    out = dataset_tool.center_crop_imagenet(img, 8, 8)
    expected = np.zeros([8, 8, 3], np.uint8)
    expected[:] = [77, 140, 77]
    np.testing.assert_array_equal(out, expected)
    # The same steps done by hand on a random image.
    rnd = np.random.default_rng(7).integers(0, 256, size=[30, 21, 3], dtype=np.uint8)
    step = PIL.Image.fromarray(rnd).resize((10, 15), PIL.Image.BOX).resize((8, 12), PIL.Image.BICUBIC)
    np.testing.assert_array_equal(dataset_tool.center_crop_imagenet(rnd, 8, 8), np.asarray(step)[2:10])


def test_cli_transform_mixed_sizes_and_channels(tmp_path):
    src = tmp_path / 'src'
    save_png(str(src / 'a.png'), checkerboard(32, 32, 8))
    save_png(str(src / 'b.png'), np.full([40, 20, 1], 9, np.uint8))  # grayscale, other size
    result = run('--source', src, '--dest', tmp_path / 'o.zip', '--transform', 'imagenet64', '--resolution', '4x4')
    assert result.exit_code == 0, result.output
    entries = read_entries(tmp_path / 'o.zip')
    np.testing.assert_array_equal(decode(entries[names(2)[0]]), checkerboard(4, 4, 1))
    np.testing.assert_array_equal(decode(entries[names(2)[1]]), np.full([4, 4, 3], 9, np.uint8))  # promoted to RGB


def test_cli_center_crop_wide_output_is_square(tmp_path):
    src = tmp_path / 'src'
    save_png(str(src / 'a.png'), np.full([12, 16, 3], 50, np.uint8))
    result = run('--source', src, '--dest', tmp_path / 'o', '--transform', 'center-crop-wide', '--resolution', '16x8')
    assert result.exit_code == 0, result.output
    expected = np.zeros([16, 16, 3], np.uint8)
    expected[4:12] = 50
    np.testing.assert_array_equal(decode(read_entries(tmp_path / 'o')[names(1)[0]]), expected)

# ----------------------------------------------------------------------------
# Errors: one line, exit code 1, and nothing written.

def write_garbage(path):
    path.write_bytes(b'this is not what it claims to be' * 10)
    return path


def error_cases(tmp_path):
    good = tmp_path / 'good'
    save_png(str(good / 'a.png'), np.zeros([8, 8, 3], np.uint8))
    mixed = tmp_path / 'mixed'
    save_png(str(mixed / 'a.png'), np.zeros([8, 8, 3], np.uint8))
    save_png(str(mixed / 'b.png'), np.zeros([16, 16, 3], np.uint8))
    mixed_c = tmp_path / 'mixed_c'
    save_png(str(mixed_c / 'a.png'), np.zeros([8, 8, 3], np.uint8))
    save_png(str(mixed_c / 'b.png'), np.zeros([8, 8, 1], np.uint8))
    odd = tmp_path / 'odd'
    save_png(str(odd / 'a.png'), np.zeros([24, 24, 3], np.uint8))
    unlabeled = tmp_path / 'unlabeled'
    save_png(str(unlabeled / 'a.png'), np.zeros([8, 8, 3], np.uint8))
    save_png(str(unlabeled / 'b.png'), np.zeros([8, 8, 3], np.uint8))
    (unlabeled / 'dataset.json').write_text('{"labels": [["a.png", 1]]}')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('x')
    (tmp_path / 'taken.zip').write_bytes(b'x')
    (tmp_path / 'corrupt_img').mkdir()
    (tmp_path / 'corrupt_img' / 'a.png').write_bytes(b'not a png')
    incomplete = tmp_path / 'incomplete' / 'cifar-10-python.tar.gz'
    incomplete.parent.mkdir()
    with tarfile.open(incomplete, 'w:gz') as tar:
        info = tarfile.TarInfo('cifar-10-batches-py/data_batch_1')
        info.size = 1
        tar.addfile(info, io.BytesIO(b'x'))
    bad_pickle = tmp_path / 'badpickle' / 'cifar-10-python.tar.gz'
    bad_pickle.parent.mkdir()
    with tarfile.open(bad_pickle, 'w:gz') as tar:
        for i in range(1, 6):
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{i}')
            info.size = 1
            tar.addfile(info, io.BytesIO(b'x'))
    bad_idx = tmp_path / 'badidx' / 'train-images-idx3-ubyte.gz'
    bad_idx.parent.mkdir()
    with gzip.open(bad_idx, 'wb') as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack('>I', 3) + b'abc')  # a 1-D (labels) file in the images slot
    return [
        (['--source', good, '--dest', 'o.zip', '--resolution', '16x8', '--transform', 'center-crop'], 'not square'),
        (['--source', good, '--dest', 'o.zip', '--resolution', '24x24'], 'not a power of two'),
        (['--source', good, '--dest', 'o.zip', '--resolution', '64'], 'is not WxH'),
        (['--source', good, '--dest', 'o.zip', '--transform', 'center-crop'], 'needs --resolution=WxH'),
        (['--source', good, '--dest', 'o.zip', '--resolution', '8x16', '--transform', 'center-crop-wide'],
         'needs W >= H'),
        (['--source', mixed, '--dest', 'o.zip'], 'differ in size or channels'),
        (['--source', mixed_c, '--dest', 'o.zip'], 'differ in size or channels'),
        (['--source', odd, '--dest', 'o.zip'], 'Source images are 24x24'),
        (['--source', unlabeled, '--dest', 'o.zip'], 'has no label for "b.png"'),
        (['--source', tmp_path / 'empty', '--dest', 'o.zip'], 'No image files found'),
        (['--source', tmp_path / 'corrupt_img', '--dest', 'o.zip'], 'Cannot read image "a.png"'),
        (['--source', good, '--dest', tmp_path / 'full'], 'already exists and is not empty; remove it'),
        (['--source', good, '--dest', tmp_path / 'taken.zip'], 'already exists and is not empty; remove it'),
        (['--source', write_garbage(tmp_path / 'cifar-10-python.tar.gz'), '--dest', 'o.zip'], 'as a gzipped tarball'),
        (['--source', incomplete, '--dest', 'o.zip'], 'has no data_batch_2'),
        (['--source', bad_pickle, '--dest', 'o.zip'], 'Cannot unpickle data_batch_1'),
        (['--source', write_garbage(tmp_path / 'train-images-idx3-ubyte.gz'), '--dest', 'o.zip'], 'as gzip'),
        (['--source', bad_idx, '--dest', 'o.zip'], 'is not a uint8 IDX file with 3 dimensions'),
        (['--source', write_garbage(tmp_path / 'data.zip'), '--dest', 'o.zip'], 'as a zip'),
        (['--source', write_garbage(tmp_path / 'data.txt'), '--dest', 'o.zip'], 'Unknown source type'),
        (['--source', tmp_path / 'missing', '--dest', 'o.zip'], 'does not exist'),
    ]


def test_cli_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, message in error_cases(tmp_path):
        before = sorted(os.listdir(tmp_path))
        result = run(*args)
        assert result.exit_code in (1, 2), (args, result.output)  # ClickException / BadParameter
        assert message in result.output, (args, result.output)
        assert result.output.strip().count('\n') <= 3, result.output  # usage lines at most, no traceback
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temp left behind
    assert (tmp_path / 'full' / 'x').read_text() == 'x'

# ----------------------------------------------------------------------------
# save_dataset, the reusable writer.

@pytest.mark.parametrize('dest_name', ['toy.zip', 'toy'])
def test_save_dataset_layout(tmp_path, dest_name):
    rng = np.random.default_rng(8)
    images = [rng.integers(0, 256, size=[4, 4, 3], dtype=np.uint8) for _ in range(3)]
    (tmp_path / 'toy').mkdir()  # an empty destination folder is allowed
    dataset_tool.save_dataset(str(tmp_path / dest_name), iter(images), [2, 0, 1], ['a', 'b', 'c'])
    entries = read_entries(tmp_path / dest_name)
    assert sorted(entries) == sorted(names(3) + ['dataset.json'])
    assert json.loads(entries['dataset.json']) == {'labels': [[n, l] for n, l in zip(names(3), [2, 0, 1])],
                                                   'label_names': ['a', 'b', 'c']}
    for n, img in zip(names(3), images):
        np.testing.assert_array_equal(decode(entries[n]), img)


def test_save_dataset_names_past_1000(tmp_path):
    images = (np.full([2, 2, 1], i % 256, np.uint8) for i in range(1001))
    dataset_tool.save_dataset(str(tmp_path / 'big.zip'), images, None)
    with zipfile.ZipFile(tmp_path / 'big.zip') as zf:
        assert zf.namelist()[999:] == ['00000/img00000999.png', '00001/img00001000.png', 'dataset.json']
        assert json.loads(zf.read('dataset.json')) == {'labels': None}


@pytest.mark.parametrize('images, labels, message', [
    ([np.zeros([4, 4, 3], np.float32)], None, 'Image 0 is float32 [4, 4, 3]'),
    ([np.zeros([4, 8, 3], np.uint8)], None, 'Image 0 is uint8 [4, 8, 3]'),
    ([np.zeros([6, 6, 3], np.uint8)], None, 'H == W a power of two'),
    ([np.zeros([4, 4, 2], np.uint8)], None, '1 or 3 channels'),
    ([np.zeros([4, 4, 3], np.uint8), np.zeros([4, 4, 1], np.uint8)], None, 'Image 1 has shape [4, 4, 1]'),
    ([np.zeros([4, 4, 3], np.uint8)] * 2, [0], 'Got 1 labels for 2 images'),
    ([np.zeros([4, 4, 3], np.uint8)], [-1], 'Label 0 is -1'),
    ([], None, 'No images to write'),
])
@pytest.mark.parametrize('dest_name', ['bad.zip', 'bad'])
def test_save_dataset_errors(tmp_path, images, labels, message, dest_name):
    with pytest.raises(ValueError, match=message.replace('[', r'\[')):
        dataset_tool.save_dataset(str(tmp_path / dest_name), iter(images), labels)
    assert os.listdir(tmp_path) == []
