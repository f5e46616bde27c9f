"""The training loop with --method=edm: files, exact resume, batch-split and world-size invariance, bad input."""

import json
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from dataset_tool import save_dataset
from torch_utils import persistence
from training import training_loop as loop_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny network: one 8x8 level, 16 channels, 1 block.
TINY_NET = dict(class_name='training.networks.EDMPrecond', model_type='SongUNet', model_channels=16, channel_mult=[1],
                num_blocks=1, attn_resolutions=[], dropout=0.0)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """16 labelled 8x8 RGB images and the same without labels."""
    root = tmp_path_factory.mktemp('data')
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=[8, 8, 3], dtype=np.uint8) for _ in range(16)]
    save_dataset(str(root / 'cond.zip'), images, [i % 4 for i in range(16)])
    save_dataset(str(root / 'uncond.zip'), images, None)
    return root


def run_loop(run_dir, data_path, total_kimg, batch_gpu=None, resume_state=None, seed=1, **kwargs):
    c = dnnlib.EasyDict(
        run_dir=str(run_dir),
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=str(data_path), use_labels=True),
        method_kwargs=dict(class_name='training.teacher.EDM', network_kwargs=TINY_NET,
                           loss_kwargs=dict(class_name='training.loss.EDMLoss'),
                           optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3), lr_rampup_kimg=0.016,
                           ema_halflife_kimg=0.01, sample_steps=2),
        seed=seed, batch_size=8, batch_gpu=batch_gpu, total_kimg=total_kimg, kimg_per_tick=0.016, snapshot_ticks=1,
        state_dump_ticks=1, resume_state=resume_state, preview_grid=4, device=torch.device('cpu'))
    c.update(kwargs)
    os.makedirs(run_dir, exist_ok=True)
    return loop_module.training_loop(**c)


def final_weights(run_dir):
    state = torch.load(loop_module.find_latest_state(str(run_dir)), weights_only=True)
    return state['method']['net'], state['method']['ema']


def test_run_writes_files_and_loadable_snapshot(data, tmp_path):
    assert run_loop(tmp_path, data / 'cond.zip', total_kimg=0.032)
    names = sorted(os.listdir(tmp_path))
    assert 'stats.jsonl' in names and 'network-snapshot-000000.pkl' in names and 'training-state-000000.pt' in names
    assert 'fakes-000000.png' in names
    lines = [json.loads(l) for l in open(tmp_path / 'stats.jsonl')]
    assert [l['Progress/kimg']['mean'] for l in lines] == [0.016, 0.032]
    assert all('Loss/loss' in l and 'timestamp' in l for l in lines)
    with open(tmp_path / 'network-snapshot-000000.pkl', 'rb') as f:
        snap = persistence.load(f)
    assert sorted(snap) == ['augment_pipe', 'dataset_kwargs', 'ema', 'loss_fn']
    net, ema = final_weights(tmp_path)
    for k, v in snap['ema'].state_dict().items():
        assert torch.equal(v, ema[k]), k


# Plain SGD for the split-invariance tests: Adam's first steps have size ~lr whatever the gradient's size, so
# float noise in a near-zero gradient element could flip a whole lr-sized step; SGD keeps differences ~lr * noise.
SGD = dict(class_name='torch.optim.SGD', lr=0.05)


def sgd_method(**kwargs):
    return dict(dict(class_name='training.teacher.EDM', network_kwargs=TINY_NET, loss_kwargs=dict(class_name='training.loss.EDMLoss'),
                     optimizer_kwargs=SGD, lr_rampup_kimg=0), **kwargs)


@pytest.mark.parametrize('dropout', [0, 0.13])  # dropout masks are keyed by sample position, not drawn per round
def test_batch_gpu_does_not_change_result(data, tmp_path, dropout):
    method = sgd_method(network_kwargs=dict(TINY_NET, dropout=dropout))
    run_loop(tmp_path / 'a', data / 'cond.zip', total_kimg=0.016, method_kwargs=method)
    run_loop(tmp_path / 'b', data / 'cond.zip', total_kimg=0.016, batch_gpu=4, method_kwargs=method)
    a, _ = final_weights(tmp_path / 'a')
    b, _ = final_weights(tmp_path / 'b')
    assert_same_update(a, b, seed=1, net_kwargs=TINY_NET)


