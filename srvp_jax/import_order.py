"""The one place that decides the import order this environment needs: torch before TensorFlow.

Importing TensorFlow before torchvision crashes the process (segfault) with the pinned versions;
importing torch / torchvision first is safe. TensorFlow is therefore never imported at a module's top:
the readers of TensorFlow formats (TFRecords, TFDS) and clu's writers ask ``import_tensorflow()`` for it,
which imports torch and torchvision first (if installed; not in a process that said it never imports
torchvision, ``without_torchvision``: training) and hides the GPUs from TensorFlow so that it does not
reserve memory JAX needs. The entry points (``srvp_jax.cli.start``) call ``import_torch_first()``
when the tool will use torch (LPIPS, the PyTorch baseline), before anything can import TensorFlow.
Imports are at the top of modules, except these, which this module's functions import when first needed:
TensorFlow, TensorFlow Datasets and lpips (the order above: ``import_tensorflow``,
``import_tensorflow_datasets``, ``import_lpips``) and torch (``import_torch``: ~4 s, as long as the rest of a
tool's start-up, ``--help`` included, for LPIPS, PyTorch files and the benchmark's baseline alone). A few
modules import a heavy dependency that one path alone needs in the function that needs it, each saying why:
grain (the training stream, ``data/pipeline.py``), scikit-learn (the stand-in digits, ``data/mnist.py``),
clu (TensorBoard writers, after ``import_tensorflow``: ``train/runtime.py``) and ``srvp_jax.torch_srvp``
(the benchmark's PyTorch baseline). ``tests/test_imports.py`` holds that list.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

_TF = None
_TORCHVISION_LATER = True  # Whether this process may import torchvision later (see without_torchvision).


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


def without_torchvision() -> None:
  """Declares that this process never imports torchvision (training: it computes no LPIPS).

  ``import_tensorflow`` then imports TensorFlow without importing torch and torchvision before it (about 4 s of a
  training process's start-up). Should something ask for torchvision all the same (``import_torch_first``,
  ``import_lpips``), it gets ImportOrderError, never a crash. torch alone (PyTorch checkpoints) stays safe.
  """
  global _TORCHVISION_LATER
  _TORCHVISION_LATER = False


def import_torch():
  """Returns the ``torch`` module (imported now if it is not yet)."""
  return importlib.import_module('torch')


def import_lpips():
  """Returns the ``lpips`` module, imported after torch / torchvision (``import_torch_first``: lpips imports
  torchvision)."""
  import_torch_first()
  return importlib.import_module('lpips')


def import_tensorflow_datasets():
  """Returns the ``tensorflow_datasets`` module, imported after TensorFlow (``import_tensorflow``)."""
  import_tensorflow()
  return importlib.import_module('tensorflow_datasets')


def import_tensorflow():
  """Returns the ``tensorflow`` module, imported after torch / torchvision and with the GPUs hidden from it."""
  global _TF
  if _TF is None:
    if importlib.util.find_spec('tensorflow') is None:
      raise ImportError('This input pipeline needs TensorFlow: pip install tensorflow-cpu tensorflow-datasets')
    if 'tensorflow' not in sys.modules and _TORCHVISION_LATER:
      import_torch_first()
    tf = importlib.import_module('tensorflow')
    tf.config.set_visible_devices([], 'GPU')
    _TF = tf
  return _TF
