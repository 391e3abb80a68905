"""A `fake://` file system for tests: paths like gs:// ones, stored offline.

etils epath (which our code and Orbax use for every user path) gets a backend
for `fake://bucket/x` that stores it under a local root. Orbax hands array
files to TensorStore as `path.as_posix()`; for fake:// paths that is the
backing local path, the part TensorStore's own gcs driver plays for gs://.

`str()` and `os.fspath()` keep the `fake://` form, so code that bypasses
epath with os.path/open on a user path would write a local `fake:` folder
(or fail) instead of reaching the store: tests check that never happens.
TensorFlow has no file system for fake:// (as for any scheme but local and
gs://), so TensorBoard events are skipped with a warning there.
"""
from __future__ import annotations

import contextlib
import os

from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath

SCHEME = 'fake'
PREFIX = f'{SCHEME}://'


class _FakeBackend(backend_lib._OsPathBackend):  # pylint: disable=protected-access
  """The os backend, on `root` + the path after fake://."""

  def __init__(self, root: str):
    self.root = root

  def local(self, path) -> str:
    path = os.fspath(path)
    if path.startswith(self.root):  # the os backend calling itself back
      return path
    assert path.startswith(PREFIX), path
    return os.path.join(self.root, path[len(PREFIX):])

  def _translated(name):  # pylint: disable=no-self-argument
    def method(self, path, *args, **kwargs):
      parent = getattr(backend_lib._OsPathBackend, name)  # pylint: disable=protected-access
      return parent(self, self.local(path), *args, **kwargs)
    return method

  for _name in ('open', 'exists', 'isdir', 'listdir', 'makedirs', 'mkdir',
                'rmtree', 'remove', 'stat'):
    locals()[_name] = _translated(_name)

  def glob(self, path):
    return [PREFIX + os.path.relpath(p, self.root)
            for p in super().glob(self.local(path))]

  def walk(self, top, *args, **kwargs):
    for root, dirs, files in super().walk(self.local(top), *args, **kwargs):
      yield PREFIX + os.path.relpath(root, self.root), dirs, files

  def rename(self, path, dst):
    super().rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    super().replace(self.local(path), self.local(dst))

  def copy(self, path, dst, overwrite):
    super().copy(self.local(path), self.local(dst), overwrite)


class FakePath(gpath.PosixGPath):
  backend: _FakeBackend

  @property
  def _backend(self):
    return self.backend

  def as_posix(self) -> str:
    return self.backend.local(self._path_str)


@contextlib.contextmanager
def fake_filesystem(root: str, monkeypatch):
  """Registers fake:// (stored under `root`) for the duration."""
  backend = _FakeBackend(root)
  monkeypatch.setattr(FakePath, 'backend', backend, raising=False)
  monkeypatch.setattr(gpath, '_URI_PREFIXES', gpath._URI_PREFIXES + (PREFIX,))  # pylint: disable=protected-access
  monkeypatch.setattr(gpath, '_URI_SCHEMES', gpath._URI_SCHEMES | {SCHEME})  # pylint: disable=protected-access
  monkeypatch.setitem(gpath._URI_MAP_ROOT, PREFIX, f'/{SCHEME}/')  # pylint: disable=protected-access
  epath.register_path_cls(PREFIX)(FakePath)
  try:
    yield backend
  finally:
    from etils.epath import register  # pylint: disable=g-import-not-at-top
    register._URI_PREFIXES_TO_CLS.pop(PREFIX, None)  # pylint: disable=protected-access