def test_step_random_draws_in_chunks():
    """A step's random numbers are chunks of at most DRAW_CHUNK elements of the flattened global batch, chunk j from
    its own generator (so that CUDA's numbers do not depend on the GPU model), and a rank's rows are those rows of
    the global array, drawn from the chunks that overlap them only."""
    from training.batching import DRAW_CHUNK, Round, StepRandom, stable_seed
    shape = [(2 * DRAW_CHUNK + 5) // 3]  # three rows: two whole chunks and one of 5 elements
    numel = 3 * shape[0]
    for kind, draw, high in [('randn', torch.randn, None), ('rand', torch.rand, None),
                             ('randint', lambda n, generator: torch.randint(9, n, generator=generator), 9)]:
        expected = torch.cat([draw([min(DRAW_CHUNK, numel - i)], generator=torch.Generator().manual_seed(
            stable_seed(3, 5, kind, 'x', i // DRAW_CHUNK))) for i in range(0, numel, DRAW_CHUNK)]).reshape(3, *shape)
        rand = StepRandom(seed=3, step=5, batch_size=3, device='cpu')
        assert torch.equal(rand._draw(kind, 'x', shape, high, 0, 3), expected)
        rank = StepRandom(seed=3, step=5, batch_size=3, device='cpu')  # the rank holding row 2 only
        r = Round(None, None, rank, 2, 1)
        got = r.randint('x', 9, *shape) if kind == 'randint' else getattr(r, kind)('x', *shape)
        assert torch.equal(got, expected[2:])
        assert sorted(k[-1] for k in rank._cache) == [1, 2]  # row 2 spans chunks 1 and 2: chunk 0 is not drawn


def assert_same_update(a, b, seed, net_kwargs):
    """a and b agree to float noise: their difference is < 1e-4 of the largest change from the initial weights."""
    import dnnlib
    torch.manual_seed(seed)  # the loop builds the networks under the global seed
    init = dnnlib.util.construct_class_by_name(**net_kwargs, img_resolution=8, img_channels=3, label_dim=4).state_dict()
    change = max((a[k] - init[k]).abs().max() for k in a)
    diff = max((a[k] - b[k]).abs().max() for k in a)
    assert change > 1e-3 and diff < 1e-4 * change, (change, diff)


def test_exact_resume_after_state_dump_and_sigterm(data, tmp_path, monkeypatch):
    # Uninterrupted: 6 steps of 8 images.
    run_loop(tmp_path / 'full', data / 'cond.zip', total_kimg=0.048)
    full_net, full_ema = final_weights(tmp_path / 'full')

    # Interrupted by SIGTERM during step 3 (after the tick-1 state dump), then resumed from the run directory.
    from training.teacher import EDM
    orig_step = EDM.step
    calls = []

    def step_then_signal(self, rounds, cur_nimg):
        orig_step(self, rounds, cur_nimg)
        calls.append(cur_nimg)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(EDM, 'step', step_then_signal)
    assert run_loop(tmp_path / 'cut', data / 'cond.zip', total_kimg=0.048) is False
    monkeypatch.setattr(EDM, 'step', orig_step)
    state = torch.load(loop_module.find_latest_state(str(tmp_path / 'cut')), weights_only=True)
    assert state['cur_nimg'] == 24  # written at the step boundary after the signal

    run_loop(tmp_path / 'cut', data / 'cond.zip', total_kimg=0.048, resume_state=str(tmp_path / 'cut'))
    cut_net, cut_ema = final_weights(tmp_path / 'cut')
    for k in full_net:
        assert torch.equal(full_net[k], cut_net[k]), k
        assert torch.equal(full_ema[k], cut_ema[k]), k
    kimgs = [json.loads(l)['Progress/kimg']['mean'] for l in open(tmp_path / 'cut' / 'stats.jsonl')]
    assert kimgs == [0.016, 0.032, 0.048]


def test_resume_from_earlier_state_is_bitwise_identical(data, tmp_path):
    run_loop(tmp_path / 'full', data / 'cond.zip', total_kimg=0.048)
    run_loop(tmp_path / 'part', data / 'cond.zip', total_kimg=0.016)
    state_file = tmp_path / 'part' / 'training-state-000000.pt'
    run_loop(tmp_path / 'part', data / 'cond.zip', total_kimg=0.048, resume_state=str(state_file))
    a, _ = final_weights(tmp_path / 'full')
    b, _ = final_weights(tmp_path / 'part')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_infinite_lr_stops_with_one_line_naming_no_state(data, tmp_path):
    with pytest.raises(dnnlib.util.RunError, match=r'^Training diverged at 0.016 kimg: non-finite weights; no training '
                                                   r'state was written yet: start again with a lower --lr$'):
        run_loop(tmp_path, data / 'cond.zip', total_kimg=0.016,
                 method_kwargs=dict(class_name='training.teacher.EDM', network_kwargs=TINY_NET,
                                    loss_kwargs=dict(class_name='training.loss.EDMLoss'),
                                    optimizer_kwargs=dict(class_name='torch.optim.SGD', lr=float('inf'))))
    assert not any(n.startswith(('network-snapshot', 'training-state')) for n in os.listdir(tmp_path))

# ----------------------------------------------------------------------------
# The NaN policy: non-finite values are counted and shown, a run whose loss stays non-finite stops in one line
# naming the last training state, and no snapshot of a generator with non-finite samples is ever written.

DIVERGE = ['--arch=ddpmpp', '--cbase=16', '--cres=1', '--dropout=0', '--augment=0', '--batch=8', '--tick=0.008',
           '--snap=1', '--dump=1', '--workers=0', '--seed=3', '--device=cpu', '--lr-rampup=0', '--nosubdir', '--cond=1']


def test_edm_lr_1e6_stops_before_writing_a_nan_snapshot(data, tmp_path):
    """The campaign's case: --lr=1e6 used to exit 0 with a snapshot whose outputs were NaN for every input."""
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', f'--data={data / "cond.zip"}', *DIVERGE, '--lr=1e6',
                                        '--duration=0.000064'])
    errors = [l for l in r.output.splitlines() if l.startswith('Error:')]
    assert r.exit_code == 1 and errors == [l for l in r.output.splitlines() if 'diverged' in l]
    assert errors[0].startswith('Error: Training diverged at 0.008 kimg: ') and 'start again with a lower --lr' in errors[0]
    assert not any(n.startswith(('network-snapshot', 'training-state')) for n in os.listdir(tmp_path))


def test_divergence_names_the_last_state_and_a_lower_lr_resumes(data, tmp_path):
    """Two good ticks, then a resume at --lr=1e6 diverges: the error names the state it came from, which stays as it
    was, and nothing is written after it; a resume with a lower --lr is accepted (lr may change on resume)."""
    args = [f'--outdir={tmp_path}', f'--data={data / "cond.zip"}', *DIVERGE]
    assert CliRunner().invoke(train.main, [*args, '--lr=1e-3', '--duration=0.000016']).exit_code == 0
    state = tmp_path / 'training-state-000000.pt'
    before = state.read_bytes()
    files = sorted(os.listdir(tmp_path))
    r = CliRunner().invoke(train.main, [*args, '--lr=1e6', '--duration=0.000064', f'--resume={tmp_path}'])
    assert r.exit_code == 1 and f'the last training state is "{state}": resume from it with a lower learning rate' in r.output
    assert state.read_bytes() == before and sorted(os.listdir(tmp_path)) == sorted(files + ['resumes.jsonl'])
    r = CliRunner().invoke(train.main, [*args, '--lr=5e-4', '--duration=0.000032', f'--resume={tmp_path}'])
    assert r.exit_code == 0, r.output



def test_sigterm_stop_of_a_diverged_run_writes_no_state(data, tmp_path, monkeypatch):
    """Issue 26 G: a diverging run stopped by SIGTERM between ticks runs the tick's checks before the stop's state
    write: one line naming the last good state (left as it was, though the stop's state would have had its name), exit 1."""
    from training.batching import StepRandom
    args = [f'--outdir={tmp_path}', f'--data={data / "cond.zip"}', *DIVERGE]
    assert CliRunner().invoke(train.main, [*args, '--lr=1e-3', '--duration=0.000016']).exit_code == 0
    state = tmp_path / 'training-state-000000.pt'
    before = state.read_bytes()
    files = sorted(os.listdir(tmp_path))

    class SigtermAtStep4(StepRandom):  # two diverging steps after the resume at step 2, no tick in between
        def __init__(self, seed, step, *rest):
            super().__init__(seed, step, *rest)
            if step == 4:
                os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(loop_module, 'StepRandom', SigtermAtStep4)
    r = CliRunner().invoke(train.main, [*args, '--lr=1e6', '--duration=0.000064', '--tick=1', f'--resume={tmp_path}'])
    errors = [l for l in r.output.splitlines() if l.startswith('Error:')]
    assert r.exit_code == 1 and len(errors) == 1 and errors[0].startswith('Error: Training diverged at 0.04 kimg: '), r.output
    assert f'the last training state is "{state}": resume from it with a lower learning rate' in errors[0]
    assert 'Received SIGTERM' not in r.output
    assert state.read_bytes() == before and sorted(os.listdir(tmp_path)) == sorted(files + ['resumes.jsonl'])

def test_dmd_divergence_stops_in_one_line(tmp_path):
    from training.networks import EDMPrecond
    torch.manual_seed(0)
    with open(tmp_path / 'teacher.pkl', 'wb') as f:
        pickle.dump(dict(ema=EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type='SongUNet',
                                        model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])), f)
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "run"}', '--method=dmd', f'--teacher={tmp_path / "teacher.pkl"}',
                                        '--batch=8', '--tick=0.008', '--snap=1', '--dump=1', '--seed=1', '--device=cpu',
                                        '--lr=1e6', '--duration=0.000064', '--nosubdir'])
    assert r.exit_code == 1 and r.output.splitlines()[-1].startswith('Error: Training diverged at '), r.output
    assert not any(n.startswith('network-snapshot') for n in os.listdir(tmp_path / 'run'))


