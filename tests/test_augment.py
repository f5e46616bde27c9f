"""AugmentPipe: identities, exact known moves, label layout, per-position randomness, pickling."""

import ast
import inspect
import math
import pickle

import pytest
import torch

import dnnlib
from torch_utils import persistence
from training import augment, loss
from training.augment import AugmentPipe
from training.batching import Round, StepRandom

ALL = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
           brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
GEOM = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
COLOR = dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
EDM_CIFAR10 = dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


class FixedRandom:
    """An `rnd` whose streams are given by name; asking for an unknown name or a wrong shape fails the test."""

    def __init__(self, **streams):
        self.streams = streams

    def _get(self, name, shape):
        x = self.streams[name]
        assert tuple(x.shape[1:]) == shape, (name, x.shape, shape)
        return x

    def rand(self, name, *shape):
        return self._get(name, shape)

    def randn(self, name, *shape):
        return self._get(name, shape)

    def randint(self, name, high, *shape):
        x = self._get(name, shape)
        assert 0 <= x.min() and x.max() < high
        return x


def step_rnd(N, seed=0, step=0, start=0, batch=None):
    return Round(None, None, StepRandom(seed, step, batch or N, 'cpu'), start, N)


def fire(N):
    return torch.zeros(N)   # coin value 0 < any positive probability: the transform fires


