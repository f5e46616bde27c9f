"""Convert CIFAR-10, MNIST, image folders and zips into EDM-style datasets: a zip (or folder) of PNGs + dataset.json."""

import codecs
import contextlib
import gzip
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import typing
import zipfile
import zlib

import click
import numpy as np
import PIL.Image

from dnnlib.util import atomic_write, is_hidden, os_error_message, progress_bar
from torch_utils import options

# ----------------------------------------------------------------------------
# Bad input data; a ValueError for library callers, a one-line click error in the CLI.

class DatasetError(ValueError):
    pass

# ----------------------------------------------------------------------------
# Writing: image i goes to {i:08d}[:5]/img{i:08d}.png, labels to dataset.json (EDM's layout).

# Name of image idx inside the dataset; 1000 images per folder.
def archive_fname(idx):
    idx_str = f'{idx:08d}'
    return f'{idx_str[:5]}/img{idx_str}.png'


# Networks halve the resolution repeatedly, so sides must be powers of two.
def is_pow2(n):
    return n >= 1 and (n & (n - 1)) == 0


# Refuse to mix new images into an existing dataset; an empty folder (or empty file for a zip) is fine.
def check_dest_free(dest):
    dest = os.fspath(dest)
    is_zip = dest.lower().endswith('.zip')
    if os.path.isdir(dest):
        taken = is_zip or len(os.listdir(dest)) > 0
    else:
        taken = os.path.exists(dest) and (not is_zip or os.path.getsize(dest) > 0)
    if taken:
        raise DatasetError(f'Destination "{dest}" already exists and is not empty; remove it or pick another --dest')


# Encode one HWC uint8 image as PNG with PIL's default settings.
def encode_png(img):
    buf = io.BytesIO()
    PIL.Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format='png')
    return buf.getvalue()


# Yield (archive name, bytes) for every image, then dataset.json; validate while streaming.
def dataset_entries(images, labels, label_names):
    shape = None
    num = 0
    for idx, img in enumerate(images):
        ok = isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3
        if not (ok and img.shape[0] == img.shape[1] and is_pow2(img.shape[0]) and img.shape[2] in (1, 3)):
            desc = f'{img.dtype} {list(img.shape)}' if isinstance(img, np.ndarray) else type(img).__name__
            raise DatasetError(f'Image {idx} is {desc}; datasets need HWC uint8 images, H == W a power of two, '
                               f'1 or 3 channels')
        if shape is not None and img.shape != shape:
            raise DatasetError(f'Image {idx} has shape {list(img.shape)} but image 0 has {list(shape)}; '
                               f'all images in a dataset must have the same size and channels')
        shape = img.shape
        num += 1
        yield archive_fname(idx), encode_png(img)
    if num == 0:
        raise DatasetError('No images to write; a dataset needs at least one image')
    meta = {'labels': None}
    if labels is not None:
        if len(labels) != num:
            raise DatasetError(f'Got {len(labels)} labels for {num} images; pass one label per image')
        meta['labels'] = [[archive_fname(idx), int(label)] for idx, label in enumerate(labels)]
    if label_names is not None:
        meta['label_names'] = list(label_names)
    yield 'dataset.json', json.dumps(meta).encode('utf-8')


# Labels are validated before anything is written, so bad ones never leave a partial dataset.
def check_labels(labels, label_names):
    if labels is None:
        if label_names is not None:
            raise DatasetError('label_names given without labels; pass labels too or drop label_names')
        return
    from training.dataset import MAX_LABEL  # the reader's bound (imports torch: only when there are labels)
    for idx, label in enumerate(labels):
        if not isinstance(label, (int, np.integer)) or isinstance(label, bool) or not 0 <= label <= MAX_LABEL:
            raise DatasetError(f'Label {idx} is {label!r}; labels must be integers in 0..{MAX_LABEL}')
        if label_names is not None and label >= len(label_names):
            raise DatasetError(f'Label {idx} is {label} but only {len(label_names)} label_names were given')