def test_nonfinite_values_are_counted_not_hidden():
    from torch_utils import training_stats
    training_stats.collect()
    training_stats.report('Loss/x', torch.tensor([1.0, float('nan'), 3.0, float('inf')]))
    training_stats.report('Loss/y', torch.tensor([float('nan')]))
    assert training_stats.collect(prefix='Loss/x', reset=False) == {'Loss/x': dict(num=2, mean=2, std=1, nonfinite=2)}
    assert training_stats.collect() == {'Loss/x': dict(num=2, mean=2, std=1, nonfinite=2),
                                        'Loss/y': dict(num=0, mean=None, std=None, nonfinite=1)}
    assert training_stats.collect() == {}

# ----------------------------------------------------------------------------
# The CLI.

CLI_NET = ['--arch=ddpmpp', '--cbase=16', '--cres=1', '--dropout=0', '--augment=0', '--batch=8', '--tick=0.008',
           '--snap=1', '--dump=1', '--workers=0', '--seed=3', '--device=cpu', '--lr-rampup=0']


def cli(*args):
    return CliRunner().invoke(train.main, list(args), catch_exceptions=False)


def test_cli_short_run_and_generate(data, tmp_path):
    r = cli(f'--outdir={tmp_path}', f'--data={data / "cond.zip"}', '--cond=1', '--duration=0.000016', *CLI_NET)
    assert r.exit_code == 0, r.output
    (run_dir,) = os.listdir(tmp_path)
    assert run_dir == '00000-cond-cond-ddpmpp-edm-gpus1-batch8-fp32'
    options = json.load(open(tmp_path / run_dir / 'training_options.json'))
    assert options['batch_size'] == 8 and options['seed'] == 3
    assert options['method_kwargs']['network_kwargs']['model_channels'] == 16
    assert 'Training options' in open(tmp_path / run_dir / 'log.txt').read()


