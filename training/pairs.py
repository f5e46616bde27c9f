"""Regression pairs (z, y, label) for DMD: the teacher's deterministic sampler output for a range of seeds.

A pair for seed k is what generate.py computes for seed k before quantisation: a per-seed generator
(StackedRandomGenerator) draws the latents z [C,H,W] first, then the class label (conditional teachers), then
the deterministic sampler (S_churn = 0, no further noise) maps (z, label) to y. Only y is stored; z and the
labels are regenerated from the seed, on the kind of device the pairs were made on (CPU and CUDA generators
draw different numbers).

Directory layout (one directory per pair set):

    shard-{k:05d}.npy    y as float16 [n, C, H, W] (np.load(..., mmap_mode='r')), float16(float32(sampler output))
    shard-{k:05d}.json   sidecar, written after the .npy: seeds [first, last], labels (class per row or null),
                         sha256 of the .npy bytes, shape, teacher (as given) and its sha256, sampler settings,
                         class, shard_size, rng_device, latents_sha256 (of the first seed's z), format

Shard k holds the seeds of [k*shard_size, (k+1)*shard_size) that lie in the requested range, so ranges made
separately (0-49999, then 50000-99999) can share a directory. A shard is complete iff its sidecar exists and
the checksum matches; make_pairs.py redoes incomplete shards and refuses to mix settings in one directory.
"""

import glob
import hashlib
import io
import json
import os

import numpy as np
import torch

import dnnlib
from training import samplers

FORMAT = 'edm-distill-pairs-1'

# Sampler settings that define a deterministic run (the churn keys are moot once S_churn = 0).
SAMPLER_KEYS = ('solver', 'grid', 'num_steps', 'sigma_min', 'sigma_max', 'rho')

# Sidecar entries that must agree between all shards of one directory (plus the image shape).
CONFIG_KEYS = ('format', 'teacher_sha256', 'sampler', 'label_dim', 'class', 'shard_size', 'rng_device')

MAKE_HINT = 'python make_pairs.py --teacher=PKL --seeds=0-99999 --outdir={path}'

# ----------------------------------------------------------------------------
# Small helpers.

def shard_paths(outdir, k):
    """(npy, json) paths of shard k."""
    base = os.path.join(outdir, f'shard-{k:05d}')
    return base + '.npy', base + '.json'


def bytes_sha256(data):
    return hashlib.sha256(data).hexdigest()


def file_sha256(path_or_url):
    """sha256 of a local file or of a URL's cached download (identifies a teacher independently of its path)."""
    h = hashlib.sha256()
    with dnnlib.util.open_url(path_or_url) as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def latents_sha256(z):
    """Fingerprint of one seed's latents, to detect a reader whose generator draws different numbers."""
    return bytes_sha256(z.detach().to('cpu', torch.float32).contiguous().numpy().tobytes())


def deterministic_settings(net, **overrides):
    """The net's sampler settings (EDM defaults <- sampling_spec <- overrides), which must not add noise."""
    s = samplers.sampler_settings(net, **overrides)
    if s['S_churn'] != 0:
        raise ValueError(f'Pairs need the deterministic sampler, but S_churn={s["S_churn"]}: use --S_churn=0')
    return {k: s[k] for k in SAMPLER_KEYS}


