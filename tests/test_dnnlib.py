"""dnnlib.util: EasyDict, construction by dotted name, time formatting, and open_url (local files, file:// URLs,
the download cache, offline failures, atomic downloads), with the cache in tmp_path and requests faked."""

import copy
import hashlib
import os
import pickle
import time

import pytest
import requests

import dnnlib
from dnnlib import util

URL = 'https://example.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl'


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


class FakeResponse:
    """What requests.Session.get returns, for a given status code and body."""
    def __init__(self, status_code, content):
        self.status_code, self.content = status_code, content

    def __enter__(self):
        return self

    def __exit__(self, *args):
        pass

    def raise_for_status(self):
        if self.status_code >= 400:
            raise requests.HTTPError(f'{self.status_code} error', response=self)


def fake_server(monkeypatch, status_code=200, content=b'payload'):
    """Serve every GET with one response; returns the list of requested URLs."""
    requested = []

    def get(session, url, **kwargs):
        requested.append(url)
        return FakeResponse(status_code, content)
    monkeypatch.setattr(requests.Session, 'get', get)
    return requested


def no_network(*args, **kwargs):
    pytest.fail('open_url touched the network')

# ----------------------------------------------------------------------------

def test_easydict():
    d = dnnlib.EasyDict(a=1, nested=dnnlib.EasyDict(b=2))
    d.c = 3
    assert d == {'a': 1, 'nested': {'b': 2}, 'c': 3} and isinstance(d, dict)
    assert d.nested.b == 2 and d['c'] == 3
    del d.a
    assert 'a' not in d and not hasattr(d, 'a')
    with pytest.raises(AttributeError, match='missing'):
        getattr(d, 'missing')
    for clone in [copy.deepcopy(d), pickle.loads(pickle.dumps(d))]:
        assert type(clone) is dnnlib.EasyDict and clone == d and clone.nested.b == 2


def test_construct_class_by_name():
    obj = util.construct_class_by_name(class_name='dnnlib.util.EasyDict', x=1)
    assert type(obj) is dnnlib.EasyDict and obj.x == 1
    assert util.construct_class_by_name([('k', 2)], class_name='collections.OrderedDict') == {'k': 2}
    assert util.call_func_by_name('a', 'b', func_name='os.path.join') == os.path.join('a', 'b')  # module attribute chain
    with pytest.raises(ValueError, match='module "dnnlib.util" has no "NoSuchClass"'):
        util.construct_class_by_name(class_name='dnnlib.util.NoSuchClass')
    with pytest.raises(ValueError, match='no importable module'):
        util.construct_class_by_name(class_name='no_such_module_xyz.Thing')
    with pytest.raises(ValueError, match='not callable'):
        util.call_func_by_name(func_name='math.pi')


@pytest.mark.parametrize('seconds, text', [
    (0, '0s'), (59.4, '59s'), (60, '1m 00s'), (3599, '59m 59s'), (3600, '1h 00m 00s'),
    (2 * 3600 + 3 * 60 + 5, '2h 03m 05s'), (86400 + 2 * 3600 + 3 * 60 + 5, '1d 02h 03m'),
])
def test_format_time(seconds, text):
    assert util.format_time(seconds) == text

# ----------------------------------------------------------------------------

def test_open_url_local_paths_and_file_urls(tmp_path, monkeypatch):
    monkeypatch.setattr(requests.Session, 'get', no_network)
    path = tmp_path / 'my dir' / 'net work.pkl'  # spaces: file:// URLs percent-encode them
    path.parent.mkdir()
    path.write_bytes(b'local bytes')
    for source in [str(path), path, path.as_uri()]:
        with util.open_url(source) as f:
            assert f.read() == b'local bytes'
        assert util.open_url(source, return_filename=True) == str(path)
    assert '%20' in path.as_uri()
    with pytest.raises(FileNotFoundError, match='No such file: ".*missing.pkl"'):
        util.open_url(tmp_path / 'missing.pkl')
    with pytest.raises(FileNotFoundError, match='missing.pkl'):
        util.open_url((tmp_path / 'missing.pkl').as_uri())
    with pytest.raises(ValueError, match='Unsupported URL scheme "ftp"'):
        util.open_url('ftp://example.com/x.pkl')


def test_cached_url_is_served_without_network(cache_dir, monkeypatch):
    for name in ['get', 'request', 'send']:
        monkeypatch.setattr(requests.Session, name, no_network)
    monkeypatch.setattr(requests, 'get', no_network)
    cache_file = util.url_cache_path(URL)
    assert cache_file == str(cache_dir / 'downloads' / (hashlib.md5(URL.encode()).hexdigest() + '_edm-cifar10-32x32-cond-vp.pkl'))
    os.makedirs(os.path.dirname(cache_file))
    with open(cache_file, 'wb') as f:
        f.write(b'cached bytes')
    with util.open_url(URL) as f:
        assert f.read() == b'cached bytes'
    assert util.open_url(URL, return_filename=True) == cache_file


def test_download_goes_to_the_cache_by_atomic_rename(cache_dir, monkeypatch):
    requested = fake_server(monkeypatch, content=b'downloaded bytes')
    real_replace = os.replace
    renames = []
    monkeypatch.setattr(os, 'replace', lambda src, dst: (renames.append((src, dst)), real_replace(src, dst))[1])
    with util.open_url(URL, verbose=False) as f:
        assert f.read() == b'downloaded bytes'
    cache_file = util.url_cache_path(URL)
    assert requested == [URL]
    assert len(renames) == 1 and renames[0][1] == cache_file
    assert os.path.dirname(renames[0][0]) == os.path.dirname(cache_file) and renames[0][0] != cache_file
    assert os.listdir(cache_dir / 'downloads') == [os.path.basename(cache_file)]  # no temp file left behind
    with util.open_url(URL, verbose=False) as f:
        assert f.read() == b'downloaded bytes'
    assert requested == [URL]  # the second call was served from the cache


def test_failed_cache_write_leaves_no_partial_file(cache_dir, monkeypatch):
    fake_server(monkeypatch, content=b'downloaded bytes')

    def disk_full(fd):
        raise OSError(28, 'No space left on device')
    with monkeypatch.context() as m:
        m.setattr(os, 'fsync', disk_full)
        with pytest.raises(OSError, match='No space left'):
            util.open_url(URL, verbose=False)
    assert os.listdir(cache_dir / 'downloads') == []  # neither the final name nor the temp file exists
    with util.open_url(URL, verbose=False) as f:  # the next attempt downloads again
        assert f.read() == b'downloaded bytes'


def test_offline_fails_at_once_naming_the_url(cache_dir, monkeypatch, tmp_path):
    calls = []

    def offline(session, url, **kwargs):
        calls.append(url)
        raise requests.ConnectionError('Failed to resolve host')
    monkeypatch.setattr(requests.Session, 'get', offline)
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        util.open_url(URL, verbose=False)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert f'"{URL}"' in message and 'ConnectionError' in message and 'pass the local path' in message
    assert util.url_cache_path(URL) in message  # where to put a copy fetched elsewhere
    assert len(calls) == 2  # num_attempts
    assert not os.path.exists(util.url_cache_path(URL))


@pytest.mark.parametrize('status_code, attempts', [(404, 1), (503, 2)])
def test_http_errors_retry_only_server_errors(status_code, attempts, monkeypatch):
    requested = fake_server(monkeypatch, status_code=status_code)
    with pytest.raises(OSError, match=f'Cannot download "{URL}" \\(HTTPError\\)'):
        util.open_url(URL, verbose=False)
    assert len(requested) == attempts
    assert not os.path.exists(util.url_cache_path(URL))
