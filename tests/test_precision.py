"""One precision per run: backbone autocast, fp16 loss scaling, skipped non-finite steps, the options, exact resume
in fp16, no host syncs inside a step, and the GPU check command's CPU rehearsal (every method in bf16 and fp16)."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from dataset_tool import save_dataset
from torch_utils import training_stats
from training import networks, optim
from training import training_loop as loop_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))
import gpu_check  # noqa: E402

ADM = dict(img_channels=3, label_dim=0, model_type='DhariwalUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
           attn_resolutions=[], dropout=0, use_fp16=True)  # an ADM-style network whose stored flag asks for fp16


def adm(resolution, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return gpu_check.randomize_weights_(networks.EDMPrecond(img_resolution=resolution, **ADM), seed)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

# ----------------------------------------------------------------------------
# The backbone precision.

def test_backbone_precision_governs_every_network_whatever_use_fp16():
    net = adm(8)
    x, sigma = torch.randn([4, 3, 8, 8], generator=torch.Generator().manual_seed(1)), torch.full([4], 1.5)
    conv_dtypes = []
    net.model.enc['8x8_conv'].register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    ref = net(x, sigma)  # EDM's rule on the CPU: fp32 although use_fp16 is set
    for precision, dtype in [('fp32', torch.float32), ('bf16', torch.bfloat16), ('fp16', torch.float16)]:
        with networks.backbone_precision(precision):
            y = net(x, sigma)
            y_fp32 = net(x, sigma, force_fp32=True)
        assert y.dtype == torch.float32 and conv_dtypes[-2] == dtype and conv_dtypes[-1] == torch.float32
        assert torch.equal(y_fp32, ref)
        err = rel_err(y, ref)
        assert (err == 0) == (precision == 'fp32') and err < 0.05, (precision, err)
    with pytest.raises(ValueError, match='fp32, bf16 or fp16'):
        with networks.backbone_precision('tf32'):
            pass


@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_backbone_activations_in_the_run_precision_under_cuda_autocast(monkeypatch, model_type, precision):
    """CUDA autocast runs group_norm in fp32 (its fp32 op list; CPU autocast does not): emulated here by casting
    group_norm's inputs to fp32 whenever autocast is on. Every GroupNorm, convolution, linear layer and block output
    of the backbone is still in the run's precision; the fp32 path is bitwise plain group_norm."""
    real = torch.nn.functional.group_norm

    def cuda_autocast_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
        if torch.is_autocast_enabled(x.device.type):
            x, weight, bias = x.float(), weight.float(), bias.float()
        return real(x, num_groups, weight, bias, eps)
    monkeypatch.setattr(torch.nn.functional, 'group_norm', cuda_autocast_group_norm)
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, model_type=model_type, model_channels=16,
                              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0)
    seen = []
    for module in net.model.modules():
        if isinstance(module, (networks.GroupNorm, networks.Conv2d, networks.Linear, networks.UNetBlock)):
            module.register_forward_hook(lambda m, i, o: seen.append((type(m).__name__, o.dtype)))
    with networks.backbone_precision(precision):
        net(torch.randn([2, 3, 8, 8]), torch.full([2], 1.5))
    assert len(seen) > 20 and {dtype for _, dtype in seen} == {networks.PRECISIONS[precision]}, set(seen)
    norm, x = networks.GroupNorm(16), torch.randn([2, 16, 4, 4])
    assert torch.equal(norm(x), real(x, norm.num_groups, norm.weight, norm.bias, norm.eps))


def test_tf32_reaches_pd_fp32_teacher_forwards(monkeypatch):
    """PD's teacher runs in fp32 in any precision (force_fp32): --tf32 (the loop's global CUDA flags) still applies
    inside those forwards, which dominate a bf16 PD step; nothing on the way turns it off."""
    from training.distill.progressive import pd_target
    net, seen = adm(8), []
    real_forward = net.model.forward
    monkeypatch.setattr(net.model, 'forward', lambda *a, **k: seen.append(
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.is_autocast_enabled('cpu')))
        or real_forward(*a, **k))
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', True)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', True)
    with networks.backbone_precision('bf16'):
        pd_target(net, torch.randn([2, 3, 8, 8]), torch.full([2], 2.0), torch.full([2], 1.0), torch.full([2], 0.5))
    assert seen == [(True, True, False)] * 2  # two teacher forwards, fp32 (autocast off), TF32 allowed