def shard_plan(first, last, shard_size):
    """[(k, [seeds of shard k])] covering the inclusive seed range first..last, shards aligned to shard_size."""
    if shard_size < 1:
        raise ValueError(f'shard_size must be >= 1 (got {shard_size})')
    if last < first:
        raise ValueError(f'Empty seed range {first}-{last}: write the smaller bound first')
    return [(k, list(range(max(first, k * shard_size), min(last, (k + 1) * shard_size - 1) + 1)))
            for k in range(first // shard_size, last // shard_size + 1)]

# ----------------------------------------------------------------------------
# Making pairs.

def seed_inputs(seeds, channels, resolution, label_dim, device, class_idx=None):
    """Per seed, in generate.py's order: latents, then a class label; returns (rnd, z, class indices or None)."""
    rnd = samplers.StackedRandomGenerator(device, seeds)
    z = rnd.randn([len(seeds), channels, resolution, resolution])
    classes = None
    if label_dim:
        # Drawn even with a fixed class, so the sampler's noise stream does not depend on it.
        classes = rnd.randint(label_dim, size=[len(seeds)])
        if class_idx is not None:
            classes = torch.full_like(classes, class_idx)
    return rnd, z, classes


@torch.no_grad()
def sample_pairs(net, seeds, device, sampler, class_idx=None):
    """One batch: (z float32, class indices or None, y float64) for the seeds, as generate.py computes them."""
    rnd, z, classes = seed_inputs(seeds, net.img_channels, net.img_resolution, net.label_dim, device, class_idx)
    labels = None if classes is None else torch.eye(net.label_dim, device=z.device)[classes]
    y = samplers.sample(net, z, labels, rnd.randn_like, **sampler)
    samplers.require_finite(y, seeds)
    return z, classes, y


def to_float16(y):
    """Stored form of sampler outputs: float16(float32(y)), refusing values float16 cannot hold."""
    y = y.detach().to('cpu', torch.float32).numpy().astype(np.float16)
    if not np.isfinite(y).all():
        raise ValueError('The teacher produced non-finite samples (or beyond float16 range); check the teacher')
    return y


def run_config(net, teacher, teacher_sha256, sampler, class_idx, shard_size, device, precision='fp32'):
    """The sidecar entries shared by all shards of a run."""
    return dict(format=FORMAT, teacher=teacher, teacher_sha256=teacher_sha256, sampler=dict(sampler), precision=precision,
                label_dim=int(net.label_dim), **{'class': class_idx}, shard_size=int(shard_size),
                rng_device=torch.device(device).type,
                image_shape=[int(net.img_channels), int(net.img_resolution), int(net.img_resolution)])


def _read_sidecar(path):
    """Parsed sidecar, or None if it is missing or unreadable (then the shard counts as incomplete)."""
    try:
        with open(path, 'rb') as f:
            meta = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _normal(x):
    """JSON round trip, so that in-memory settings compare equal to the ones read back from a sidecar."""
    return json.loads(json.dumps(x))


def config_mismatch(meta, config):
    """The first config entry in which a sidecar differs from `config`, as (key, theirs, ours), or None."""
    config = _normal(config)
    theirs = dict(meta, image_shape=meta.get('shape', [None])[1:])
    for key in CONFIG_KEYS + ('image_shape',):
        a, b = theirs.get(key), config.get(key)
        if a != b and isinstance(a, dict) and isinstance(b, dict):
            sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))  # name the setting that differs
            return f'{key} {sub}', a.get(sub), b.get(sub)
        if a != b:
            return key, a, b
    return None


def shard_is_complete(outdir, k, seeds, meta):
    """Sidecar present, for exactly these seeds, and the .npy's checksum matches."""
    npy_path, _ = shard_paths(outdir, k)
    if meta is None or meta.get('seeds') != [seeds[0], seeds[-1]] or not os.path.isfile(npy_path):
        return False
    with open(npy_path, 'rb') as f:
        return bytes_sha256(f.read()) == meta.get('sha256')


def shards_to_make(outdir, plan, config):
    """Shards of `plan` still to make; raises if the directory holds pairs made with other settings."""
    for path in sorted(glob.glob(os.path.join(outdir, 'shard-*.json'))):
        meta = _read_sidecar(path)
        bad = None if meta is None else config_mismatch(meta, config)
        if bad is not None:
            raise ValueError(f'"{outdir}" holds pairs made with a different {bad[0]} ({os.path.basename(path)}: '
                             f'{bad[1]}, this run: {bad[2]}); use another --outdir or that run\'s settings')
    todo = []
    for k, seeds in plan:
        meta = _read_sidecar(shard_paths(outdir, k)[1])
        if meta is not None and not (seeds[0] <= meta['seeds'][0] and meta['seeds'][1] <= seeds[-1]):
            raise ValueError(f'shard-{k:05d} in "{outdir}" holds seeds {meta["seeds"][0]}-{meta["seeds"][1]}, '
                             f'outside this run\'s {seeds[0]}-{seeds[-1]} for it; use another --outdir or a seed '
                             f'range that covers them')
        if not shard_is_complete(outdir, k, seeds, meta):
            todo.append((k, seeds))
    return todo