def images(N=4, C=3, H=8, W=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand([N, C, H, W], generator=g) * 2 - 1

# ----------------------------------------------------------------------------

@pytest.mark.parametrize('C', [1, 3])
def test_p0_is_identity_with_zero_labels(C):
    x = images(C=C)
    y, labels = AugmentPipe(p=0, **ALL)(x, step_rnd(4))
    assert torch.equal(y, x)
    assert labels.shape == (4, 19) and labels.dtype == torch.float32
    assert torch.equal(labels, torch.zeros(4, 19))


def test_no_transform_enabled_gives_empty_labels():
    x = images()
    y, labels = AugmentPipe(p=1)(x)
    assert torch.equal(y, x) and labels.shape == (4, 0)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_output_shape_and_dtype(dtype):
    x = images(N=3, H=8, W=12).to(dtype)
    y, labels = AugmentPipe(p=1, **{k: v for k, v in ALL.items() if k != 'rotate_int'})(x, step_rnd(3))
    assert y.shape == x.shape and y.dtype == dtype
    assert labels.shape == (3, 17) and labels.dtype == torch.float32


def test_xflip_mirrors_exactly_and_sets_label():
    x = images()
    flip = torch.tensor([1, 0, 1, 0])
    y, labels = AugmentPipe(p=1, xflip=1)(x, FixedRandom(aug_xflip_p=fire(4), aug_xflip=flip))
    assert torch.equal(y[[0, 2]], x[[0, 2]].flip(3)) and torch.equal(y[[1, 3]], x[[1, 3]])
    assert torch.equal(labels, flip[:, None].float())


def test_xflip_1e8_with_global_rng_is_a_fair_mirror():
    # EDM's CIFAR-10 setting: min(1e8 * p, 1) = 1, so every sample tosses the flip coin.
    x = images(N=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        y, labels = AugmentPipe(p=0.12, xflip=1e8)(x)
    flipped = labels[:, 0] == 1
    assert torch.equal(y[flipped], x[flipped].flip(3)) and torch.equal(y[~flipped], x[~flipped])
    assert 0 < flipped.sum() < 64


def test_same_streams_are_deterministic_and_do_not_touch_global_rng():
    x = images(N=8)
    pipe = AugmentPipe(p=0.7, **ALL)
    state = torch.get_rng_state()
    y1, l1 = pipe(x, step_rnd(8, seed=3, step=5))
    y2, l2 = pipe(x, step_rnd(8, seed=3, step=5))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(y1, y2) and torch.equal(l1, l2)
    y3, l3 = pipe(x, step_rnd(8, seed=3, step=6))
    assert not torch.equal(l1, l3)


def test_augmentation_depends_only_on_global_position():
    x = images(N=8)
    pipe = AugmentPipe(p=0.7, **ALL)
    rand = StepRandom(11, 2, 8, 'cpu')
    y, labels = pipe(x, Round(None, None, rand, 0, 8))
    for start, size in [(0, 3), (3, 5)]:
        y_part, l_part = pipe(x[start:start + size], Round(None, None, rand, start, size))
        assert torch.allclose(y_part, y[start:start + size], atol=1e-6)
        assert torch.equal(l_part, labels[start:start + size])
    # The same image at different positions gets different draws.
    same = x[:1].expand(8, -1, -1, -1)
    _, labels = pipe(same, Round(None, None, rand, 0, 8))
    assert len({tuple(row.tolist()) for row in labels}) == 8


def test_labels_zero_exactly_where_transform_did_not_fire():
    N, p = 64, 0.5
    x = images(N=N)
    rnd = step_rnd(N, seed=2)  # a seed with a sample on which none of the 7 transforms fired (1 in 128 each)
    y, labels = AugmentPipe(p=p, **GEOM)(x, rnd)
    fired = {name: rnd.rand(f'aug_{name}_p') < p for name in GEOM}
    cols = dict(zip(GEOM, labels.split([1, 1, 2, 2, 1, 2, 2, 2], dim=1)))
    for name in ['xflip', 'yflip']:
        assert torch.equal(cols[name][:, 0], (fired[name] & (rnd.randint(f'aug_{name}', 2) == 1)).float())
    k = torch.where(fired['rotate_int'], rnd.randint('aug_rotate_int', 4), 0)
    assert torch.equal(cols['rotate_int'], torch.stack([(k == 1) | (k == 2), (k == 2) | (k == 3)], 1).float())
    for name in ['translate_int', 'scale', 'rotate_frac', 'aniso', 'translate_frac']:
        assert torch.all(cols[name][~fired[name]] == 0)
    for name in ['scale', 'rotate_frac', 'translate_frac']:
        assert torch.all(cols[name][fired[name]].abs().sum(1) > 0)
    assert 0 < fired['scale'].sum() < N
    # Samples on which nothing fired come back bit-identical.
    untouched = ~torch.stack(list(fired.values())).any(0)
    assert untouched.any() and torch.equal(y[untouched], x[untouched])


def test_color_labels_zero_exactly_where_not_fired():
    N, p = 64, 0.5
    rnd = step_rnd(N, seed=8)
    _, labels = AugmentPipe(p=p, **COLOR)(images(N=N), rnd)
    fired = [rnd.rand(f'aug_{name}_p') < p for name in COLOR]
    cols = labels.split([1, 1, 1, 2, 1], dim=1)
    for name, f, col in zip(COLOR, fired, cols):
        assert torch.all(col[~f] == 0), name
        if name != 'lumaflip':
            assert torch.all(col[f].abs().sum(1) > 0), name


def test_edm_cifar10_kwargs_give_nine_labels_in_edm_layout():
    pipe = dnnlib.util.construct_class_by_name(class_name='training.augment.AugmentPipe', **EDM_CIFAR10)
    assert type(pipe).__name__ == 'AugmentPipe' and pipe.init_kwargs == EDM_CIFAR10
    N = 4
    rnd = FixedRandom(
        aug_xflip_p=fire(N), aug_xflip=torch.tensor([1, 0, 0, 0]),
        aug_yflip_p=torch.tensor([0.0, 0.0, 1, 1]), aug_yflip=torch.tensor([1, 1, 1, 1]),
        aug_scale_p=torch.tensor([1.0, 0, 1, 1]), aug_scale=torch.full([N], 0.5),
        aug_rotate_frac_p=torch.tensor([1.0, 1, 0, 1]), aug_rotate_frac=torch.full([N], 0.75),
        aug_aniso_p=torch.tensor([1.0, 1, 1, 0]), aug_aniso=torch.full([N], 2.0),
        aug_aniso_angle_p=fire(N), aug_aniso_angle=torch.full([N], 2 / 3),
        aug_translate_frac_p=torch.tensor([0.0, 1, 1, 1]), aug_translate_frac=torch.tensor([[0.3, -0.2]] * N),
    )
    _, labels = pipe(images(N=N), rnd)
    theta, r = math.pi / 2, math.pi / 3       # (0.75 * 2 - 1) * pi, (2/3 * 2 - 1) * pi
    expect = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0, 0.3, -0.2],
        [0, 1, 0.5, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, math.cos(theta) - 1, math.sin(theta), 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 2 * math.cos(r), 2 * math.sin(r), 0, 0],
    ])
    assert torch.allclose(labels, expect, atol=1e-6)

# ----------------------------------------------------------------------------
# Geometry with known answers.

