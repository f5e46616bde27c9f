"""SiD and SiDA against the official code (github.com/mingyuanzhou/SiD: branch main's mingyuanzhou/SiD:training/sid_loss.py,
mingyuanzhou/SiD:training/sid_training_loop.py and sid_train.py; branch sida's sida_training/sida_loss.py, sida_networks.py,
sida_training_loop.py and sida_train.py). Each test writes the official expression out here, independently of
training/distill/sid.py, and runs it beside the project's code on the same inputs and random draws; the official
settings it relies on are quoted with the file they come from."""

import copy
import json
import math

import pytest
import torch

from training.batching import Round, StepRandom
from training.distill.sid import SiD
from training.networks import EDMPrecond, UNetBlock

B = 4  # global batch of the tests

# A small conditional DDPM++ with EDM's augmentation labels (augment_dim=9, as EDM's CIFAR-10 networks), weights
# randomised everywhere (EDM zero-initialises output layers, which would hide terms).
TEACHER = dict(img_resolution=8, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=16,
               channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0, augment_dim=9)


def teacher(seed=0):
    torch.manual_seed(seed)
    net = EDMPrecond(**TEACHER)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval().requires_grad_(False)


def make_sid(**kwargs):
    kwargs = dict(dict(dropout=0.13, augment_p=0.12, lr=1e-4, ema_halflife_kimg=None, dataset=True), **kwargs)
    sid = SiD(teacher(), 'cpu', B, **kwargs)
    with torch.no_grad():  # G and the fake score already apart from the teacher (as after some training)
        for net, seed in ((sid.G, 1), (sid.fake, 2)):
            g = torch.Generator().manual_seed(seed)
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return sid


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand([B, 3, 8, 8], generator=g) * 2 - 1
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 3, 1]), 4).to(torch.float32)  # unevenly drawn classes
    return images, labels


def rows(rand, images, labels, i, n=1):
    """Round of global rows i..i+n-1 of the step's streams (a per-GPU batch of n in the official loop)."""
    return Round(images[i:i + n], labels[i:i + n], rand, i, n)


def karras_official(t):
    # sid_loss.py generator_loss: sigma = (max_inv_rho + (1 - rnd_t) * (min_inv_rho - max_inv_rho)) ** rho, 0.002, 80, 7
    min_inv_rho, max_inv_rho = 0.002 ** (1 / 7), 80 ** (1 / 7)
    return (max_inv_rho + (1 - t) * (min_inv_rho - max_inv_rho)) ** 7


def edm_weight(sigma):
    return (sigma ** 2 + 0.5 ** 2) / (sigma * 0.5) ** 2  # sid_loss.py: P_mean -1.2, P_std 1.2, sigma_data 0.5


class Tap:
    """Official `return_flag='encoder_decoder'` (sida_networks.py): logits = x.mean(dim=1, keepdim=True) of the last
    encoder block's output, here read by a hook of the test's own on a full forward pass."""

    def __init__(self, net):
        self.h = None
        list(net.model.enc.values())[-1].register_forward_hook(lambda m, i, out: setattr(self, 'h', out))

    def __call__(self, net, x, sigma, labels, **kw):
        D = net(x, sigma, labels, **kw)
        return D, self.h.mean(dim=1, keepdim=True).to(torch.float32)


def bce(logits, target):
    return torch.nn.BCEWithLogitsLoss()(logits, torch.full_like(logits, float(target)))  # reduction 'mean'


