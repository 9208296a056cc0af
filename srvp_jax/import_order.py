"""The one place that decides the import order this environment needs: torch before TensorFlow.

Importing TensorFlow before torchvision crashes the process (segfault) with the pinned versions;
importing torch / torchvision first is safe. TensorFlow is therefore never imported at a module's top:
the readers of TensorFlow formats (TFRecords, TFDS) and clu's writers ask ``import_tensorflow()`` for it,
which imports torch and torchvision first (if installed) and hides the GPUs from TensorFlow so that it
does not reserve memory JAX needs. The entry points (``srvp_jax.cli.start``) call ``import_torch_first()``
when the tool will use torch (LPIPS, the PyTorch baseline), before anything can import TensorFlow.
Imports are at the top of modules, except these: TensorFlow and TensorFlow Datasets (the order above),
and the heavy imports that one path alone needs and that would add seconds to every start-up: grain
(the training stream, ``data/pipeline.py``), torch (PyTorch files and models: ``convert.py``,
``metrics/lpips_bridge.py``, the benchmark's baseline) and scikit-learn (the stand-in digits).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

_TF = None


class ImportOrderError(RuntimeError):
  """TensorFlow is already imported and torchvision is not: importing torchvision now would crash."""


def import_torch_first() -> None:
  """Imports torch and torchvision (if installed) so a later TensorFlow import is safe.

  Raises ImportOrderError when TensorFlow came first (importing torchvision would crash the process).
  """
  if 'tensorflow' in sys.modules and 'torchvision' not in sys.modules:
    raise ImportOrderError('torchvision crashes once TensorFlow is imported: run this in a fresh process '
                           '(or import torchvision before TensorFlow)')
  for name in ('torch', 'torchvision'):
    if importlib.util.find_spec(name) is not None:
      importlib.import_module(name)


def import_tensorflow():
  """Returns the ``tensorflow`` module, imported after torch / torchvision and with the GPUs hidden from it."""
  global _TF
  if _TF is None:
    if importlib.util.find_spec('tensorflow') is None:
      raise ImportError('This input pipeline needs TensorFlow: pip install tensorflow-cpu tensorflow-datasets')
    if 'tensorflow' not in sys.modules:
      import_torch_first()
    tf = importlib.import_module('tensorflow')
    tf.config.set_visible_devices([], 'GPU')
    _TF = tf
  return _TF
