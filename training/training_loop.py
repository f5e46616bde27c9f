"""The generic training loop: data, ticks, statistics, snapshots, training states, exact resume, graceful stop.

Everything method-specific (networks, losses, optimizers, EMA) lives in the method object, constructed from
`method_kwargs` by dotted class name; see docs/DESIGN.md for the contract (step / networks / snapshot / sample /
state_dict / load_state_dict).
"""

import functools
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import re
import signal
import threading
import time

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed, misc, persistence, training_stats
from training import networks, networks_edm2, optim, phema
from training.batching import IndexStream, RankSampler, Round, StepRandom

# ----------------------------------------------------------------------------
# Graceful stop: SIGTERM/SIGINT set a flag; the loop writes a training state at the next step boundary.

_stop_signal = None


def _request_stop(signum, _frame):
    global _stop_signal
    _stop_signal = signal.Signals(signum).name


def catch_stop_signals():
    """From now on SIGTERM/SIGINT set the stop flag instead of ending the process; returns the previous handlers.
    A flag set before the loop starts (train.py catches the signals from before the loop's setup) stops it at once."""
    return {s: signal.signal(s, _request_stop) for s in (signal.SIGTERM, signal.SIGINT)}


def _stop_agreed():
    """True on every rank when any rank was asked to stop (a host-side all-reduce). Checked before every step and, in a
    step of several accumulation rounds, between its rounds until its first update (training/optim.py abandons the
    step there), so the stop waits for at most one round, or for the rest of a step that has begun updating."""
    return distributed.any_rank(_stop_signal is not None)

# ----------------------------------------------------------------------------
# RNG states of every library, so that a resumed run continues the same random streams.

def _rng_state(device):
    np_state = np.random.get_state()
    state = dict(
        torch=torch.get_rng_state(),
        numpy_keys=torch.from_numpy(np_state[1].astype(np.int64)),
        numpy_pos=np_state[2], numpy_has_gauss=np_state[3], numpy_gauss=np_state[4],
        python=list(random.getstate()[1]),
    )
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state['torch'])
    np.random.set_state(('MT19937', state['numpy_keys'].numpy().astype(np.uint32), state['numpy_pos'],
                         state['numpy_has_gauss'], state['numpy_gauss']))
    random.setstate((3, tuple(state['python']), None))
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)

# ----------------------------------------------------------------------------
# Files in the run directory.

def state_path(run_dir, cur_nimg):
    return os.path.join(run_dir, f'training-state-{cur_nimg // 1000:06d}.pt')


_STATE_KEYS = ('method', 'cur_nimg', 'cur_tick', 'tick_start_nimg', 'step', 'world_size', 'rng')


def checksum_path(path):
    """The checksum file beside a training state: `sha256sum -c` reads it."""
    return path + '.sha256'


