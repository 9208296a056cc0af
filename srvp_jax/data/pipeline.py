"""Step-indexed input pipelines: every batch is a pure function of (seed, step, process).

Why: resuming a killed run must continue the *same* data stream. Instead of checkpointing
iterator state, each dataset defines ``make_batch(rng, batch_size) -> np.ndarray`` and the
batch for global step ``k`` on process ``p`` is drawn from ``np.random.default_rng([seed, k, p])``.
Resuming at step ``k`` is then exact by construction. tf.data runs the NumPy batch builder on
several threads and prefetches, so generation overlaps with the device step.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

BatchFn = Callable[[np.random.Generator, int], np.ndarray]


def step_rng(seed: int, step: int, process_index: int = 0) -> np.random.Generator:
  """The generator that produces the batch of ``step`` on ``process_index``."""
  return np.random.default_rng([int(seed), int(step), int(process_index)])


def step_indexed_batches(make_batch: BatchFn, *, batch_size: int, seed: int, start_step: int = 0,
                         process_index: int = 0, num_parallel: int = 4,
                         prefetch: int = 4) -> Iterator[np.ndarray]:
  """Yields ``make_batch(step_rng(seed, k, process_index), batch_size)`` for k = start_step, ...

  Batches are produced in parallel by tf.data (deterministic order) and returned as NumPy arrays.
  """
  from srvp_jax.data import tf_utils  # pylint: disable=import-outside-toplevel
  tf = tf_utils.import_tensorflow()
  probe = make_batch(step_rng(seed, start_step, process_index), batch_size)
  shape, dtype = probe.shape, probe.dtype

  def _numpy_batch(step):
    return make_batch(step_rng(seed, int(step), process_index), batch_size).astype(dtype, copy=False)

  def _tf_batch(step):
    batch = tf.numpy_function(_numpy_batch, [step], tf.as_dtype(dtype), stateful=False)
    batch.set_shape(shape)
    return batch

  ds = tf.data.Dataset.range(start_step + 1, np.iinfo(np.int64).max)
  ds = ds.map(_tf_batch, num_parallel_calls=num_parallel, deterministic=True)
  ds = ds.prefetch(prefetch)
  yield probe
  yield from ds.as_numpy_iterator()


def fixed_batches(videos: np.ndarray, batch_size: int, *, drop_remainder: bool = False) -> Iterator[np.ndarray]:
  """Splits an array of videos (N, T, H, W, C) into consecutive batches (test sets)."""
  n = len(videos)
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    yield videos[start:start + batch_size]


def official_val_split(n: int, train: bool) -> np.ndarray:
  """Indices of the official 95/5 split: RandomState(42).shuffle of range(n), first 95% train."""
  idx = np.arange(n)
  np.random.RandomState(42).shuffle(idx)
  cut = int(0.95 * n)
  return idx[:cut] if train else idx[cut:]
