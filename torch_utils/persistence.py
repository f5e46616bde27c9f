"""EDM's pickle protocol (version 6): writing with `persistent_class`, reading with `load` (safe by default).

A class decorated with `persistent_class` records its constructor arguments and pickles as
`_reconstruct_persistent_obj(meta)`, where `meta` embeds the full source of its defining module, so that
EDM-derived code (which execs that source) can read the files this project writes.

`load` reads such files (official EDM snapshots and our own) without executing anything from them: a restricted
unpickler allows a short list of globals, and each persisted class name is mapped onto this project's class, built
from its recorded constructor arguments and filled with the stored tensors. `allow_code=True` restores EDM's
behaviour of executing the embedded source, for files the user trusts.
"""

import collections
import copy
import importlib
import inspect
import io
import pickle
import pickletools
import struct
import sys
import types

import numpy as np
import torch

import dnnlib

_version = 6  # the protocol version EDM's readers expect in meta['version']

# ----------------------------------------------------------------------------

def persistent_class(orig_class):
    """Make instances of `orig_class` pickle with their module source and init arguments (EDM protocol)."""
    assert isinstance(orig_class, type)
    if is_persistent(orig_class):
        return orig_class
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_source(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Recorded after construction so the subclass chain cannot overwrite them.
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        @property
        def init_args(self):
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            return copy.deepcopy(self._init_kwargs)

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

        def __deepcopy__(self, memo):
            # copy.deepcopy must not go through __reduce__ (that path is for files and may refuse to exec code).
            obj = type(self).__new__(type(self))
            memo[id(self)] = obj
            obj.__dict__.update(copy.deepcopy(self.__dict__, memo))
            return obj

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    Decorator.__doc__ = orig_class.__doc__
    _persistent_classes.add(Decorator)
    return Decorator


_persistent_classes = set()


def is_persistent(obj):
    try:
        if obj in _persistent_classes:
            return True
    except TypeError:
        pass
    return type(obj) in _persistent_classes


def _module_source(module):
    """The defining module's full source text, embedded into every pickle of its classes."""
    src = getattr(module, '__persistent_src__', None)
    if src is None:
        src = inspect.getsource(module)
    return src

# ----------------------------------------------------------------------------
# Reading: EDM's files call this global. Which version runs is decided by the unpickler in `load`.

_code_execution_allowed = False  # set only inside load(..., allow_code=True)
_src_to_module_dict = dict()


def _reconstruct_persistent_obj(meta):
    """Rebuild a persistent object by executing its embedded module source (only when explicitly allowed)."""
    if not _code_execution_allowed:
        raise RuntimeError('Refusing to execute source code embedded in a pickle; '
                           'use torch_utils.persistence.load(f, allow_code=True) (--trust-pickle) only for files you trust')
    meta = dict(meta)
    if meta.get('type') != 'class' or meta.get('version') != _version:
        raise ValueError(f'Unsupported persistent object (type={meta.get("type")}, version={meta.get("version")})')
    module = _src_to_module(meta['module_src'])
    orig_class = module.__dict__[meta['class_name']]
    decorator_class = persistent_class(orig_class)
    obj = decorator_class.__new__(decorator_class)
    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(meta['state'])
    else:
        obj.__dict__.update(meta['state'])
    return obj


def _src_to_module(module_src):
    module = _src_to_module_dict.get(module_src, None)
    if module is None:
        module_name = '_imported_module_' + format(abs(hash(module_src)), 'x')
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        module.__persistent_src__ = module_src
        _src_to_module_dict[module_src] = module
        exec(module_src, module.__dict__)  # noqa: S102 (only reached with allow_code=True)
    return module

# ----------------------------------------------------------------------------
# Safe reading.

class PickleLoadError(ValueError):
    """A file that cannot be read as a pickle of EDM's or this project's objects."""


class UnsafePickleError(PickleLoadError):
    """A pickle that needs a global or class outside the safe loader's allow-list."""


_trust_hint = ('if you trust the file, load it with allow_code=True (CLI flag --trust-pickle), '
               'which executes the code embedded in it')

# Persisted class name -> this project's class: the only classes the safe reader builds.
_safe_classes = {
    'EDMPrecond':           'training.networks.EDMPrecond',
    'VPPrecond':            'training.networks.VPPrecond',
    'VEPrecond':            'training.networks.VEPrecond',
    'iDDPMPrecond':         'training.networks.iDDPMPrecond',
    'SongUNet':             'training.networks.SongUNet',
    'DhariwalUNet':         'training.networks.DhariwalUNet',
    'UNetBlock':            'training.networks.UNetBlock',
    'Linear':               'training.networks.Linear',
    'Conv2d':               'training.networks.Conv2d',
    'GroupNorm':            'training.networks.GroupNorm',
    'PositionalEmbedding':  'training.networks.PositionalEmbedding',
    'FourierEmbedding':     'training.networks.FourierEmbedding',
    'EDMLoss':              'training.loss.EDMLoss',
    'VPLoss':               'training.loss.VPLoss',
    'VELoss':               'training.loss.VELoss',
    'AugmentPipe':          'training.augment.AugmentPipe',
    'GMMDenoiser':          'training.toy.GMMDenoiser',
}


class _Persisted:
    """Stand-in for a persisted object while unpickling: its class name and pickled __dict__, nothing executed."""
    def __init__(self, class_name, state):
        self.class_name = class_name
        self.state = state


def _reconstruct_safely(meta):
    """What `_reconstruct_persistent_obj` means in the safe path: check the meta, keep it as a stand-in."""
    if not isinstance(meta, dict) or meta.get('type') != 'class' or meta.get('version') != _version:
        raise PickleLoadError('persistent object with unsupported meta (expected type "class", version 6)')
    class_name, state = meta.get('class_name'), meta.get('state')
    if class_name not in _safe_classes:
        raise UnsafePickleError(f'persisted class "{class_name}" is not one the safe loader can rebuild; {_trust_hint}')
    if not isinstance(state, dict):
        raise PickleLoadError(f'persisted {class_name} has no state dict')
    return _Persisted(class_name, state)


# What the unpickler and the allow-listed rebuilders raise on garbled bytes (no other code runs while unpickling).
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, MemoryError, AttributeError, IndexError,
                    KeyError, OverflowError, RecursionError, RuntimeError, struct.error)

