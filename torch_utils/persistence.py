"""EDM's pickle protocol (version 6) for writing; reading lives in `load` (safe by default).

A class decorated with `persistent_class` records its constructor arguments and pickles as
`_reconstruct_persistent_obj(meta)`, where `meta` embeds the full source of its defining module, so that
EDM-derived code (which execs that source) can read the files this project writes.
"""

import copy
import inspect
import sys
import types

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