def write_shard(outdir, k, seeds, y, classes, first_latents_sha256, config):
    """Write y (float16 [n,C,H,W]) as shard k, then its sidecar; both atomically."""
    npy_path, json_path = shard_paths(outdir, k)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(y, dtype=np.float16))
    data = buf.getvalue()
    # The old sidecar goes first: a crash between the two writes leaves a shard without one (incomplete).
    if os.path.exists(json_path):
        os.remove(json_path)
    dnnlib.util.atomic_write(npy_path, lambda f: f.write(data))
    meta = dict(config, seeds=[seeds[0], seeds[-1]], shape=list(y.shape), sha256=bytes_sha256(data),
                labels=None if classes is None else [int(c) for c in classes],
                latents_sha256=first_latents_sha256)
    meta.pop('image_shape')
    text = json.dumps(meta, indent=1, sort_keys=True) + '\n'
    dnnlib.util.atomic_write(json_path, lambda f: f.write(text.encode('utf-8')))


def make_shard(net, outdir, k, seeds, config, batch=64, device='cpu', progress=None):
    """Sample shard k in batches of `batch` seeds and write it; progress(n) is called after each batch."""
    ys, classes, first_sha = [], [], None
    for i in range(0, len(seeds), batch):
        z, c, y = sample_pairs(net, seeds[i : i + batch], device, config['sampler'], config['class'])
        if i == 0:
            first_sha = latents_sha256(z[0])
        ys.append(to_float16(y))
        classes += [] if c is None else c.tolist()
        if progress is not None:
            progress(y.shape[0])
    write_shard(outdir, k, seeds, np.concatenate(ys), classes if net.label_dim else None, first_sha, config)

# ----------------------------------------------------------------------------
# Reading pairs.

def _to(t, device):
    """Host to device without waiting for the device (pinned memory, non-blocking copy): get() is in the G step."""
    return (t.pin_memory() if device.type == 'cuda' and t.device.type == 'cpu' else t).to(device, non_blocking=True)


