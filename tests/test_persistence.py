"""Safe reading of EDM pickles: official layout without executing embedded code, refusals, opt-in execution,
round trips of our own snapshots, and clear errors on malformed files."""

import inspect
import io
import os
import pickle
import sys

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import persistence
from training import augment, loss, networks, toy

# Tiny networks covering each preconditioner and backbone variant the loader must rebuild.
CONFIGS = {
    'edm-ddpmpp': (networks.EDMPrecond, dict(img_resolution=8, img_channels=3, label_dim=2, augment_dim=9, model_type='SongUNet',
                   model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.13)),
    'vp-ddpmpp': (networks.VPPrecond, dict(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=8,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])),
    've-ncsnpp': (networks.VEPrecond, dict(img_resolution=8, img_channels=3, label_dim=3, model_type='SongUNet', model_channels=8,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], embedding_type='fourier', channel_mult_noise=2,
                  encoder_type='residual', decoder_type='skip', resample_filter=[1, 3, 3, 1])),
    'iddpm-adm': (networks.iDDPMPrecond, dict(img_resolution=8, img_channels=3, label_dim=2, model_type='DhariwalUNet',
                  model_channels=16, channel_mult=[1, 4], num_blocks=1, attn_resolutions=[4])),
    'gmm': (toy.GMMDenoiser, dict(img_resolution=4, img_channels=3, num_components=3, label_dim=3)),
}

# Every global an official EDM snapshot contains (numpy's scalar under either module name).
EDM_GLOBALS = {'torch_utils.persistence._reconstruct_persistent_obj', 'collections.OrderedDict', 'torch._utils._rebuild_tensor_v2',
               'torch._utils._rebuild_parameter', 'torch.storage._load_from_bytes', 'torch.nn.modules.container.ModuleDict', 'numpy.dtype'}
NUMPY_SCALAR = {'numpy.core.multiarray.scalar', 'numpy._core.multiarray.scalar'}

BOOBY_TRAP = "raise RuntimeError('module_src was executed')\n"


def make_net(config, seed=0):
    cls, kwargs = CONFIGS[config]
    torch.manual_seed(seed)
    net = cls(**kwargs).eval().requires_grad_(False)  # as EDM's 'ema' entry
    for p in net.parameters():
        p.copy_(torch.randn_like(p))  # zero-initialised layers must not hide a loading error
    return net


def run_net(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([2, net.img_channels, net.img_resolution, net.img_resolution], generator=g)
    labels = torch.eye(net.label_dim)[[0, 1]] if net.label_dim else None
    with torch.no_grad():
        return net(x, torch.tensor([0.3, 5.0]), labels)


class EDMStylePickler(pickle.Pickler):
    """pickle.dump as EDM's training loop does it, with each persistent object's module_src prefixed by `prefix`."""
    def __init__(self, file, prefix):
        super().__init__(file, protocol=4)
        self.prefix = prefix

    def reducer_override(self, obj):
        if not persistence.is_persistent(type(obj)):
            return NotImplemented
        func, (meta,), *rest = obj.__reduce__()
        src = self.prefix + inspect.getsource(sys.modules[type(obj).__module__])
        return (func, (dict(meta, module_src=src),), *rest)


def official_snapshot(net, prefix=BOOBY_TRAP):
    """Bytes laid out like edm-*.pkl: the dict keys, persistent objects with embedded source, numpy scalars."""
    data = dict(ema=net, loss_fn=loss.EDMLoss(P_mean=-1.1, P_std=1.3), augment_pipe=augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1),
                dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='datasets/cifar10-32x32.zip',
                                    use_labels=True, xflip=False, cache=True, resolution=32, max_size=np.int64(50000)))
    f = io.BytesIO()
    EDMStylePickler(f, prefix).dump(data)
    return f.getvalue()


class Anything:
    """Stands in for every global when listing a pickle's globals without running them."""
    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def pickle_globals(data):
    found = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.add(f'{module}.{name}')
            return Anything
    Recorder(io.BytesIO(data)).load()
    return found


class Call:
    """Pickles as `func(*args)`: the shape of a malicious pickle."""
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def write(path, data):
    path.write_bytes(data)
    return str(path)

# ----------------------------------------------------------------------------

