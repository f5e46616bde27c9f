"""Hostile and careless input (issue 26 A-D, F and "also seen"): crafted pickles (nesting, memory bombs, mutation of
allow-listed classes), damaged datasets, non-finite samples and fid.py's detector, each reported as one line with
nothing written. docs/RELIABILITY.md names these tests."""

import hashlib
import io
import json
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import dnnlib
import fid
import generate
import make_pairs
import train
from dataset_tool import save_dataset
from torch_utils import persistence
from training import toy
from training.networks import EDMPrecond, iDDPMPrecond

TINY = dict(img_resolution=8, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=16, channel_mult=[1],
            num_blocks=1, attn_resolutions=[], dropout=0.0)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """16 labelled 8x8 images and a tiny teacher."""
    root = tmp_path_factory.mktemp('safety')
    rng = np.random.default_rng(0)
    save_dataset(str(root / 'cond.zip'), [rng.integers(0, 256, size=[8, 8, 3], dtype=np.uint8) for _ in range(16)],
                 [i % 4 for i in range(16)])
    torch.manual_seed(0)
    with open(root / 'teacher.pkl', 'wb') as f:
        pickle.dump(dict(ema=EDMPrecond(**TINY)), f)
    return root


def one_error_line(r):
    """Exit code 1 and one `Error: ...` line (besides progress lines), no traceback; returns that line."""
    errors = [line for line in r.output.splitlines() if line.startswith('Error: ')]
    assert r.exit_code == 1 and len(errors) == 1 and 'Traceback' not in r.output, (r.exit_code, r.output, r.exception)
    return errors[0]


def cli(command, files, tmp_path, pkl):
    """Every command line that loads a network pickle, reading `pkl`; returns (click result, its output path)."""
    out = tmp_path / 'out'
    args = {
        'teacher': (train.main, ['--method=dmd', f'--teacher={pkl}', '--batch=8', '--device=cpu', f'--outdir={out}']),
        'transfer': (train.main, [f'--data={files / "cond.zip"}', f'--transfer={pkl}', '--cond=1',
                                  '--arch=ddpmpp', '--cbase=16', '--cres=1', '--device=cpu', f'--outdir={out}']),
        'generate': (generate.main, [f'--network={pkl}', f'--outdir={out}', '--seeds=0-1', '--device=cpu']),
        'make_pairs': (make_pairs.main, [f'--teacher={pkl}', f'--outdir={out}', '--seeds=0-1', '--device=cpu']),
    }[command]
    return CliRunner().invoke(args[0], args[1]), out

# ----------------------------------------------------------------------------
# A: nesting. Bytes written opcode by opcode: Python's pickler would itself overflow on such data.

def deep_list(n):
    """[[[...]]] nested n deep: n EMPTY_LISTs, then n-1 APPENDs."""
    return b'\x80\x04' + b']' * n + b'a' * (n - 1) + b'.'


def self_list():
    """a = [a]: EMPTY_LIST, MEMOIZE, BINGET 0, APPEND."""
    return b'\x80\x04]\x94h\x00a.'


def self_kwargs():
    """A network whose stored constructor arguments contain themselves."""
    net = EDMPrecond(**TINY)
    loop = []
    loop.append(loop)
    net._init_kwargs['extra'] = loop
    return pickle.dumps(dict(ema=net))


@pytest.mark.parametrize('make', [lambda: deep_list(100_000), self_list, self_kwargs])
def test_nesting_is_a_pickle_load_error(make):
    with pytest.raises(persistence.PickleLoadError, match='more than 100 levels deep') as info:
        persistence.load(io.BytesIO(make()))
    assert '\n' not in str(info.value)


def test_nesting_within_the_bound_loads():
    data = persistence.load(io.BytesIO(deep_list(persistence.MAX_DEPTH)))
    for _ in range(persistence.MAX_DEPTH - 1):
        data = data[0]
    assert data == []


@pytest.mark.parametrize('command', ['teacher', 'transfer', 'generate', 'make_pairs'])
def test_nested_pickle_is_one_line_in_every_command(files, tmp_path, command):
    pkl = tmp_path / 'deep.pkl'
    pkl.write_bytes(deep_list(100_000))
    r, out = cli(command, files, tmp_path, pkl)
    assert str(pkl) in one_error_line(r) and 'levels deep' in r.output
    assert not out.exists()

# ----------------------------------------------------------------------------
# C: a pickle may not change the classes and functions the safe loader hands out.

def unicode(text):
    """SHORT_BINUNICODE."""
    return b'\x8c' + bytes([len(text)]) + text.encode()


