"""oneDNN convolutions for the CPU: XLA FFI handlers (compiled on first use) and the layers' routing.

XLA's CPU convolutions reach about half of oneDNN's speed, far less for strided gradients and weight
gradients, so on a CPU target in float32 the model's convolutions run the passes listed in ``ROUTES``
on oneDNN. The float64 replay, bfloat16 and GPU/TPU programs stay on XLA.

``SRVP_ONEDNN`` chooses: unset or 'auto' uses oneDNN when the handlers build and load, else runs on XLA
and says so once on stderr (with the install command); '0' always runs on XLA; '1' requires oneDNN (an
error if it is unavailable).
"""

from __future__ import annotations

import os
import sys
import threading

import jax
import jax.numpy as jnp

from srvp_jax.model import backend
from srvp_jax.model.onednn import build
from srvp_jax.model.onednn.ops import ALL, Route, conv2d, conv_transpose2d, xla_conv2d

__all__ = ['ALL', 'Route', 'conv2d', 'conv_transpose2d', 'xla_conv2d', 'available', 'enabled', 'route_for', 'mode',
           'OnednnUnavailable']

ENV = 'SRVP_ONEDNN'
_lock = threading.Lock()
_status: dict[str, object] = {}


class OnednnUnavailable(RuntimeError):
  """``SRVP_ONEDNN=1`` but the oneDNN handlers cannot be built or loaded."""


def mode() -> str:
  """'auto', 'on' or 'off' from ``SRVP_ONEDNN``."""
  value = os.environ.get(ENV, 'auto').strip().lower()
  if value in ('', 'auto'):
    return 'auto'
  if value in ('1', 'on', 'true', 'yes'):
    return 'on'
  if value in ('0', 'off', 'false', 'no'):
    return 'off'
  raise OnednnUnavailable(f"{ENV}={value!r}: expected 0, 1 or auto")


def _load() -> str | None:
  """Builds, loads and registers the handlers once per process; the reason when that failed."""
  with _lock:
    if 'error' not in _status:
      try:
        lib = build.load()
        jax.ffi.register_ffi_target('srvp_onednn_conv', jax.ffi.pycapsule(lib.SrvpOnednnConv), platform='cpu')
        _status['error'] = None
      except (build.BuildError, OSError, AttributeError) as e:
        _status['error'] = str(e)
    return _status['error']


def available() -> bool:
  """Whether the oneDNN handlers are built, loaded and registered (builds them on first call)."""
  return _load() is None


def enabled(dtype) -> bool:
  """Whether a convolution computing in ``dtype`` in the program being traced runs on oneDNN."""
  if backend.target_platform() != 'cpu' or jnp.dtype(dtype) != jnp.float32:
    return False
  setting = mode()
  if setting == 'off':
    return False
  error = _load()
  if error is None:
    return True
  if setting == 'on':
    raise OnednnUnavailable(f'oneDNN convolutions unavailable ({error}); install: {build.INSTALL_HINT}')
  with _lock:
    if not _status.get('noted'):
      _status['noted'] = True
      print(f'note: oneDNN convolutions unavailable ({error}); running on XLA\'s slower CPU convolutions. '
            f'Install: {build.INSTALL_HINT}', file=sys.stderr)
  return False


# Below this many channels on the image side (a frame's 1 or 3), oneDNN's kernels for the passes that
# produce or read that side at full resolution lose to XLA's (`benchmark --convs`, 2 threads: smmnist's last
# transposed convolution 64->1 forward 0.24 s vs XLA 0.04 s, input gradient 0.14 s vs 0.10 s; BAIR's first
# 3x3 convolution 3->64 forward 0.32 s vs 0.07 s, input gradient 0.40 s vs 0.18 s), except the strided first
# convolution's forward (smmnist 1->64: 0.29 s vs 0.42 s); their kernel gradients win 1.4-12x on oneDNN.
MIN_IMAGE_CHANNELS = 8


def route_for(transpose: bool, kernel: int, stride: int, n_in: int, n_out: int) -> Route:
  """The passes of a layer that run on oneDNN (per-pass measurements: BENCHMARKS.md, oneDNN section)."""
  del kernel
  if (n_out if transpose else n_in) < MIN_IMAGE_CHANNELS:
    return Route(forward=not transpose and stride > 1, input_grad=False, kernel_grad=True)
  return ALL
