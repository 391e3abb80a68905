"""Test setup: 8 fake CPU devices so the sharded code paths run here, and a
JAX compilation cache for each test process (each xdist worker has its own,
so no two processes write one cache entry at once)."""
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Many tests compile the same tiny programs, in this process and in every
# train.py they start (the environment reaches those); each compile of a
# train step costs seconds here. Only compiles over 1 s are kept (JAX's
# default), and only until the process ends its session.
_CACHE = tempfile.mkdtemp(prefix='droppos_tests_jax_cache_')
os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE


def pytest_sessionfinish():
  shutil.rmtree(_CACHE, ignore_errors=True)


# Files that take minutes each: run first, so that with `--dist loadfile`
# no worker starts one of them while the other worker is running out of
# files (the longest, the README's commands, would otherwise start last).
LONGEST_FIRST = ('test_readme.py', 'test_multihost.py',
                 'test_accelerator_check.py')


def pytest_collection_modifyitems(items):
  rank = lambda item: next(
      (i for i, name in enumerate(LONGEST_FIRST) if item.path.name == name),
      len(LONGEST_FIRST))
  items.sort(key=rank)   # stable: each file's tests keep their order