@pytest.mark.parametrize('args, message', [
    (['--data=/nonexistent.zip'], '--data'),
    (['--data={uncond}', '--cond=1'], 'no labels'),
    (['--data={cond}', '--batch=8', '--batch-gpu=3'], '--batch-gpu=3'),
    ([], 'needs --data'),
    (['--data={cond}', '--grad-clip=1'], 'drop --grad-clip'),
])
def test_cli_bad_input_creates_nothing(data, tmp_path, args, message):
    args = [a.format(cond=data / 'cond.zip', uncond=data / 'uncond.zip') for a in args]
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', '--device=cpu', *args])
    assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / 'runs').exists()


def test_cli_transfer_resolution_mismatch(data, tmp_path):
    from training.networks import EDMPrecond
    net = EDMPrecond(img_resolution=16, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=16,
                     channel_mult=[1], num_blocks=1, attn_resolutions=[])
    with open(tmp_path / 'net.pkl', 'wb') as f:
        pickle.dump(dict(ema=net), f)
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', '--device=cpu', f'--data={data / "cond.zip"}',
                                        '--cond=1', f'--transfer={tmp_path / "net.pkl"}'])
    assert r.exit_code != 0 and '--transfer' in r.output and '16x16' in r.output, r.output
    assert not (tmp_path / 'runs').exists()