def state_problem(path):
    """Why a file cannot be resumed from (damaged anywhere, truncated, without its checksum file, not a training
    state), or None. The whole file is checked against its checksum file (one read, a few seconds per GB); results are
    remembered per file version, so the up-front check and the loop's take one read."""
    stat = os.stat(path)
    sums = checksum_path(path)
    sums_stat = os.stat(sums) if os.path.isfile(sums) else None
    return _state_problem(os.path.abspath(path), (stat.st_ino, stat.st_size, stat.st_mtime_ns),
                          sums_stat and (sums_stat.st_ino, sums_stat.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _state_problem(path, _version, _sums_version):
    sums = checksum_path(path)
    if not os.path.isfile(sums):
        return (f'no checksum file "{os.path.basename(sums)}" beside it: copy it with the state (a state written before '
                f'checksums: `sha256sum STATE > STATE.sha256` once you know the state is whole)')
    with open(sums) as f:
        expected = {line.split()[0] for line in f if line.strip()}  # two while a write replaces the state
    if _file_sha256(path) not in expected:
        return f'checksum mismatch: its content is not the one recorded in "{os.path.basename(sums)}"'
    try:
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)  # the keys only: cheap
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # what torch raises on damaged files
        return f'{type(e).__name__}: {str(e).strip().split(". ")[0][:200]}'  # torch adds paragraphs of advice
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
        return 'not a training state written by this project'
    return None


def find_latest_state(path, log=None):
    """A state file as given, or the newest complete training-state-*.pt in a run directory; newer ones that are
    damaged are skipped, each reported through log(message). RunError when there is none to resume from."""
    if os.path.isfile(path):
        problem = state_problem(path)
        if problem is not None:
            raise dnnlib.util.RunError(f'--resume: "{path}" is not a complete training state ({problem}); pass an '
                                       f'older one, or the run directory to take the newest complete one')
        return path
    if not os.path.isdir(path):
        raise dnnlib.util.RunError(f'--resume: "{path}" is neither a training state nor a run directory')
    names = [n for n in os.listdir(path) if re.fullmatch(r'training-state-\d+\.pt', n)]
    names.sort(key=lambda n: (int(n[15:-3]), os.path.getmtime(os.path.join(path, n))), reverse=True)
    for name in names:
        problem = state_problem(os.path.join(path, name))
        if problem is None:
            return os.path.join(path, name)
        if log is not None:
            log(f'Skipping "{name}": not a complete training state ({problem})')
    if names:
        raise dnnlib.util.RunError(f'--resume: none of the {len(names)} training-state-*.pt in "{path}" is complete; '
                                   f'start a new run, or resume from a copy of the run that has one')
    raise dnnlib.util.RunError(f'--resume: no training-state-*.pt in "{path}"; nothing to resume (the run stopped '
                               f'before its first state dump), start it again without --resume')


def _write_pickle(obj, path):
    dnnlib.util.atomic_write(path, lambda f: pickle.dump(obj, f))


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class _HashingFile:
    """A file that hashes what is written to it (torch.save writes its zip sequentially). A large piece is hashed in a
    second thread while it is written (both release the GIL), so the hash costs little time on top of the write."""

    def __init__(self, f):
        self.f = f
        self.digest = hashlib.sha256()

    def write(self, data):
        if len(memoryview(data).cast('B')) < 1 << 20:
            self.digest.update(data)
            return self.f.write(data)
        hashing = threading.Thread(target=self.digest.update, args=(data,))
        hashing.start()
        try:
            return self.f.write(data)
        finally:
            hashing.join()  # torch may reuse the buffer once write() returns

    def flush(self):
        self.f.flush()


def _write_state(state, path):
    """The state and its checksum file. While the state is replaced, the checksum file lists the old content's hash and
    the new one's, so a kill at any moment leaves a state that matches its checksum file."""
    name = os.path.basename(path)
    sums = checksum_path(path)
    old = open(sums).read() if os.path.isfile(sums) else ''

    new = []

    def write(f):
        hashing = _HashingFile(f)
        torch.save(state, hashing)
        new.append(f'{hashing.digest.hexdigest()}  {name}\n')
        dnnlib.util.atomic_write(sums, lambda g: g.write(new[0] + old), mode='w')  # before the state replaces the old one
    dnnlib.util.atomic_write(path, write)
    dnnlib.util.atomic_write(sums, lambda g: g.write(new[0]), mode='w')


def _whole_line(line):
    """A last stats line without its newline: itself (newline added) if it parses, else '' (torn)."""
    try:
        json.loads(line)
    except ValueError:
        return ''
    return line + '\n'


def _line_kimg(line):
    """The kimg of a stats.jsonl or metric-*.jsonl line."""
    return line['kimg'] if 'kimg' in line else line.get('Progress/kimg', {}).get('mean', 0)


def _truncate_stats(path, max_nimg):
    """On resume, drop stats (or metric) lines logged after the state was written, so the file stays one
    consistent run."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [l for l in f if l.strip()]
    if lines and not lines[-1].endswith('\n'):  # a kill while writing the last line: keep it only if it is whole
        lines[-1] = _whole_line(lines[-1])
    keep = [l for l in lines if l and _line_kimg(json.loads(l)) * 1000 <= max_nimg + 1e-6]
    dnnlib.util.atomic_write(path, lambda f: f.write(''.join(keep)), mode='w')

# ----------------------------------------------------------------------------

def training_loop(
    precision           = None,     # every network's backbone: 'fp32', 'bf16', 'fp16' (autocast), None = EDM's use_fp16 rule
    loss_scaling        = None,     # fp16: 'dynamic' or a static scale (EDM's --ls); None = off
    tf32                = False,    # allow TF32 in float32 matmuls/convolutions on CUDA
    deterministic       = False,    # deterministic CUDA kernels (the caller sets $CUBLAS_WORKSPACE_CONFIG and benchmark off)
    **kwargs,                       # the loop's settings, see _training_loop
):
    """The whole run, every network and optimizer of it, in one precision."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.use_deterministic_algorithms(deterministic)  # an op with no deterministic CUDA kernel raises
    with networks.backbone_precision(precision), optim.loss_scaling(loss_scaling):
        return _training_loop(**kwargs)


def _training_loop(
    run_dir             = '.',      # output directory (only rank 0 writes)
    method_kwargs       = {},       # class_name + keywords of the method (training.teacher.EDM, training.distill.dmd.DMD, ...)
    dataset_kwargs      = None,     # training.dataset.ImageFolderDataset keywords, or None for data-free methods
    data_loader_kwargs  = {},       # torch.utils.data.DataLoader keywords
    teacher             = None,     # teacher network pickle (path or URL), for distillation
    guide_net           = None,     # guiding network pickle for an autoguided teacher (methods that take guide_net)
    transfer            = None,     # network pickle whose weights initialise the trained network
    trust_pickle        = False,    # allow code embedded in pickles to run (trusted files only)
    seed                = 0,        # global seed: weights, data order, noise
    batch_size          = 512,      # global batch
    batch_gpu           = None,     # per-rank batch per accumulation round, None = no accumulation
    total_kimg          = 200000,   # training duration in thousands of images
    kimg_per_tick       = 50,       # progress print interval
    snapshot_ticks      = 50,       # network snapshot interval, None = off
    state_dump_ticks    = 500,      # training state interval, None = off
    resume_state        = None,     # training state (.pt) or run directory to resume from
    preview_grid        = 64,       # images in the preview grid written with each snapshot, 0 = off
    metrics             = [],       # in-training metrics computed at each snapshot
    metric_kwargs       = {},       # keywords of the metric functions (ref, detector, ...)
    tensorboard         = False,    # also write the statistics as TensorBoard event files (rank 0)
    phema_stds          = None,     # post-hoc EMA: stds of the power-function profiles to track (EDM2: [0.05, 0.1])
    cudnn_benchmark     = True,
    device              = torch.device('cpu'),
):
    start_time = time.time()
    world_size = distributed.get_world_size()
    rank = distributed.get_rank()
    torch.backends.cudnn.benchmark = cudnn_benchmark
    per_rank = batch_size // world_size
    batch_gpu = batch_gpu or per_rank
    num_rounds = per_rank // batch_gpu
    assert batch_size == batch_gpu * num_rounds * world_size

    # Data.
    dataset = None
    if dataset_kwargs is not None:
        distributed.print0('Loading dataset...')
        dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
        stream = IndexStream(len(dataset), seed=seed)

    # Networks: built under the global seed on every rank, so initial weights do not depend on world size.
    distributed.print0('Constructing method...')
    torch.manual_seed(seed)
    load = lambda path: _widen_float16(persistence.load_network_pkl(path, allow_code=trust_pickle).to(device))
    extra = {}
    if teacher is not None:
        extra['teacher'] = load(teacher).eval().requires_grad_(False)
    if transfer is not None:
        extra['transfer'] = load(transfer)
    if dataset is not None:
        extra['dataset'] = dataset
    takes = lambda name: _accepts(dnnlib.util.get_obj_by_name(method_kwargs['class_name']), name)
    if takes('run_dir'):
        extra['run_dir'] = run_dir  # for methods that write files of their own (DisBack's recorded path)
    if takes('seed'):
        extra['seed'] = seed  # for methods with fixed orders of their own (DMD's regression pairs)
    if guide_net is not None:
        extra['guide_net'] = load(guide_net)
    method = dnnlib.util.construct_class_by_name(**method_kwargs, device=device, batch_size=batch_size, **extra)
    for net in method.networks().values():
        misc.broadcast_module(net)
        networks_edm2.force_weight_normalization(net)  # EDM2 networks being trained start normalised
    phema_tracker = phema.PowerFunctionEMA(_tracked(method), phema_stds) if phema_stds else None

    # Counters, possibly from a training state.
    cur_nimg = 0
    cur_tick = 0
    tick_start_nimg = 0
    step = 0
    if resume_state is not None:
        path = find_latest_state(resume_state, log=distributed.print0)
        distributed.print0(f'Resuming from "{path}"...')
        state = torch.load(path, map_location='cpu', weights_only=True)
        method.load_state_dict(state['method'])
        _resume_phema(phema_tracker, state, path)
        cur_nimg, cur_tick, tick_start_nimg, step = state['cur_nimg'], state['cur_tick'], state['tick_start_nimg'], state['step']
        if state['world_size'] == world_size:
            _set_rng_state(state['rng'][rank], device)
        else:
            distributed.print0(f'Warning: state written with {state["world_size"]} processes, resuming with '
                               f'{world_size}: RNG streams restart, so the run is not bitwise reproducible')
            torch.manual_seed(seed * world_size + rank + step)
        if rank == 0:
            for name in ['stats.jsonl'] + [n for n in os.listdir(run_dir) if re.fullmatch(r'metric-.+\.jsonl', n)]:
                _truncate_stats(os.path.join(run_dir, name), cur_nimg)
        del state
    else:
        torch.manual_seed(seed * world_size + rank)  # per-rank stream for whatever is not keyed by sample
        np.random.seed((seed * world_size + rank) % (1 << 31))
        random.seed(seed * world_size + rank)

    data_iter = None
    if dataset is not None:
        sampler = RankSampler(stream, batch_size, rank, world_size, start_step=step)
        # The loader's own generator: iter() draws a worker base seed, which must not consume the global
        # stream restored from a training state (dropout reads that one).
        generator = torch.Generator().manual_seed(seed * world_size + rank)
        loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_gpu, generator=generator,
                                             **data_loader_kwargs)
        data_iter = iter(loader)

    # Preview grid: fixed latents and labels, so grids from different snapshots are comparable. Sampled before
    # every snapshot (a few images when previews are off): a generator whose samples are not finite is not written.
    grid = None
    if rank == 0:
        g = torch.Generator().manual_seed(seed)
        ref = next(iter(method.networks().values()))
        label_dim = getattr(ref, 'label_dim', 0)
        n = preview_grid or 8
        z = torch.randn([n, ref.img_channels, ref.img_resolution, ref.img_resolution], generator=g)
        c = torch.eye(label_dim)[torch.arange(n) % label_dim] if label_dim else None
        grid = (z.to(device), c.to(device) if c is not None else None)

    # Graceful stop on SIGTERM/SIGINT.
    global _stop_signal
    old_handlers = catch_stop_signals()

    distributed.print0(f'Training for {total_kimg} kimg...\n')
    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    stats_jsonl = None
    # On resume, TensorBoard hides the events a killed run logged after its state (as stats.jsonl drops them).
    stats_tfevents = _tensorboard_writer(run_dir, cur_nimg + 1 if resume_state else None) if tensorboard and rank == 0 else None
    try:
        while True:
            done = cur_nimg >= total_kimg * 1000
            stop = not done and _stop_agreed()
            if done or stop:
                break

            # One step: rounds of this rank's share of the global batch. With several rounds a stop may abandon the
            # step (see _stop_agreed): the random streams then go back to the step's start, which the state describes.
            rng_start = _rng_state(device) if num_rounds > 1 else None
            rand = StepRandom(seed, step, batch_size, device)
            rounds = []
            for i in range(num_rounds):
                images = labels = None
                if data_iter is not None:
                    images, labels = next(data_iter)
                    images = images.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1  # pinned: no host wait
                    labels = labels.to(device, non_blocking=True)
                rounds.append(Round(images, labels, rand, rank * per_rank + i * batch_gpu, batch_gpu))
            try:
                with optim.abandonable(_stop_agreed if num_rounds > 1 else None):
                    method.step(rounds, cur_nimg)
            except optim.StepAbandoned:
                _set_rng_state(rng_start, device)
                stop = True
                break
            cur_nimg += batch_size
            step += 1
            if phema_tracker is not None:
                phema_tracker.update(_tracked(method), cur_nimg, batch_size)
            for net in method.networks().values():  # after the EMAs have seen the update, as in EDM2
                networks_edm2.force_weight_normalization(net)

            done = cur_nimg >= total_kimg * 1000
            wanted = hasattr(method, 'wants_snapshot') and method.wants_snapshot()  # e.g. the end of a PD round
            if not done and not wanted and cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
                continue

            # Tick: progress, statistics, snapshot, state; nothing is written once the run has diverged.
            tick_end_time = time.time()
            _writer.poll()
            health = _check_divergence(method, run_dir, cur_nimg, device)
            fields = [f'tick {cur_tick:<5d}', f'kimg {cur_nimg / 1000:<9.1f}',
                      f'time {dnnlib.util.format_time(tick_end_time - start_time):<12s}',
                      f'sec/tick {tick_end_time - tick_start_time:<7.1f}',
                      f'sec/kimg {(tick_end_time - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1000:<7.2f}',
                      f'maintenance {maintenance_time:<6.1f}',
                      f'cpumem {psutil.Process(os.getpid()).memory_info().rss / 2**30:<6.2f}']
            training_stats.report0('Progress/tick', cur_tick)
            training_stats.report0('Progress/kimg', cur_nimg / 1000)
            training_stats.report0('Timing/total_sec', tick_end_time - start_time)
            training_stats.report0('Timing/sec_per_tick', tick_end_time - tick_start_time)
            training_stats.report0('Timing/sec_per_kimg', (tick_end_time - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1000)
            training_stats.report0('Timing/maintenance_sec', maintenance_time)
            training_stats.report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30)
            if device.type == 'cuda':
                fields.append(f'gpumem {torch.cuda.max_memory_allocated(device) / 2**30:<6.2f}')
                training_stats.report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2**30)
                torch.cuda.reset_peak_memory_stats()
            fields += _tick_fields(health, cur_nimg, total_kimg, (tick_end_time - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1000)
            distributed.print0(' '.join(fields + _health_fields(health)))

            is_snapshot = snapshot_ticks is not None and (done or wanted or cur_tick % snapshot_ticks == 0)
            if is_snapshot:
                _save_snapshot(method, run_dir, cur_nimg, dataset_kwargs, _check_samples(method, grid, run_dir, cur_nimg, rank),
                               preview_grid, rank, phema_tracker)
                with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
                    _run_metrics(method, metrics, metric_kwargs, run_dir, cur_nimg, device)
            if state_dump_ticks is not None and (done or cur_tick % state_dump_ticks == 0):
                _save_state(method, run_dir, cur_nimg, cur_tick + 1, cur_nimg, step, device, phema_tracker)

            stats = training_stats.collect(device)
            if rank == 0:
                if stats_jsonl is None:
                    stats_jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'at')
                stats_jsonl.write(json.dumps(dict(stats, timestamp=time.time())) + '\n')
                stats_jsonl.flush()
                if stats_tfevents is not None:
                    _write_tensorboard(stats_tfevents, stats, cur_nimg)

            cur_tick += 1
            tick_start_nimg = cur_nimg
            tick_start_time = time.time()
            maintenance_time = tick_start_time - tick_end_time

        if stop:  # the checks of a tick with a snapshot: every state on disk passed them
            _check_divergence(method, run_dir, cur_nimg, device)
            _check_samples(method, grid, run_dir, cur_nimg, rank)
            path = _save_state(method, run_dir, cur_nimg, cur_tick, tick_start_nimg, step, device, phema_tracker)
            _writer.wait()
            distributed.print0(f'\nReceived {_stop_signal or "a stop request on another rank"}: '
                               f'training state written to "{path}"; resume with --resume={run_dir}')
            return False
        _writer.wait()
    finally:
        _writer.close()  # on an error, a state write in progress still completes
        for s, h in old_handlers.items():
            signal.signal(s, h)
        _stop_signal = None  # this run's stop is handled: a later run in this process starts without it
        if stats_jsonl is not None:
            stats_jsonl.close()
        if stats_tfevents is not None:
            stats_tfevents.close()
    distributed.print0('\nExiting...')
    return True