# What this project's constructors raise on stored arguments they cannot use.
_CONSTRUCTION_ERRORS = (TypeError, ValueError, AssertionError, KeyError, IndexError, ZeroDivisionError, RuntimeError,
                        OverflowError)


def _scan(f):
    """Walk the opcodes without executing them: a truncated or garbled file fails here, and so does a memo index no
    pickler writes (the unpickler would allocate a memo table that large, e.g. 2**32 entries from one flipped bit)."""
    puts = 0
    try:
        for op, arg, _pos in pickletools.genops(f):
            if op.name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
                if arg > puts:
                    raise ValueError(f'memo index {arg} after {puts} entries')
                puts += arg == puts
            elif op.name == 'MEMOIZE':
                puts += 1
    except (ValueError, OverflowError, struct.error) as e:  # pickletools' reports on malformed streams
        raise PickleLoadError(f'is truncated, corrupt or not a pickle ({_summary(e)})') from None


def _summary(e):
    """An exception as one short line (torch's own messages span many lines)."""
    lines = str(e).strip().splitlines()
    return f'{type(e).__name__}: {lines[0][:200]}' if lines else type(e).__name__


def _load_storage_from_bytes(b):
    """EDM's tensors pickle as torch.storage._load_from_bytes(blob), a legacy torch.save of one storage."""
    if not isinstance(b, bytes):
        raise PickleLoadError('tensor storage is not a byte string')
    try:
        return torch.load(io.BytesIO(b), weights_only=True, map_location='cpu')  # not the GPU it was saved from
    except (RuntimeError, AssertionError, pickle.UnpicklingError, EOFError) as e:  # what torch's legacy reader raises on bad bytes
        raise PickleLoadError(f'corrupt tensor storage ({_summary(e)})') from None


