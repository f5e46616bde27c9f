"""Distillation from EDM2 teachers: float16 EDM2 pickles as teachers, the autoguided real score of the one-step
methods, forced weight normalisation of the trained copies (part of exact resume), the GAN head on EDM2's bottleneck."""

import io
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import train
from dataset_tool import save_dataset
from test_networks_edm2 import golden_net
from torch_utils import persistence
from training import networks_edm2
from training import training_loop as loop_module
from training.distill.dmd import DMD, Bottleneck


def edm2_pickle(path, cfg):
    """An EDM2-layout (float16) snapshot of golden network `cfg`, as EDM2 releases them."""
    path.write_bytes(pickle.dumps(networks_edm2.edm2_snapshot(golden_net(cfg))))
    return str(path)


@pytest.fixture(scope='module')
def pkls(tmp_path_factory):
    root = tmp_path_factory.mktemp('edm2')
    images = np.random.default_rng(0).integers(0, 256, size=[10, 16, 16, 3], dtype=np.uint8)
    save_dataset(str(root / 'data.zip'), list(images), list(range(10)))
    return dict(teacher=edm2_pickle(root / 'teacher.pkl', 'b'), guide=edm2_pickle(root / 'guide.pkl', 'c'),
                uncond=edm2_pickle(root / 'uncond.pkl', 'a'), data=str(root / 'data.zip'))


def load(path):
    return persistence.load_network_pkl(path).to(torch.float32)


def test_autoguided_real_score_and_copies_from_the_teacher(pkls):
    teacher, guide = load(pkls['teacher']), load(pkls['guide'])
    dmd = DMD(teacher, 'cpu', batch_size=4, guide_net=guide, guidance=1.7, ema_halflife_kimg=None)
    g = torch.Generator().manual_seed(0)
    x, sigma, c = torch.randn([2, 3, 16, 16], generator=g), torch.tensor([0.5, 5.0]), torch.eye(10)[[2, 7]]
    with torch.no_grad():
        expected = guide(x, sigma, c).lerp(teacher(x, sigma, c), 1.7)
        assert torch.equal(dmd.real_score(x, sigma, c), expected)
    for net in [dmd.G, dmd.fake]:  # generator and fake score start from the teacher alone
        assert type(net) is networks_edm2.Precond
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), teacher.state_dict().values()))


def mpconv_row_rms(state):
    """Max |RMS - 1| over the output rows of every MPConv weight (the only >= 2-D tensors of EDM2's Precond)."""
    return max((w.square().mean(dim=list(range(1, w.ndim))).sqrt() - 1).abs().max().item()
               for k, w in state.items() if w.ndim >= 2)


ARGS = ['--batch=8', '--tick=0.008', '--snap=100', '--dump=100', '--seed=1', '--device=cpu', '--lr=1e-3', '--nosubdir']


@pytest.mark.parametrize('method', ['dmd', 'sid'])
def test_one_step_methods_with_an_autoguided_edm2_teacher_resume_exactly(pkls, tmp_path, method):
    common = [f'--method={method}', f'--teacher={pkls["teacher"]}', f'--guide-net={pkls["guide"]}', '--guidance=1.7',
              '--duration=0.000024', '--ema=0.5', *ARGS]  # an EMA for both (DMD has none by default)
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "full"}', *common], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "part"}', *common[:4], '--duration=0.000008', *common[5:]],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(train.main, [f'--resume={tmp_path / "part"}', *common], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    a = torch.load(loop_module.find_latest_state(str(tmp_path / 'full')), weights_only=True)['method']
    b = torch.load(loop_module.find_latest_state(str(tmp_path / 'part')), weights_only=True)['method']
    for net in ['G', 'fake', 'G_ema']:
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net
    # The trained copies keep unit-norm weights (forced weight normalisation); the teacher's are not (EMA averages).
    assert mpconv_row_rms(a['G']) < 1e-3 and mpconv_row_rms(a['fake']) < 1e-3
    assert mpconv_row_rms(load(pkls['teacher']).state_dict()) > 1e-2
    G = persistence.load_network_pkl(str(tmp_path / 'full' / 'network-snapshot-000000.pkl'))
    assert type(G) is networks_edm2.Precond and G.sampling_spec['num_steps'] == 1
    assert {t.dtype for t in G.state_dict().values()} == {torch.float32}


def test_forced_weight_normalization_equals_edm2_train_mode():
    # normalize after an update, then an eval forward == EDM2's train-mode forward on the updated weights.
    net = golden_net('a')
    x, sigma = torch.randn([2, 3, 16, 16], generator=torch.Generator().manual_seed(1)), torch.tensor([0.3, 3.0])
    with torch.no_grad():
        D_train = net.train()(x, sigma)
    net = golden_net('a')
    networks_edm2.force_weight_normalization(net)
    with torch.no_grad():
        D_eval = net.eval()(x, sigma)
    assert torch.equal(D_train, D_eval)
    frozen = golden_net('a').requires_grad_(False)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    networks_edm2.force_weight_normalization(frozen)  # frozen networks (teachers, EMAs) are left alone
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())