# ----------------------------------------------------------------------------

def _accepts(cls, name):
    """Whether constructing cls takes the keyword `name`: some __init__ along the MRO names it before one that
    forwards no **kwargs (a mixin's **kwargs pass on to the next class, which may not take it)."""
    for c in cls.__mro__:
        if '__init__' in c.__dict__:
            params = inspect.signature(c.__init__).parameters
            if name in params:
                return True
            if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
                return False
    return False


def _tick_fields(health, cur_nimg, total_kimg, sec_per_kimg):
    """The tick line's tail: the method's losses (Loss/* means over all ranks since the last tick, from the tick's
    health statistics) and the time to --duration at this tick's speed (snapshots, metrics and state dumps to come
    not included)."""
    losses = {name: s['mean'] for name, s in health.items() if name.startswith('Loss/')}
    fields = [f'{name[5:]} {value:<9.4g}' if value is not None else f'{name[5:]} {"nan":<9s}' for name, value in losses.items()]
    eta = max(total_kimg * 1000 - cur_nimg, 0) / 1000 * sec_per_kimg
    return fields + [f'eta {dnnlib.util.format_time(eta)}']


def _tensorboard_writer(run_dir, purge_step):
    from torch.utils.tensorboard import SummaryWriter  # optional: train.py checks it before starting
    return SummaryWriter(run_dir, purge_step=purge_step)