HELLO = unicode('hello') + unicode('world')
# What a pickle can do to the object below on the stack: BUILD with a __dict__ or a slot state, and item assignment,
# append, extend and add (which these objects lack).
MUTATIONS = {'BUILD dict': b'}' + HELLO + b'sb', 'BUILD slots': b'N}' + HELLO + b's\x86b', 'SETITEM': HELLO + b's',
             'APPEND': HELLO + b'0a', 'APPENDS': b'(' + HELLO + b'e', 'ADDITEMS': b'(' + HELLO + b'\x90'}


@pytest.mark.parametrize('mutation', sorted(MUTATIONS))
@pytest.mark.parametrize('module, name', sorted(persistence._safe_globals))
def test_an_allow_listed_global_cannot_be_changed(module, name, mutation):
    obj = persistence._safe_globals[module, name]
    before = dict(vars(obj)) if hasattr(obj, '__dict__') else None
    data = b'\x80\x04' + unicode(module) + unicode(name) + b'\x93' + MUTATIONS[mutation] + b'.'
    with pytest.raises(persistence.PickleLoadError) as info:
        persistence.load(io.BytesIO(data))
    if mutation.startswith('BUILD'):
        assert 'sets attributes of' in str(info.value)
    assert not hasattr(obj, 'hello') and (dict(vars(obj)) if hasattr(obj, '__dict__') else None) == before


def test_build_on_a_persisted_stand_in_is_refused():
    """A stand-in's class name is checked when it is made; BUILD could change it afterwards."""
    meta = dict(type='class', version=6, class_name='EDMLoss', state={})
    data = pickle.dumps(meta, protocol=2)[2:-1]  # the dict's opcodes, without PROTO and STOP
    data = (b'\x80\x04' + unicode('torch_utils.persistence') + unicode('_reconstruct_persistent_obj') + b'\x93' + data
            + b'\x85R}' + unicode('class_name') + unicode('Unknown') + b'sb.')
    with pytest.raises(persistence.PickleLoadError, match='sets attributes of _Persisted'):
        persistence.load(io.BytesIO(data))

# ----------------------------------------------------------------------------
# B: the network built from a file is bounded by the bytes the file stores, before anything is allocated.

class ViewPickler(pickle.Pickler):
    """Pickles every tensor as torch does (EDM's _rebuild_tensor_v2 over a _load_from_bytes storage), but as a view
    of one shared `storage` with the given strides, so that a small file can describe large tensors."""
    def __init__(self, file, storage, strides):
        super().__init__(file, protocol=4)
        self.storage, self.strides = storage, strides

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Parameter):
            return torch._utils._rebuild_parameter, (obj.data, obj.requires_grad, dict())
        if isinstance(obj, torch.Tensor):
            return torch._utils._rebuild_tensor_v2, (self.storage, 0, tuple(obj.shape), self.strides(obj), False, dict())
        return NotImplemented


def views_of_one_storage(model_channels, storage_numel, stride0=False):
    """A snapshot of TINY's network claiming `model_channels`, each tensor a view of one storage of `storage_numel`
    floats (None: as many as the largest tensor has): contiguous (the tensors overlap) or with stride 0."""
    kwargs = dict(TINY, model_channels=model_channels)
    with torch.device('meta'):
        shapes = {k: t.shape for k, t in EDMPrecond(**kwargs).state_dict().items()}
    net = EDMPrecond(**TINY)
    for name, shape in shapes.items():
        *path, leaf = name.split('.')
        module = net.get_submodule('.'.join(path))
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(torch.zeros(shape), requires_grad=False)
        else:
            module._buffers[leaf] = torch.zeros(shape)
    net._init_kwargs = kwargs
    strides = (lambda t: (0,) * t.ndim) if stride0 else (lambda t: t.stride())
    storage = torch.zeros(storage_numel or max(shape.numel() for shape in shapes.values()))._typed_storage()
    f = io.BytesIO()
    ViewPickler(f, storage, strides).dump(dict(ema=net))
    return f.getvalue()


def many_blocks(num_blocks):
    """TINY's snapshot with `num_blocks` in its stored arguments (the file holds one block's tensors)."""
    net = EDMPrecond(**TINY)
    net._init_kwargs['num_blocks'] = num_blocks
    return pickle.dumps(dict(ema=net))


