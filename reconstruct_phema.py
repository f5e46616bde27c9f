"""Post-hoc EMA reconstruction: a network for any EMA length from the profiles a run tracked with --phema.

    python reconstruct_phema.py --indir=training-runs/00000-... --outdir=phema --outstd=0.045,0.075,0.150

Reads every network-snapshot-KIMG-STD.pkl of --indir up to --outkimg, solves for the least-squares combination of
their power-function profiles that best matches each target (EDM2's method, training/phema.py) and writes
phema-KIMG-STD.pkl per target: the latest snapshot with its network replaced by the reconstruction.
"""

import os
import pickle
import re

import click

import dnnlib
from torch_utils import persistence
from training import networks_edm2, phema

# ----------------------------------------------------------------------------

def find_profiles(indir, allow_code=False):
    """[(nimg, std, path)] of the tracked-profile snapshots in indir, from the 'phema' entry each file carries."""
    names = sorted(n for n in os.listdir(indir) if re.fullmatch(r'network-snapshot-\d+-\d+\.\d+\.pkl', n))
    profiles = []
    for name in names:
        path = os.path.join(indir, name)
        info = _load(path, allow_code).get('phema')
        if not isinstance(info, dict) or not {'std', 'nimg'} <= set(info):
            raise ValueError(f'"{path}" has no post-hoc EMA profile entry (phema = {{std, nimg}})')
        profiles.append((int(info['nimg']), float(info['std']), path))
    return profiles


def _load(path, allow_code):
    with open(path, 'rb') as f:
        data = persistence.load(f, allow_code=allow_code)
    if not isinstance(data, dict) or 'ema' not in data:
        raise ValueError(f'"{path}" is not a snapshot (a dict with an "ema" network)')
    return data


def reconstruct_files(indir, outdir, out_stds, out_nimg=None, allow_code=False, edm2_layout=False):
    """Write outdir/phema-KIMG-STD.pkl for each target std at out_nimg (default: the latest profile's); returns paths.
    edm2_layout: write EDM2's own layout (networks_edm2.edm2_snapshot: float16 ema, encoder, loss_fn), for EDM2's tools."""
    profiles = find_profiles(indir, allow_code)
    if not profiles:
        raise ValueError(f'"{indir}" has no network-snapshot-KIMG-STD.pkl files: train with --phema=0.050,0.100')
    out_nimg = max(n for n, _, _ in profiles) if out_nimg is None else out_nimg
    profiles = [p for p in profiles if 0 < p[0] <= out_nimg]
    if not profiles:
        raise ValueError(f'no tracked profile ends at or before {out_nimg / 1000:g} kimg')
    for std in out_stds:
        phema.std_to_exp(std)  # validates
    latest = max(profiles)[2]
    inputs = [(n, s, lambda path=path: _load(path, allow_code)['ema']) for n, s, path in profiles]
    nets = phema.reconstruct(inputs, [out_nimg] * len(out_stds), out_stds)
    data = _load(latest, allow_code)
    if edm2_layout and not isinstance(data['ema'], networks_edm2.Precond):
        raise ValueError(f'--edm2 writes EDM2\'s layout for EDM2 networks; "{latest}" holds a {type(data["ema"]).__name__}')
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for std, net in zip(out_stds, nets):
        paths.append(os.path.join(outdir, f'phema-{out_nimg // 1000:06d}-{std:.3f}.pkl'))
        if edm2_layout:
            out = networks_edm2.edm2_snapshot(net, data.get('dataset_kwargs'))
        else:
            out = dict(data, ema=net, phema=dict(std=std, nimg=out_nimg))
        dnnlib.util.atomic_write(paths[-1], lambda f, out=out: pickle.dump(out, f))
    return paths


def _parse_stds(ctx, param, value):
    try:
        return [float(x) for x in value.split(',')]
    except ValueError:
        raise click.BadParameter(f'"{value}" is not a list of numbers, e.g. 0.050,0.100', ctx=ctx, param=param) from None


@click.command()
@click.option('--indir',        help='Run directory with network-snapshot-KIMG-STD.pkl files (train.py --phema)', metavar='DIR', type=click.Path(exists=True, file_okay=False), required=True)
@click.option('--outdir',       help='Where to write phema-KIMG-STD.pkl', metavar='DIR', type=str, required=True)
@click.option('--outstd',       help='Target EMA lengths (relative stds), e.g. 0.050,0.075', metavar='LIST', type=str, required=True, callback=_parse_stds)
@click.option('--outkimg',      help='Training time of the targets  [default: the latest profile]', metavar='KIMG', type=click.FloatRange(min=0, min_open=True))
@click.option('--trust-pickle', help='Allow code embedded in the pickles to run (only for files you trust)', is_flag=True)
@click.option('--edm2',         help='Write EDM2\'s pickle layout (float16 ema, encoder, loss_fn) for its generate_images.py', is_flag=True)
def main(indir, outdir, outstd, outkimg, trust_pickle, edm2):
    """Reconstruct networks for other EMA lengths from a run's tracked power-function EMA profiles."""
    try:
        paths = reconstruct_files(indir, outdir, outstd, None if outkimg is None else round(outkimg * 1000), trust_pickle, edm2)
    except ValueError as e:
        raise click.ClickException(str(e))
    except OSError as e:
        raise click.ClickException(dnnlib.util.os_error_message(e))
    for path in paths:
        print(path)


if __name__ == '__main__':
    main()