def test_gan_head_taps_edm2s_bottleneck(pkls):
    net = load(pkls['uncond'])  # 16x16, channel_mult [1,2]: an 8x8 bottleneck, 16 channels
    seen, decoder_calls = [], []
    list(net.unet.enc.values())[-1].register_forward_hook(lambda m, args, out: seen.append(out))
    for block in net.unet.dec.values():
        block.register_forward_hook(lambda m, args, out: decoder_calls.append(1))
    x, sigma = torch.randn([2, 3, 16, 16]), torch.tensor([0.5, 2.0])
    net(x, sigma)
    decoder_calls.clear()
    h = Bottleneck(net)(x, sigma, None)
    assert torch.equal(h, seen[0]) and h.shape == (2, 16, 8, 8) and not decoder_calls
    dmd = DMD(net, 'cpu', batch_size=4, dataset=object(), gan_g_weight=3e-3, ema_halflife_kimg=None)
    assert dmd.head is not None


@pytest.mark.parametrize('args, message', [
    (['--method=pd', '--guide-net={guide}', '--guidance=2', '--data={data}', '--cond=1'], '--guide-net autoguides the real score of --method=dmd or sid; drop it for --method=pd'),
    (['--method=dmd', '--guidance=2'], '--guidance is the autoguidance weight of --guide-net: give --guide-net=PKL too'),
    (['--method=dmd', '--guide-net={guide}'], '--guide-net needs --guidance=W'),
    (['--method=sid', '--guide-net={uncond}', '--guidance=2'], '--guide-net is 16x16x3 with 0 labels, the teacher 16x16x3 with 10'),
])
def test_cli_autoguidance_errors(pkls, tmp_path, args, message):
    args = [a.format(**pkls) for a in args]
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', f'--teacher={pkls["teacher"]}', '--device=cpu', *args])
    assert r.exit_code == 1 and message in r.output, r.output
    assert not (tmp_path / 'runs').exists()


def test_edm2_float16_file_is_widened_exactly(pkls):
    with open(pkls['teacher'], 'rb') as f:
        stored = persistence.load(io.BytesIO(f.read()))['ema']
    widened = load(pkls['teacher'])
    assert all(torch.equal(a.to(torch.float32), b) for a, b in zip(stored.state_dict().values(), widened.state_dict().values()))


def test_guided_student_of_an_edm2_teacher_starts_as_the_teacher(pkls):
    from training.distill.guided import make_guided_student
    teacher = load(pkls['teacher'])
    student = make_guided_student(teacher).eval()
    assert sorted(set(student.state_dict()) - set(teacher.state_dict())) == [
        'unet.emb_guidance.weight', 'unet.emb_guidance_fourier.freqs', 'unet.emb_guidance_fourier.phases', 'unet.emb_guidance_gain']
    x, sigma, c = torch.randn([2, 3, 16, 16]), torch.tensor([0.5, 5.0]), torch.eye(10)[[2, 7]]
    with torch.no_grad():
        assert torch.equal(student(x, sigma, c, guidance=torch.tensor([0.0, 3.0])), teacher(x, sigma, c))
        with pytest.raises(ValueError, match='no guidance input'):
            teacher(x, sigma, c, guidance=1.0)


@pytest.mark.parametrize('method, extra', [('pd', ['--start-steps=4', '--end-steps=2', '--round-kimg=0.008']),
                                           ('guided', ['--guide={guide}', '--duration=0.000016'])])
