"""The platform a program is traced for, which picks each layer's formulation.

Layers choose between exact, equivalent formulations (and kernels), and the model its scans' unrolling
(``scan_unroll``), by the platform their program will run on, not by the process's default backend: a GPU
program compiled ahead of time on a CPU-only host (``JAX_PLATFORMS=cpu``, a CUDA topology) must get the GPU
forms. ``target_platform()`` is the platform set by ``compile_for`` around the trace, else the default backend.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

PLATFORMS = ('cpu', 'gpu', 'tpu')
_ALIASES = {'cuda': 'gpu', 'rocm': 'gpu'}
# Time steps per loop iteration of the model's frame, Euler and LSTM scans (``jax.lax.scan``'s ``unroll``; True:
# fully unrolled, no loop). GPUs: XLA's GPU runtime drives every loop iteration from the host, and a fully
# unrolled train step launches half the kernels (Moving MNIST at 128: 970 per step instead of 1,999 in 58 loop
# iterations; BAIR at 192: 1,509 instead of 3,208 in 90) for the same memory. CPUs: the same step time and
# 36-40% longer compiles. TPUs: loops run on the device (not measured: kept rolled). BENCHMARKS.md, GPU.
SCAN_UNROLL: dict[str, int | bool] = {'cpu': 1, 'gpu': True, 'tpu': 1}
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar('srvp_target_platform', default=None)


def normalize(platform: str) -> str:
  """'cpu', 'gpu' or 'tpu' for a JAX platform or backend name ('cuda' and 'rocm' are 'gpu')."""
  name = _ALIASES.get(platform.lower(), platform.lower())
  if name not in PLATFORMS:
    raise ValueError(f'unknown platform {platform!r}; expected one of {PLATFORMS}')
  return name


def target_platform() -> str:
  """The platform the program being traced will run on: 'cpu', 'gpu' or 'tpu'."""
  target = _TARGET.get()
  return target if target is not None else normalize(jax.default_backend())


@contextlib.contextmanager
def compile_for(platform: str) -> Iterator[None]:
  """Traces inside this context pick the layer forms of ``platform`` (e.g. a deviceless GPU compile).

  ``jax.jit`` caches traces by function and argument types, not by this setting: trace a fresh
  function (or call ``.trace`` on a new ``jax.jit`` object) inside the context.
  """
  token = _TARGET.set(normalize(platform))
  try:
    yield
  finally:
    _TARGET.reset(token)


def scan_unroll() -> int | bool:
  """The model's default scan unrolling for the target platform (``SCAN_UNROLL``)."""
  return SCAN_UNROLL[target_platform()]