def test_translate_int_by_known_amounts_mirrors_about_edge_pixels():
    x = images(N=1, H=6, W=6)
    # translate_int_max=0.5 on 6 px: tx = round((2u - 1) * 3); u = 5/6 -> tx = 2 (right), u = 1/3 -> ty = -1 (down).
    rnd = FixedRandom(aug_translate_int_p=fire(1), aug_translate_int=torch.tensor([[5 / 6, 1 / 3]]))
    y, labels = AugmentPipe(translate_int=1, translate_int_max=0.5)(x, rnd)
    expect = x[:, :, [1, 0, 1, 2, 3, 4]][:, :, :, [2, 1, 0, 1, 2, 3]]
    assert torch.equal(y, expect)
    assert torch.allclose(labels, torch.tensor([[2 / 3, -1 / 3]]))


def test_rotate_int_matches_rot90():
    x = images()
    k = torch.tensor([0, 1, 2, 3])
    y, labels = AugmentPipe(rotate_int=1)(x, FixedRandom(aug_rotate_int_p=fire(4), aug_rotate_int=k))
    for i in range(4):
        assert torch.equal(y[i], x[i].rot90(i, dims=(1, 2)))
    assert torch.equal(labels, torch.tensor([[0.0, 0], [1, 0], [1, 1], [0, 1]]))