def _write_tensorboard(writer, stats, cur_nimg):
    """One tick's statistics (their means; all-non-finite ones skipped) at step = images seen, as stats.jsonl."""
    for name, value in stats.items():
        if value['mean'] is not None:
            writer.add_scalar(name, value['mean'], global_step=cur_nimg)
    writer.flush()


def _check_samples(method, grid, run_dir, cur_nimg, rank):
    """Rank 0 samples the preview grid: its rows (None on other ranks), or RunError on every rank when a sample is
    not finite. The training's random streams are left as they were (a stop checks where a run does not)."""
    rows = None
    ok = True
    if rank == 0:
        with torch.random.fork_rng(devices=[grid[0].device] if grid[0].device.type == 'cuda' else []):
            rows = method.preview(*grid) if hasattr(method, 'preview') else [method.sample(*grid)]
        ok = bool(torch.stack([torch.isfinite(r).all() for r in rows]).all())
    if not distributed.broadcast_object(ok):
        raise dnnlib.util.RunError(_diverged_message('the generator\'s samples are not finite', run_dir, cur_nimg))
    return rows


def _save_snapshot(method, run_dir, cur_nimg, dataset_kwargs, rows, preview_grid, rank, phema_tracker=None):
    """Rank 0 writes the snapshot and the preview PNG of the grid's rows (checked finite by _check_samples). With
    post-hoc EMA, also one snapshot per tracked profile."""
    if rank != 0:
        return
    data = method.snapshot()
    data['dataset_kwargs'] = dict(dataset_kwargs) if dataset_kwargs is not None else None  # a plain dict, as EDM's
    _write_pickle(data, os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:06d}.pkl'))
    if phema_tracker is not None:
        _save_phema_snapshots(phema_tracker, data, run_dir, cur_nimg)
    if preview_grid:
        n = rows[0].shape[0]
        w = next(d for d in range(max(math.isqrt(n), 1), n + 1) if n % d == 0)  # each kind a w-wide block, stacked
        misc.save_image_grid(torch.cat([r.cpu() for r in rows]), os.path.join(run_dir, f'fakes-{cur_nimg // 1000:06d}.png'), grid_w=w)


