"""Datasets made by dataset_tool.py (a zip or folder of images + dataset.json), served as uint8 CHW + one-hot labels."""

import io
import json
import os
import struct
import zipfile
import zlib

import numpy as np
import PIL.Image
import torch

import dnnlib

# ----------------------------------------------------------------------------

# What PIL and zipfile raise for a damaged image file or zip member, or an image too large to decode.
_BAD_IMAGE = (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, struct.error,
              PIL.Image.DecompressionBombError)

# The largest class index a dataset may have: labels are one-hot vectors of max + 1 entries (ImageNet-21k has 21841).
MAX_LABEL = 100_000


def parse_labels(data, where):
    """dataset.json's bytes ({"labels": [[file name, class], ...] or null}) as {file name: class}, or None for no
    labels. In UTF-8, -16 or -32 (JSON's encodings, told apart as json.loads does). Malformed files give one line
    naming the file and the fix."""
    fix = ('write it as {"labels": [["00000/img00000000.png", 6], ...]} (one [file name, class] pair per image, '
           f'class in 0..{MAX_LABEL}, as dataset_tool.py does) or {{"labels": null}}')
    try:
        meta = json.loads(data)
    except ValueError as e:
        raise ValueError(f'dataset.json in "{where}" is not valid JSON ({e}); {fix}') from None
    if not isinstance(meta, dict) or 'labels' not in meta:
        raise ValueError(f'dataset.json in "{where}" is a {type(meta).__name__} without a "labels" key; {fix}')
    entries = meta['labels']
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise ValueError(f'dataset.json in "{where}": "labels" is a {type(entries).__name__}, not a list; {fix}')
    table = {}
    for i, entry in enumerate(entries):
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
        if not ok or not isinstance(entry[1], int) or isinstance(entry[1], bool) or not 0 <= entry[1] <= MAX_LABEL:
            raise ValueError(f'dataset.json in "{where}": labels entry {i} is {json.dumps(entry)[:80]}, not a '
                             f'[file name, integer class] pair with class in 0..{MAX_LABEL}; {fix}')
        table[entry[0].replace('\\', '/')] = entry[1]
    return table


def check_network_matches(net, dataset, fix):
    """One-line error unless the network's resolution, channels and label count are the dataset's; fix: the advice."""
    got = (net.img_resolution, net.img_channels, net.label_dim)
    want = (dataset.resolution, dataset.num_channels, dataset.label_dim)
    if got != want:
        raise ValueError(f'The teacher is {got[0]}x{got[0]}x{got[1]} with {got[2]} labels, the data {want[0]}x{want[0]}x'
                         f'{want[1]} with {want[2]} labels; {fix}')


