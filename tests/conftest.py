"""Test setup: CPU-only JAX, the repository root on sys.path, and the ``slow`` marker."""

import os
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'  # Before JAX is imported: tests are CPU float32 references.

import jax  # pylint: disable=wrong-import-position

jax.config.update('jax_platforms', 'cpu')
# One persistent compilation cache for the test process and every process it starts (they inherit these
# variables), in the repository's ignored .pytest_cache: a program compiled once, by any of them, is read back
# by the others, however short its compilation. No size limit: a limit turns on JAX's file lock, and with it a
# scan of the whole cache at every write (half a second per write at the ~1,200 entries of a full test run).
# Unlocked, a process that reads an entry another one is still writing gets a warning and compiles the program
# itself (never a wrong program).
CACHE_DIR = os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', '.pytest_cache', 'jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
jax.config.update('jax_compilation_cache_dir', CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running test (deselect with -m "not slow")')