def official_step(sid, rand, images, labels, cur_nimg, sida):
    """One iteration of the official loop with batch_gpu = 1 (one round per sample; loss_scaling 1, loss_scaling_G 100,
    SiDA: loss_scaling_D 1, loss_scaling_G_gan 0.01) on copies of sid's networks, with sid's draws and dropout keys.
    Returns the updated (G, fake) and the gradients each optimizer stepped on (G's: None when it did not step)."""
    G, fake, real = copy.deepcopy(sid.G), copy.deepcopy(sid.fake), sid.real
    # sid_train.py: Adam, betas [0.0, 0.999] (fake) and [g_beta1, 0.999] (G), eps 1e-8 (fp16: 1e-6)
    opt_fake = torch.optim.Adam(fake.parameters(), lr=sid.fake_lr, betas=(0.0, 0.999), eps=1e-8)
    opt_G = torch.optim.Adam(G.parameters(), lr=sid.lr, betas=(0.0, 0.999), eps=1e-8)
    tap = Tap(fake)
    numel = 3 * 8 * 8

    # Fake-score update: fake_score_ddp.train(); G (eval, no_grad) draws images with the batch's labels.
    fake.train().requires_grad_(True)
    for i in range(B):
        r = rows(rand, images, labels, i)
        with torch.no_grad():
            x = G(sid.sigma_init * r.randn('z', 3, 8, 8), torch.full([1], sid.sigma_init), r.labels)
        sigma = (r.randn('fake_t') * 1.2 - 1.2).exp().view(-1, 1, 1, 1)  # rnd_normal * P_std + P_mean
        n = r.randn('fake_n', 3, 8, 8) * sigma
        y, aug = sid.augment_pipe(x, rnd=_prefixed(r, ''))  # augment_pipe(images)
        with r.keyed_dropout('dropout_fake'):
            if not sida:  # SID_EDMLoss.__call__; loss.sum().mul(loss_scaling / batch_gpu_total)
                loss = edm_weight(sigma) * ((fake(y + n, sigma, r.labels, augment_labels=aug) - y) ** 2)
                (loss.sum() * (1 / B)).backward()
                continue
            # SIDA_EDMLoss.fakescore_discriminator_share_encoder_loss: real images with their own augmentation, the
            # same sigma and n; loss_D = weight * (loss_real + loss_fake) / 2
            y_fake, logit_fake = tap(fake, y + n, sigma, r.labels, augment_labels=aug)
            real_y, real_aug = sid.augment_pipe(r.images, rnd=_prefixed(r, 'real_'))
            _, logit_real = tap(fake, real_y + n, sigma, r.labels, augment_labels=real_aug)
        loss = edm_weight(sigma) * ((y_fake - y) ** 2)
        loss_D = edm_weight(sigma) * (bce(logit_real, 1) + bce(logit_fake, 0)) / 2
        (loss.sum() * (1 / B) + loss_D.sum() * (1 / B)).backward()
    fake.eval().requires_grad_(False)
    if sida:
        torch.nn.utils.clip_grad_value_(fake.parameters(), 1)  # sida_training_loop.py: `if use_gan:` value clip at 1
    grads_fake = [p.grad.clone() for p in fake.parameters()]
    opt_fake.step()

    # Generator update: G_ddp.train(); generator_loss(augment_pipe=None): augment labels zeros(9).
    G.train().requires_grad_(True)
    for i in range(B):
        r = rows(rand, images, labels, i)
        with r.keyed_dropout('dropout_G'):
            x = G(sid.sigma_init * r.randn('z_g', 3, 8, 8), torch.full([1], sid.sigma_init), r.labels,
                  augment_labels=torch.zeros(1, 9))
        sigma = karras_official(r.rand('sid_t') * 800 / 1000).view(-1, 1, 1, 1)  # tmax 800
        n = r.randn('sid_n', 3, 8, 8) * sigma
        zeros = dict(augment_labels=torch.zeros(1, 9))
        y_real = real(x + n, sigma, r.labels, **zeros)
        if sida:
            y_fake, y_D = tap(fake, x + n, sigma, r.labels, **zeros)
        else:
            y_fake = fake(x + n, sigma, r.labels, **zeros)
        with torch.no_grad():
            weight_factor = abs(x - y_real).to(torch.float32).mean(dim=[1, 2, 3], keepdim=True).clip(min=0.00001)
        loss = (y_real - y_fake) * ((y_real - x) - sid.alpha * (y_real - y_fake)) / weight_factor
        loss = loss.sum().mul(100 / B)
        if sida and cur_nimg > 200 * 1000:
            loss_gan = bce(y_D.clamp(-10, 10), 1).to(torch.float32) / weight_factor
            loss_gan = (loss_gan.mean(dim=[1, 2, 3], keepdim=True) * numel).sum().mul(0.01 / B)
            (0.5 * loss + 0.5 * loss_gan).backward()
        else:
            loss.backward()
    G.eval().requires_grad_(False)
    grads_G = None
    if not sida or cur_nimg > 100 * 1000:  # `if use_gan is False or cur_nimg>100*1000: g_optimizer.step()`
        grads_G = [p.grad.clone() for p in G.parameters()]
        opt_G.step()
    return G, fake, grads_fake, grads_G


def record_grads(updater):
    """The gradients a project updater's optimizer steps on, one list per step."""
    seen, step = [], updater.optimizer.step

    def recorded(*args, **kwargs):
        seen.append([p.grad.clone() for p in updater.params])
        return step(*args, **kwargs)
    updater.optimizer.step = recorded
    return seen