def many_noise_levels(M):
    """A small iDDPM network's snapshot with `M` in its stored arguments: its constructor fills a table of M + 1 noise
    levels on the CPU, even on the meta device."""
    net = iDDPMPrecond(img_resolution=8, img_channels=3, model_type='DhariwalUNet', model_channels=8, channel_mult=[1],
                       num_blocks=1, attn_resolutions=[])
    net._init_kwargs['M'] = M
    return pickle.dumps(dict(ema=net))


BOMBS = {  # name: (bytes, message)
    'stride 0': (lambda: views_of_one_storage(256, 1, stride0=True), 'needs 1024 elements of a storage that holds 1'),
    'storage grown to fit': (lambda: views_of_one_storage(256, 1024), 'needs 262144 elements of a storage that holds 1024'),
    'views of one storage': (lambda: views_of_one_storage(256, None), 'describe a network larger than the tensors stored'),
    'many blocks': (lambda: many_blocks(3000), 'describe a network larger than the tensors stored'),
    'many noise levels': (lambda: many_noise_levels(200_000), 'describe a network larger than the tensors stored'),
}


@pytest.mark.parametrize('name', sorted(BOMBS))
def test_a_network_is_bounded_by_the_bytes_stored(name, monkeypatch):
    make, message = BOMBS[name]
    data = make()
    assert len(data) < 6_000_000  # a few MB at most, each describing a network many times larger
    def table_computed(self, j):
        raise RuntimeError('the table of noise levels was computed')  # would take minutes for M = 200,000
    monkeypatch.setattr(iDDPMPrecond, 'alpha_bar', table_computed)
    with pytest.raises(persistence.PickleLoadError, match=message):
        persistence.load(io.BytesIO(data))


def test_a_mixture_larger_than_memory_is_a_pickle_load_error():
    """GMMDenoiser builds its mixture with numpy (beyond the meta device's bound): numpy refuses 87 TiB up front."""
    net = toy.GMMDenoiser(img_resolution=4, img_channels=3, num_components=3)
    net._init_kwargs['img_resolution'] = 10**6
    with pytest.raises(persistence.PickleLoadError, match='cannot construct training.toy.GMMDenoiser .*MemoryError'):
        persistence.load(io.BytesIO(pickle.dumps(dict(ema=net))))


@pytest.mark.parametrize('command', ['teacher', 'generate'])
def test_a_memory_bomb_is_one_line(files, tmp_path, command):
    pkl = tmp_path / 'bomb.pkl'
    pkl.write_bytes(views_of_one_storage(256, 1, stride0=True))
    r, out = cli(command, files, tmp_path, pkl)
    assert 'needs 1024 elements' in one_error_line(r) and not out.exists()

# ----------------------------------------------------------------------------
# D: datasets. Images whose PNG chunks are intact (valid CRCs) but whose pixels cannot be decoded, decompression
# bombs, labels out of range, damaged zips and dataset.json encodings: one line naming the member, nothing written.

def png_chunks(png):
    """[(type, data)] of a PNG's chunks."""
    pos, out = 8, []
    while pos < len(png):
        n, = struct.unpack('>I', png[pos:pos + 4])
        out.append((png[pos + 4:pos + 8], png[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def png_from_chunks(chunks):
    """A PNG of these chunks, each with a valid CRC."""
    return b'\x89PNG\r\n\x1a\n' + b''.join(struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))
                                           for t, d in chunks)


def png_bytes(seed=0):
    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, [8, 8, 3], dtype=np.uint8)).save(buf, format='PNG')
    return buf.getvalue()


def garbage_pixels():
    """Intact chunks whose compressed pixel data is not zlib data: PIL's verify() passes it, decoding fails."""
    return png_from_chunks([(t, bytes(range(len(d))) if t == b'IDAT' else d) for t, d in png_chunks(png_bytes())])


def decompression_bomb():
    """A header claiming 20000x20000 pixels (over twice PIL's MAX_IMAGE_PIXELS, so PIL refuses to open it)."""
    return png_from_chunks([(t, struct.pack('>II', 20000, 20000) + d[8:] if t == b'IHDR' else d)
                            for t, d in png_chunks(png_bytes())])


def dataset_zip(path, replace=None, meta=None):
    """A stored zip of 4 labelled 8x8 PNGs in dataset_tool's layout; `replace` maps a member to other bytes, `meta`
    is dataset.json's bytes."""
    names = [f'00000/img0000000{i}.png' for i in range(4)]
    meta = json.dumps(dict(labels=[[n, i % 2] for i, n in enumerate(names)])).encode() if meta is None else meta
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as zf:
        for i, name in enumerate(names):
            zf.writestr(name, (replace or {}).get(name, png_bytes(i)))
        zf.writestr('dataset.json', meta)
    return path