@pytest.mark.parametrize('config', list(CONFIGS))
def test_official_layout_loads_without_executing_code(config, tmp_path):
    net = make_net(config)
    data = official_snapshot(net)
    found = pickle_globals(data)
    not_used = {'torch.nn.modules.container.ModuleDict', 'torch._utils._rebuild_parameter'} if config == 'gmm' else set()  # buffers only
    assert found - NUMPY_SCALAR == EDM_GLOBALS - not_used
    assert len(found & NUMPY_SCALAR) == 1

    execed_before = dict(persistence._src_to_module_dict)
    path = write(tmp_path / 'edm.pkl', data)
    with open(path, 'rb') as f:
        out = persistence.load(f)
    assert persistence._src_to_module_dict == execed_before  # no embedded source was exec'd into a module
    assert list(out) == ['ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs']
    ema = out['ema']
    assert type(ema) is type(net) and type(ema).__module__ == type(net).__module__
    assert ema.training is False and not any(p.requires_grad for p in ema.parameters())
    ref, got = net.state_dict(), ema.state_dict()
    assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert torch.equal(run_net(ema), run_net(net))

    assert type(out['loss_fn']) is loss.EDMLoss
    assert (out['loss_fn'].P_mean, out['loss_fn'].P_std, out['loss_fn'].sigma_data) == (-1.1, 1.3, 0.5)
    assert type(out['augment_pipe']) is augment.AugmentPipe
    assert (out['augment_pipe'].p, out['augment_pipe'].xflip, out['augment_pipe'].yflip, out['augment_pipe'].scale) == (0.12, 1e8, 1, 0)
    assert out['dataset_kwargs']['max_size'] == 50000 and out['dataset_kwargs']['path'] == 'datasets/cifar10-32x32.zip'


def test_plain_unpickling_refuses_embedded_code():
    data = official_snapshot(make_net('edm-ddpmpp'))
    with pytest.raises(RuntimeError, match='Refusing to execute source code'):
        pickle.loads(data)  # the writer's global alone never execs: the booby trap would raise a different error


def test_allow_code_executes_module_src(tmp_path):
    net = make_net('edm-ddpmpp')
    marker = tmp_path / 'executed'
    data = official_snapshot(net, prefix=f'open({str(marker)!r}, "w").close()\n')
    with open(write(tmp_path / 'edm.pkl', data), 'rb') as f:
        out = persistence.load(f, allow_code=True)
    assert marker.exists()
    assert type(out['ema']).__module__.startswith('_imported_module_')  # the class comes from the file's source
    assert torch.equal(run_net(out['ema']), run_net(net))
    assert persistence._code_execution_allowed is False


def test_allow_code_restores_the_gate_when_the_code_fails():
    with pytest.raises(RuntimeError, match='module_src was executed'):
        persistence.load(io.BytesIO(official_snapshot(make_net('vp-ddpmpp'))), allow_code=True)
    assert persistence._code_execution_allowed is False


@pytest.mark.parametrize('make_payload, name', [
    (lambda marker: Call(os.system, f'touch {marker}'), f'{os.system.__module__}.system'),
    (lambda marker: Call(eval, f'open({str(marker)!r}, "w")'), 'builtins.eval'),
    (lambda marker: torch.nn.Linear(2, 2), 'torch.nn.modules.linear.Linear'),
    (lambda marker: Call(persistence._reconstruct_persistent_obj, dict(type='class', version=6, class_name='Backdoor', state={},
                         module_src=f'open({str(marker)!r}, "w").close()\nclass Backdoor: pass\n')), 'Backdoor'),
])
def test_unexpected_globals_and_classes_are_refused(make_payload, name, tmp_path):
    marker = tmp_path / 'called'
    path = write(tmp_path / 'evil.pkl', pickle.dumps(dict(ema=make_payload(marker), loss_fn=None), protocol=4))
    with open(path, 'rb') as f, pytest.raises(persistence.UnsafePickleError) as info:
        persistence.load(f)
    message = str(info.value)
    assert f'"{name}"' in message and path in message and 'allow_code=True' in message and '--trust-pickle' in message
    assert '\n' not in message
    assert not marker.exists()