def assert_same_grads(a, b, names):
    """Each tensor's gradient equal up to float32 summation order (1e-5 of its norm)."""
    for name, x, y in zip(names, a, b):
        assert float((x - y).norm()) <= 1e-5 * float(y.norm()) + 1e-12, name


def _prefixed(r, prefix):
    from training.distill.sid import _Named
    return _Named(r, prefix)


def assert_same_weights(a, b, **tol):
    """Every parameter equal, except the attention's key biases: their gradient is zero in exact arithmetic (softmax
    ignores a shift of all keys), so Adam's first step normalises rounding noise that depends on the summation order
    (the official batch of 1 against our batch of 4). qkv entries are ordered (head, channel, {q, k, v})."""
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if name.endswith('qkv.bias'):
            p, q = p.view(-1, 3)[:, [0, 2]], q.view(-1, 3)[:, [0, 2]]
        torch.testing.assert_close(p, q, msg=name, **tol)

# ----------------------------------------------------------------------------
# Item 4: train mode, dropout and augmentation.

def test_networks_train_only_during_their_own_update_and_augmentation_feeds_the_fake_score_loss_only():
    """sid_training_loop.py: `fake_score_ddp.train()` for its update, `.eval()` after; `G_ddp.train()` for its own
    update, eval otherwise; true_score eval throughout; `loss_fn(..., augment_pipe=augment_pipe)` in the fake-score
    update, `generator_loss(..., augment_pipe=None)` (zero augment labels) in G's. sid_train.py: the networks are built
    with `dropout=opts.dropout` and copy the teacher's weights."""
    sid = make_sid()
    assert {b.dropout for net in (sid.G, sid.fake) for b in net.modules() if isinstance(b, UNetBlock)} == {0.13}
    assert {b.dropout for b in sid.real.modules() if isinstance(b, UNetBlock)} == {0.0}
    calls = []
    for name in ('real', 'fake', 'G'):
        hook = lambda m, args, kw, name=name: calls.append((name, m.training, kw.get('augment_labels') is not None))
        getattr(sid, name).register_forward_pre_hook(hook, with_kwargs=True)
    images, labels = data()
    sid.step([Round(images, labels, StepRandom(0, 0, B, 'cpu'), 0, B)], 0)
    assert calls == [('G', False, False), ('fake', True, True), ('G', True, False), ('real', False, False),
                     ('fake', False, False)]
    assert not sid.G.training and not sid.fake.training
    # Official zero augment labels are no labels: map_augment has no bias.
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0])
    torch.testing.assert_close(sid.real(x, s, labels[:2], augment_labels=torch.zeros(2, 9)), sid.real(x, s, labels[:2]))


def test_dropout_rate_defaults_to_the_teachers_and_augmentation_needs_augment_labels():
    """sid_train.py takes --dropout (EDM's per-dataset values in run_sid.sh: CIFAR-10 0.13, ImageNet 0.1, FFHQ/AFHQ
    0.05, which are the rates EDM trained those teachers with): None keeps the teacher's. --augment needs the
    augmentation-label input (`c.network_kwargs.augment_dim = 9`); a teacher without it is refused."""
    net = teacher()
    for b in net.modules():
        if isinstance(b, UNetBlock):
            b.dropout = 0.05
    sid = SiD(net, 'cpu', B, ema_halflife_kimg=None)
    assert {b.dropout for b in sid.G.modules() if isinstance(b, UNetBlock)} == {0.05}
    assert sid.augment_pipe.p == 0.12  # None: 0.12 (sid_train.py --augment default) for a teacher that takes it
    plain = EDMPrecond(**dict(TEACHER, augment_dim=0))
    assert SiD(plain, 'cpu', B, ema_halflife_kimg=None).augment_pipe is None
    with pytest.raises(ValueError, match='trained without augmentation labels'):
        SiD(plain, 'cpu', B, augment_p=0.15, ema_halflife_kimg=None)

# ----------------------------------------------------------------------------
# Items 4, 6, 8: one whole SiD step equals the official loop's.

def test_sid_step_equals_the_official_loop():
    """Fake score: train mode with dropout 0.13, EDM augmentation p 0.12, loss summed over pixels / batch; G: train
    mode, loss x100 / batch; Adam eps 1e-8; both updates take the data batch's labels. One step of each, compared
    parameter by parameter with the official iteration on copies."""
    sid = make_sid()
    images, labels = data()
    rand = StepRandom(3, 5, B, 'cpu')
    G, fake, _, _ = official_step(sid, rand, images, labels, 0, sida=False)
    sid.step([Round(images, labels, rand, 0, B)], 0)
    assert_same_weights(sid.fake, fake, rtol=1e-5, atol=1e-7)
    assert_same_weights(sid.G, G, rtol=1e-5, atol=1e-7)