class PairSet:
    """The complete shards of a pair directory: `get(indices)` -> (z, y, one-hot labels or None) on `device`."""

    def __init__(self, path, device='cpu', verify=True):
        self.path = os.fspath(path)
        self.device = torch.device(device)
        metas = [(p, _read_sidecar(p)) for p in sorted(glob.glob(os.path.join(self.path, 'shard-*.json')))]
        if not metas:
            hint = MAKE_HINT.format(path=self.path)
            raise FileNotFoundError(f'No pair shards in "{self.path}"; make them with `{hint}`')
        redo = 'delete it and re-run make_pairs.py to regenerate it'
        first = None
        self._arrays, self._labels, seeds = [], [], []
        for json_path, meta in metas:
            npy_path = json_path[:-len('.json')] + '.npy'
            name = os.path.basename(npy_path)
            if meta is None or meta.get('format') != FORMAT:
                raise ValueError(f'"{json_path}" is not a {FORMAT} sidecar; {redo}')
            if first is None:
                first = meta
            bad = config_mismatch(meta, dict(first, image_shape=first['shape'][1:]))
            if bad is not None:
                raise ValueError(f'"{self.path}" mixes pairs with different {bad[0]} ({name}: {bad[1]}, others: '
                                 f'{bad[2]}); keep one setting per directory')
            if not os.path.isfile(npy_path):
                raise FileNotFoundError(f'{name} is missing next to its sidecar in "{self.path}"; {redo}')
            if verify:
                with open(npy_path, 'rb') as f:
                    if bytes_sha256(f.read()) != meta['sha256']:
                        raise ValueError(f'Checksum mismatch in "{npy_path}" (corrupt or partly written); {redo}')
            y = np.load(npy_path, mmap_mode='r')
            if list(y.shape) != meta['shape'] or y.dtype != np.float16:
                raise ValueError(f'{name} holds {y.dtype} {list(y.shape)}, its sidecar says float16 {meta["shape"]}; '
                                 f'{redo}')
            self._arrays.append(y)
            self._labels.append(meta['labels'])
            seeds.append(np.arange(meta['seeds'][0], meta['seeds'][1] + 1, dtype=np.int64))
            self._check_latents(meta, name)
        self.seeds = np.concatenate(seeds)                              # seed of each pair
        self._starts = np.cumsum([0] + [len(s) for s in seeds])         # first global index of each shard
        self.channels, self.resolution = int(first['shape'][1]), int(first['shape'][2])
        self.label_dim = int(first['label_dim'])
        self.class_idx = first['class']
        self.sampler = dict(first['sampler'])
        self.teacher = first['teacher']
        self.teacher_sha256 = first['teacher_sha256']
        self.rng_device = first['rng_device']

    def __len__(self):
        return len(self.seeds)

    # Generators must be of the device type the pairs were made with (CPU and CUDA streams differ).
    def _rng_device(self, rng_device):
        if self.device.type == rng_device:
            return self.device
        if rng_device == 'cpu' or (rng_device == 'cuda' and torch.cuda.is_available()):
            return torch.device(rng_device)
        raise ValueError(f'Pairs in "{self.path}" were made with --device={rng_device}; their latents can only be '
                         f'regenerated there: read them on {rng_device}, or remake them with --device=cpu')

    # The first seed of each shard must regenerate to the latents the shard was made from, and every seed to its
    # stored label (checked here, once, so that get() in the training step never reads the device back).
    def _check_latents(self, meta, name):
        seeds = list(range(meta['seeds'][0], meta['seeds'][1] + 1))
        _rnd, z, _classes = seed_inputs(seeds[:1], meta['shape'][1], meta['shape'][2], meta['label_dim'],
                                        self._rng_device(meta['rng_device']))
        if latents_sha256(z[0]) != meta['latents_sha256']:
            raise ValueError(f'Seed {seeds[0]} of {name} regenerates different latents here than when the pairs were '
                             f'made (another {meta["rng_device"]} random generator); remake the pairs on this machine')
        if meta['label_dim'] and meta['class'] is None:
            for i in range(0, len(seeds), 1000):
                _rnd, _z, classes = seed_inputs(seeds[i:i + 1000], meta['shape'][1], meta['shape'][2], meta['label_dim'],
                                                self._rng_device(meta['rng_device']))
                bad = np.nonzero(classes.cpu().numpy() != np.asarray(meta['labels'][i:i + 1000]))[0]
                if bad.size:
                    raise ValueError(f'Labels regenerated from the seeds differ from those stored in {name} (seed '
                                     f'{seeds[i + bad[0]]}); remake the pairs on this machine')

    def get(self, indices):
        """Pairs at global indices (any order, repeats allowed): z, y float32 [n,C,H,W], one-hot labels or None."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            empty = torch.zeros([0, self.channels, self.resolution, self.resolution], device=self.device)
            labels = torch.zeros([0, self.label_dim], device=self.device) if self.label_dim else None
            return empty, empty.clone(), labels
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f'Pair index out of range: got {idx.min()}..{idx.max()}, "{self.path}" has {len(self)} '
                             f'pairs (0..{len(self) - 1})')
        shard = np.searchsorted(self._starts, idx, side='right') - 1
        y = np.empty([idx.size, self.channels, self.resolution, self.resolution], dtype=np.float16)
        classes = np.empty([idx.size], dtype=np.int64)
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            y[rows] = self._arrays[s][idx[rows] - self._starts[s]]
            if self.label_dim:
                classes[rows] = np.asarray(self._labels[s], dtype=np.int64)[idx[rows] - self._starts[s]]
        seeds = self.seeds[idx].tolist()
        _rnd, z, _classes = seed_inputs(seeds, self.channels, self.resolution, self.label_dim,
                                        self._rng_device(self.rng_device), self.class_idx)
        # The stored labels, which y was made with (the regenerated ones agree: checked per shard on opening).
        labels = torch.eye(self.label_dim)[torch.from_numpy(classes)] if self.label_dim else None
        return _to(z, self.device), _to(torch.from_numpy(y), self.device).to(torch.float32), \
            _to(labels, self.device) if labels is not None else None

    def check_teacher(self, net):
        """The pairs must fit the network being distilled: resolution, channels and label_dim."""
        ours = (self.channels, self.resolution, self.label_dim)
        theirs = (int(net.img_channels), int(net.img_resolution), int(net.label_dim))
        if ours != theirs:
            raise ValueError(f'Pairs in "{self.path}" are {ours[0]}x{ours[1]}x{ours[1]} with label_dim {ours[2]}, the '
                             f'teacher is {theirs[0]}x{theirs[1]}x{theirs[1]} with label_dim {theirs[2]}; make pairs '
                             f'with this teacher or use the one they came from ({self.teacher})')