def _check_divergence(method, run_dir, cur_nimg, device):
    """The tick's health statistics (every rank), or RunError naming the last training state when the run diverged."""
    health = training_stats.collect(device, prefix=('Loss/', 'Health/'), reset=False)
    reason = _divergence(health, method)
    if reason is not None:
        raise dnnlib.util.RunError(_diverged_message(reason, run_dir, cur_nimg))
    return health


def _widen_float16(net):
    """EDM2's float16 files widened to float32 (exactly): networks train in float32, precision is the run's autocast."""
    if any(t.dtype == torch.float16 for t in net.state_dict().values()):
        net = net.float()
    return net


def _tracked(method):
    """The network post-hoc EMA averages: the method's first network (the one being trained: net, G, student)."""
    return next(iter(method.networks().values()))


def _resume_phema(tracker, state, path):
    """The tracked profiles from a training state: part of exact resume; a mismatch with --phema is a one-line error."""
    if tracker is None:
        return
    if 'phema' not in state:
        raise dnnlib.util.RunError(f'"{path}" has no post-hoc EMA profiles (written without --phema): resume without '
                                   f'--phema, or start a new run')
    try:
        tracker.load_state_dict(state['phema'])
    except ValueError as e:
        raise dnnlib.util.RunError(f'"{path}": {e}') from None