def test_loss_reductions_matter_to_adam():
    """The same step with the previous reductions (fake-score loss a mean over pixels, G's loss without x100) moves the
    weights differently: Adam's eps (1e-8) is not negligible next to those 3x8x8 = 192x (100x) smaller gradients, so
    matching the official reduction is what makes the updates equal above."""
    sid = make_sid()
    images, labels = data()
    rand = StepRandom(3, 5, B, 'cpu')
    G, fake, _, _ = official_step(sid, rand, images, labels, 0, sida=False)
    G0, fake0 = copy.deepcopy(sid.G), copy.deepcopy(sid.fake)
    sid.g_loss_scale = 1
    loss = sid.fake_loss
    sid.fake_loss = lambda r, x0=None: loss(r, x0) / 192
    sid.step([Round(images, labels, rand, 0, B)], 0)
    for ours, official, start in ((sid.fake, fake, fake0), (sid.G, G, G0)):  # the largest difference, in units of lr
        diff = max(float(((p - s) - (q - s)).detach().abs().max()) for p, q, s in
                   zip(ours.parameters(), official.parameters(), start.parameters())) / sid.lr
        assert diff > 0.1, diff


def test_labels_come_from_the_data_else_uniform():
    """sid_training_loop.py: `images, labels = next(dataset_iterator)` feeds G in both updates; without data (the
    project's data-free mode) the labels are uniform draws."""
    sid = make_sid(dropout=0.0, augment_p=0.0)
    seen = []
    sid.G.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    images, labels = data()
    sid.step([Round(images, labels, StepRandom(0, 0, B, 'cpu'), 0, B)], 0)
    assert len(seen) == 2 and all(torch.equal(c, labels) for c in seen)
    seen.clear()
    sid.step([Round(None, None, StepRandom(0, 1, B, 'cpu'), 0, B)], B)
    assert len(seen) == 2 and all(c.sum(1).eq(1).all() for c in seen) and not torch.equal(seen[1], labels)

# ----------------------------------------------------------------------------
# Item 7: SiDA.

@pytest.mark.parametrize('cur_nimg', [100 * 1000, 150 * 1000, 250 * 1000])
def test_sida_step_equals_the_official_loop(cur_nimg):
    """SiDA's step at three points of its schedule (sida_training_loop.py): at 100 kimg G does not step
    (`cur_nimg>100*1000`); at 150 kimg G steps on the SiD term alone; at 250 kimg on 0.5 * SiD x100 + 0.5 * GAN x0.01
    (`cur_nimg>200*1000`). The fake score's loss adds loss_D with weight 1 (lsd) and its gradients are clipped by
    value at 1. Official per-GPU batch 1, where its batch-mean BCE is the project's per-sample BCE."""
    sid = make_sid(sida=True, alpha=1.0)
    images, labels = data()
    rand = StepRandom(3, 5, B, 'cpu')
    G0 = copy.deepcopy(sid.G)
    _, _, grads_fake, grads_G = official_step(sid, rand, images, labels, cur_nimg, sida=True)
    ours_fake, ours_G = record_grads(sid.opt_fake), record_grads(sid.opt_G)
    sid.step([Round(images, labels, rand, 0, B)], cur_nimg)
    assert_same_grads(ours_fake[0], grads_fake, [n for n, _ in sid.fake.named_parameters()])
    assert sid.num_g_steps == len(ours_G) == (grads_G is not None) == (cur_nimg > 100 * 1000)
    if grads_G is None:
        assert_same_weights(sid.G, G0, rtol=0, atol=0)
    else:
        assert_same_grads(ours_G[0], grads_G, [n for n, _ in sid.G.named_parameters()])


def test_sida_classifier_is_the_channel_mean_of_the_last_encoder_map():
    """sida_networks.py: `logits = x.mean(dim=1, keepdim=True)` after the encoder loop; `return_flag='encoder'` runs
    the encoder only. Here: the same logits from the full pass and from the encoder-only pass (no decoder block runs),
    one per position of the 4x4 map."""
    sid = make_sid(sida=True)
    x, s, c = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 3.0]), data()[1][:2]
    D, logits = sid.classifier.denoise(x, s, c)
    _, official = Tap(sid.fake)(sid.fake, x, s, c)
    torch.testing.assert_close(logits, official[:, 0])
    assert logits.shape == (2, 4, 4)
    decoder_ran = []
    list(sid.fake.model.dec.values())[0].register_forward_hook(lambda *a: decoder_ran.append(1))
    torch.testing.assert_close(sid.classifier.encoder(x, s, c), official[:, 0])
    assert not decoder_ran
    torch.testing.assert_close(D, sid.fake(x, s, c))