def crc_damaged(path):
    """dataset_zip with one byte of member 2's data flipped: its zip CRC no longer matches."""
    dataset_zip(path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo('00000/img00000002.png')
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def run_tool(tool, data, tmp_path):
    """train.py (conditional), dataset_tool.py or fid.py ref reading `data`; returns (result, what it would write)."""
    out = tmp_path / 'out'
    if tool == 'train':
        args = (train.main, [f'--data={data}', '--cond=1', '--arch=ddpmpp', '--cbase=16', '--cres=1', '--device=cpu',
                             f'--outdir={out}'])
    elif tool == 'dataset_tool':
        args = (dataset_tool.main, [f'--source={data}', f'--dest={out}.zip'])
        out = tmp_path / 'out.zip'
    else:
        args = (fid.main, ['ref', f'--data={data}', f'--dest={out}.npz', '--detector=pixels'])
        out = tmp_path / 'out.npz'
    return CliRunner().invoke(*args), out


DATASET_CASES = {  # name: (make the data, the tools, text of the one-line error)
    'garbage pixels': (lambda p: dataset_zip(p, {'00000/img00000002.png': garbage_pixels()}),
                       ['train', 'dataset_tool', 'fid'], '"00000/img00000002.png"'),
    'decompression bomb': (lambda p: dataset_zip(p, {'00000/img00000002.png': decompression_bomb()}),
                           ['train', 'dataset_tool', 'fid'], '"00000/img00000002.png"'),
    'crc error': (crc_damaged, ['train', 'dataset_tool', 'fid'], '"00000/img00000002.png"'),
    'label 1e9': (lambda p: dataset_zip(p, meta=b'{"labels": [["00000/img00000000.png", 1000000000]]}'),
                  ['train', 'dataset_tool'], 'class in 0..100000'),
    'label 2**64': (lambda p: dataset_zip(p, meta=b'{"labels": [["00000/img00000000.png", 18446744073709551616]]}'),
                    ['train', 'dataset_tool'], 'class in 0..100000'),
    'dataset.json not text': (lambda p: dataset_zip(p, meta=b'\xff\xfa\x00{'), ['train', 'dataset_tool'],
                              'dataset.json in'),
}


@pytest.mark.parametrize('name, tool', [(n, t) for n, (_m, tools, _e) in sorted(DATASET_CASES.items()) for t in tools])
def test_bad_datasets_are_one_line(tmp_path, name, tool):
    make, _tools, text = DATASET_CASES[name]
    r, out = run_tool(tool, make(tmp_path / 'data.zip'), tmp_path)
    assert text in one_error_line(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data.zip'] and not out.exists()


def test_labels_out_of_range_are_refused_by_save_dataset(tmp_path):
    for label in [100_001, 2**64]:
        with pytest.raises(dataset_tool.DatasetError, match='labels must be integers in 0..100000'):
            save_dataset(str(tmp_path / 'out.zip'), [np.zeros([8, 8, 3], np.uint8)], [label])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('encoding', ['utf-8', 'utf-16', 'utf-32'])
def test_dataset_json_in_any_json_encoding_reads_the_same_everywhere(tmp_path, encoding):
    """One rule for dataset.json in train.py and dataset_tool.py: JSON's encodings (RFC 8259), detected as json.loads
    does for bytes."""
    from training.dataset import ImageFolderDataset
    labels = [[f'00000/img0000000{i}.png', 3 - i] for i in range(4)]
    data = dataset_zip(tmp_path / 'data.zip', meta=json.dumps(dict(labels=labels)).encode(encoding))
    ds = ImageFolderDataset(data, use_labels=True)
    assert [int(np.argmax(ds.get_label(i))) for i in range(4)] == [3, 2, 1, 0]
    r = CliRunner().invoke(dataset_tool.main, [f'--source={data}', f'--dest={tmp_path / "out.zip"}'])
    assert r.exit_code == 0, r.output
    with zipfile.ZipFile(tmp_path / 'out.zip') as zf:
        assert json.loads(zf.read('dataset.json'))['labels'] == labels

# ----------------------------------------------------------------------------
# F: non-finite samples are never written (as black images, pairs or a metric): one line naming the seeds, exit 1.

@pytest.fixture(scope='module')
def nan_teacher(files):
    """TINY's network with one NaN weight (its output layer's bias): every sample is NaN."""
    torch.manual_seed(0)
    net = EDMPrecond(**TINY)
    with torch.no_grad():
        net.model.dec['8x8_aux_conv'].bias[0] = float('nan')
    path = files / 'nan.pkl'
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net), f)
    return path