def test_rotate_frac_quarter_turn_matches_rot90():
    x = images(N=1, H=7, W=7)
    # theta = (2u - 1) * pi = pi / 2 for u = 3/4.
    rnd = FixedRandom(aug_rotate_frac_p=fire(1), aug_rotate_frac=torch.tensor([0.75]))
    y, labels = AugmentPipe(rotate_frac=1)(x, rnd)
    assert torch.allclose(y, x.rot90(1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(labels, torch.tensor([[-1.0, 1.0]]), atol=1e-6)


def test_translate_frac_by_one_pixel_uses_reflection_padding():
    x = images(N=1, H=8, W=8)
    # w_x * W * std = 1 px right, w_y = 0.
    rnd = FixedRandom(aug_translate_frac_p=fire(1), aug_translate_frac=torch.tensor([[1 / (8 * 0.125), 0.0]]))
    y, _ = AugmentPipe(translate_frac=1)(x, rnd)
    assert torch.allclose(y, x[:, :, :, [0, 0, 1, 2, 3, 4, 5, 6]], atol=1e-5)


def test_scale_and_aniso_magnify_about_the_centre():
    x = images(N=2, H=9, W=9)
    c = 4
    i = torch.arange(-2, 3)
    # Sample 0: isotropic magnification 2^(1 * 1) = 2: out(2i, 2j) = in(i, j).
    rnd = FixedRandom(aug_scale_p=fire(2), aug_scale=torch.tensor([1.0, 0.0]))
    y, _ = AugmentPipe(scale=1, scale_std=1)(x, rnd)
    assert torch.allclose(y[0][:, c + 2 * i][:, :, c + 2 * i], x[0][:, c + i][:, :, c + i], atol=1e-5)
    assert torch.equal(y[1], x[1])
    # Anisotropic with r = 0 (angle coin 1 never keeps r): 2x along x, 1/2 along y: out(2i, j) = in(i, 2j).
    rnd = FixedRandom(aug_aniso_p=fire(2), aug_aniso=torch.tensor([1.0, 1.0]),
                      aug_aniso_angle_p=torch.ones(2), aug_aniso_angle=torch.tensor([0.3, 0.3]))
    y, labels = AugmentPipe(aniso=1, aniso_std=1)(x, rnd)
    assert torch.allclose(y[0][:, c + i][:, :, c + 2 * i], x[0][:, c + 2 * i][:, :, c + i], atol=1e-5)
    assert torch.equal(labels, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_geometric_transforms_preserve_a_constant_image():
    x = torch.full([16, 3, 8, 8], 0.25)
    y, _ = AugmentPipe(p=1, **GEOM)(x, step_rnd(16, seed=1))
    assert torch.allclose(y, x, atol=1e-6)

# ----------------------------------------------------------------------------
# Color with known answers.

def test_hue_and_saturation_preserve_grey():
    grey = torch.tensor([-1.0, -0.3, 0.0, 0.4, 1.0]).reshape(5, 1, 1, 1).expand(5, 3, 4, 4)
    y, labels = AugmentPipe(p=1, hue=1, saturation=1)(grey, step_rnd(5, seed=2))
    assert torch.allclose(y, grey, atol=1e-6)
    assert torch.all(labels.abs().sum(1) > 0)


def test_hue_third_turn_cycles_channels():
    x = images(N=1)
    # theta = (2u - 1) * pi = 2 pi / 3 for u = 5/6: R -> G -> B -> R.
    y, _ = AugmentPipe(hue=1)(x, FixedRandom(aug_hue_p=fire(1), aug_hue=torch.tensor([5 / 6])))
    assert torch.allclose(y, x.roll(1, dims=1), atol=1e-6)


def test_brightness_contrast_lumaflip_saturation_closed_forms():
    x = images(N=1)
    luma = x.mean(dim=1, keepdim=True)
    one = fire(1)
    cases = [
        (dict(brightness=1), dict(aug_brightness_p=one, aug_brightness=torch.tensor([1.5])), x + 1.5 * 0.2),
        (dict(contrast=1), dict(aug_contrast_p=one, aug_contrast=torch.tensor([2.0])), x * 2.0),
        (dict(lumaflip=1), dict(aug_lumaflip_p=one, aug_lumaflip=torch.tensor([1])), x - 2 * luma),
        (dict(saturation=1), dict(aug_saturation_p=one, aug_saturation=torch.tensor([-1.0])), luma + (x - luma) / 2),
        (dict(brightness=1, contrast=1), dict(aug_brightness_p=one, aug_brightness=torch.tensor([1.0]),
                                              aug_contrast_p=one, aug_contrast=torch.tensor([2.0])), (x + 0.2) * 2),
    ]
    for kwargs, streams, expect in cases:
        y, _ = AugmentPipe(**kwargs)(x, FixedRandom(**streams))
        assert torch.allclose(y, expect, atol=1e-6), kwargs


def test_single_channel_gets_brightness_contrast_lumaflip_only():
    x = images(N=1, C=1)
    one = fire(1)
    streams = dict(aug_brightness_p=one, aug_brightness=torch.tensor([1.0]),
                   aug_contrast_p=one, aug_contrast=torch.tensor([2.0]),
                   aug_lumaflip_p=one, aug_lumaflip=torch.tensor([1]),
                   aug_hue_p=one, aug_hue=torch.tensor([0.9]),
                   aug_saturation_p=one, aug_saturation=torch.tensor([-3.0]))
    y, _ = AugmentPipe(**COLOR)(x, FixedRandom(**streams))
    assert torch.allclose(y, -(x + 0.2) * 2, atol=1e-6)

# ----------------------------------------------------------------------------
# Interoperability and errors.

def test_pickle_round_trip_preserves_kwargs_and_behaviour(monkeypatch):
    pipe = AugmentPipe(**EDM_CIFAR10)
    data = pickle.dumps(pipe)
    assert b'_reconstruct_persistent_obj' in data and b'AugmentPipe' in data
    monkeypatch.setattr(persistence, '_code_execution_allowed', True)   # the embedded-source reader
    clone = pickle.loads(data)
    assert type(clone).__name__ == 'AugmentPipe' and clone.init_kwargs == EDM_CIFAR10
    x = images(N=8)
    y1, l1 = pipe(x, step_rnd(8, seed=4))
    y2, l2 = clone(x, step_rnd(8, seed=4))
    assert torch.equal(y1, y2) and torch.equal(l1, l2)


@pytest.mark.parametrize('module', [augment, loss])
def test_module_imports_only_what_embedded_source_may_use(module):
    """Anywhere in the module, also inside functions: EDM's readers exec it beside their own `training` package."""
    tree = ast.parse(inspect.getsource(module))
    names = {a.name.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert names <= {'numpy', 'torch', 'torch_utils'}, names


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match='p=-0.5'):
        AugmentPipe(p=-0.5)
    with pytest.raises(ValueError, match=r'\[N, C, H, W\]'):
        AugmentPipe(xflip=1)(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match='square'):
        AugmentPipe(rotate_int=1)(torch.zeros(2, 3, 8, 6))
    with pytest.raises(ValueError, match='1 or 3 channels'):
        AugmentPipe(brightness=1)(torch.zeros(2, 2, 8, 8))


def test_color_basis_made_on_the_device_equals_the_numpy_constants():
    """The 4x4 color matrices, built on the device by fills (no host-to-device copy in a step), are bitwise the
    float32 casts of the numpy definitions."""
    from training import augment
    for made, numpy_matrix in zip(augment._color_basis(torch.device('cpu')), (augment._P, augment._D, augment._K, augment._E)):
        assert torch.equal(made, torch.as_tensor(numpy_matrix, dtype=torch.float32))
