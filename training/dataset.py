"""Datasets made by dataset_tool.py (a zip or folder of images + dataset.json), served as uint8 CHW + one-hot labels."""

import json
import os
import zipfile

import numpy as np
import PIL.Image
import torch

# ----------------------------------------------------------------------------

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
            all_fnames = [os.path.relpath(os.path.join(root, f), self._path).replace(os.sep, '/')
                          for root, _dirs, files in os.walk(self._path) for f in files]
        elif not os.path.exists(self._path):
            raise IOError(f'Dataset "{self._path}" does not exist; pass a zip or folder made by dataset_tool.py')
        elif zipfile.is_zipfile(self._path):
            self._type = 'zip'
            all_fnames = self._get_zipfile().namelist()
        else:
            raise IOError(f'Dataset "{self._path}" is neither a folder nor a zip; pass one made by dataset_tool.py')
        PIL.Image.init()
        self._image_fnames = sorted(f for f in all_fnames if os.path.splitext(f)[1].lower() in PIL.Image.EXTENSION)
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
        with self._open_file(fname) as f:
            img = PIL.Image.open(f)
            img = np.array(img if img.mode in ('L', 'RGB') else img.convert('RGB'))
        img = img[:, :, np.newaxis] if img.ndim == 2 else img
        return img.transpose(2, 0, 1)  # HWC -> CHW

    def _load_raw_labels(self):
        fname = 'dataset.json'
        if self._type == 'dir':
            if not os.path.isfile(os.path.join(self._path, fname)):
                return None
        elif fname not in self._get_zipfile().namelist():
            return None
        with self._open_file(fname) as f:
            entries = json.load(f).get('labels')
        if entries is None:
            return None
        table = {str(entry[0]).replace('\\', '/'): entry[1] for entry in entries}
        missing = [f for f in self._image_fnames if f not in table]
        if missing:
            raise ValueError(f'dataset.json in "{self._path}" has no label for "{missing[0]}"; rebuild the dataset')
        labels = [table[f] for f in self._image_fnames]
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in labels):
            raise ValueError(f'dataset.json in "{self._path}" has labels that are not non-negative integers')
        return np.array(labels, dtype=np.int64)

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