def _save_phema_snapshots(tracker, data, run_dir, cur_nimg):
    """network-snapshot-KIMG-STD.pkl per tracked profile: the snapshot with its 'ema' network holding that profile
    (buffers and attributes as in the snapshot), and 'phema' = {std, nimg} for the reconstruction (phema.py)."""
    for index, std in enumerate(tracker.stds):
        profile = dict(data, ema=tracker.profile_net(index, data['ema']).cpu(), phema=dict(std=std, nimg=cur_nimg))
        _write_pickle(profile, os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:06d}-{std:.3f}.pkl'))


def _divergence(health, method):
    """Why the run must stop, or None: a loss with no finite value in the whole tick, or non-finite weights.
    A non-finite step now and then is only counted: its update is skipped (training/optim.py)."""
    dead = [name for name, s in health.items() if name.startswith('Loss/') and s['num'] == 0]
    if dead:
        return f'{dead[0]} was non-finite in every step of the tick ({int(health[dead[0]]["nonfinite"])} values)'
    floored = [name[len('Health/scale_floor_'):] for name, s in health.items() if name.startswith('Health/scale_floor_') and s['mean']]
    if floored:
        return (f'the gradient of {floored[0]} was non-finite at the fp16 loss scale\'s floor '
                f'{optim.LossScaler.FLOOR:g} (it overflows fp16 unscaled)')
    if not misc.all_finite(method.networks().values()):
        return 'non-finite weights'
    return None


