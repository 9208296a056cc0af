"""Test setup: CPU-only JAX, the repository root on sys.path, and the ``slow`` marker."""

import os
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'  # Before JAX is imported: tests are CPU float32 references.

import jax  # pylint: disable=wrong-import-position

jax.config.update('jax_platforms', 'cpu')
# Identical programs compiled by several tests (and their subprocesses) are compiled once.
CACHE_DIR = os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', '.pytest_cache', 'jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')
jax.config.update('jax_compilation_cache_dir', CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running test (deselect with -m "not slow")')