def test_fp16_underflow_without_loss_scaling_and_its_cure():
    """The review's finding, reproduced: DMD's loss is a mean over C*H*W, so at ImageNet-64's per-GPU batch of 35
    and a median |grad| of 0.1 the gradient reaching the backbone output is ~2e-7 per element, subnormal in fp16.
    Same per-element size here on a 16x16 ADM: fp16 without scaling is far off fp32; a 2^16 loss scale cures it."""
    net, B = adm(16), 8
    g = torch.Generator().manual_seed(1)
    z = torch.randn([B, 3, 16, 16], generator=g)
    dm_grad = torch.randn([B, 3, 16, 16], generator=g) * 0.1 * (3 * 16 * 16 * B) / (3 * 64 * 64 * 35)

    def loss_fn(_):  # gradient injection, as DMD's distribution-matching loss
        x = net(z * 2.5, torch.full([B], 2.5))
        return 0.5 * (x - (x.detach() - dm_grad)).square().mean(dim=[1, 2, 3])

    def gradient(precision, scaling):
        with networks.backbone_precision(precision), optim.loss_scaling(scaling):
            u = optim.Updater(net.parameters(), 'G', lr=0)
            u.backward([0], loss_fn, B)
            grad = u.flat / (u.scaler.scale if u.scaler is not None else 1)
            u.flat = None
        for p in net.parameters():
            p.grad = None
        return grad

    ref = gradient('fp32', None)
    assert rel_err(gradient('fp16', None), ref) > 0.5          # measured 3.3 (cosine 0.40)
    assert rel_err(gradient('fp16', 'dynamic'), ref) < 0.01    # measured 0.0026
    assert rel_err(gradient('bf16', None), ref) < 0.05         # measured 0.021: bf16 has fp32's exponent range

# ----------------------------------------------------------------------------
# The updater: loss scale, skipped steps, equivalence with a plain optimizer step.

def test_loss_scaler_backs_off_grows_and_static_stays():
    s = optim.LossScaler('cpu', init_scale=8.0, growth_interval=2)
    seen = []
    for found_inf in [0, 0, 1, 0, 1, 0, 0, 0]:
        s.update(torch.tensor(float(found_inf)))
        seen.append(float(s.scale))
    assert seen == [8, 16, 8, 8, 4, 4, 8, 8]
    restored = optim.LossScaler('cpu')
    restored.load_state_dict(s.state_dict())
    assert float(restored.scale) == 8 and int(restored.good_steps) == 1
    static = optim.LossScaler('cpu', static=128.0)
    static.update(torch.tensor(1.0))
    assert float(static.scale) == 128


def test_loss_scale_stops_at_its_floor_and_the_run_is_diverged():
    """A scale halved on every non-finite gradient would reach 0 and skip every later step unnoticed: it stops at
    FLOOR = 1, a non-finite gradient there is flagged, and the loop's tick check ends the run as diverged."""
    s = optim.LossScaler('cpu', init_scale=4.0)
    seen = [(float(s.scale), float(s.update(torch.tensor(1.0)))) for _ in range(4)]
    assert seen == [(4, 0), (2, 0), (1, 1), (1, 1)] and float(s.scale) == 1
    assert optim.LossScaler('cpu', static=0.5).update(torch.tensor(1.0)) is None  # a static scale is the user's
    lin = torch.nn.Linear(3, 2)
    training_stats.collect()
    with optim.loss_scaling('dynamic'):
        u = optim.Updater(lin.parameters(), 'G', lr=0.1)
    u.scaler.scale = torch.tensor(1.0)
    u.backward([0], lambda _: lin(torch.full([1, 3], float('inf'))).sum(dim=1), 1)
    u.step(0.1)
    health = training_stats.collect(prefix=('Loss/', 'Health/'))
    assert health['Health/scale_floor_G']['mean'] == 1
    assert loop_module._divergence(health, types.SimpleNamespace(networks=lambda: {'G': lin})) == \
        "the gradient of G was non-finite at the fp16 loss scale's floor 1 (it overflows fp16 unscaled)"