def save_dataset(dest: str, images: typing.Iterable[np.ndarray], labels: list[int] | None,
                 label_names: list[str] | None = None):
    """Write HWC uint8 images (and int labels) as an EDM dataset: a zip (stored) if dest ends in .zip, else a folder.

    Atomic: the zip is written under a temp name and renamed; a folder is filled beside dest and renamed into place.
    dataset.json holds {"labels": [[archive name, int], ...] or null}, plus "label_names" when label_names is given.
    """
    dest = os.fspath(dest)
    check_dest_free(dest)
    check_labels(labels, label_names)
    entries = dataset_entries(images, labels, label_names)
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)

    if dest.lower().endswith('.zip'):
        def write_zip(f):
            with zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as zf:
                for name, data in entries:
                    zf.writestr(name, data)
        atomic_write(dest, write_zip)
        return

    tmp_dir = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(dest))}.', suffix='.tmp', dir=parent)
    try:
        for name, data in entries:
            path = os.path.join(tmp_dir, *name.split('/'))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(data)
        if os.path.isdir(dest):
            os.rmdir(dest)  # an empty destination folder: make room for the rename
        os.replace(tmp_dir, dest)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise

# ----------------------------------------------------------------------------
# Sources. Each yields a Source: per-image (H, W, C) shapes known up front, a loader, labels and label names.

class Source(typing.NamedTuple):
    shapes: list          # [(H, W, C)] per image, read before any pixel is decoded
    load: typing.Callable  # idx -> HWC uint8 array
    labels: list | None
    label_names: list | None


# CIFAR-10 batches are pickles of dicts of numpy arrays; allow only the globals such files use.
class ArrayUnpickler(pickle.Unpickler):
    allowed = {
        ('_codecs', 'encode'): codecs.encode,
        ('numpy', 'ndarray'): np.ndarray,
        ('numpy', 'dtype'): np.dtype,
        ('numpy.core.multiarray', '_reconstruct'): np.zeros(0).__reduce__()[0],
        ('numpy._core.multiarray', '_reconstruct'): np.zeros(0).__reduce__()[0],
    }

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f'unexpected object {module}.{name}')
        return self.allowed[(module, name)]


# Unpickle one CIFAR-10 file with the allow-list; broken pickles become one-line errors.
def load_array_pickle(data, what):
    try:
        return ArrayUnpickler(io.BytesIO(data), encoding='bytes').load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DatasetError(f'Cannot unpickle {what} ({e}); download cifar-10-python.tar.gz again') from e


# The five training batches of cifar-10-python.tar.gz: 50,000 32x32 RGB images stored as CHW rows, labels 0-9.
@contextlib.contextmanager
def open_cifar10(tarball, max_images):
    batches = {}
    try:
        with tarfile.open(tarball, 'r:gz') as tar:
            for member in tar.getmembers():
                base = os.path.basename(member.name)
                if member.isfile() and (base.startswith('data_batch_') or base == 'batches.meta'):
                    batches[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DatasetError(f'Cannot read "{tarball}" as a gzipped tarball ({e}); download it again') from e
    missing = [f'data_batch_{i}' for i in range(1, 6) if f'data_batch_{i}' not in batches]
    if missing:
        raise DatasetError(f'"{tarball}" has no {missing[0]}; expected the CIFAR-10 python tarball '
                           f'(cifar-10-python.tar.gz)')
    images, labels = [], []
    for name in [f'data_batch_{i}' for i in range(1, 6)]:
        batch = load_array_pickle(batches[name], name)
        data = batch.get(b'data') if isinstance(batch, dict) else None
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
            raise DatasetError(f'{name} in "{tarball}" has no uint8 [N, 3072] "data"; not a CIFAR-10 python batch')
        batch_labels = [int(x) for x in batch.get(b'labels', [])]
        if len(batch_labels) != len(data):
            raise DatasetError(f'{name} in "{tarball}" has {len(batch_labels)} labels for {len(data)} images')
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW rows -> HWC
        labels += batch_labels
    images = np.concatenate(images)[:max_images]
    label_names = None
    if 'batches.meta' in batches:
        meta = load_array_pickle(batches['batches.meta'], 'batches.meta')
        names = meta.get(b'label_names') if isinstance(meta, dict) else None
        label_names = [x.decode('utf-8') for x in names] if names is not None else None
    yield Source([images.shape[1:]] * len(images), lambda idx: images[idx], labels[:len(images)], label_names)


# One IDX file (MNIST's format): big-endian magic (0, 0, 0x08 = uint8, ndim), then ndim uint32 sizes, then the data.
def read_idx(path, ndim):
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f'Cannot read "{path}" as gzip ({e}); download it again') from e
    if len(data) < 4 + 4 * ndim or data[:4] != bytes([0, 0, 0x08, ndim]):
        raise DatasetError(f'"{path}" is not a uint8 IDX file with {ndim} dimensions (bad header)')
    shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != np.prod(shape):
        raise DatasetError(f'"{path}" holds {body.size} bytes of data but its header says {list(shape)}; '
                           f'download it again')
    return body.reshape(shape)


