"""Test setup: 8 fake CPU devices so the sharded code paths run here, and
one JAX compilation cache for the whole test session: every xdist worker and
every process a test starts (the environment reaches them) reads and writes
it, under the cache's file lock."""
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Many tests compile the same tiny programs, in this process, in the other
# workers and in every train.py they start; each compile of a train step
# costs seconds here. Only compiles over 1 s are kept (JAX's default), and
# only until the session ends. A size limit turns on the cache's file lock
# (filelock), so that no process reads an entry another is writing.
_OWNS_CACHE = 'DROPPOS_TESTS_JAX_CACHE' not in os.environ  # xdist controller
if _OWNS_CACHE:  # the workers it starts inherit the variable
  os.environ['DROPPOS_TESTS_JAX_CACHE'] = tempfile.mkdtemp(
      prefix='droppos_tests_jax_cache_')
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ['DROPPOS_TESTS_JAX_CACHE']
os.environ['JAX_COMPILATION_CACHE_MAX_SIZE'] = str(8 << 30)


def pytest_sessionfinish():
  if _OWNS_CACHE:
    shutil.rmtree(os.environ['DROPPOS_TESTS_JAX_CACHE'], ignore_errors=True)


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
