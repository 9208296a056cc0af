"""Test setup: CPU-only JAX compiled for speed with one shared compilation cache, the repository root on sys.path,
two test processes for a whole-suite run (pytest-xdist), and the ``slow`` marker."""

import os
import sys

import pytest

os.environ['JAX_PLATFORMS'] = 'cpu'  # Before JAX is imported: tests are CPU float32 references.
# The tests' programs are tiny: they compile for far longer than they run. LLVM's optimisation level 0 (XLA's own
# HLO passes still run; the float semantics are the same) and XLA's older elemental fusion emitters instead of its
# MLIR ones compile them in about half the time (a tiny train step: 17.2 s -> 11.4 s -> 7.8 s of CPU). The deviceless
# GPU compiles (test_gpu_check.py) spend most of their time in ptxas, once per kernel: at -O0 (the HLO, the memory
# analysis and the kernel census the tests check do not depend on it) the file takes 15% less CPU. LLVM code generation
# in one piece instead of 32 parallel ones: both cores are busy with the two test processes, and splitting costs
# 15-20% more CPU (a tiny train step: 2.5-3.0 s -> 2.0-2.4 s). Processes the tests start inherit these flags (their
# scripts append to XLA_FLAGS, never replace it).
_FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false',
                 '--xla_cpu_parallel_codegen_split_count=1', '--xla_gpu_disable_gpuasm_optimizations=true')
for _flag in _FAST_COMPILE:
  if _flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = ' '.join(filter(None, [os.environ.get('XLA_FLAGS'), _flag]))

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


# Two test processes (pytest-xdist) when a run names a folder or several files, as the README's command does: most
# of a test's time is single-threaded (start-up, tracing, compilation), so a second process uses the second core.
# Each test file is one unit of work (``--dist loadfile``: its module fixtures are built once, in one process), the
# slowest first so that both processes end together. ``-n 0``: one process; a single file runs in one process (the
# workers' start-up would cost more than they save). (Not ``--dist loadgroup``: with pytest 9 the group xdist 3.8
# appends to a test's id is lost, and a file's tests are then spread over both processes, its fixtures built twice.)
WORKERS = 2
# The slowest files first (by --durations); the others follow in collection order. test_gpu_check.py is fast where
# it is skipped (no CUDA plugin) and among the slowest where it runs (.ci/run).
SLOWEST_FIRST = ('test_data_end_to_end.py', 'test_launch_distributed.py', 'test_launch.py', 'test_gpu_check.py',
                 'test_parity.py', 'test_train.py', 'test_reliability_run.py', 'test_evaluate.py',
                 'test_reliability_checkpoints.py', 'test_benchmark.py', 'test_reliability_tools.py',
                 'test_own_videos.py', 'test_model.py', 'test_metrics.py', 'test_data_store.py')


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
  if (not config.pluginmanager.hasplugin('xdist') or config.option.numprocesses is not None
      or hasattr(config, 'workerinput')):  # A worker runs its tests itself (it starts no workers).
    return
  paths = [arg.split('::')[0] for arg in config.args if not arg.startswith('-')]
  if len(set(paths)) > 1 or any(os.path.isdir(p) for p in paths):
    config.option.numprocesses = WORKERS
    config.option.dist = 'loadfile'
    config.option.loadscopereorder = False  # Keep the order below (xdist's own puts the files with most tests first).


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running test (deselect with -m "not slow")')


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  """The slowest files first (stable: each file's tests stay together, in their order). Every process sorts the
  same way: xdist's workers collect the tests and the controller hands them out in that order."""
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(item.fspath), len(rank)))
