"""A run directory's guards: one writing process at a time, and a resume only with the options the run was made with.

The lock is an flock on `run_dir/.lock`, held until the process exits: the kernel releases it on any exit, kill -9
included, so a dead run never blocks its resume. A resume compares its options with the run's
training_options.json: options that define the networks, the method or the random streams must match; options that
only say how long to train, how often to report and how to use the hardware may change, and each change is recorded
in `resumes.jsonl`.
"""

import fcntl
import json
import os
import socket
import time

import dnnlib

# Options a resume may change (a dotted key and everything under it); every other difference is refused.
RESUMABLE = (
    'run_dir',              # the same directory, however it is spelled
    'resume_state',
    'total_kimg',           # --duration
    'kimg_per_tick',        # --tick
    'snapshot_ticks',       # --snap
    'state_dump_ticks',     # --dump
    'batch_gpu',            # --batch-gpu: same global batch, other split (results equal up to float summation order)
    'data_loader_kwargs',   # --workers, pin_memory
    'cudnn_benchmark',      # --bench
    'metrics',              # --metrics
    'metric_kwargs',        # --ref, --detector, --pr-data
    'tensorboard',          # --tensorboard
    'trust_pickle',         # --trust-pickle: permission, not configuration
    'tf32',                 # --tf32: how float32 matmuls run (precision, which the states depend on, must match)
    'method_kwargs.lr',     # --lr: lowering it after a divergence, or for a final phase (DMD2's 5e-7 resume)
    'method_kwargs.fake_lr',
    'method_kwargs.optimizer_kwargs.lr',
)

# ----------------------------------------------------------------------------

def lock(run_dir):
    """Take run_dir's lock for the life of this process; returns the open lock file (keep a reference to it)."""
    f = open(os.path.join(run_dir, '.lock'), 'a+')
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        f.close()
        raise dnnlib.util.RunError(f'"{run_dir}" is in use by another run ({holder}); wait for it to end or stop it, '
                                   f'or write elsewhere (another --outdir, or without --nosubdir)') from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    f.flush()
    return f


def _flatten(d, prefix=''):
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


ABSENT = '(absent)'  # an option one of the two configs does not have


def option_changes(old, new):
    """(refused, accepted): [(dotted key, old value, new value)] of the options that differ between two configs. Under
    a dict whose class_name differs, keywords only one class takes are not listed (they differ with the class)."""
    old, new = (_flatten(json.loads(json.dumps(c))) for c in (old, new))  # as stored: tuples become lists
    diffs = [(k, old.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(set(old) | set(new))
             if k not in old or k not in new or old[k] != new[k]]
    renamed = [k[:-len('class_name')] for k, _a, _b in diffs if k.endswith('class_name')]
    inside = lambda k: any(k.startswith(p) and k != p + 'class_name' for p in renamed)
    diffs = [(k, a, b) for k, a, b in diffs if not inside(k) or ABSENT not in (a, b)]
    refused = [d for d in diffs if not any(d[0] == r or d[0].startswith(r + '.') for r in RESUMABLE)]
    return refused, [d for d in diffs if d not in refused]


def read_options(run_dir):
    """The run's training_options.json, for a resume."""
    path = os.path.join(run_dir, 'training_options.json')
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise dnnlib.util.RunError(f'--resume: "{run_dir}" has no training_options.json, so it is not a run directory '
                                   f'of train.py; pass the directory of the run to continue') from None
    except ValueError as e:
        raise dnnlib.util.RunError(f'--resume: "{path}" is not valid JSON ({e}); restore it from the run\'s log.txt '
                                   f'("Training options:")') from None


def check_options(old, c):
    """A resume's options `c` against the run's `old` ones: RunError naming every refused difference; returns the
    accepted ones."""
    refused, accepted = option_changes(old, c)
    if refused:
        show = lambda v: v if v is ABSENT else json.dumps(v)
        listed = '; '.join(f'{k}: {show(a)} -> {show(b)}' for k, a, b in refused)
        raise dnnlib.util.RunError(f'--resume: options differ from the run\'s training_options.json ({listed}); these '
                                   f'change the networks, the method or the random streams: pass the run\'s values, '
                                   f'or start a new run')
    return accepted


def record_resume(run_dir, state, accepted):
    """Append one line to resumes.jsonl: when, from which state, and which options changed (old, new)."""
    path = os.path.join(run_dir, 'resumes.jsonl')
    line = json.dumps(dict(timestamp=time.time(), state=os.path.basename(state),
                           changed={k: [a, b] for k, a, b in accepted if k not in ('run_dir', 'resume_state')}))
    text = open(path).read() if os.path.isfile(path) else ''
    dnnlib.util.atomic_write(path, lambda f: f.write(text + line + '\n'), mode='w')
