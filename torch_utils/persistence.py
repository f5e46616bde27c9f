"""EDM's pickle protocol (version 6): writing with `persistent_class`, reading with `load` (safe by default).

A class decorated with `persistent_class` records its constructor arguments and pickles as
`_reconstruct_persistent_obj(meta)`, where `meta` embeds the full source of its defining module, so that
EDM-derived code (which execs that source) can read the files this project writes.

`load` reads such files (official EDM snapshots and our own) without executing anything from them: a restricted
unpickler allows a short list of globals, and each persisted class name is mapped onto this project's class, built
from its recorded constructor arguments and filled with the stored tensors. `allow_code=True` restores EDM's
behaviour of executing the embedded source, for files the user trusts.
"""

import ast
import collections
import copy
import importlib
import inspect
import io
import math
import pickle
import pickletools
import struct
import sys
import threading
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


# EDM2's persisted class names (generic ones such as Precond and UNet) -> (this project's class, the classes the
# embedded module source must define). A name is rebuilt as EDM2's only if its source is EDM2's module of that name.
_EDM2_NETWORKS = frozenset(['Precond', 'UNet', 'Block', 'MPConv', 'MPFourier'])
_edm2_classes = {
    **{name: (f'training.networks_edm2.{name}', _EDM2_NETWORKS) for name in _EDM2_NETWORKS},
    'StandardRGBEncoder':   ('training.networks_edm2.StandardRGBEncoder', frozenset(['StandardRGBEncoder'])),
    'EDM2Loss':             ('training.networks_edm2.EDM2Loss', frozenset(['EDM2Loss'])),
}
_defined_classes_cache = dict()


def _defined_classes(module_src):
    """The top-level class names an embedded module source defines, read with ast (parsed, never executed)."""
    if module_src not in _defined_classes_cache:
        try:
            tree = ast.parse(module_src)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # ast's reports on text that is not Python
            raise PickleLoadError(f'embedded module source does not parse ({_summary(e)})') from None
        _defined_classes_cache[module_src] = frozenset(n.name for n in tree.body if isinstance(n, ast.ClassDef))
    return _defined_classes_cache[module_src]


def _safe_class_name(class_name, module_src):
    """This project's class for a persisted (class name, module source), or None: EDM2's names need EDM2's source."""
    if class_name in _edm2_classes:
        target, needed = _edm2_classes[class_name]
        if not isinstance(module_src, str):
            raise PickleLoadError(f'persisted {class_name} has no embedded module source')
        if needed <= _defined_classes(module_src):
            return target
        if class_name not in _safe_classes:
            raise UnsafePickleError(f'persisted class "{class_name}" comes from a module that is not EDM2\'s '
                                    f'(its source does not define {sorted(needed)}); {_trust_hint}')
    return _safe_classes.get(class_name)


class _Persisted:
    """Stand-in for a persisted object while unpickling: its class name and pickled __dict__, nothing executed;
    `target` is the dotted name of the project class it becomes."""
    def __init__(self, class_name, state, target):
        self.class_name = class_name
        self.state = state
        self.target = target


def _reconstruct_safely(meta):
    """What `_reconstruct_persistent_obj` means in the safe path: check the meta, keep it as a stand-in."""
    if not isinstance(meta, dict) or meta.get('type') != 'class' or meta.get('version') != _version:
        raise PickleLoadError('persistent object with unsupported meta (expected type "class", version 6)')
    class_name, state = meta.get('class_name'), meta.get('state')
    target = _safe_class_name(class_name, meta.get('module_src'))
    if target is None:
        raise UnsafePickleError(f'persisted class "{class_name}" is not one the safe loader can rebuild; {_trust_hint}')
    if not isinstance(state, dict):
        raise PickleLoadError(f'persisted {class_name} has no state dict')
    return _Persisted(class_name, state, target)


# What the unpickler and the allow-listed rebuilders raise on garbled bytes (no other code runs while unpickling).
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, MemoryError, AttributeError, IndexError,
                    KeyError, OverflowError, RecursionError, RuntimeError, struct.error)