# MNIST digits, zero-padded from 28x28 to 32x32; labels from the *-labels-idx1-ubyte.gz beside it if present.
@contextlib.contextmanager
def open_mnist(images_gz, max_images):
    images = read_idx(images_gz, 3)[:max_images]
    images = np.pad(images, [(0, 0), (2, 2), (2, 2)])[:, :, :, np.newaxis]
    labels_name = os.path.basename(images_gz).replace('images-idx3', 'labels-idx1')
    labels_gz = os.path.join(os.path.dirname(images_gz), labels_name)
    labels = None
    if os.path.isfile(labels_gz):
        labels = [int(x) for x in read_idx(labels_gz, 1)[:max_images]]
        if len(labels) != len(images):
            raise DatasetError(f'"{labels_gz}" has {len(labels)} labels for {len(images)} images')
    yield Source([images.shape[1:]] * len(images), lambda idx: images[idx], labels, None)


GRAY_MODES = {'1', 'L', 'LA'}
COLOR_MODES = {'RGB', 'RGBA', 'RGBX', 'P', 'PA', 'CMYK', 'YCbCr'}


# What PIL and zipfile raise for a damaged image file or zip member, or an image too large to decode (as the
# training reader's list in training/dataset.py).
BAD_IMAGE = (OSError, SyntaxError, EOFError, zipfile.BadZipFile, zlib.error, struct.error, PIL.Image.DecompressionBombError)


# Open a file object as PIL image and report its (H, W, C) without decoding the pixels.
def image_header(f, name):
    try:
        img = PIL.Image.open(f)
    except BAD_IMAGE as e:
        raise DatasetError(f'Cannot read image "{name}" ({e}); remove or fix the file') from e
    if img.mode not in GRAY_MODES | COLOR_MODES:
        raise DatasetError(f'Image "{name}" has unsupported mode {img.mode}; convert it to 8-bit grayscale or RGB')
    return img, (img.height, img.width, 1 if img.mode in GRAY_MODES else 3)


# Decode pixels as HWC uint8, grayscale kept as one channel, every other mode as RGB.
def decode_image(f, name):
    img, (_h, _w, c) = image_header(f, name)
    try:
        arr = np.asarray(img.convert('L' if c == 1 else 'RGB'))
    except BAD_IMAGE as e:
        raise DatasetError(f'Cannot decode image "{name}" ({e}); remove or fix the file') from e
    return arr[:, :, np.newaxis] if arr.ndim == 2 else arr


# Image files are recognised by the extensions PIL can read.
def is_image_fname(name):
    PIL.Image.init()
    return os.path.splitext(name)[1].lower() in PIL.Image.EXTENSION and not is_hidden(name)


# Labels from dataset.json ({"labels": [[name, int], ...]} or null), else from top-level sub-folder names.
def folder_labels(names, meta_text, where):
    if meta_text is not None:
        from training.dataset import parse_labels  # the one reader of the format (imports torch: only when needed)
        try:
            table = parse_labels(meta_text, where)
        except ValueError as e:
            raise DatasetError(str(e)) from None
        if table is None:
            return None, None
        missing = [name for name in names if name not in table]
        if missing:
            raise DatasetError(f'dataset.json in "{where}" has no label for "{missing[0]}" ({len(missing)} images '
                               f'unlabelled); add them or delete dataset.json')
        return [table[name] for name in names], None
    tops = [name.split('/')[0] if '/' in name else '' for name in names]
    label_names = sorted(set(tops))
    if len(label_names) < 2:
        return None, None
    index = {top: idx for idx, top in enumerate(label_names)}
    return [index[top] for top in tops], label_names


# Shared by folders and zips: labels, then every header (so size errors come before any write), then a loader.
def source_from_files(names, meta_text, open_file, where):
    if len(names) == 0:
        raise DatasetError(f'No image files found in "{where}"; point --source at a folder or zip of images')
    labels, label_names = folder_labels(names, meta_text, where)
    shapes = []
    for name in names:
        with open_file(name) as f:
            shapes.append(image_header(f, name)[1])

    def load(idx):
        with open_file(names[idx]) as f:
            return decode_image(f, names[idx])
    return Source(shapes, load, labels, label_names)


