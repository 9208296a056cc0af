"""Step-indexed input streams on grain: every batch is a pure function of (seed, step, process).

Why: resuming a killed run must continue the *same* data stream. Instead of checkpointing iterator
state, the batch of global step ``k`` on process ``p`` is computed from ``k`` alone (random draws from
``step_rng(seed, k, p)``), so resuming at step ``k`` is exact by construction, whatever the number of
worker threads. grain maps the step index to its batch on a pool of threads, in order, and keeps a few
batches ready ahead of the train step (NumPy slicing, copies and casts release the GIL).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from absl import flags

_ENDLESS = 1 << 62  # Last step index of an endless stream.


def step_rng(seed: int, step: int, process_index: int = 0) -> np.random.Generator:
  """The generator that produces the batch of ``step`` on ``process_index``."""
  return np.random.default_rng([int(seed), int(step), int(process_index)])


def step_indexed(batch_of_step: Callable[[int], np.ndarray], *, start_step: int = 0, num_threads: int = 4,
                 prefetch: int = 4, num_processes: int = 0) -> Iterator[np.ndarray]:
  """Yields ``batch_of_step(k)`` for k = start_step, start_step + 1, ..., built ahead on grain threads.

  With ``num_processes`` > 0, grain worker processes (each with ``num_threads`` threads) build the batches
  (``batch_of_step`` must then be picklable); the order, hence every batch, is the same.
  """
  import grain  # pylint: disable=import-outside-toplevel  # Seconds to import; the training stream only.
  ds = grain.MapDataset.range(int(start_step), _ENDLESS).map(batch_of_step)
  options = grain.ReadOptions(num_threads=max(1, int(num_threads)), prefetch_buffer_size=max(1, int(prefetch)))
  ds = ds.to_iter_dataset(options)
  if num_processes > 0:
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags in the workers; launch.py has parsed them.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_processes), per_worker_buffer_size=2))
  return iter(ds)


def to_float(videos: np.ndarray) -> np.ndarray:
  """uint8 videos as float32 in [0, 1] (exactly ``x.astype(float32) / 255``); float32 input is returned as is."""
  if videos.dtype == np.float32:
    return videos
  return np.divide(videos, np.float32(255), dtype=np.float32)


def official_val_split(n: int, train: bool) -> np.ndarray:
  """Indices of the official 95/5 split: RandomState(42).shuffle of range(n), first 95% train."""
  idx = np.arange(n)
  np.random.RandomState(42).shuffle(idx)
  cut = int(0.95 * n)
  return idx[:cut] if train else idx[cut:]


def fold_indices(n: int, fold: str) -> np.ndarray:
  """Video indices of the official 'train' or 'val' fold, in dataset order as the official ``get_fold`` keeps them."""
  return np.sort(official_val_split(n, train=fold == 'train'))
