from . import util
from .util import EasyDict, make_cache_dir_path

__all__ = ['util', 'EasyDict', 'make_cache_dir_path']  # re-exports: dnnlib.EasyDict etc., as in EDM
