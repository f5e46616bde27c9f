"""Small utilities shared by every script: EasyDict, construction by dotted name, logging, time formatting, open_url."""

import errno
import hashlib
import importlib
import io
import os
import re
import sys
import tempfile
import urllib.parse

# ----------------------------------------------------------------------------
# Attribute-style dict, so configs read like `c.network_kwargs.model_channels`.

class EasyDict(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]

# ----------------------------------------------------------------------------
# Tee stdout/stderr into a log file (the training loop's log.txt).

class Logger:
    def __init__(self, file_name=None, file_mode='w', should_flush=True):
        self.file = open(file_name, file_mode) if file_name is not None else None
        self.should_flush = should_flush
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        sys.stdout = self
        sys.stderr = self

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.close()

    def write(self, text):
        if isinstance(text, bytes):
            text = text.decode()
        if len(text) == 0:
            return
        if self.file is not None:
            self.file.write(text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()

    def flush(self):
        if self.file is not None:
            self.file.flush()
        self.stdout.flush()

    def close(self):
        self.flush()
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None

# ----------------------------------------------------------------------------

def format_time(seconds):
    """'42s', '3m 05s', '2h 03m 05s', '1d 02h 03m' like EDM's progress lines."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h {(s // 60) % 60:02d}m'

# ----------------------------------------------------------------------------
# Progress bars for the long command-line jobs: on a person's terminal only, so log files stay clean.

def _on_terminal():
    return sys.stdout.isatty() and sys.stderr.isatty()


def progress_bar(total, desc, unit='img', iterable=None):
    """A tqdm bar (rate, ETA) on stderr of torchrun's rank 0; off on other ranks, when stdout or stderr is not a
    terminal (redirected to a file, a job log) and with TQDM_DISABLE=1. Use as a context manager: .update(n), or
    iterate over it to advance through `iterable`."""
    import tqdm
    disable = (os.environ.get('RANK', '0') != '0' or not _on_terminal()
               or os.environ.get('TQDM_DISABLE', '0').lower() not in ('', '0', 'false'))
    return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)


def share_updater(bar, world_size):
    """For a bar over a whole torchrun job that rank 0 advances with its own counts: its share times the world size
    estimates the whole (capped at the total, which rank 0's larger share would overshoot)."""
    return lambda n: bar.update(min(n * world_size, bar.total - bar.n))

# ----------------------------------------------------------------------------
# Objects named by dotted strings, as in EDM's configs.

def get_obj_by_name(name):
    """'training.networks.EDMPrecond' -> the class; tries the longest importable module prefix."""
    parts = name.split('.')
    for i in range(len(parts) - 1, 0, -1):
        module_name = '.'.join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not module_name.startswith(e.name):
                raise  # a dependency of the module is missing: report that, not the name
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                raise ValueError(f'Cannot find "{name}": module "{module_name}" has no "{attr}"')
            obj = getattr(obj, attr)
        return obj
    raise ValueError(f'Cannot find "{name}": no importable module in that dotted name')


def call_func_by_name(*args, func_name=None, **kwargs):
    assert func_name is not None
    func = get_obj_by_name(func_name)
    if not callable(func):
        raise ValueError(f'"{func_name}" is not callable')
    return func(*args, **kwargs)


def construct_class_by_name(*args, class_name=None, **kwargs):
    return call_func_by_name(*args, func_name=class_name, **kwargs)

# ----------------------------------------------------------------------------
# Atomic writes: a crash never leaves a truncated file under the final name. The temp file is hidden and ends in
# .tmp (`.network-snapshot-000000.pkl.k3j9x_2a.tmp`), so no reader mistakes one left by a kill for an output.

_TEMP_NAME = re.compile(r'\..+\.[a-z0-9_]{8}\.tmp')  # what mkstemp makes from prefix='.NAME.', suffix='.tmp'


def atomic_write(path, write_fn, mode='wb'):
    """Call write_fn(f) on a temp file beside `path`, then os.replace it into place. OS errors name `path`."""
    path = os.fspath(path)
    dirname = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=dirname)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the final file the usual permissions
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename != path:  # a failed write() names no file, mkstemp the temp one
            raise OSError(e.errno, e.strerror or str(e), path) from e
        raise


def is_hidden(name):
    """'/'-separated names with a component starting with '.' (atomic_write's temp files, .DS_Store, ...): readers
    of images skip them."""
    return any(part.startswith('.') for part in name.split('/'))


def remove_temp_files(dirname):
    """Delete the temp files atomic_write left in `dirname` when a process was killed; returns their names."""
    names = sorted(n for n in os.listdir(dirname) if _TEMP_NAME.fullmatch(n) and os.path.isfile(os.path.join(dirname, n)))
    for name in names:
        os.remove(os.path.join(dirname, name))
    return names

# ----------------------------------------------------------------------------
# How every command line fails (README "Exit codes"): one line `Error: ...` and a code a scheduler can act on.

EXIT_ERROR = 1      # bad input, an unreadable or unwritable file, a run that cannot go on (e.g. it diverged)
EXIT_USAGE = 2      # a malformed command line (click's usage errors)
EXIT_STOPPED = 75   # train.py stopped by SIGTERM/SIGINT after writing a training state (EX_TEMPFAIL): resume it


class RunError(Exception):
    """A failure the user must fix, reported by the command lines as `Error: <message>` with EXIT_ERROR and no
    traceback. The message is one line naming the file or option and the fix."""


def os_error_message(e):
    """An OSError (full disk, read-only or missing directory, ...) as one line naming the file and the fix."""
    where = f'"{e.filename}": ' if e.filename is not None else ''
    fix = {errno.ENOSPC: 'free disk space', errno.EDQUOT: 'free disk space (quota exceeded)',
           errno.EACCES: 'make it writable or write elsewhere', errno.EROFS: 'the file system is read-only; write elsewhere',
           errno.EPERM: 'make it writable or write elsewhere', errno.ENOENT: 'check the path'}.get(e.errno, 'check the file system')
    return f'{where}{e.strerror or e}; {fix}'

# ----------------------------------------------------------------------------
# open_url: local paths and file:// directly, http(s) through a cache.

def make_cache_dir_path(*paths):
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    return os.path.join(os.path.expanduser('~'), '.cache', 'dnnlib', *paths)


def is_url(obj):
    return isinstance(obj, str) and re.match(r'^[a-z][a-z0-9+.-]*://', obj) is not None


def url_cache_path(url, cache_dir=None):
    """Where a downloaded URL lives: <cache>/downloads/md5(url)_<basename>."""
    cache_dir = cache_dir or make_cache_dir_path('downloads')
    name = os.path.basename(urllib.parse.urlparse(url).path) or 'file'
    name = re.sub(r'[^0-9a-zA-Z._-]', '_', name)
    return os.path.join(cache_dir, hashlib.md5(url.encode('utf-8')).hexdigest() + '_' + name)


def open_url(url, cache_dir=None, num_attempts=2, timeout=10, verbose=True, return_filename=False, cache=True):
    """Open a local path, file:// URL or http(s) URL as a binary file object (or return its local filename).

    Downloads land in the cache with an atomic rename; a cached file is served without network access.
    Offline, it fails within seconds naming the URL and the way to pass a local file instead.
    """
    url = os.fspath(url) if not isinstance(url, str) else url
    if not is_url(url):
        if not os.path.isfile(url):
            raise FileNotFoundError(f'No such file: "{url}" (pass an existing path or an http(s):// URL)')
        return url if return_filename else open(url, 'rb')
    scheme = urllib.parse.urlparse(url).scheme
    if scheme == 'file':
        path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
        if os.name == 'nt' and re.match(r'^/[a-zA-Z]:', path):
            path = path[1:]
        return open_url(path, return_filename=return_filename)
    if scheme not in ('http', 'https'):
        raise ValueError(f'Unsupported URL scheme "{scheme}" in "{url}" (use a local path, file:// or http(s)://)')

    cache_file = url_cache_path(url, cache_dir)
    if cache and os.path.isfile(cache_file):
        return cache_file if return_filename else open(cache_file, 'rb')

    import requests  # imported here so that offline users of local files never need it
    data = None
    last_error = None
    for _attempt in range(num_attempts):
        try:
            with requests.Session() as session:
                if verbose:
                    print(f'Downloading {url} ...', end='', flush=True, file=sys.stderr)
                with session.get(url, timeout=timeout) as res:
                    res.raise_for_status()
                    data = res.content
                if verbose:
                    print(' done', file=sys.stderr)
                break
        except requests.RequestException as e:
            if verbose:
                print(' failed', file=sys.stderr)
            last_error = e
            if isinstance(e, requests.HTTPError) and e.response is not None and e.response.status_code < 500:
                break  # a 4xx will not fix itself
    if data is None:
        raise IOError(f'Cannot download "{url}" ({type(last_error).__name__}); download it elsewhere and pass '
                      f'the local path instead, or place it at "{cache_file}"')

    if cache:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        atomic_write(cache_file, lambda f: f.write(data))
        if return_filename:
            return cache_file
    elif return_filename:
        raise ValueError('return_filename=True needs cache=True')
    return io.BytesIO(data)
