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