# What this project's constructors raise on stored arguments they cannot use (MemoryError: numpy refusing an array
# larger than memory, e.g. GMMDenoiser's mixture for a huge stored img_resolution, before allocating it).
_CONSTRUCTION_ERRORS = (TypeError, ValueError, AssertionError, KeyError, IndexError, ZeroDivisionError, RuntimeError,
                        OverflowError, MemoryError)


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


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    """torch's _rebuild_tensor_v2, refusing a view that reaches past its storage (torch would grow the storage to fit:
    memory the file does not hold) or has more elements than it (stride 0): the file's bytes bound its tensors."""
    if not isinstance(storage, torch.TypedStorage) or not isinstance(size, tuple) or not isinstance(stride, tuple) \
            or len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in (storage_offset, *size, *stride)):
        raise PickleLoadError('malformed tensor (expected a storage, an offset, and sizes and strides as tuples of ints)')
    numel = math.prod(size)
    extent = storage_offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1 if numel else 0  # elements used
    held = storage._size()  # elements; size() is the same, with a deprecation warning for TypedStorage
    if max(numel, extent) > held:
        raise PickleLoadError(f'a tensor of shape {list(size)} (strides {list(stride)}) needs {max(numel, extent)} elements '
                              f'of a storage that holds {held}')
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, *rest)


# numpy 2 moved numpy.core to numpy._core; files name either, both resolve to this one function.
_numpy_scalar = importlib.import_module('numpy._core.multiarray' if int(np.__version__.split('.')[0]) >= 2 else 'numpy.core.multiarray').scalar


# (module, name) -> what the safe unpickler hands back. Everything else in a file is refused.
_safe_globals = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_safely,
    ('collections', 'OrderedDict'):                              collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'):                      _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'):                      torch._utils._rebuild_parameter,
    ('torch.storage', '_load_from_bytes'):                       _load_storage_from_bytes,
    ('torch.nn.modules.container', 'ModuleDict'):                torch.nn.ModuleDict,  # rebuilt via __setstate__ only
    ('numpy', 'dtype'):                                          np.dtype,
    ('numpy.core.multiarray', 'scalar'):                         _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'):                        _numpy_scalar,
    ('dnnlib.util', 'EasyDict'):                                 dnnlib.util.EasyDict,  # a dict; our configs
}


class _SafeUnpickler(pickle._Unpickler):
    """Resolves globals only through the allow-list, so loading a file never imports or calls anything else.
    Python's own unpickler (as fast here: the time goes to the tensor blobs), so that BUILD can be checked."""
    def find_class(self, module, name):
        obj = _safe_globals.get((module, name))
        if obj is None:
            raise UnsafePickleError(f'refusing global "{module}.{name}" (not on the safe loader\'s allow-list); {_trust_hint}')
        return obj

    def persistent_load(self, pid):
        raise PickleLoadError('pickle uses persistent ids (a torch.save file?); use torch.load for it')

    def load_build(self):
        # BUILD sets attributes on the object below its state: on an allow-listed class or function that would change
        # it for the rest of the process, on a stand-in the class name already checked.
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if any(target is obj for obj in _safe_globals.values()) or isinstance(target, _Persisted):
            raise PickleLoadError(f'pickle sets attributes of {getattr(target, "__name__", type(target).__name__)}, '
                                  f'which no pickler writes')
        super().load_build()

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build


# How deeply containers may nest in a file: EDM's snapshots nest a few levels; a crafted file (or one that contains
# itself) would otherwise exhaust the recursion of the walks below.
MAX_DEPTH = 100


def _check_depth(depth):
    if depth > MAX_DEPTH:
        raise PickleLoadError(f'nests containers or modules more than {MAX_DEPTH} levels deep (or refers to itself)')


def _is_plain(value, depth=0):
    """Plain data (None/bool/int/float/str and lists/tuples/dicts of those): safe to copy onto a rebuilt object."""
    _check_depth(depth)
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _entries(state, key, prefix):
    """state[key] as (name, value) pairs, checking it is a dict keyed by names."""
    entries = state.get(key, {})
    if not isinstance(entries, dict) or not all(isinstance(k, str) for k in entries):
        raise PickleLoadError(f'"{prefix}{key}" is not a dict of names')
    return list(entries.items())


def _gather_tensors(state, prefix, out, depth=0):
    """Collect the state-dict entries of a persisted module tree (params, persistent buffers, children)."""
    _check_depth(depth)
    skip = state.get('_non_persistent_buffers_set', set())
    if not isinstance(skip, set):
        raise PickleLoadError(f'"{prefix}_non_persistent_buffers_set" is not a set')
    buffers = [(k, v) for k, v in _entries(state, '_buffers', prefix) if k not in skip]
    for name, t in _entries(state, '_parameters', prefix) + buffers:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise PickleLoadError(f'"{prefix}{name}" is a {type(t).__name__}, not a tensor')
        out[prefix + name] = t
    for name, child in _entries(state, '_modules', prefix):
        if isinstance(child, _Persisted):
            _gather_tensors(child.state, f'{prefix}{name}.', out, depth + 1)
        elif isinstance(child, torch.nn.ModuleDict):
            _gather_tensors(child.__dict__, f'{prefix}{name}.', out, depth + 1)
        elif child is not None:
            raise PickleLoadError(f'submodule "{prefix}{name}" is a {type(child).__name__}, not a persisted module')