def test_cli_dry_run_writes_nothing(data, tmp_path):
    r = cli(f'--outdir={tmp_path / "runs"}', f'--data={data / "cond.zip"}', '--cond=1', '--dry-run', *CLI_NET)
    assert r.exit_code == 0 and 'Dry run' in r.output
    assert not (tmp_path / 'runs').exists()

# ----------------------------------------------------------------------------
# Two processes (gloo) give the weights of one process with the same global batch, with dropout too.

def train_1_and_2_processes(tmp_path, args):
    """`train.py ARGS` in one process and under torchrun with two (gloo), in tmp_path/one and tmp_path/two
    (ARGS include --nosubdir): the method states of their last training states."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    one = subprocess.run([sys.executable, 'train.py', f'--outdir={tmp_path / "one"}', *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          'train.py', f'--outdir={tmp_path / "two"}', *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    return [torch.load(loop_module.find_latest_state(str(tmp_path / d)), weights_only=True)['method'] for d in ('one', 'two')]


def test_two_processes_match_one(data, tmp_path):
    common = [f'--data={data / "cond.zip"}', '--cond=1', '--duration=0.000016', '--nosubdir', *CLI_NET, '--dropout=0.13']
    a, b = [state['net'] for state in train_1_and_2_processes(tmp_path, common)]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_augmented_training_feeds_augment_labels(data, tmp_path):
    """--augment: the network gets EDM's 9 augment labels (map_augment) and the run is still exactly resumable."""
    augment = dict(class_name='training.augment.AugmentPipe', p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1,
                   aniso=1, translate_frac=1)
    kwargs = sgd_method(augment_kwargs=augment)
    kwargs['network_kwargs'] = dict(TINY_NET, augment_dim=9)
    run_loop(tmp_path / 'a', data / 'cond.zip', total_kimg=0.016, method_kwargs=kwargs)
    run_loop(tmp_path / 'b', data / 'cond.zip', total_kimg=0.016, method_kwargs=kwargs, batch_gpu=2)
    a, _ = final_weights(tmp_path / 'a')
    b, _ = final_weights(tmp_path / 'b')
    assert a['model.map_augment.weight'].shape == (16, 9)
    assert a['model.map_augment.weight'].abs().sum() > 0
    assert_same_update(a, b, seed=1, net_kwargs=kwargs['network_kwargs'])  # augmentation is keyed by sample position
    with open(tmp_path / 'a' / 'network-snapshot-000000.pkl', 'rb') as f:
        snap = persistence.load(f)
    assert type(snap['augment_pipe']).__name__ == 'AugmentPipe' and snap['augment_pipe'].p == 0.5