# A folder of images, searched recursively; names are '/'-separated paths relative to the folder, sorted.
@contextlib.contextmanager
def open_image_folder(folder, max_images):
    names = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        rel = os.path.relpath(root, folder).replace(os.sep, '/')
        names += [f if rel == '.' else f'{rel}/{f}' for f in files if is_image_fname(f)]
    names = sorted(names)[:max_images]
    meta_path = os.path.join(folder, 'dataset.json')
    meta_text = None
    if os.path.isfile(meta_path):
        with open(meta_path, 'rb') as f:
            meta_text = f.read()  # bytes: parse_labels tells JSON's encodings apart
    yield source_from_files(names, meta_text, lambda name: open(os.path.join(folder, *name.split('/')), 'rb'), folder)


# A zip of images, same rules as a folder.
@contextlib.contextmanager
def open_image_zip(path, max_images):
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DatasetError(f'Cannot read "{path}" as a zip ({e}); rebuild or download it again') from e
    with zf:
        names = sorted(name for name in zf.namelist() if is_image_fname(name))[:max_images]
        try:
            meta_text = zf.read('dataset.json') if 'dataset.json' in zf.namelist() else None
        except BAD_IMAGE as e:
            raise DatasetError(f'Cannot read dataset.json in "{path}" ({e}); rebuild or download it again') from e
        yield source_from_files(names, meta_text, zf.open, path)


# Pick the reader from the path: folder, .zip, CIFAR-10 tarball or MNIST idx3 file.
def open_source(source, max_images):
    if not os.path.exists(source):
        raise DatasetError(f'Source "{source}" does not exist; pass an existing folder, zip, '
                           f'cifar-10-python.tar.gz or train-images-idx3-ubyte.gz')
    name = os.path.basename(source).lower()
    if os.path.isdir(source):
        return open_image_folder(source, max_images)
    if name.endswith('.zip'):
        return open_image_zip(source, max_images)
    if name.endswith('.tar.gz') or name.endswith('.tgz'):
        return open_cifar10(source, max_images)
    if name.endswith('idx3-ubyte.gz'):
        return open_mnist(source, max_images)
    raise DatasetError(f'Unknown source type "{source}"; expected a folder, a .zip, cifar-10-python.tar.gz or '
                       f'train-images-idx3-ubyte.gz')

# ----------------------------------------------------------------------------
# Transforms: HWC uint8 in, HWC uint8 out.

# PIL wants HxW arrays for grayscale and HxWx3 for RGB; the tool keeps HWC everywhere.
def to_pil(img):
    return PIL.Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)


def from_pil(img):
    arr = np.asarray(img)
    return arr[:, :, np.newaxis] if arr.ndim == 2 else arr


# Plain resize with Lanczos (EDM's default), skipped when the size already matches so copies stay lossless.
def resize(img, width, height, resample=PIL.Image.LANCZOS):
    if img.shape[1] == width and img.shape[0] == height:
        return img
    return from_pil(to_pil(img).resize((width, height), resample))


# Largest centered square, then resize.
def center_crop(img, width, height):
    s = min(img.shape[:2])
    y, x = (img.shape[0] - s) // 2, (img.shape[1] - s) // 2
    return resize(img[y:y + s, x:x + s], width, height)


# Largest centered crop with the output's aspect ratio, resize to WxH, then pad top and bottom with black to WxW.
def center_crop_wide(img, width, height):
    h, w = img.shape[:2]
    if w * height >= h * width:
        ch, cw = h, min(w, round(h * width / height))   # image is wider than the target: trim the sides
    else:
        ch, cw = min(h, round(w * height / width)), w   # image is taller: trim top and bottom
    y, x = (h - ch) // 2, (w - cw) // 2
    img = resize(img[y:y + ch, x:x + cw], width, height)
    canvas = np.zeros([width, width, img.shape[2]], dtype=np.uint8)
    top = (width - height) // 2
    canvas[top:top + height] = img
    return canvas


# ADM's ImageNet recipe (also EDM's): halve with a box filter while the short side is >= 2x the target,
# bicubic-scale the short side to the target, then take the centered square.
def center_crop_imagenet(img, width, height):
    pil = to_pil(img)
    while min(pil.size) >= 2 * width:
        pil = pil.resize((pil.width // 2, pil.height // 2), resample=PIL.Image.BOX)
    scale = width / min(pil.size)
    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), resample=PIL.Image.BICUBIC)
    arr = from_pil(pil)
    y, x = (arr.shape[0] - height) // 2, (arr.shape[1] - width) // 2
    return arr[y:y + height, x:x + width]


