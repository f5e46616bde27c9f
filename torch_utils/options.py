"""Command-line value types shared by every script (train.py, generate.py, make_pairs.py, fid.py, toy.py,
dataset_tool.py): finite, bounded numbers, integer lists and the device.

A bad value is refused while click parses the command line, before anything is read or written, as click's one line
`Error: Invalid value for '--OPTION': ...` with exit code 2. tests/test_options.py feeds random, non-finite and huge
values to every numeric option of every command.
"""

import math
import re

import click

MAX_SEED = 2**32 - 1  # EDM's seeds are numpy RandomState seeds, which are 32-bit
MAX_INT = 2**31 - 1   # any other count: a C int, which every size and index below (torch, numpy, zipfile) takes
MAX_BATCH = 1 << 16   # images per batch: 8x the largest official batch (SiD ImageNet-64, 8192)
MAX_LIST = 1 << 24    # items of an integer list (--seeds): a Python list of them stays well below 1 GB
MAX_FLOAT = 1e12      # any float's magnitude: larger means nothing to any option here, and overflows once a
                      # duration is turned into images or steps


class Float(click.FloatRange):
    """A finite float in [min, max], [-MAX_FLOAT, MAX_FLOAT] unless given: click's FloatRange lets NaN through
    (every comparison with NaN is false), and inf where only a minimum is set."""

    def __init__(self, min=-MAX_FLOAT, max=MAX_FLOAT, **kwargs):
        super().__init__(min=min, max=max, **kwargs)

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)  # click's one line for text that is no number at all
        if not math.isfinite(number):  # before the range, whose checks NaN passes
            self.fail(f'{value!r} is not a finite number', param, ctx)
        return super().convert(number, param, ctx)


class Int(click.IntRange):
    """An int in [min, max], max MAX_INT unless given: a 23-digit value is refused here, not by an overflow later."""

    def __init__(self, min=None, max=MAX_INT, **kwargs):
        super().__init__(min=min, max=max, **kwargs)


SEED = Int(0, MAX_SEED)
BATCH = Int(1, MAX_BATCH)


def parse_int_list(s, min=0, max=MAX_INT, max_len=MAX_LIST):
    """'0-63,100' -> [0, 1, ..., 63, 100]: comma-separated ints in [min, max] and inclusive ranges; ValueError
    naming the bad item otherwise."""
    result = []
    for part in s.split(','):
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if m is None:
            raise ValueError(f'malformed item "{part}" in "{s}": use comma-separated non-negative integers and '
                             f'inclusive ranges, e.g. 0-63,100')
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        if hi < lo:
            raise ValueError(f'empty range "{part}" in "{s}": write the smaller bound first, e.g. {hi}-{lo}')
        if lo < min or hi > max:
            raise ValueError(f'"{part}" in "{s}" is outside [{min}, {max}]')
        if len(result) + hi - lo + 1 > max_len:  # checked before the list is made: "0-4294967295" is 4G items
            raise ValueError(f'"{s}" has more than {max_len} items')
        result.extend(range(lo, hi + 1))
    return result


class IntList(click.ParamType):
    """parse_int_list as a click type, so that a bad list is an error naming its option."""
    name = 'list'

    def __init__(self, min=0, max=MAX_INT, max_len=MAX_LIST):
        self.min, self.max, self.max_len = min, max, max_len

    def convert(self, value, param, ctx):
        if isinstance(value, list):  # a default given as a list, or a value converted before
            return value
        try:
            return parse_int_list(value, self.min, self.max, self.max_len)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class Device(click.Choice):
    """--device=cpu|cuda; cuda is refused when this PyTorch cannot use it (a CPU-only build, no GPU)."""

    def __init__(self):
        super().__init__(['cpu', 'cuda'])

    def convert(self, value, param, ctx):
        import torch  # here, so that dataset_tool.py, which needs no torch, starts without it
        device = super().convert(value, param, ctx)
        if device == 'cuda' and not torch.cuda.is_available():
            self.fail('CUDA is not available to this PyTorch (a CPU-only build, or no GPU); use --device=cpu', param, ctx)
        return device
