"""Where each sample of a global batch comes from: its data index and its random numbers.

Both are keyed by the sample's global position (step, index within the global batch), never by rank or
accumulation round, so a step gives the same result for any world size and any --batch-gpu (up to float
summation order). A run is then a pure function of (--seed, global batch, data), which is what exact resume
and the 1-vs-2-process test rely on.
"""

import hashlib

import numpy as np
import torch

# ----------------------------------------------------------------------------

def stable_seed(*parts):
    """A 63-bit seed from any tuple of ints/strings, identical on every platform and Python run."""
    text = '/'.join(str(p) for p in parts).encode('utf-8')
    return int.from_bytes(hashlib.sha256(text).digest()[:8], 'little') & ((1 << 63) - 1)

# ----------------------------------------------------------------------------

class IndexStream:
    """Dataset indices for global sample positions: one permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, num_items, seed=0, shuffle=True):
        if num_items <= 0:
            raise ValueError('The dataset is empty')
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = None
        self._perm = None

    def _permutation(self, epoch):
        if self._epoch != epoch:
            self._perm = np.arange(self.num_items)
            if self.shuffle:
                np.random.Generator(np.random.PCG64(stable_seed('data', self.seed, epoch))).shuffle(self._perm)
            self._epoch = epoch
        return self._perm

    def __getitem__(self, position):
        epoch, i = divmod(int(position), self.num_items)
        return int(self._permutation(epoch)[i])


class RankSampler(torch.utils.data.Sampler):
    """Infinite index sampler for one rank: at step k, rank r reads global positions
    k*batch + r*(batch/world) ... + batch/world - 1, in order, starting at `start_step` (exact resume)."""

    def __init__(self, stream, batch_size, rank=0, world_size=1, start_step=0):
        assert batch_size % world_size == 0
        self.stream = stream
        self.batch_size = batch_size
        self.per_rank = batch_size // world_size
        self.rank = rank
        self.start_step = start_step

    def __iter__(self):
        step = self.start_step
        while True:
            base = step * self.batch_size + self.rank * self.per_rank
            for j in range(self.per_rank):
                yield self.stream[base + j]
            step += 1

# ----------------------------------------------------------------------------

# Elements per CUDA draw. A CUDA generator's number for an element depends on the kernel's grid, which torch caps at
# (SMs x max threads per SM) threads: one draw of more elements (221,184 on an A100, 270,336 on an H100 SXM)
# gives different numbers on different GPU models. Draws of at most 2^15 elements, below that cap on any CUDA GPU
# (a T4's is 40,960), do not.
DRAW_CHUNK = 1 << 15


class StepRandom:
    """Random numbers for one training step, laid out over the global batch and named by the caller.

    `randn('noise', C, H, W)` is conceptually one [batch, C, H, W] array per (step, name), flattened and cut into
    chunks of DRAW_CHUNK elements, chunk j drawn from its own generator seeded by (seed, step, kind, name, j).
    A rank draws only the chunks that overlap the rows its rounds read, so a row's numbers do not depend on who
    draws them (world-size and --batch-gpu invariance) and no rank draws the whole global batch.
    """

    def __init__(self, seed, step, batch_size, device):
        self.seed = seed
        self.step = step
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._cache = {}

    def _chunk(self, kind, name, shape, high, j):
        """Elements [j * DRAW_CHUNK, ...) of the flattened [batch_size, *shape] array (cached for later rounds)."""
        key = (kind, name, tuple(shape), high, j)
        if key not in self._cache:
            g = torch.Generator(device=self.device).manual_seed(stable_seed(self.seed, self.step, kind, name, j))
            numel = min(DRAW_CHUNK, self.batch_size * int(np.prod(shape)) - j * DRAW_CHUNK)
            x = torch.empty([numel], dtype=torch.int64 if kind == 'randint' else torch.float32, device=self.device)
            if kind == 'randn':
                x.normal_(generator=g)
            elif kind == 'rand':
                x.uniform_(generator=g)
            else:
                x.random_(0, high, generator=g)
            self._cache[key] = x
        return self._cache[key]

    def _draw(self, kind, name, shape, high, start, size):
        """Rows [start, start + size) of the step's [batch_size, *shape] array `name`."""
        row = int(np.prod(shape))
        lo, hi = start * row, (start + size) * row
        pieces = [self._chunk(kind, name, shape, high, j)[max(lo - j * DRAW_CHUNK, 0):hi - j * DRAW_CHUNK]
                  for j in range(lo // DRAW_CHUNK, (hi - 1) // DRAW_CHUNK + 1)]
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).view(size, *shape)


class Round:
    """One accumulation round of one rank: its images, labels, and its rows of the step's random streams."""

    def __init__(self, images, labels, rand, start, size):
        self.images = images    # [size, C, H, W] float32 in [-1, 1], or None for data-free methods
        self.labels = labels    # [size, label_dim] float32 one-hot, or None
        self.rand_ = rand
        self.start = start      # global position of the first sample within the step's batch
        self.size = size

    @property
    def positions(self):
        """Global positions of this round's samples since the start of training (for indexing fixed sets)."""
        first = self.rand_.step * self.rand_.batch_size + self.start
        return range(first, first + self.size)

    def randn(self, name, *shape):
        return self.rand_._draw('randn', name, shape, None, self.start, self.size)

    def rand(self, name, *shape):
        return self.rand_._draw('rand', name, shape, None, self.start, self.size)

    def randint(self, name, high, *shape):
        return self.rand_._draw('randint', name, shape, high, self.start, self.size)

    def random_labels(self, name, label_dim):
        """One-hot labels drawn uniformly, for methods that have no data (None when unconditional)."""
        return _one_hot(self.randint(name, label_dim), label_dim) if label_dim else None

    def keyed_dropout(self, name='dropout'):
        """Context in which the networks' dropout masks follow this round's global sample positions; `name` gives
        each network of a step its own masks (SiD's generator and fake score)."""
        from training.networks import _hash32, keyed_dropout
        rand = self.rand_
        # A sample's key: its position hashed with the step's 32-bit seed, on the device (a bijection of the
        # position, so no two samples share a key).
        positions = torch.arange(self.start, self.start + self.size, dtype=torch.int64, device=rand.device)
        return keyed_dropout(_hash32(_hash32(positions ^ (stable_seed(rand.seed, rand.step, name) & 0xffffffff))))


def _one_hot(idx, label_dim):
    return torch.nn.functional.one_hot(idx, label_dim).to(torch.float32)