def test_sida_rounds_split_and_refusals():
    """Per-sample losses, dropout and augmentation keyed by sample: one round of 4 and two of 2 give the same step
    (the world-size invariance of SiDA's classifier loss); SiDA needs real images."""
    images, labels = data()
    a, b = make_sid(sida=True), make_sid(sida=True)
    rand = StepRandom(0, 0, B, 'cpu')
    grads = [(record_grads(m.opt_fake), record_grads(m.opt_G)) for m in (a, b)]
    a.step([Round(images, labels, rand, 0, B)], 300 * 1000)
    b.step([rows(rand, images, labels, 0, 2), rows(rand, images, labels, 2, 2)], 300 * 1000)
    assert_same_grads(grads[0][0][0], grads[1][0][0], [n for n, _ in a.fake.named_parameters()])
    assert_same_grads(grads[0][1][0], grads[1][1][0], [n for n, _ in a.G.named_parameters()])
    with pytest.raises(ValueError, match='needs real images'):
        SiD(teacher(), 'cpu', B, sida=True)


def test_updater_clips_by_value():
    """clip_grad_value_(params, 1) as torch does it: each element into [-1, 1] (after the norm clip, if any)."""
    from training.optim import Updater
    p = torch.nn.Parameter(torch.zeros(3))
    u = Updater([p], 'p', class_name='torch.optim.SGD', lr=1.0, max_grad_value=1.0)
    u.backward([None], lambda _: (p * torch.tensor([5.0, -3.0, 0.5])).sum(), 1)
    u.step(1.0)
    torch.testing.assert_close(p.detach(), torch.tensor([-1.0, 1.0, -0.5]))
    assert math.isclose(make_sid(sida=True).opt_fake.max_grad_value, 1.0) and make_sid().opt_fake.max_grad_value is None

# ----------------------------------------------------------------------------
# Item 5: precision.

def test_precision_defaults_are_the_official_ones(tmp_path, monkeypatch):
    """run_sid.sh / run_sida.sh: `--fp16 0` for CIFAR-10 (32x32), `--fp16 1` for ImageNet-64, FFHQ-64 and AFHQv2-64;
    sid_training_loop.py: `torch.backends.cuda.matmul.allow_tf32 = False`, `cudnn.allow_tf32 = False`; sid_train.py:
    Adam `eps = 1e-8 if not opts.fp16 else 1e-6`. bf16 only when asked."""
    import dnnlib
    import train
    opts = lambda **kw: dnnlib.EasyDict(dict(method='sid', precision=None, fp16=False, ls=None, tf32=False, dry_run=False,
                                             teacher=None), **kw)
    cuda = torch.device('cuda')
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)  # a GPU with bf16
    assert train.resolve_precision(opts(), cuda, 32)[:2] == ('fp32', None)
    assert train.resolve_precision(opts(), cuda, 64)[:2] == ('fp16', 'dynamic')
    assert train.resolve_precision(opts(method='sid-disback'), cuda, 64)[0] == 'fp16'
    assert train.resolve_precision(opts(), cuda, None)[0] == 'fp32'  # resolution unknown (a dry run without data)
    assert train.resolve_precision(opts(precision='bf16'), cuda, 64)[0] == 'bf16'
    assert train.resolve_precision(opts(method='dmd'), cuda, 64)[0] == 'bf16'  # other methods keep theirs
    assert train._resolution(opts(), dnnlib.EasyDict(resolution=64), cuda) == 64
    assert train._resolution(opts(precision='fp32'), dnnlib.EasyDict(resolution=64), cuda) is None
    from click.testing import CliRunner
    net = tmp_path / 'teacher.pkl'
    net.touch()
    for args, eps in (([], 1e-8), (['--precision=fp16'], 1e-6)):
        r = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', '--method=sid', f'--teacher={net}', '--device=cpu',
                                            '--dry-run', *args])
        c = json.loads(r.output.split('Training options:')[1].split('Output directory')[0])
        assert c['method_kwargs']['eps'] == eps and c['tf32'] is False, r.output