class ImageFolderDataset(torch.utils.data.Dataset):
    def __init__(self,
        path,               # Zip or folder of images, e.g. made by dataset_tool.py.
        resolution  = None, # Expected resolution; None = whatever the images are.
        max_size    = None, # Keep a random subset of this many images (before xflip); None = all.
        use_labels  = False,# Return one-hot labels from dataset.json? False = zero-length label vectors.
        xflip       = False,# Append mirrored copies, doubling the length.
        random_seed = 0,    # Seed of the max_size subset.
        cache       = False,# Keep decoded images in memory.
    ):
        self._path = os.fspath(path)
        self._zipfile = None
        self._zip_pid = None
        if os.path.isdir(self._path):
            self._type = 'dir'
            all_fnames = []
            for root, dirs, files in os.walk(self._path):
                dirs[:] = [d for d in dirs if not d.startswith('.')]
                all_fnames += [os.path.relpath(os.path.join(root, f), self._path).replace(os.sep, '/') for f in files]
        elif not os.path.exists(self._path):
            raise IOError(f'Dataset "{self._path}" does not exist; pass a zip or folder made by dataset_tool.py')
        elif zipfile.is_zipfile(self._path):
            self._type = 'zip'
            all_fnames = self._get_zipfile().namelist()
        else:
            raise IOError(f'Dataset "{self._path}" is neither a folder nor a zip; pass one made by dataset_tool.py')
        PIL.Image.init()
        self._image_fnames = sorted(f for f in all_fnames if os.path.splitext(f)[1].lower() in PIL.Image.EXTENSION
                                    and not dnnlib.util.is_hidden(f))
        if len(self._image_fnames) == 0:
            raise IOError(f'No image files found in "{self._path}"; build the dataset with dataset_tool.py')

        self._name = os.path.splitext(os.path.basename(self._path.rstrip('/')))[0]
        self._image_shape = list(self._load_raw_image(0).shape)  # [C, H, W]
        if self._image_shape[1] != self._image_shape[2]:
            raise ValueError(f'Dataset "{self._path}" has non-square {self._image_shape[2]}x{self._image_shape[1]} '
                             f'images; rebuild it with dataset_tool.py --transform=center-crop')
        if resolution is not None and self._image_shape[1] != resolution:
            raise ValueError(f'Dataset "{self._path}" has {self._image_shape[1]}x{self._image_shape[1]} images but '
                             f'resolution={resolution} was asked for; rebuild it with dataset_tool.py '
                             f'--resolution={resolution}x{resolution} or change the resolution')

        # Labels are read up front so that a missing dataset.json fails here, not inside a DataLoader worker.
        self._use_labels = use_labels
        self._raw_labels = self._load_raw_labels() if use_labels else None
        if use_labels and self._raw_labels is None:
            raise ValueError(f'Dataset "{self._path}" has no labels (dataset.json missing or "labels": null); '
                             f'train unconditionally (--cond=0) or rebuild the dataset with labels')
        self._label_dim = int(self._raw_labels.max()) + 1 if use_labels else 0

        # EDM's subset rule: shuffle all indices with the seed, keep the first max_size, restore file order.
        self._raw_idx = np.arange(len(self._image_fnames), dtype=np.int64)
        if max_size is not None and len(self._raw_idx) > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])
        self._xflip = np.zeros(len(self._raw_idx), dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])
        self._cache = dict() if cache else None
        self.close()  # reopen lazily, in whichever process reads images

    # A zip handle is opened per process: forked DataLoader workers must not share one file offset.
    def _get_zipfile(self):
        if self._zipfile is None or self._zip_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zip_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname):
        if self._type == 'dir':
            return open(os.path.join(self._path, *fname.split('/')), 'rb')
        return self._get_zipfile().open(fname, 'r')

    def close(self):
        if self._zipfile is not None and self._zip_pid == os.getpid():
            self._zipfile.close()
        self._zipfile = None

    # Pickled copies (spawned DataLoader workers) reopen the zip themselves.
    def __getstate__(self):
        return dict(self.__dict__, _zipfile=None, _zip_pid=None)

    def _load_raw_image(self, raw_idx):
        fname = self._image_fnames[raw_idx]
        with self._open_member(fname) as f:
            return self._decode(fname, f)

    def _decode(self, fname, f):
        """The image in file object f as uint8 CHW; a damaged or oversized one is a one-line error naming fname."""
        try:
            img = PIL.Image.open(f)
            img = np.array(img if img.mode in ('L', 'RGB') else img.convert('RGB'))
        except _BAD_IMAGE as e:
            raise self._unreadable(fname, e) from None
        img = img[:, :, np.newaxis] if img.ndim == 2 else img
        return img.transpose(2, 0, 1)  # HWC -> CHW

    def _open_member(self, fname):
        """_open_file, with a damaged zip entry reported as a bad image (a missing file stays an OSError)."""
        try:
            return self._open_file(fname)
        except zipfile.BadZipFile as e:
            raise self._unreadable(fname, e) from None

    def _unreadable(self, fname, e):
        return ValueError(f'Cannot read "{fname}" in "{self._path}" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); '
                          f'rebuild the dataset with dataset_tool.py')

    def verify(self, part=0, parts=1):
        """Read every image's bytes (a zip checks each member's CRC) and decode them (PIL's verify() does not
        decompress: garbage pixel data under valid chunk CRCs passes it): corrupt members and images of another size
        fail now, naming the file, rather than in the middle of a run. As costly as reading the data once;
        `part` of `parts` reads every parts-th image (the ranks of a job share the work)."""
        for fname in self._image_fnames[part::parts]:
            with self._open_member(fname) as f:
                try:
                    data = f.read()  # to the end: zipfile checks the CRC there
                except _BAD_IMAGE as e:
                    raise self._unreadable(fname, e) from None
            shape = list(self._decode(fname, io.BytesIO(data)).shape)
            if shape != self._image_shape:
                raise ValueError(f'Image "{fname}" in "{self._path}" has shape {shape} (CHW) but the dataset has '
                                 f'{self._image_shape}; rebuild it with dataset_tool.py (--resolution, --transform)')

    def _load_raw_labels(self):
        fname = 'dataset.json'
        if self._type == 'dir':
            if not os.path.isfile(os.path.join(self._path, fname)):
                return None
        elif fname not in self._get_zipfile().namelist():
            return None
        with self._open_file(fname) as f:
            table = parse_labels(f.read(), self._path)
        if table is None:
            return None
        missing = [f for f in self._image_fnames if f not in table]
        if missing:
            raise ValueError(f'dataset.json in "{self._path}" has no label for "{missing[0]}"; rebuild the dataset')
        return np.array([table[f] for f in self._image_fnames], dtype=np.int64)

    def __len__(self):
        return len(self._raw_idx)

    def __getitem__(self, idx):
        raw_idx = int(self._raw_idx[idx])
        image = self._cache.get(raw_idx) if self._cache is not None else None
        if image is None:
            image = self._load_raw_image(raw_idx)
            if list(image.shape) != self._image_shape:
                raise ValueError(f'Image "{self._image_fnames[raw_idx]}" in "{self._path}" has shape '
                                 f'{list(image.shape)} (CHW) but the dataset has {self._image_shape}; rebuild it')
            if self._cache is not None:
                self._cache[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    # One-hot float32 label of item idx; a zero-length vector when labels are off.
    def get_label(self, idx):
        onehot = np.zeros([self._label_dim], dtype=np.float32)
        if self._use_labels:
            onehot[self._raw_labels[self._raw_idx[idx]]] = 1
        return onehot

    @property
    def name(self):
        return self._name

    @property
    def image_shape(self):
        return list(self._image_shape)

    @property
    def num_channels(self):
        return self._image_shape[0]

    @property
    def resolution(self):
        return self._image_shape[1]

    @property
    def label_shape(self):
        return [self._label_dim]

    @property
    def label_dim(self):
        return self._label_dim

    @property
    def has_labels(self):
        return self._label_dim > 0

# ----------------------------------------------------------------------------
