"""srvp_jax: Stochastic Latent Residual Video Prediction (SRVP, ICML 2020) in JAX/Flax.

Data flow: ``srvp_jax.preparation`` (makes the data) -> ``srvp_jax.data`` (input pipelines) ->
``srvp_jax.model`` (Flax NNX modules) -> ``srvp_jax.train`` / ``srvp_jax.evaluate`` -> ``srvp_jax.checkpoints``.
The tools share ``srvp_jax.cli``. TensorFlow is imported only through ``srvp_jax.import_order``, where a
TensorFlow format is read or TensorBoard events are written, so the model, training step, prediction and
benchmarks run on machines without it.

On a Linux host with the JAX CUDA plugin installed (the deviceless GPU check, ``srvp_jax.gpu_check``) but
no NVIDIA device (nor a TPU), JAX is kept to the CPU unless ``JAX_PLATFORMS`` says otherwise: the plugin
would otherwise print its failed CUDA initialisation as a traceback in every run.
"""

import glob as _glob
import importlib.util as _importlib_util
import os as _os
import sys as _sys

__version__ = '0.1.0'


def _cpu_only_host() -> bool:
  """A host where an installed CUDA plugin can only fail: no NVIDIA, AMD or TPU device nodes."""
  if not _sys.platform.startswith('linux') or 'JAX_PLATFORMS' in _os.environ:
    return False
  try:
    plugin = any(_importlib_util.find_spec(f'jax_plugins.{name}') is not None for name in ('xla_cuda13', 'xla_cuda12'))
  except (ImportError, ValueError):
    plugin = False
  devices = [p for pattern in ('/dev/nvidia*', '/dev/dxg', '/dev/kfd', '/dev/accel*', '/dev/vfio/*')
             for p in _glob.glob(pattern)]
  return plugin and not devices


if _cpu_only_host():
  _os.environ['JAX_PLATFORMS'] = 'cpu'
  if 'jax' in _sys.modules:  # Imported before us: its flag already read the environment.
    _sys.modules['jax'].config.update('jax_platforms', 'cpu')
