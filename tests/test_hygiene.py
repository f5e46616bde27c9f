"""The repository stands on its own: a fresh clone collects every test (nothing read from beside the repository), no
binaries or large files outside tests/fixtures and docs, and every repository path a comment or a doc names exists.

These read the committed tree through git (a missing git is a failure, not a skip)."""

import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIRS = ('tests/fixtures/', 'docs/')  # where binary data (golden outputs, the README's plot) may live
BINARY_SUFFIXES = ('.whl', '.tar', '.gz', '.tgz', '.bz2', '.xz', '.zip', '.7z', '.pt', '.pth', '.pkl', '.pickle',
                   '.npz', '.npy', '.ckpt', '.safetensors', '.bin', '.onnx', '.h5', '.so', '.pyc', '.egg', '.exe')
MAX_BYTES = 1 << 20


def git(*args, cwd=ROOT):
    assert shutil.which('git'), 'these tests need git on the PATH'
    return subprocess.run(['git', *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def tracked_files():
    return git('ls-files', '-z').split('\0')[:-1]


def test_a_fresh_clone_collects_every_test(tmp_path):
    """`git clone` of the committed tree alone, then the README's test command's collection step in it."""
    clone = tmp_path / 'clone'
    git('clone', '--quiet', ROOT, str(clone))
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}  # nothing from this checkout on the path
    r = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-p', 'no:cacheprovider'], cwd=clone,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    collected = int(re.search(r'^(\d+) tests? collected', r.stdout, re.M).group(1))
    # At least one per test function of the clone's test files (parametrised ones count several times).
    functions = sum(len(re.findall(r'^def test_', (clone / 'tests' / name).read_text(), re.M))
                    for name in os.listdir(clone / 'tests') if name.startswith('test_') and name.endswith('.py'))
    assert functions > 100 and collected >= functions, (collected, functions)


def test_no_binaries_or_large_files_outside_fixtures_and_docs():
    problems = []
    for path in tracked_files():
        if path.startswith(DATA_DIRS):
            continue
        with open(os.path.join(ROOT, path), 'rb') as f:
            data = f.read()
        if path.lower().endswith(BINARY_SUFFIXES) or b'\0' in data:
            problems.append(f'{path}: a binary or archive (put test data in tests/fixtures with its provenance)')
        if len(data) > MAX_BYTES:
            problems.append(f'{path}: {len(data)} bytes, over {MAX_BYTES}')
    assert not problems, '\n'.join(problems)


# A path-like token: directories and a name with one of the project's text or code suffixes (`owner/repo:path`
# names a file of another repository).
_PATH = re.compile(r'(?<![\w./:-])((?:[\w.-]+/)*[\w-]+\.(?:md|py|sh|toml|txt|yml|json))(?![\w/-])')
_URL = re.compile(r'\w+://\S+')


def referenced_paths(text, top_dirs):
    """(path, quoted) of the repository paths named in a text: every name ending in .md, and every path under a
    tracked top-level directory; URLs, patterns and example paths (runs, datasets, downloads) are not repository
    paths. quoted: the name is a string literal (joined to a directory in code)."""
    text = _URL.sub(' ', text)
    for m in _PATH.finditer(text):
        token = m.group(1)
        if token.endswith('.md') or token.split('/')[0] in top_dirs:
            yield token, text[m.start() - 1:m.start()] in ('"', "'")


def test_referenced_repository_paths_exist():
    files = tracked_files()
    names = set(files)
    top_dirs = {path.split('/')[0] for path in files if '/' in path}
    basenames = {os.path.basename(path) for path in files}
    missing = []
    for path in files:
        if not path.endswith(('.py', '.md', '.sh', '.toml', '.txt', '.yml')) and path != '.ci/run':
            continue
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        for token, quoted in referenced_paths(text, top_dirs):
            here = os.path.normpath(os.path.join(os.path.dirname(path), token))  # a markdown link is relative
            if token not in names and here not in names and not (quoted and '/' not in token and token in basenames):
                missing.append(f'{path}: "{token}"')
    assert not missing, 'references to files that do not exist:\n' + '\n'.join(sorted(set(missing)))


def test_path_references_are_found():
    """The scanner itself: what counts as a repository path and what does not."""
    md = '.md'  # spelled apart, so that the scan of this file does not take the examples for references
    text = (f'see NOTES{md}; docs/RELIABILITY.md and (training/distill/sid.py); run `bash .ci/run`; FIXTURES / "KEYS{md}"; '
            'https://example.com/a/README.md; training-runs/00000-x/log.txt; toy/default/problem.json; sid.py')
    assert list(referenced_paths(text, {'docs', 'training', 'tests'})) == [
        (f'NOTES{md}', False), ('docs/RELIABILITY.md', False), ('training/distill/sid.py', False), (f'KEYS{md}', True)]