# numpy 2 moved numpy.core to numpy._core; files name either, both resolve to this one function.
_numpy_scalar = importlib.import_module('numpy._core.multiarray' if int(np.__version__.split('.')[0]) >= 2 else 'numpy.core.multiarray').scalar


# (module, name) -> what the safe unpickler hands back. Everything else in a file is refused.
_safe_globals = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_safely,
    ('collections', 'OrderedDict'):                              collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'):                      torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'):                      torch._utils._rebuild_parameter,
    ('torch.storage', '_load_from_bytes'):                       _load_storage_from_bytes,
    ('torch.nn.modules.container', 'ModuleDict'):                torch.nn.ModuleDict,  # rebuilt via __setstate__ only
    ('numpy', 'dtype'):                                          np.dtype,
    ('numpy.core.multiarray', 'scalar'):                         _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'):                        _numpy_scalar,
    ('dnnlib.util', 'EasyDict'):                                 dnnlib.util.EasyDict,  # a dict; our configs
}


class _SafeUnpickler(pickle.Unpickler):
    """Resolves globals only through the allow-list, so loading a file never imports or calls anything else."""
    def find_class(self, module, name):
        obj = _safe_globals.get((module, name))
        if obj is None:
            raise UnsafePickleError(f'refusing global "{module}.{name}" (not on the safe loader\'s allow-list); {_trust_hint}')
        return obj

    def persistent_load(self, pid):
        raise PickleLoadError('pickle uses persistent ids (a torch.save file?); use torch.load for it')


def _is_plain(value):
    """Plain data (None/bool/int/float/str and lists/tuples/dicts of those): safe to copy onto a rebuilt object."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _entries(state, key, prefix):
    """state[key] as (name, value) pairs, checking it is a dict keyed by names."""
    entries = state.get(key, {})
    if not isinstance(entries, dict) or not all(isinstance(k, str) for k in entries):
        raise PickleLoadError(f'"{prefix}{key}" is not a dict of names')
    return list(entries.items())


def _gather_tensors(state, prefix, out):
    """Collect the state-dict entries of a persisted module tree (params, persistent buffers, children)."""
    skip = state.get('_non_persistent_buffers_set', set())
    buffers = [(k, v) for k, v in _entries(state, '_buffers', prefix) if k not in skip]
    for name, t in _entries(state, '_parameters', prefix) + buffers:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise PickleLoadError(f'"{prefix}{name}" is a {type(t).__name__}, not a tensor')
        out[prefix + name] = t
    for name, child in _entries(state, '_modules', prefix):
        if isinstance(child, _Persisted):
            _gather_tensors(child.state, f'{prefix}{name}.', out)
        elif isinstance(child, torch.nn.ModuleDict):
            _gather_tensors(child.__dict__, f'{prefix}{name}.', out)
        elif child is not None:
            raise PickleLoadError(f'submodule "{prefix}{name}" is a {type(child).__name__}, not a persisted module')


def _build(p):
    """This project's object for a top-level stand-in: constructed from its init arguments, then given its weights."""
    state = p.state
    args, kwargs = state.get('_init_args'), state.get('_init_kwargs')
    if not isinstance(args, tuple) or not isinstance(kwargs, dict) or not _is_plain(args) or not _is_plain(kwargs):
        raise PickleLoadError(f'persisted {p.class_name} lacks plain-data constructor arguments (_init_args/_init_kwargs)')
    cls = dnnlib.util.get_obj_by_name(_safe_classes[p.class_name])
    try:
        with torch.device('meta'):  # shapes first, allocating nothing: garbled arguments could ask for a huge network
            shell = cls(*args, **kwargs)
    except _CONSTRUCTION_ERRORS as e:  # stored arguments this project's class does not take or rejects
        raise PickleLoadError(f'cannot construct {_safe_classes[p.class_name]} from the stored arguments ({_summary(e)})') from None
    if isinstance(shell, torch.nn.Module):
        tensors = dict()
        _gather_tensors(state, '', tensors)
        expected = shell.state_dict()
        problems = [f'missing {k}' for k in expected if k not in tensors]
        problems += [f'unexpected {k}' for k in tensors if k not in expected]
        problems += [f'{k} has shape {list(t.shape)}, expected {list(expected[k].shape)}'
                     for k, t in tensors.items() if k in expected and t.shape != expected[k].shape]
        if problems:
            raise PickleLoadError(f'stored weights of {p.class_name} do not match training.networks '
                                  f'({len(problems)} problems: {"; ".join(problems[:3])})')
    obj = cls(*args, **kwargs)  # for real: as large as the stored tensors, which the file's size bounds
    if isinstance(obj, torch.nn.Module):
        obj.load_state_dict(tensors, strict=True)
        for name, param in obj.named_parameters():
            param.requires_grad_(tensors[name].requires_grad)  # EDM's ema copies are frozen
        obj.train(bool(state.get('training', True)))
    # Public plain-data attributes carry settings made after construction (e.g. a student's sampling_spec).
    for name, value in state.items():
        if not name.startswith('_') and name != 'training' and _is_plain(value):
            if hasattr(type(obj), name):  # a method or property (e.g. init_kwargs) is not an attribute to overwrite
                raise PickleLoadError(f'persisted {p.class_name} sets "{name}", which its class defines')
            setattr(obj, name, value)
    return obj


