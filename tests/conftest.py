"""One intra-op thread per process: the tests use tiny networks, where extra threads only add contention
(and the torchrun tests start two processes on a 2-core machine). Signal handlers and torch's
deterministic mode are restored after each test. Also the fixtures several test modules share."""

import os
import signal

os.environ.setdefault('OMP_NUM_THREADS', '1')

import pickle  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402 (after the environment is set, so child processes inherit it)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_process_settings():
    """train.main keeps its SIGTERM/SIGINT handlers until its process exits, and --deterministic sets a torch-wide
    mode: in the test process both end with the test (so that Ctrl-C still stops pytest)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    torch.use_deterministic_algorithms(deterministic)


# A tiny conditional 8x8 EDM network: the teacher of the distillation tests.
TINY_TEACHER = dict(img_resolution=8, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=16,
                    channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0)


@pytest.fixture(scope='module')
def teacher_pkl(tmp_path_factory):
    """TINY_TEACHER with seed-0 weights, pickled as EDM's snapshots are ({'ema': net})."""
    from training.networks import EDMPrecond
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pkl'
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=EDMPrecond(**TINY_TEACHER)), f)
    return path


# VGG16 `features` as torchvision lays it out: numbers are conv widths, 'M' a 2x2 max-pool (indices count both
# the conv and its ReLU, so conv i is followed by ReLU i+1).
_VGG_CFG = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512]


@pytest.fixture(scope='module')
def weight_files(tmp_path_factory):
    """Random VGG16 and LPIPS-head weights saved in the official files' key layouts."""
    root = tmp_path_factory.mktemp('lpips_weights')
    g = torch.Generator().manual_seed(0)
    vgg, index, c_in = {}, 0, 3
    for v in _VGG_CFG:
        if v == 'M':
            index += 1
            continue
        vgg[f'features.{index}.weight'] = torch.randn([v, c_in, 3, 3], generator=g) * (2 / (9 * c_in)) ** 0.5
        vgg[f'features.{index}.bias'] = torch.randn([v], generator=g) * 0.1
        index, c_in = index + 2, v
    vgg['classifier.0.weight'] = torch.randn([10, 4], generator=g)  # torchvision's file has the classifier too
    lin = {f'lin{k}.model.1.weight': torch.rand([1, c, 1, 1], generator=g) for k, c in enumerate([64, 128, 256, 512, 512])}
    torch.save(vgg, root / 'vgg16.pth')
    torch.save(lin, root / 'vgg.pth')
    return dict(vgg=vgg, lin=lin, vgg_path=str(root / 'vgg16.pth'), lin_path=str(root / 'vgg.pth'))