def test_pd_and_guided_train_from_an_edm2_teacher(pkls, tmp_path, method, extra):
    r = CliRunner().invoke(train.main, [f'--method={method}', f'--teacher={pkls["teacher"]}', f'--data={pkls["data"]}',
                                        '--cond=1', f'--outdir={tmp_path}', *[a.format(**pkls) for a in extra], *ARGS],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    state = torch.load(loop_module.find_latest_state(str(tmp_path)), weights_only=True)['method']
    assert mpconv_row_rms(state['student']) < 1e-3  # forced weight normalisation of the trained student
    assert type(persistence.load_network_pkl(str(tmp_path / 'network-snapshot-000000.pkl'))) is networks_edm2.Precond


def test_toy_edm2_teacher_distilled_with_dmd_and_sid(tmp_path):
    """toy.py build --arch=edm2 fits an EDM2 UNet to the exact denoiser; dmd and sid distil it into one-step
    generators that toy.py measures (their quality: docs/BENCHMARKS.md)."""
    import json

    import toy as toy_cli
    build = ['build', '--resolution=8', '--channels=3', '--K=3', '--num-images=64', '--fit-kimg=0.512', '--fit-batch=64',
             '--fit-channels=8', '--fit-mult=1,2', '--arch=edm2', '--fit-lr=1e-2']
    r = CliRunner().invoke(toy_cli.cli, [*build, f'--outdir={tmp_path / "a"}'])
    assert r.exit_code == 0, r.output
    teacher = persistence.load_network_pkl(str(tmp_path / 'a' / 'teacher-edm2.pkl'))
    assert type(teacher) is networks_edm2.Precond and teacher.label_dim == 3 and not teacher.training
    info = json.loads((tmp_path / 'a' / 'problem.json').read_text())
    assert info['net']['class_name'] == 'training.networks_edm2.Precond' and info['fit']['num_steps'] == 8
    assert mpconv_row_rms(teacher.state_dict()) < 1e-3  # fitted with forced weight normalisation
    for method in ['dmd', 'sid']:
        out = tmp_path / method
        r = CliRunner().invoke(train.main, [f'--method={method}', f'--teacher={tmp_path / "a" / "teacher-edm2.pkl"}',
                                            f'--outdir={out}', '--duration=0.000016', *ARGS], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(toy_cli.cli, ['metrics', f'--problem={tmp_path / "a"}', f'--network={out / "network-snapshot-000000.pkl"}',
                                             '--num=64', f'--out={out / "metrics.json"}'])
        assert r.exit_code == 0, r.output
        assert np.isfinite(json.loads((out / 'metrics.json').read_text())['images']['fd'])


def test_kd_compresses_an_edm2_teacher(pkls, tmp_path):
    from training.distill import kd
    torch.manual_seed(0)
    teacher = networks_edm2.Precond(16, 3, 10, use_fp16=False, model_channels=8, channel_mult=[1, 2], num_blocks=2,
                                    attn_resolutions=[8], channels_per_head=8).eval()
    student = kd.make_student(teacher, 'base')
    assert type(student) is networks_edm2.Precond and student.init_kwargs['num_blocks'] == 1
    source = teacher.state_dict()
    for key, value in student.state_dict().items():  # block 0 from block 0; the last decoder block from the teacher's
        assert torch.equal(value, source[key.replace('_block1.', '_block2.') if '.dec.' in key else key]), key
    assert ('unet.dec.8x8_block1', 'unet.dec.8x8_block2') in kd.feature_pairs(student, teacher)
    path = tmp_path / 'teacher.pkl'
    path.write_bytes(pickle.dumps(networks_edm2.edm2_snapshot(teacher)))
    common = ['--method=kd', f'--teacher={path}', f'--data={pkls["data"]}', '--cond=1', '--device=cpu']
    r = CliRunner().invoke(train.main, [*common, f'--outdir={tmp_path / "run"}', '--duration=0.000016', '--phema=0.050,0.100', *ARGS])
    assert r.exit_code == 0, r.output
    state = torch.load(loop_module.find_latest_state(str(tmp_path / 'run')), weights_only=True)['method']
    assert mpconv_row_rms(state['net']) < 1e-3
    # The compressed student's profiles, reconstructed into EDM2's own pickle layout (for its generate_images.py).
    import reconstruct_phema
    r = CliRunner().invoke(reconstruct_phema.main, ['--indir', str(tmp_path / 'run'), '--outdir', str(tmp_path / 'phema'),
                                                    '--outstd', '0.070', '--edm2'])
    assert r.exit_code == 0, r.output
    data = persistence.load(io.BytesIO((tmp_path / 'phema' / 'phema-000000-0.070.pkl').read_bytes()))
    assert list(data) == ['encoder', 'dataset_kwargs', 'loss_fn', 'ema'] and data['ema'].init_kwargs['num_blocks'] == 1
    assert {t.dtype for t in data['ema'].state_dict().values()} == {torch.float16} and not data['ema'].training
    r = CliRunner().invoke(train.main, [*common, f'--outdir={tmp_path / "small"}', '--kd-variant=small'])
    assert r.exit_code == 1 and 'KD variant "small" removes the in0/in1 decoder blocks, which EDM2\'s UNet always has' in r.output