def _materialize(obj, memo):
    """Replace every top-level stand-in (inside plain dicts, lists and tuples) by the object it describes."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, _Persisted):
        out = _build(obj)
    elif isinstance(obj, dict):
        out = type(obj)((k, _materialize(v, memo)) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(_materialize(v, memo) for v in obj)
    else:
        return obj
    memo[id(obj)] = out
    return out


def load(f, allow_code=False):
    """Unpickle an EDM-style file (e.g. {'ema': net, 'loss_fn': ..., ...}) without executing code from it.

    Persisted objects become this project's classes (see `_safe_classes`), built from their stored constructor
    arguments and loaded with their stored tensors. Raises UnsafePickleError for anything outside the allow-list
    and PickleLoadError for malformed files. allow_code=True unpickles with plain pickle, executing the module
    source embedded in the file (EDM's behaviour): only for trusted files.
    """
    global _code_execution_allowed
    where = f'"{f.name}"' if isinstance(getattr(f, 'name', None), str) else 'pickle'
    if not f.seekable():
        f = io.BytesIO(f.read())
    start = f.tell()
    magic = f.read(4)
    f.seek(start)
    if magic == b'PK\x03\x04':
        raise PickleLoadError(f'{where} is a zip archive (a torch.save checkpoint or a dataset), not a pickle')
    try:
        _scan(f)
    except PickleLoadError as e:
        raise PickleLoadError(f'{where} {e}') from None
    f.seek(start)
    if allow_code:
        prev, _code_execution_allowed = _code_execution_allowed, True
        try:
            return pickle.Unpickler(f).load()
        except (pickle.UnpicklingError, EOFError) as e:  # not _UNPICKLE_ERRORS: the trusted code's own errors pass
            raise PickleLoadError(f'{where} is truncated, corrupt or not a pickle ({_summary(e)})') from None
        finally:
            _code_execution_allowed = prev
    try:
        raw = _SafeUnpickler(f).load()
    except PickleLoadError as e:
        raise type(e)(f'{where}: {e}') from None
    except _UNPICKLE_ERRORS as e:
        raise PickleLoadError(f'{where} is truncated, corrupt or not a pickle ({_summary(e)})') from None
    try:
        obj = _materialize(raw, dict())
    except PickleLoadError as e:
        raise type(e)(f'{where}: {e}') from None
    return obj


def load_network_pkl(path_or_url, allow_code=False, key='ema'):
    """The network in a snapshot (`data[key]`, EDM's 'ema') or in a bare network pickle, by path or URL."""
    with dnnlib.util.open_url(path_or_url) as f:
        data = load(f, allow_code=allow_code)
    if isinstance(data, dict):
        if key not in data:
            raise PickleLoadError(f'"{path_or_url}" has no "{key}" entry (it has {sorted(map(str, data))}); pick one with key=...')
        data = data[key]
    if not isinstance(data, torch.nn.Module):
        raise PickleLoadError(f'"{path_or_url}" holds a {type(data).__name__}, not a network')
    return data