TRANSFORMS = {
    'center-crop': center_crop,
    'center-crop-wide': center_crop_wide,
    'center-crop-dhariwal': center_crop_imagenet,  # EDM's name for the ImageNet recipe
    'imagenet64': center_crop_imagenet,
}


# Decide the output shape and the per-image function before writing anything; refuse what cannot be stored.
def plan_output(shapes, transform, resolution):
    channels = sorted({c for _h, _w, c in shapes})
    sizes = sorted({(h, w) for h, w, _c in shapes})
    if transform is None and resolution is None:
        if len(sizes) > 1 or len(channels) > 1:
            raise DatasetError(f'Source images differ in size or channels (sizes {sizes[:3]}, channels {channels}); '
                               f'pass --resolution=WxH and --transform to make them uniform')
        (h, w), = sizes
        if h != w or not is_pow2(h):
            raise DatasetError(f'Source images are {w}x{h}; outputs must be square with a power-of-two side: '
                               f'pass --resolution=WxH and --transform')
        return h, channels[0], lambda img: img
    if resolution is None:
        raise DatasetError(f'--transform={transform} needs --resolution=WxH (e.g. --resolution=64x64)')
    width, height = resolution
    out = width if transform == 'center-crop-wide' else None
    if transform == 'center-crop-wide' and height > width:
        raise DatasetError(f'--transform=center-crop-wide needs W >= H, got --resolution={width}x{height}')
    if out is None:
        if width != height:
            raise DatasetError(f'--resolution={width}x{height} is not square; use e.g. --resolution={width}x{width}')
        out = width
    if not is_pow2(out):
        raise DatasetError(f'Output resolution {out}x{out} is not a power of two; use e.g. 32x32 or 64x64')
    c = max(channels)  # grayscale images join color ones as RGB
    fn = TRANSFORMS[transform] if transform is not None else resize

    def apply(img):
        img = fn(img, width, height)
        return np.repeat(img, 3, axis=2) if img.shape[2] < c else img
    return out, c, apply

# ----------------------------------------------------------------------------

# --resolution=WxH -> (W, H), as EDM spells it.
def parse_resolution(_ctx, _param, value):
    if value is None:
        return None
    parts = value.lower().split('x')
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f'"{value}" is not WxH; use e.g. --resolution=64x64')
    return int(parts[0]), int(parts[1])


@click.command()
@click.option('--source',     help='CIFAR-10 tarball, MNIST .gz, image folder or zip', metavar='PATH', required=True)
@click.option('--dest',       help='Output zip (stored) or folder', metavar='PATH', required=True)
@click.option('--max-images', help='Keep only the first N images', metavar='INT', type=options.Int(min=1))
@click.option('--transform',  help='Crop/resize recipe', type=click.Choice(sorted(TRANSFORMS)))
@click.option('--resolution', help='Output resolution, e.g. 64x64', metavar='WxH', callback=parse_resolution)
def main(source, dest, max_images, transform, resolution):
    """Convert a dataset into EDM's layout: {i:08d}[:5]/img{i:08d}.png plus dataset.json.

    \b
    python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
    python dataset_tool.py --source=downloads/mnist/train-images-idx3-ubyte.gz --dest=datasets/mnist-32x32.zip
    python dataset_tool.py --source=downloads/ffhq/images1024x1024 --dest=datasets/ffhq-64x64.zip --resolution=64x64
    python dataset_tool.py --source=downloads/imagenet/train --dest=datasets/imagenet-64x64.zip \\
        --resolution=64x64 --transform=center-crop-dhariwal
    """
    try:
        check_dest_free(dest)
        with open_source(source, max_images) as src:
            res, c, apply = plan_output(src.shapes, transform, resolution)
            num = len(src.shapes)
            with progress_bar(num, f'Writing {num} images ({res}x{res}x{c})', iterable=range(num)) as bar:
                save_dataset(dest, (apply(src.load(idx)) for idx in bar), src.labels, src.label_names)
    except DatasetError as e:
        raise click.ClickException(str(e)) from e
    except OSError as e:  # a full disk, a read-only destination, ...: nothing is left under --dest
        raise click.ClickException(os_error_message(e)) from e
    click.echo(f'Wrote {num} images to "{dest}"')


if __name__ == '__main__':
    main()