def test_own_snapshot_round_trips_through_safe_path(tmp_path):
    net = make_net('edm-ddpmpp')
    net.sampling_spec = dict(sigma_init=80.0, steps=1, sigmas=[80.0, 0.5], name='one-step')  # set after construction
    net.sigma_max = 80.0  # a public attribute changed after construction: the file's value wins
    net._scratch = [1]  # private attributes are not restored
    path = str(tmp_path / 'network-snapshot-000000.pkl')
    snapshot = dict(ema=net, loss_fn=loss.VPLoss(beta_d=10.0), augment_pipe=None, dataset_kwargs=dnnlib.EasyDict(resolution=8))
    dnnlib.util.atomic_write(path, lambda f: pickle.dump(snapshot, f))

    ref = run_net(net)
    for source in [path, 'file://' + path]:
        ema = persistence.load_network_pkl(source)
        assert type(ema) is networks.EDMPrecond
        assert ema.sampling_spec == net.sampling_spec and ema.sigma_max == 80.0 and not hasattr(ema, '_scratch')
        assert torch.equal(run_net(ema), ref)
    with open(path, 'rb') as f:
        out = persistence.load(f)
    assert type(out['loss_fn']) is loss.VPLoss and out['loss_fn'].beta_d == 10.0
    assert out['augment_pipe'] is None and out['dataset_kwargs'] == {'resolution': 8}


def test_load_network_pkl_bare_network_and_keys(tmp_path):
    net = make_net('vp-ddpmpp')
    bare = write(tmp_path / 'bare.pkl', pickle.dumps(net))
    assert torch.equal(run_net(persistence.load_network_pkl(bare)), run_net(net))

    other_key = write(tmp_path / 'student.pkl', pickle.dumps(dict(student=net)))
    with pytest.raises(persistence.PickleLoadError, match=r'has no "ema" entry.*student.*key='):
        persistence.load_network_pkl(other_key)
    assert torch.equal(run_net(persistence.load_network_pkl(other_key, key='student')), run_net(net))

    not_a_net = write(tmp_path / 'loss.pkl', pickle.dumps(dict(ema=loss.EDMLoss())))
    with pytest.raises(persistence.PickleLoadError, match='holds a EDMLoss, not a network'):
        persistence.load_network_pkl(not_a_net)


@pytest.mark.parametrize('tamper, match', [
    (lambda kwargs: kwargs.update(model_channels=16), r'stored weights of EDMPrecond do not match .*has shape'),
    (lambda kwargs: kwargs.update(bogus=1), r'cannot construct training.networks.EDMPrecond .*bogus'),
    (lambda kwargs: kwargs.update(embedding_type='bogus'), r'cannot construct training.networks.EDMPrecond .*embedding_type'),
])
def test_stored_arguments_that_do_not_fit_are_reported(tamper, match):
    net = make_net('edm-ddpmpp')
    tamper(net._init_kwargs)
    with pytest.raises(persistence.PickleLoadError, match=match):
        persistence.load(io.BytesIO(pickle.dumps(dict(ema=net))))


def corrupt_storage(data):
    # The first tensor blob starts with torch's legacy magic number (a pickled LONG1); break it.
    magic = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)[2:-1]
    assert magic in data
    return data.replace(magic, magic[:-1] + b'\x00', 1)


@pytest.mark.parametrize('make_bytes, match, check_allow_code', [
    (lambda data: data[:len(data) // 2], 'truncated, corrupt or not a pickle', False),  # allow_code would run module_src first
    (lambda data: data[:100], 'truncated, corrupt or not a pickle', True),
    (lambda data: b'', 'truncated, corrupt or not a pickle', True),
    (lambda data: b'hello, world\n', 'truncated, corrupt or not a pickle', True),
    (lambda data: corrupt_storage(data), 'corrupt tensor storage', False),
    (lambda data: None, 'is a zip archive', True),
])
def test_malformed_files_give_clear_errors(make_bytes, match, check_allow_code, tmp_path):
    net = make_net('vp-ddpmpp')
    path = tmp_path / 'bad.pkl'
    data = make_bytes(official_snapshot(net))
    if data is None:
        torch.save(net.state_dict(), path)  # a zip archive, as training-state files are
    else:
        path.write_bytes(data)
    for allow_code in [False, True] if check_allow_code else [False]:
        with open(path, 'rb') as f, pytest.raises(persistence.PickleLoadError, match=match) as info:
            persistence.load(f, allow_code=allow_code)
        assert str(path) in str(info.value) and '\n' not in str(info.value)


def test_storages_saved_on_a_gpu_load_on_the_cpu(monkeypatch):
    """A third-party pickle records each storage's device: a CUDA one lands on the CPU (map_location), not on its
    recorded GPU (which would fail here, CUDA being absent, and fill that GPU on a multi-GPU machine)."""
    import torch.serialization
    tensor = torch.arange(6.0)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, 'location_tag', lambda storage: 'cuda:0')
        blob = pickle.dumps(dict(x=tensor))
    loaded = persistence.load(io.BytesIO(blob))['x']
    assert loaded.device.type == 'cpu' and torch.equal(loaded, tensor)