STAND_IN = r'''
import json, sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[2]]  # a `training` package without this project's modules, then the project
import training
from torch_utils import persistence
assert not hasattr(training, 'batching') and training.__file__.startswith(sys.argv[1])
with open(sys.argv[3], 'rb') as f:
    data = persistence.load(f, allow_code=True)  # EDM's reader: the embedded module sources run
torch.manual_seed(0)
images, labels = torch.rand([4, 3, 8, 8]) * 2 - 1, torch.eye(4)[[0, 1, 2, 3]]
loss = data['loss_fn'](net=data['ema'], images=images, labels=labels, augment_pipe=data['augment_pipe'])
y, augment_labels = data['augment_pipe'](images)
print(json.dumps(dict(loss=list(loss.shape), finite=bool(loss.isfinite().all()), y=list(y.shape),
                      augment_labels=list(augment_labels.shape), modules=sorted(type(data[k]).__module__ for k in
                      ['ema', 'loss_fn', 'augment_pipe']), dataset_kwargs=type(data['dataset_kwargs']).__name__)))
'''


def test_snapshot_loss_and_augment_pipe_run_under_edms_own_code(data, tmp_path):
    """EDM-derived tools exec a snapshot's embedded sources beside their own `training` package and call
    `loss_fn(net=, images=, labels=, augment_pipe=)` and `augment_pipe(images)`: neither may import this project's
    other modules. The snapshot's dataset_kwargs is a plain dict, as EDM writes it."""
    augment = dict(class_name='training.augment.AugmentPipe', p=1, xflip=1e8, yflip=1, scale=1, rotate_frac=1,
                   aniso=1, translate_frac=1)
    kwargs = sgd_method(augment_kwargs=augment, ema_halflife_kimg=0.01)
    kwargs['network_kwargs'] = dict(TINY_NET, augment_dim=9)
    run_loop(tmp_path / 'run', data / 'cond.zip', total_kimg=0.008, method_kwargs=kwargs)
    (tmp_path / 'stand' / 'training').mkdir(parents=True)
    (tmp_path / 'stand' / 'training' / '__init__.py').write_text('')
    r = subprocess.run([sys.executable, '-c', STAND_IN, str(tmp_path / 'stand'), ROOT,
                        str(tmp_path / 'run' / 'network-snapshot-000000.pkl')], cwd=tmp_path / 'stand',
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out['loss'] == [4, 3, 8, 8] and out['finite'] and out['y'] == [4, 3, 8, 8] and out['augment_labels'] == [4, 9]
    assert all(m.startswith('_imported_module_') for m in out['modules']), out['modules']  # the embedded sources ran
    assert out['dataset_kwargs'] == 'dict'


def test_ema_update_is_the_half_life_formula():
    """One fused update (torch._foreach_lerp_) equals EDM's ema <- beta ema + (1 - beta) net, beta = 0.5^(batch /
    min(half-life, ramp-up ratio x images seen)), to float32 rounding; buffers are copied."""
    from training.ema import EMA
    torch.manual_seed(0)
    net = torch.nn.BatchNorm1d(5)  # parameters and buffers
    ema = EMA(net, halflife_kimg=0.5, rampup_ratio=0.05)
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            t.copy_(torch.randn(t.shape) if t.is_floating_point() else t + 3)
    before = [p.detach().double().clone() for p in ema.ema.parameters()]
    ema.update(cur_nimg=4000, batch_size=64)  # ramp-up: half-life min(500, 200) images
    beta = 0.5 ** (64 / 200)
    for b, p_net, p_ema in zip(before, net.parameters(), ema.ema.parameters()):
        torch.testing.assert_close(p_ema.double(), beta * b + (1 - beta) * p_net.double(), rtol=0, atol=1e-6)
        assert not torch.equal(p_ema, p_net)
    assert all(torch.equal(a, b) for a, b in zip(ema.ema.buffers(), net.buffers()))
