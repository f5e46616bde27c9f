"""Golden outputs of the reference EDM networks and the weight rule that reproduces them.

Use from any test: `from golden import build_golden_net, golden_arrays` (tests/ is on sys.path under pytest).
The fixtures live in tests/fixtures (tests/fixtures/README.md says what produced them).
"""

import functools
import json
from pathlib import Path

import numpy as np
import torch

from training import networks

FIXTURES = Path(__file__).resolve().parent / 'fixtures'

# GroupNorm modules of the EDM layout, whose weights the rule draws around 1.
_GROUPNORM_SUFFIXES = ('norm0', 'norm1', 'norm2', 'aux_norm', 'out_norm')

# ----------------------------------------------------------------------------

# Path of one fixture file, with a one-line fix when the shared folder is missing.
def fixture_path(name):
    path = FIXTURES / name
    if not path.is_file():
        raise FileNotFoundError(f'Golden fixture {path} not found; it is committed with the repository '
                                f'(git checkout -- tests/fixtures)')
    return path


# {network name: {'precond', 'kwargs', 'weight_seed'}} plus the 'sampler' settings.
@functools.lru_cache(maxsize=None)
def golden_config():
    return json.loads(fixture_path('edm_golden.json').read_text())


# Every array of edm_golden.npz, by its stored name ('NAME/x', 'NAME/buffer/...', 'sampler/images', ...).
@functools.lru_cache(maxsize=None)
def _golden_npz():
    with np.load(fixture_path('edm_golden.npz')) as npz:
        return {key: npz[key] for key in npz.files}


# The arrays of one network (or 'sampler') with the 'NAME/' prefix removed, as a fresh dict of numpy arrays.
def golden_arrays(name):
    prefix = f'{name}/'
    return {key[len(prefix):]: value.copy() for key, value in _golden_npz().items() if key.startswith(prefix)}


# Fill all parameters by tests/fixtures/README.md's weight rule: sorted names, one float64 stream, fan-in scaling.
@torch.no_grad()
def fill_golden_weights(net, weight_seed):
    g = torch.Generator().manual_seed(weight_seed)
    params = dict(net.named_parameters())
    for name in sorted(params):
        p = params[name]
        r = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if p.ndim >= 2:
            value = r / np.sqrt(p[0].numel())
        elif name.endswith('.weight') and name.rsplit('.', 2)[-2].endswith(_GROUPNORM_SUFFIXES):
            value = 1 + 0.1 * r
        else:
            value = 0.1 * r
        p.copy_(value.to(torch.float32))
    return net


# The golden network `name` with the rule's weights and the stored buffers, in eval mode on the CPU.
def build_golden_net(name):
    config = golden_config()[name]
    net = getattr(networks, config['precond'])(**config['kwargs'])
    fill_golden_weights(net, config['weight_seed'])
    buffers = dict(net.named_buffers())
    with torch.no_grad():
        for key, value in golden_arrays(name).items():
            if key.startswith('buffer/'):
                buffers[key[len('buffer/'):]].copy_(torch.from_numpy(value))
    return net.eval()


# Names of the golden networks (everything in edm_golden.json except the sampler settings).
def golden_net_names():
    return sorted(name for name in golden_config() if name != 'sampler')
