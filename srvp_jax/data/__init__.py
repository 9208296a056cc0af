"""The streaming side of the data: datasets behind one interface, the video store, grain input streams.

``get_dataset(cfg)`` returns the config's dataset (``base.Dataset``): ``train_batches(...)``,
``val_batches(...)`` (float32 (B, T, 64, 64, nc) in [0, 1]) and ``test_set(seq_len)`` (uint8). Training,
validation and evaluation go through it; nothing else dispatches on the dataset name. The steps that
make the data (download, prepare, make_test_set, inspect, throughput) are ``srvp_jax.preparation``, run
as ``python -m srvp_jax.data``; no module here imports it. TensorFlow is imported only where a TensorFlow
format is read (TFDS digits here, TFRecords in the preparation), never at a module's top.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping


class DataError(ValueError):
  """Data that is there but unusable (corrupt, truncated, too short, wrong shape); the message names the file."""


# Dataset name (config and CLI) -> (module, class).
DATASETS = {'smmnist': ('mmnist', 'MovingMnist'), 'mmnist': ('mmnist', 'MovingMnist'), 'kth': ('kth', 'KTH'),
            'human': ('human', 'Human'), 'bair': ('bair', 'BAIR'), 'videos': ('videos', 'Videos')}


def dataset_class(name: str):
  """The ``Dataset`` class of a dataset name."""
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r}; expected one of {sorted(DATASETS)}')
  module, cls = DATASETS[name]
  return getattr(importlib.import_module(f'srvp_jax.data.{module}'), cls)


def get_dataset(cfg: Mapping[str, Any], data_dir: str | None = None):
  """The dataset of ``cfg.dataset`` reading ``data_dir`` (default ``cfg.data_dir``)."""
  return dataset_class(cfg['dataset'])(cfg, data_dir)