def _diverged_message(reason, run_dir, cur_nimg):
    """One line: what happened, the last training state (every state written passed these checks), what to do."""
    _writer.wait()  # the last state is whole on disk before it is named
    try:
        path = find_latest_state(run_dir)
    except dnnlib.util.RunError:
        return (f'Training diverged at {cur_nimg / 1000:g} kimg: {reason}; no training state was written yet: '
                f'start again with a lower --lr')
    return (f'Training diverged at {cur_nimg / 1000:g} kimg: {reason}; the last training state is "{path}": '
            f'resume from it with a lower learning rate (--resume={run_dir} --lr=...)')


def _health_fields(health):
    """Tick-line fields, only when there is something to see: non-finite loss values, skipped steps, fp16 scales."""
    fields = []
    nonfinite = sum(s.get('nonfinite', 0) for name, s in health.items() if name.startswith('Loss/'))
    if nonfinite:
        fields.append(f'nonfinite {int(nonfinite)}')
    skipped = {name[len('Health/skipped_'):]: s['num'] * s['mean'] for name, s in health.items()
               if name.startswith('Health/skipped_') and s['mean']}
    if skipped:
        fields.append('skipped ' + ','.join(f'{k}:{int(v)}' for k, v in sorted(skipped.items())))
    scales = [s['mean'] for name, s in health.items() if name.startswith('Health/loss_scale_') and s['mean']]
    if scales:
        fields.append(f'scale {min(scales):g}')
    return fields


class _StateWriter:
    """Writes training states from CPU copies in a background thread, so that training goes on (or ends) while a
    multi-GB state is written. One write at a time: the next waits for the previous. wait() joins the write and raises
    its error; the loop calls it before returning and before naming the last state, so a finished run's states exist."""

    def __init__(self):
        self.thread = None
        self.error = None

    def write(self, state, path):
        self.wait()
        state = _cpu_copy(state)  # the weights change in place once the loop goes on

        def run():
            try:
                _write_state(state, path)
            except Exception as e:  # re-raised in the main thread by wait()
                self.error = e
        self.thread = threading.Thread(target=run, name=f'write {os.path.basename(path)}')
        self.thread.start()

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        if error is not None:
            raise error

    def poll(self):
        """wait() for a write that has ended: its error stops the run at the next tick, not at the next write."""
        if self.thread is not None and not self.thread.is_alive():
            self.wait()

    def close(self):
        """On the way out of an error: the write in progress completes; its own error, if any, is dropped (the one
        being raised is reported)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self.error = None


_writer = _StateWriter()  # rank 0's


def _cpu_copy(tree):
    """Nested dicts/lists of tensors and plain values, with every tensor copied to the CPU (on CUDA, the copy waits
    for the device)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to('cpu', copy=True)
    if isinstance(tree, dict):
        return {k: _cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu_copy(v) for v in tree)
    return tree