@pytest.mark.parametrize('class_name', ['torch.optim.AdamW', 'torch.optim.RMSprop'])  # fused kernel; host-side skip
def test_updater_skips_nonfinite_steps_and_counts_them(class_name):
    lin = torch.nn.Linear(3, 2)
    u = optim.Updater(lin.parameters(), 'net', class_name=class_name, lr=0.1)
    before = [p.detach().clone() for p in lin.parameters()]
    x = torch.tensor([[1.0, float('nan'), 0.0]])
    training_stats.collect()
    u.backward([0], lambda _: lin(x).sum(dim=1), 1)
    u.step(0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))
    assert all(not s or float(s.get('step', 0)) == 0 for s in u.optimizer.state.values())
    u.backward([0], lambda _: lin(torch.ones([1, 3])).sum(dim=1), 1)
    u.step(0.1)
    assert not torch.equal(before[0], lin.weight)
    stats = training_stats.collect()
    assert stats['Health/skipped_net']['num'] == 2 and stats['Health/skipped_net']['mean'] == 0.5
    assert stats['Health/grad_norm_net']['num'] == 1 and stats['Health/grad_norm_net']['nonfinite'] == 1


def test_updater_equals_accumulated_clipped_adamw():
    """Two rounds into the flat buffer, clipping, fused AdamW == one backward, clip_grad_norm_, torch's AdamW."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn([6, 4])
    u = optim.Updater(a.parameters(), 'a', class_name='torch.optim.AdamW', lr=0.01, weight_decay=0.01, max_grad_norm=0.5)
    opt = torch.optim.AdamW(b.parameters(), lr=0.01, weight_decay=0.01, foreach=False)
    for _ in range(3):
        u.backward([x[:2], x[2:]], lambda xs: a(xs).square().sum(dim=1), 6)
        u.step(0.01)
        (b(x).square().sum(dim=1).sum() / 6).backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

# ----------------------------------------------------------------------------
# train.py: the option, its defaults and refusals, the run directory name, training_options.json.

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    rng = np.random.default_rng(0)
    save_dataset(str(root / 'cond.zip'), [rng.integers(0, 256, [8, 8, 3], dtype=np.uint8) for _ in range(16)],
                 [i % 4 for i in range(16)])
    return root / 'cond.zip'


EDM_ARGS = ['--cond=1', '--arch=adm', '--cbase=16', '--cres=1', '--batch=8', '--tick=0.008', '--snap=1', '--dump=1',
            '--seed=1', '--device=cpu', '--lr-rampup=0', '--dropout=0', '--augment=0']


@pytest.mark.parametrize('args, precision, scaling, use_fp16', [
    ([], 'fp32', None, False),                              # CPU default
    (['--fp16=1'], 'fp16', 'dynamic', True),                # EDM's flag
    (['--precision=fp16', '--ls=128'], 'fp16', 128, True),  # EDM's static loss scale
    (['--precision=bf16'], 'bf16', None, False),
])
def test_cli_precision_recorded(data, tmp_path, args, precision, scaling, use_fp16):
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', f'--data={data}', '--duration=0.000008', *EDM_ARGS, *args],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (run_dir,) = os.listdir(tmp_path)
    assert run_dir.endswith(f'-{precision}')
    options = json.load(open(tmp_path / run_dir / 'training_options.json'))
    assert options['precision'] == precision and options['loss_scaling'] == scaling and options['tf32'] is False
    assert options['method_kwargs']['network_kwargs']['use_fp16'] == use_fp16


@pytest.mark.parametrize('bf16_hardware, method, asked, precision, scaling', [
    (True, 'dmd', None, 'bf16', None),          # A100/H100: DMD2's bf16
    (False, 'dmd', None, 'fp16', 'dynamic'),    # V100/T4: fp16 with loss scaling, said on the log's first line
    (False, 'dmd', 'bf16', 'bf16', None),       # asked for: emulated, but as asked
    (False, 'edm', None, 'fp32', None),         # EDM's default is fp32 (its --fp16 is opt-in)
])
def test_cuda_default_precision_follows_bf16_hardware(monkeypatch, bf16_hardware, method, asked, precision, scaling):
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: calls.append(
        including_emulation) or bf16_hardware)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Tesla V100-SXM2-16GB')
    opts = dnnlib.EasyDict(fp16=False, precision=asked, ls=None, tf32=False, method=method)
    got, got_scaling, note = train.resolve_precision(opts, torch.device('cuda'))
    assert (got, got_scaling, opts.precision) == (precision, scaling, precision)
    assert set(calls) <= {False}  # hardware bf16 only: torch's default also counts emulation as support
    if precision == 'fp16':
        assert note == ('Precision: fp16 with loss scaling, not the default bf16: Tesla V100-SXM2-16GB has no bf16 '
                        'hardware (--precision=fp32 for full precision)')
    else:
        assert note is None


@pytest.mark.parametrize('args, message', [
    (['--fp16=1', '--precision=bf16'], '--fp16=1 means --precision=fp16'),
    (['--ls=128'], '--ls is a static fp16 loss scale'),
    (['--tf32=1'], '--tf32 applies to CUDA only'),
])
def test_cli_precision_refusals(data, tmp_path, args, message):
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', f'--data={data}', *EDM_ARGS, *args])
    assert r.exit_code != 0 and message in r.output
    assert not (tmp_path / 'runs').exists()


def test_fp16_resume_is_bitwise_exact_with_the_loss_scale(data, tmp_path):
    """EDM's loss overflows fp16 at the initial 2^16 scale: steps are skipped and the scale backs off; a resumed run
    restores the scale and its counter, and ends bitwise equal to an uninterrupted one."""
    common = [f'--data={data}', '--nosubdir', '--precision=fp16', *EDM_ARGS]
    run = lambda outdir, kimg, *extra: CliRunner().invoke(train.main, [f'--outdir={outdir}', f'--duration={kimg}', *common,
                                                                        *extra], catch_exceptions=False)
    assert run(tmp_path / 'full', 0.000032).exit_code == 0
    assert run(tmp_path / 'part', 0.000016).exit_code == 0
    assert run(tmp_path / 'part', 0.000032, f'--resume={tmp_path / "part"}').exit_code == 0
    a = torch.load(loop_module.find_latest_state(str(tmp_path / 'full')), weights_only=True)['method']
    b = torch.load(loop_module.find_latest_state(str(tmp_path / 'part')), weights_only=True)['method']
    assert a['optimizer']['scaler']['scale'] < 2 ** 16  # backed off: the restored value is not the initial one
    assert torch.equal(a['optimizer']['scaler']['scale'], b['optimizer']['scaler']['scale'])
    assert torch.equal(a['optimizer']['scaler']['good_steps'], b['optimizer']['scaler']['good_steps'])
    for k in a['net']:
        assert torch.equal(a['net'][k], b['net'][k]), k
    stats = [json.loads(l) for l in open(tmp_path / 'full' / 'stats.jsonl')]
    assert sum(s['Health/skipped_net']['mean'] * s['Health/skipped_net']['num'] for s in stats) >= 1

# ----------------------------------------------------------------------------
# No host-device synchronisation inside a step.

@pytest.fixture(scope='module')
def rehearsal_inputs(tmp_path_factory):
    """The CPU rehearsal's CIFAR-10 configuration: EDM and KD augment (EDM's setting) and train with dropout 0.13."""
    workdir = str(tmp_path_factory.mktemp('gpu-check'))
    device = torch.device('cpu')
    config = gpu_check.TINY['cifar10']
    assert config['dropout'] > 0 and config['augment_dim'] > 0
    return dict(workdir=workdir, config=config, lpips=gpu_check.write_lpips_weights(workdir),
                paths=gpu_check.write_inputs(workdir, 'cifar10', config, device))


@pytest.mark.parametrize('method', gpu_check.METHODS)
def test_no_host_sync_or_host_copy_inside_a_training_step(rehearsal_inputs, method):
    """No host sync and no host-to-device copy (bench/sync_counter.py: CUDA's placement emulated on the CPU) in any
    step, augmentation and dropout on, across PD's round boundary (step 2) and DisBack's stage switches."""
    c = rehearsal_inputs
    with networks.backbone_precision('fp16'), optim.loss_scaling('dynamic'):
        m = gpu_check.build_method(method, c['config'], c['paths'], c['lpips'], torch.device('cpu'), 4, c['workdir'], 32)
        from training.dataset import ImageFolderDataset
        dataset = ImageFolderDataset(path=c['paths']['data'], use_labels=True)
        training_stats.collect()  # statistics' host accumulators are then made inside the counter, which sees them
        for step in range(4):
            rounds = gpu_check.rounds_for(step, dataset, 4, torch.device('cpu'))
            with gpu_check.SyncCounter('cpu') as counter, gpu_check.HostCopyCounter('cpu') as copies:
                m.step(rounds, step * 4)
            assert counter.calls == [], (method, step, counter.calls)
            assert copies.calls == [], (method, step, copies.calls)
        if method == 'pd':
            assert m.round == 1
    training_stats.collect()


def test_host_copy_counter_sees_the_copies_it_is_for():
    """The counter's CPU emulation on the patterns the step code had: each kind is counted, device-side work is not."""
    x = torch.ones(4)
    with gpu_check.HostCopyCounter('cpu') as c:
        torch.as_tensor(0.5, dtype=torch.float32, device=x.device)                     # Python number on the device
        torch.tensor([1, 2], device=x.device)                                          # list on the device
        torch.arange(3, dtype=torch.float64).mul(0.5).to(x.device)                     # made on the host, moved
        torch.from_numpy(np.ones(2)).to(x.device)                                      # numpy, moved
        x[torch.arange(2)]                                                             # host index of a device tensor
        x.new_tensor([1.0])                                                            # host data on x's device
    assert len(c.calls) == 6, c.calls
    with gpu_check.HostCopyCounter('cpu') as c:
        torch.full([3], 0.5, device=x.device) * torch.arange(3, device=x.device)     # made on the device
        torch.as_tensor(x, device=x.device).to(torch.float64).to(x.device)            # already there
        x * torch.tensor(2.0)                                                          # a host scalar: a kernel argument
    assert c.calls == []

def test_gpu_check_data_has_every_network_label_count(tmp_path):
    """The GPU check's data and networks agree in both configurations, official and tiny: 64 images labelled
    `i % 1000` once gave an ImageNet-64 dataset of 64 classes against a 1000-class network, which the tiny config
    (then 4 classes) hid. Tiny configs now differ from the official ones in sizes only, labels derived by one function."""
    from training.dataset import ImageFolderDataset, check_network_matches
    for name, config in gpu_check.CONFIGS.items():
        sizes = set(gpu_check.SHRINK) | {'channel_mult'}
        assert {k: v for k, v in gpu_check.TINY[name].items() if k not in sizes} == \
            {k: v for k, v in config.items() if k not in sizes}
    assert gpu_check.CONFIGS['imagenet64']['label_dim'] == 1000 and gpu_check.CONFIGS['cifar10']['label_dim'] == 10
    config = gpu_check.TINY['imagenet64']
    save_dataset(str(tmp_path / 'data.zip'), [np.zeros([16, 16, 3], np.uint8)] * 64, gpu_check.class_labels(64, 1000))
    dataset = ImageFolderDataset(path=str(tmp_path / 'data.zip'), use_labels=True)
    check_network_matches(gpu_check.make_network(config, 0), dataset, 'the check itself is wrong')
    assert dataset.label_dim == 1000 and gpu_check.class_labels(64, 10)[::7] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]

# ----------------------------------------------------------------------------
# The GPU check command, rehearsed on the CPU: every method, both configurations, every precision, the CLI paths.

def test_gpu_check_cpu_rehearsal(tmp_path):
    out = tmp_path / 'rows.json'
    p = subprocess.run([sys.executable, 'bench/gpu_check.py', '--device=cpu', '--tiny', '--batch=4', '--steps=3',
                        f'--workdir={tmp_path / "work"}', f'--json={out}'], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.load(open(out))
    cells = {(r['method'], r['config'], r['precision']) for r in rows if r['part'] == '1' and r['result'] == 'pass'}
    assert cells == {(m, c, p) for m in gpu_check.METHODS for c in gpu_check.TINY for p in gpu_check.PRECISIONS}
    assert all(r['grad_diff'] <= gpu_check.GRAD_TOL[r['precision']] and r['syncs'] == r['h2d'] == 0
               for r in rows if r['part'] == '1')
    assert {r['method'] for r in rows if r['part'] == '2'} == {
        'train.py dmd x1', 'train.py dmd x2', 'resumed vs uninterrupted, G (bitwise)', '1 vs 2 processes, G',
        'generate.py + fid.py', 'generate.py = API, use_fp16'}