class _BoundedConstruction(torch.overrides.TorchFunctionMode):
    """While a constructor runs (in this thread): stop it once the tensors it registers cost more than `budget`, one
    unit per tensor and per element, and refuse any tensor factory call for more elements than `budget` before it
    allocates (some constructors compute tables on the CPU even on the meta device: iDDPMPrecond's M noise levels).
    So a small file cannot describe a large network, nor make its meta shell allocate or build a million modules."""
    _factories = {torch.zeros, torch.ones, torch.empty, torch.full, torch.rand, torch.randn}

    def __init__(self, budget, class_name):
        super().__init__()
        self.budget, self.used, self.owner = budget, 0, threading.get_ident()
        self.error = PickleLoadError(f'the stored arguments of {class_name} describe a network larger than the tensors '
                                     f'stored for it (more than {budget} elements and tensors)')

    def _count(self, module, name, tensor):
        if tensor is not None and threading.get_ident() == self.owner:
            self.used += 1 + tensor.numel()
            if self.used > self.budget:
                raise self.error

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._factories and args:
            size = args[0] if isinstance(args[0], (tuple, list, torch.Size)) else args  # zeros([n, m]) or zeros(n, m)
            if all(isinstance(n, int) for n in size) and math.prod(size) > self.budget:
                raise self.error
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.hooks = [torch.nn.modules.module.register_module_parameter_registration_hook(self._count),
                      torch.nn.modules.module.register_module_buffer_registration_hook(self._count)]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)


def _build(p):
    """This project's object for a top-level stand-in: constructed from its init arguments, then given its weights."""
    state = p.state
    args, kwargs = state.get('_init_args'), state.get('_init_kwargs')
    if not isinstance(args, tuple) or not isinstance(kwargs, dict) or not _is_plain(args) or not _is_plain(kwargs):
        raise PickleLoadError(f'persisted {p.class_name} lacks plain-data constructor arguments (_init_args/_init_kwargs)')
    cls = dnnlib.util.get_obj_by_name(p.target)
    tensors = dict()
    _gather_tensors(state, '', tensors)
    # The bytes the file really holds for them: each distinct storage once (tensors may be views of one storage).
    stored = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()}.values())
    try:
        # Shapes first, allocating nothing, and no more (elements, tensors) than stored: every element takes a byte.
        with torch.device('meta'), _BoundedConstruction(stored + len(tensors), p.class_name):
            shell = cls(*args, **kwargs)
    except PickleLoadError:
        raise
    except _CONSTRUCTION_ERRORS as e:  # stored arguments this project's class does not take or rejects
        raise PickleLoadError(f'cannot construct {p.target} from the stored arguments ({_summary(e)})') from None
    if isinstance(shell, torch.nn.Module):
        expected = shell.state_dict()
        problems = [f'missing {k}' for k in expected if k not in tensors]
        problems += [f'unexpected {k}' for k in tensors if k not in expected]
        problems += [f'{k} has shape {list(t.shape)}, expected {list(expected[k].shape)}'
                     for k, t in tensors.items() if k in expected and t.shape != expected[k].shape]
        if problems:
            raise PickleLoadError(f'stored weights of {p.class_name} do not match {p.target} '
                                  f'({len(problems)} problems: {"; ".join(problems[:3])})')
    obj = cls(*args, **kwargs)  # for real: as large as the shell, which the stored bytes bound
    if isinstance(obj, torch.nn.Module):
        _to_stored_dtype(obj, tensors)
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


def _to_stored_dtype(module, tensors):
    """A network whose stored tensors all have one floating dtype (EDM2's float16 `ema`) is rebuilt in it, so that
    it computes exactly as the file's own code would (EDM2's gains are applied in float16)."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        module.to(dtypes.pop())


def _materialize(obj, memo, depth=0):
    """Replace every top-level stand-in (inside plain dicts, lists and tuples) by the object it describes."""
    _check_depth(depth)
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, _Persisted):
        out = _build(obj)
    elif isinstance(obj, dict):
        out = type(obj)((k, _materialize(v, memo, depth + 1)) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(_materialize(v, memo, depth + 1) for v in obj)
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
