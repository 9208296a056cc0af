"""The one place that imports TensorFlow, in the order this environment needs.

Importing TensorFlow before torchvision crashes the process (segfault) with the pinned versions;
importing torch/torchvision first is safe. So whenever TensorFlow is imported we first import
torch and torchvision if they are installed. TensorFlow is also kept off the GPUs so that it does
not reserve memory JAX needs.
"""

from __future__ import annotations

import importlib.util

_TF = None


def import_torch_first() -> None:
  """Imports torch and torchvision (if installed) so a later TensorFlow import is safe."""
  for name in ('torch', 'torchvision'):
    if importlib.util.find_spec(name) is not None:
      importlib.import_module(name)


def import_tensorflow():
  """Returns the ``tensorflow`` module, imported safely and with GPUs hidden from it."""
  global _TF
  if _TF is None:
    if importlib.util.find_spec('tensorflow') is None:
      raise ImportError('This input pipeline needs TensorFlow: pip install tensorflow-cpu tensorflow-datasets')
    import_torch_first()
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.set_visible_devices([], 'GPU')
    _TF = tf
  return _TF