def _save_state(method, run_dir, cur_nimg, cur_tick, tick_start_nimg, step, device, phema_tracker=None):
    """All ranks contribute their RNG state; rank 0 starts the write (_StateWriter). Returns the path. No barrier after
    the write: no other rank reads the file, and a barrier would only move their wait for rank 0 (up to the collective
    timeout of torch_utils/distributed.py) from their next collective to here."""
    rng = [None] * distributed.get_world_size()
    if distributed.is_distributed():
        torch.distributed.all_gather_object(rng, _rng_state(device))
    else:
        rng[0] = _rng_state(device)
    path = state_path(run_dir, cur_nimg)
    if distributed.get_rank() == 0:
        state = dict(method=method.state_dict(), cur_nimg=cur_nimg, cur_tick=cur_tick, tick_start_nimg=tick_start_nimg,
                     step=step, world_size=distributed.get_world_size(), rng=rng)
        if phema_tracker is not None:
            state['phema'] = phema_tracker.state_dict()
        _writer.write(state, path)
    return path


def _run_metrics(method, metrics, metric_kwargs, run_dir, cur_nimg, device):
    """Metrics of the current generator ('fid10k': FID of 10,000 images, seeds 0-9999; is50k, pr50k), no files
    written. Detectors, reference statistics and real features are loaded once per process."""
    if not metrics:
        return
    from training import metrics as metric_lib
    from training.dataset import ImageFolderDataset
    from training.samplers import StackedRandomGenerator, require_finite
    ref_net = next(iter(method.networks().values()))
    shape = [ref_net.img_channels, ref_net.img_resolution, ref_net.img_resolution]
    label_dim = ref_net.label_dim
    batch = metric_kwargs.get('batch', 64)

    def sample_fn(seeds):  # per-seed latents, then labels, exactly as generate.py draws them
        rnd = StackedRandomGenerator(device, seeds)
        z = rnd.randn([len(seeds), *shape])
        c = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[len(seeds)])] if label_dim else None
        x = method.sample(z, c)
        try:
            require_finite(x, seeds)  # NaN would be scored as black images
        except ValueError as e:
            raise dnnlib.util.RunError(_diverged_message(f'the metrics\' samples are not finite ({e})', run_dir, cur_nimg))
        return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)

    def downloaded(key, load):  # loaded once per process; a URL is downloaded into the cache once
        if key not in _metric_cache:
            with distributed.rank0_first():
                _metric_cache[key] = load()
        return _metric_cache[key]

    for metric in metrics:
        kind, num = metric_lib.parse_metric(metric)
        name = metric_kwargs.get('detector') or metric_lib.default_detector(kind)
        trust = metric_kwargs.get('trust_detector', False)
        detector = downloaded(('detector', name, trust), lambda: metric_lib.load_detector(name, device=device, trust=trust))
        ref = real = None
        if kind == 'fid':
            ref = downloaded(('ref', metric_kwargs['ref']), lambda: metric_lib.load_ref(metric_kwargs['ref']))
        if kind == 'pr':  # as many real images as generated ones (all of them when there are fewer)
            key = ('real', metric_kwargs['pr_data'], name, trust, num)
            if key not in _metric_cache:  # a collective: every rank featurises its share
                data = ImageFolderDataset(metric_kwargs['pr_data'])
                _metric_cache[key] = metric_lib.compute_features(data, detector, num=min(len(data), num), batch=batch,
                                                                 device=device).cpu()  # kept on the CPU: 1.6 GB at pr50k
            real = _metric_cache[key].to(device)  # on the device for this evaluation only
        results = metric_lib.sampler_metric(metric, sample_fn, detector, ref=ref, real=real, batch=batch, device=device)
        for key, value in results.items():
            training_stats.report0(f'Metrics/{key}', value)
        distributed.print0(f'{metric} at {cur_nimg / 1000:.1f} kimg: {", ".join(f"{k} {v:g}" for k, v in results.items())}')
        if distributed.get_rank() == 0:
            with open(os.path.join(run_dir, f'metric-{metric}.jsonl'), 'at') as f:
                f.write(json.dumps(dict(kimg=cur_nimg / 1000, results=results, timestamp=time.time())) + '\n')


_metric_cache = {}  # detectors, reference statistics and real features, loaded once per process
