"""Input pipelines: training / validation streams and official test sets, per dataset.

Every loader returns videos batch-major (B, T, 64, 64, nc): float32 in [0, 1] for training and
validation streams, uint8 for test sets. TensorFlow is imported lazily (``tf_utils``), never at
package import time.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator, Mapping

import numpy as np

_MODULES = {'smmnist': 'mmnist', 'mmnist': 'mmnist', 'kth': 'kth', 'human': 'human', 'bair': 'bair'}


def dataset_module(cfg: Mapping[str, Any]):
  """The module implementing ``cfg.dataset``."""
  name = cfg['dataset']
  if name not in _MODULES:
    raise ValueError(f'unknown dataset {name!r}; expected one of {sorted(_MODULES)}')
  return importlib.import_module(f'srvp_jax.data.{_MODULES[name]}')


def _extra(cfg: Mapping[str, Any]) -> dict:
  return {'source': cfg['digits_source']} if _MODULES[cfg['dataset']] == 'mmnist' else {}


def train_batches(cfg: Mapping[str, Any], *, batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0) -> Iterator[np.ndarray]:
  """Training stream; batch k is a pure function of (seed, k, process), so resuming is exact."""
  return dataset_module(cfg).train_batches(cfg, batch_size=batch_size, seed=seed, start_step=start_step,
                                           process_index=process_index, **_extra(cfg))


def val_batches(cfg: Mapping[str, Any], *, batch_size: int, seed: int, n_batches: int) -> Iterator[np.ndarray]:
  """Validation split (official 95/5), deterministic given seed."""
  return dataset_module(cfg).val_batches(cfg, batch_size=batch_size, seed=seed, n_batches=n_batches, **_extra(cfg))
