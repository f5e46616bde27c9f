"""Make DMD's regression pairs: the teacher's deterministic sampler output for a contiguous seed range, in shards.

    python make_pairs.py --teacher=edm-cifar10-32x32-cond-vp.pkl --seeds=0-99999 --outdir=pairs/cifar10
    torchrun --standalone --nproc_per_node=8 make_pairs.py --teacher=... --seeds=0-99999 --outdir=...

Re-running the same command resumes: complete shards are kept, missing or corrupt ones are made again.
Rank r of W makes every W-th of the shards still to make. See training/pairs.py for the format.
"""

import os
import time

import click

import dnnlib
from generate import check_class, inference_precision, init_and_load, precision_option
from torch_utils import distributed as dist
from torch_utils import options
from training import networks, pairs

POLL_S = 10  # how often rank 0 looks for the other ranks' shards at the end

# ----------------------------------------------------------------------------

def _parse_seed_range(ctx, param, value):
    """--seeds must be one contiguous range, so that shard k's seeds follow from k."""
    if value != list(range(value[0], value[0] + len(value))):
        raise click.BadParameter('not one contiguous range; give it as FIRST-LAST, e.g. 0-99999', ctx=ctx, param=param)
    return value


@click.command()
@click.option('--teacher', 'teacher_pkl',  help='Teacher network pickle filename or URL', metavar='PKL|URL', type=str, required=True)
@click.option('--outdir',                  help='Where to save the pair shards', metavar='DIR', type=str, required=True)
@click.option('--seeds',                   help='Contiguous seed range (e.g. 0-99999)', metavar='RANGE', type=options.IntList(max=options.MAX_SEED), required=True, callback=_parse_seed_range)
@click.option('--shard-size',              help='Seeds per shard (shard k holds seeds k*size...)', metavar='INT', type=options.Int(min=1), default=1000, show_default=True)
@click.option('--batch',                   help='Maximum batch size per process', metavar='INT', type=options.BATCH, default=64, show_default=True)
@click.option('--class', 'class_idx',      help='Class label  [default: random]', metavar='INT', type=options.Int(min=0), default=None)
@click.option('--steps', 'num_steps',      help='Number of sampling steps  [default: 18 or the network\'s spec]', metavar='INT', type=options.Int(min=1))
@click.option('--sigma_min',               help='Lowest noise level  [default: 0.002 or spec]', metavar='FLOAT', type=options.Float(min=0, min_open=True))
@click.option('--sigma_max',               help='Highest noise level  [default: 80 or spec]', metavar='FLOAT', type=options.Float(min=0, min_open=True))
@click.option('--rho',                     help='Time step exponent  [default: 7 or spec]', metavar='FLOAT', type=options.Float(min=0, min_open=True))
@click.option('--S_churn', 'S_churn',      help='Stochasticity strength; must be 0 (pairs are deterministic)', metavar='FLOAT', type=options.Float(min=0))
@click.option('--solver',                  help='Ablate ODE solver  [default: heun or spec]', type=click.Choice(['euler', 'heun']))
@click.option('--device',                  help='Device  [default: cuda if available]', type=options.Device())
@click.option('--trust-pickle',            help='Allow code embedded in the pickle to run (only for files you trust)', is_flag=True)
@precision_option
def main(teacher_pkl, outdir, seeds, shard_size, batch, class_idx, device, trust_pickle, precision, **sampler_kwargs):
    """Write (z, y, label) pair shards of a teacher's deterministic sampler; resumable and torchrun-aware."""
    device, net = init_and_load(device, teacher_pkl, trust_pickle, 'teacher')
    teacher_sha256 = pairs.file_sha256(teacher_pkl)  # the file is local or cached by now
    precision = inference_precision(net, device, precision)

    # Every rank checks the settings and scans the directory before any rank writes to it.
    try:
        check_class(net, class_idx)
        sampler = pairs.deterministic_settings(net, **sampler_kwargs)
        config = pairs.run_config(net, teacher_pkl, teacher_sha256, sampler, class_idx, shard_size, device, precision)
        plan = pairs.shard_plan(seeds[0], seeds[-1], shard_size)
        todo = pairs.shards_to_make(outdir, plan, config)
    except ValueError as e:
        raise click.ClickException(str(e))
    dist.barrier()
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as e:
        raise click.ClickException(dnnlib.util.os_error_message(e))

    mine = todo[dist.get_rank() :: dist.get_world_size()]
    dist.print0(f'{len(plan) - len(todo)} of {len(plan)} shards complete in "{outdir}"; making {len(todo)} with '
                f'{dist.get_world_size()} process(es)...')
    with dnnlib.util.progress_bar(sum(len(shard_seeds) for _, shard_seeds in todo), 'Making pairs') as bar:
        for k, shard_seeds in mine:
            try:
                with networks.backbone_precision(precision):
                    pairs.make_shard(net, outdir, k, shard_seeds, config, batch=batch, device=device,
                                     progress=dnnlib.util.share_updater(bar, dist.get_world_size()))
            except ValueError as e:
                raise click.ClickException(f'shard {k}: {e}')
            except OSError as e:  # a full disk, a read-only --outdir, ...: the shards written so far stay complete
                raise click.ClickException(dnnlib.util.os_error_message(e))
    # No final barrier: a rank with one shard fewer would wait a whole shard (ImageNet, 256 steps: ~15 GPU-minutes)
    # in it. Rank 0 watches the others' files instead (torchrun ends the job if another rank fails).
    if dist.get_rank() == 0:
        others = [shard for i, shard in enumerate(todo) if i % dist.get_world_size() != 0]
        while True:
            try:
                others = pairs.shards_to_make(outdir, others, config)
            except ValueError as e:
                raise click.ClickException(str(e))
            if not others:
                break
            time.sleep(POLL_S)
    dist.print0('Done.')
    dist.shutdown()

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
