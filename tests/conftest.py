"""Test setup: CPU-only JAX, the repository root on sys.path, and the ``slow`` marker."""

import os
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'  # Before JAX is imported: tests are CPU float32 references.

import jax  # pylint: disable=wrong-import-position

jax.config.update('jax_platforms', 'cpu')
# One persistent compilation cache for the test process and every process it starts (they inherit these
# variables), in the repository's ignored .pytest_cache: a program compiled once, by any of them, is read back
# by the others, however short its compilation. A size limit switches on JAX's file lock around every read and
# write of the cache, so processes running side by side never read an entry another one is still writing.
CACHE_DIR = os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', '.pytest_cache', 'jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(8 << 30))
jax.config.update('jax_compilation_cache_dir', CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
jax.config.update('jax_compilation_cache_max_size', int(os.environ['JAX_COMPILATION_CACHE_MAX_SIZE']))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running test (deselect with -m "not slow")')
