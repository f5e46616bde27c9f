"""EDM2 pickles: written in EDM2's layout (encoder/dataset_kwargs/loss_fn/ema, float16 ema, embedded module source),
read back by the safe loader without executing anything, EDM2's generic class names told apart from others by the
embedded source, and one-line errors on malformed files."""

import inspect
import io
import pickletools

import pytest
import torch

from test_networks_edm2 import CONFIGS, golden, golden_net
from test_persistence import BOOBY_TRAP, EDMStylePickler
from torch_utils import persistence
from training import networks, networks_edm2


def edm2_bytes(net, prefix=BOOBY_TRAP):
    """An EDM2-layout snapshot of `net` as EDM2's training loop pickles it, each module source prefixed by `prefix`
    (a booby trap by default: executing any embedded source raises)."""
    f = io.BytesIO()
    EDMStylePickler(f, prefix).dump(networks_edm2.edm2_snapshot(net, dict(class_name='training.dataset.ImageFolderDataset', path='img64.zip')))
    return f.getvalue()


def run(net, cfg='b'):
    inputs = golden(cfg, 'in')
    with torch.no_grad():
        return net(inputs['x'], inputs['sigma'], inputs.get('class_labels'))


def test_edm2_layout_round_trips_without_executing_code():
    net = golden_net('b')
    data = edm2_bytes(net)
    ops = list(pickletools.genops(data))
    assert ops[0][0].name == 'PROTO' and ops[0][1] == 4
    assert b'HalfStorage' in data  # float16 storages, as in EDM2's released files
    execed_before = dict(persistence._src_to_module_dict)
    out = persistence.load(io.BytesIO(data))
    assert persistence._src_to_module_dict == execed_before
    assert list(out) == ['encoder', 'dataset_kwargs', 'loss_fn', 'ema']
    ema = out['ema']
    assert type(ema) is networks_edm2.Precond and ema.init_kwargs == CONFIGS['b']['precond_kwargs']
    assert ema.training is False and not any(p.requires_grad for p in ema.parameters())
    assert {t.dtype for t in ema.state_dict().values()} == {torch.float16}  # rebuilt as stored
    ref = networks_edm2.edm2_snapshot(net).ema
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), ref.state_dict().values()))
    assert torch.equal(run(ema), run(ref))
    # A float16 EDM2 network computes in float32 from float16 weights: close to the float32 original.
    torch.testing.assert_close(run(ema), run(net.eval()), rtol=0, atol=1e-3)
    assert type(out['encoder']) is networks_edm2.StandardRGBEncoder and type(out['loss_fn']) is networks_edm2.EDM2Loss
    assert out['dataset_kwargs'] == dict(class_name='training.dataset.ImageFolderDataset', path='img64.zip')
    assert torch.equal(out['encoder'].decode(torch.tensor([-1.0, 0.0, 1.0, 2.0])), torch.tensor([0, 128, 255, 255], dtype=torch.uint8))


def test_load_network_pkl_and_generic_names_need_edm2_source(tmp_path):
    net = golden_net('a')
    path = tmp_path / 'edm2-img16.pkl'
    path.write_bytes(edm2_bytes(net))
    assert torch.equal(run(persistence.load_network_pkl(str(path)), 'a'), run(networks_edm2.edm2_snapshot(net).ema, 'a'))

    # The same class names with a module source that is not EDM2's (here EDM's networks.py, which has no MPConv).
    class OtherSource(EDMStylePickler):
        def reducer_override(self, obj):
            reduced = super().reducer_override(obj)
            if reduced is NotImplemented:
                return reduced
            func, (meta,), *rest = reduced
            return (func, (dict(meta, module_src=inspect.getsource(networks)),), *rest)
    f = io.BytesIO()
    OtherSource(f, '').dump(dict(ema=net))
    with pytest.raises(persistence.UnsafePickleError, match=r'persisted class "(MPFourier|Precond)" comes from a '
                       r'module that is not EDM2\'s \(its source does not define') as info:
        persistence.load(io.BytesIO(f.getvalue()))
    assert '--trust-pickle' in str(info.value) and '\n' not in str(info.value)


@pytest.mark.parametrize('tamper, match', [
    (lambda net: net._init_kwargs.update(model_channels=4), r'stored weights of Precond do not match training.networks_edm2.Precond .*has shape'),
    (lambda net: net._init_kwargs.update(model_channels=16), r'stored arguments of Precond describe a network larger than the tensors stored'),
    (lambda net: net._init_kwargs.update(bogus=1), r'cannot construct training.networks_edm2.Precond .*bogus'),
    (lambda net: net.unet.enc.__dict__['_modules'].popitem(), r'stored weights of Precond do not match .*missing unet.enc.'),
])
def test_malformed_edm2_pickles_give_one_line_errors(tamper, match):
    net = golden_net('b')
    tamper(net)
    with pytest.raises(persistence.PickleLoadError, match=match) as info:
        persistence.load(io.BytesIO(edm2_bytes(net)))
    assert '\n' not in str(info.value)


def test_module_source_that_does_not_parse_is_reported():
    data = edm2_bytes(golden_net('a'), prefix='def (:\n')
    with pytest.raises(persistence.PickleLoadError, match=r'embedded module source does not parse \(SyntaxError') as info:
        persistence.load(io.BytesIO(data))
    assert '\n' not in str(info.value)


def test_allow_code_reads_it_as_edm2_would():
    net = golden_net('a')
    out = persistence.load(io.BytesIO(edm2_bytes(net, prefix='')), allow_code=True)  # EDM2's reader: exec the source
    assert torch.equal(run(out['ema'], 'a'), run(networks_edm2.edm2_snapshot(net).ema, 'a'))


def test_damaged_edm2_pickles_raise_only_pickle_load_error():
    # Truncations and bit flips anywhere (the embedded source included): a one-line PickleLoadError or a clean load.
    import random
    data = edm2_bytes(golden_net('a'), prefix='')
    rng = random.Random(0)
    cases = [data[:rng.randrange(len(data))] for _ in range(15)]
    for _ in range(30):
        b = bytearray(data)
        for p in rng.sample(range(len(data)), rng.randint(1, 3)):
            b[p] ^= 1 << rng.randrange(8)
        cases.append(bytes(b))
    refused = 0
    for case in cases:
        try:
            persistence.load(io.BytesIO(case))
        except persistence.PickleLoadError as e:
            assert '\n' not in str(e)
            refused += 1
    assert refused >= 15  # every truncation at least