@pytest.mark.parametrize('command', ['generate', 'make_pairs'])
def test_nonfinite_samples_are_not_written(files, nan_teacher, tmp_path, command):
    r, out = cli(command, files, tmp_path, nan_teacher)
    assert 'non-finite values for seed(s) 0, 1' in one_error_line(r)
    assert not out.exists() or [p.name for p in out.iterdir()] == []


def test_nonfinite_samples_stop_the_in_training_metric(files, tmp_path):
    from training import training_loop as loop_module

    class NaNGenerator:
        net = EDMPrecond(**TINY)

        def networks(self):
            return dict(net=self.net)

        def sample(self, z, c):
            return torch.full_like(z, float('nan'))

    ref = tmp_path / 'ref.npz'
    np.savez(ref, mu=np.zeros(192), sigma=np.eye(192))
    with pytest.raises(dnnlib.util.RunError, match=r'Training diverged at 0.008 kimg: .*non-finite values for seed\(s\) '
                                                   r'0, 1, 2, .* and \d+ more'):
        loop_module._run_metrics(NaNGenerator(), ['fid1k'], dict(detector='pixels', ref=str(ref)), str(tmp_path), 8,
                                 torch.device('cpu'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ref.npz']  # no metric-fid1k.jsonl

# ----------------------------------------------------------------------------
# Also seen: --detector naming nothing, fid.py ref --dest naming a directory, the cached official detector's hash.

def test_unknown_detector_is_no_such_detector(files, tmp_path):
    ref = tmp_path / 'ref.npz'
    np.savez(ref, mu=np.zeros(3), sigma=np.eye(3))
    r = CliRunner().invoke(fid.main, ['calc', f'--images={files / "cond.zip"}', f'--ref={ref}', '--detector=foo'])
    assert 'No such detector "foo": use inception, vgg16, pixels' in one_error_line(r)
    r = CliRunner().invoke(train.main, ['--method=dmd', f'--teacher={files / "teacher.pkl"}', '--batch=8', '--device=cpu',
                                        '--metrics=fid1k', f'--ref={ref}', '--detector=foo', f'--outdir={tmp_path / "out"}'])
    assert '--detector: No such detector "foo"' in one_error_line(r) and not (tmp_path / 'out').exists()


def test_fid_ref_into_a_directory_is_one_line_before_the_pass(files, tmp_path, monkeypatch):
    monkeypatch.setattr(fid, '_init', lambda *args: pytest.fail('the pass over the data started'))
    r = CliRunner().invoke(fid.main, ['ref', f'--data={files / "cond.zip"}', f'--dest={tmp_path}', '--detector=pixels'])
    assert f'--dest "{tmp_path}" is a directory' in one_error_line(r) and list(tmp_path.iterdir()) == []


class FakeResponse:
    """What requests.Session.get returns, serving `content`."""
    def __init__(self, content):
        self.content = content

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        pass


def test_cached_official_detector_is_checked_against_its_recorded_hash(tmp_path, monkeypatch):
    import requests
    from training import metrics
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    official = pickle.dumps(torch.nn.Identity())
    monkeypatch.setattr(requests.Session, 'get', lambda self, url, **kwargs: FakeResponse(official))
    cache = dnnlib.util.url_cache_path(metrics.INCEPTION_URL)

    assert isinstance(metrics.load_detector('inception'), torch.nn.Identity)  # downloaded: its hash is recorded
    assert open(cache + '.sha256').read().strip() == hashlib.sha256(official).hexdigest()
    assert isinstance(metrics.load_detector('inception'), torch.nn.Identity)  # cached, the same bytes

    replaced = pickle.dumps(torch.nn.ReLU())  # as a file planted in the cache would be: it would run code
    dnnlib.util.atomic_write(cache, lambda f: f.write(replaced))
    with pytest.raises(ValueError, match='its sha256 differs from the one recorded when it was downloaded'):
        metrics.load_detector('inception')
    assert isinstance(metrics.load_detector('inception', trust=True), torch.nn.ReLU)  # trusted: recorded
    assert isinstance(metrics.load_detector('inception'), torch.nn.ReLU)

    os.remove(cache + '.sha256')  # placed by hand (the offline route): trusted once, then recorded
    with pytest.raises(ValueError, match='it was not downloaded by this project'):
        metrics.load_detector('inception')
    assert isinstance(metrics.load_detector('inception', trust=True), torch.nn.ReLU)
    assert isinstance(metrics.load_detector('inception'), torch.nn.ReLU)
