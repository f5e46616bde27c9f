"""training/dataset.py: ImageFolderDataset on datasets written by dataset_tool.save_dataset."""

import json
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch

import dataset_tool
from training.dataset import ImageFolderDataset

LABELS = [0, 2, 1, 2, 0, 1]


def make_images(n=6, res=8, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=[n, res, res, channels], dtype=np.uint8)


@pytest.fixture(params=['data.zip', 'data'])
def dataset_path(request, tmp_path):
    images = make_images()
    path = str(tmp_path / request.param)
    dataset_tool.save_dataset(path, list(images), LABELS)
    return path, images


def test_items_and_properties(dataset_path):
    path, images = dataset_path
    ds = ImageFolderDataset(path, use_labels=True)
    assert len(ds) == 6
    assert (ds.name, ds.resolution, ds.num_channels) == ('data', 8, 3)
    assert (ds.image_shape, ds.label_shape, ds.label_dim, ds.has_labels) == ([3, 8, 8], [3], 3, True)
    for i in range(6):
        image, label = ds[i]
        assert image.dtype == np.uint8 and label.dtype == np.float32
        np.testing.assert_array_equal(image, images[i].transpose(2, 0, 1))
        np.testing.assert_array_equal(label, np.eye(3, dtype=np.float32)[LABELS[i]])
        np.testing.assert_array_equal(ds.get_label(i), label)
    with pytest.raises(IndexError):
        ds[6]


def test_no_labels(dataset_path):
    path, images = dataset_path
    ds = ImageFolderDataset(path, resolution=8)
    assert (ds.label_shape, ds.label_dim, ds.has_labels) == ([0], 0, False)
    image, label = ds[3]
    assert label.shape == (0,) and label.dtype == np.float32
    np.testing.assert_array_equal(image, images[3].transpose(2, 0, 1))


def test_xflip(dataset_path):
    path, images = dataset_path
    ds = ImageFolderDataset(path, use_labels=True, xflip=True)
    assert len(ds) == 12
    for i in range(12):
        image, label = ds[i]
        expected = images[i % 6].transpose(2, 0, 1)
        np.testing.assert_array_equal(image, expected[:, :, ::-1] if i >= 6 else expected)
        np.testing.assert_array_equal(label, np.eye(3, dtype=np.float32)[LABELS[i % 6]])


def test_max_size_subset(dataset_path):
    path, images = dataset_path
    subsets = {}
    for seed in range(4):
        ds = ImageFolderDataset(path, max_size=4, random_seed=seed, use_labels=True)
        perm = np.arange(6)
        np.random.RandomState(seed).shuffle(perm)
        expected = sorted(perm[:4])  # EDM's rule: shuffle with the seed, keep the first max_size, file order
        got = [int(np.flatnonzero([np.array_equal(ds[i][0], im.transpose(2, 0, 1)) for im in images])[0])
               for i in range(len(ds))]
        assert got == expected
        assert [int(np.argmax(ds[i][1])) for i in range(4)] == [LABELS[j] for j in expected]
        again = ImageFolderDataset(path, max_size=4, random_seed=seed)
        assert all(np.array_equal(again[i][0], ds[i][0]) for i in range(4))  # deterministic
        subsets[seed] = tuple(got)
    assert len(set(subsets.values())) > 1  # the seed matters
    assert len(ImageFolderDataset(path, max_size=6)) == 6 and len(ImageFolderDataset(path, max_size=4, xflip=True)) == 8


def test_cache_serves_decoded_images(tmp_path):
    images = make_images(n=2, channels=1)
    path = tmp_path / 'gray'
    dataset_tool.save_dataset(str(path), list(images), None)
    ds = ImageFolderDataset(str(path), cache=True)
    uncached = ImageFolderDataset(str(path), cache=False)
    assert ds.image_shape == [1, 8, 8]
    first = ds[1][0]
    np.testing.assert_array_equal(first, images[1].transpose(2, 0, 1))
    os.remove(path / '00000' / 'img00000001.png')
    np.testing.assert_array_equal(ds[1][0], first)  # from memory
    with pytest.raises(FileNotFoundError):
        uncached[1]  # nothing cached: the file is read again


def test_dataloader_workers_read_zip(tmp_path):
    images = make_images(n=8, seed=1)
    path = str(tmp_path / 'w.zip')
    dataset_tool.save_dataset(path, list(images), list(range(8)))
    ds = ImageFolderDataset(path, use_labels=True)
    ds[0]  # the parent opens the zip; forked workers must reopen their own
    copy = pickle.loads(pickle.dumps(ds))  # picklable (spawned workers): the open zip is not carried along
    np.testing.assert_array_equal(copy[5][0], images[5].transpose(2, 0, 1))
    ctx = 'fork' if 'fork' in torch.multiprocessing.get_all_start_methods() else None
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context=ctx)
    got_images, got_labels = zip(*[(x, y) for x, y in loader])
    np.testing.assert_array_equal(torch.cat(got_images).numpy(), images.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(torch.cat(got_labels).numpy(), np.eye(8, dtype=np.float32))


def test_errors(tmp_path):
    with pytest.raises(IOError, match='does not exist'):
        ImageFolderDataset(str(tmp_path / 'missing.zip'))
    (tmp_path / 'notes.txt').write_text('x')
    with pytest.raises(IOError, match='neither a folder nor a zip'):
        ImageFolderDataset(str(tmp_path / 'notes.txt'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(IOError, match='No image files found'):
        ImageFolderDataset(str(tmp_path / 'empty'))

    dataset_tool.save_dataset(str(tmp_path / 'd.zip'), list(make_images(n=2)), None)
    with pytest.raises(ValueError, match=r'has 8x8 images but resolution=16 was asked for'):
        ImageFolderDataset(str(tmp_path / 'd.zip'), resolution=16)
    with pytest.raises(ValueError, match=r'has no labels \(dataset.json missing or "labels": null\)'):
        ImageFolderDataset(str(tmp_path / 'd.zip'), use_labels=True)

    wide = tmp_path / 'wide'
    wide.mkdir()
    PIL.Image.fromarray(np.zeros([4, 8, 3], np.uint8)).save(wide / 'a.png')
    with pytest.raises(ValueError, match='non-square 8x4 images'):
        ImageFolderDataset(str(wide))
    plain = tmp_path / 'plain'
    plain.mkdir()
    PIL.Image.fromarray(np.zeros([4, 4, 3], np.uint8)).save(plain / 'a.png')
    with pytest.raises(ValueError, match='has no labels'):
        ImageFolderDataset(str(plain), use_labels=True)  # no dataset.json at all

    mixed = tmp_path / 'mixed'
    mixed.mkdir()
    PIL.Image.fromarray(np.zeros([4, 4, 3], np.uint8)).save(mixed / 'a.png')
    PIL.Image.fromarray(np.zeros([8, 8, 3], np.uint8)).save(mixed / 'b.png')
    (mixed / 'dataset.json').write_text(json.dumps({'labels': [['a.png', 0]]}))
    with pytest.raises(ValueError, match='has no label for "b.png"'):
        ImageFolderDataset(str(mixed), use_labels=True)
    ds = ImageFolderDataset(str(mixed))
    with pytest.raises(ValueError, match=r'"b.png" .* has shape \[3, 8, 8\] \(CHW\) but the dataset has \[3, 4, 4\]'):
        ds[1]
