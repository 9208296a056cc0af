"""The official test protocol over a whole test set: batches through ``BestOfN``, results on the host.

Batch i+1 is queued on the devices before batch i is copied to the host (double buffering), so the
devices never wait for the host.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from srvp_jax import sharding
from srvp_jax.evaluation.sampling import BestOfN, Protocol

IMAGE_METRICS = ('psnr', 'ssim', 'lpips')
N_RANDOM = 5


def evaluate_videos(model, videos: np.ndarray, *, nt_cond: int, n_samples: int, n_euler_steps: int,
                    train_euler_steps: int | None = None, batch_size: int, seed: int, metrics: Sequence[str],
                    sample_chunk: int | None = None, lpips_fn: Callable | None = None,
                    progress: bool = True, mesh=None) -> dict[str, Any]:
  """Predicts n_samples futures of every video (N, T, H, W, C) uint8 and selects best / worst samples.

  As the official ``test.py``: y_1 and the posterior z's over the conditioning frames (and their
  reconstruction ``cond_rec``) are inferred with ``train_euler_steps`` (the model's training value;
  default ``n_euler_steps``), and only the prior rollout uses ``n_euler_steps``. ``sample_chunk``
  None: from the compiled program's memory analysis (``BestOfN.chunk_size``).

  Returns NumPy arrays: best_value / worst_value / best_index / worst_index {metric: (N,)}, sample_values
  {metric: (n_samples, N)}, per_frame {metric: (N, nt_pred)} of the best sample, best / worst
  {metric: (N, nt_pred, H, W, C)}, random [min(5, n_samples) x (N, nt_pred, H, W, C)], cond_rec
  (N, nt_cond, H, W, C), plus sample_chunk, sampling_time_s, predicted_frames and steady_frames_per_s.
  """
  n, nt = videos.shape[:2]
  batch_size = min(int(batch_size), n)  # A batch larger than the test set would only predict padding.
  nt_pred = nt - nt_cond
  frame_shape = videos.shape[2:]
  names = [m for m in metrics if m in IMAGE_METRICS and (m != 'lpips' or lpips_fn is not None)]
  protocol = Protocol(nt_cond=nt_cond, nt_pred=nt_pred, n_euler_steps=int(n_euler_steps),
                      cond_euler_steps=int(train_euler_steps or n_euler_steps),
                      metrics=tuple(m for m in names if m != 'lpips'), keep_float=lpips_fn is not None)
  graphdef, state = nnx.split(model)
  scorer = BestOfN(graphdef, protocol, mesh=mesh)
  states = sharding.replicate((state,), scorer.mesh)
  chunk = int(sample_chunk or scorer.chunk_size(states, batch_size, frame_shape, n_samples))
  chunk = min(chunk, n_samples)
  base_key = jax.random.key(seed)
  n_random = min(N_RANDOM, n_samples)
  out = {
      'best_value': {m: np.empty((n,), np.float32) for m in names},
      'worst_value': {m: np.empty((n,), np.float32) for m in names},
      'best_index': {m: np.empty((n,), np.int32) for m in names},
      'worst_index': {m: np.empty((n,), np.int32) for m in names},
      'sample_values': {m: np.empty((n_samples, n), np.float32) for m in names},
      'per_frame': {m: np.empty((n, nt_pred), np.float32) for m in names},
      'best': {m: np.empty((n, nt_pred) + frame_shape, np.uint8) for m in names},
      'worst': {m: np.empty((n, nt_pred) + frame_shape, np.uint8) for m in names},
      'random': [np.empty((n, nt_pred) + frame_shape, np.uint8) for _ in range(n_random)],
      'cond_rec': np.empty((n, nt_cond) + frame_shape, np.uint8),
      'sample_chunk': chunk,
  }

  def dispatch(first):
    ids = np.minimum(np.arange(first, first + batch_size), n - 1)  # The last batch repeats its last video.
    x = np.asarray(videos[ids], np.float32) / 255.
    return first, scorer.run_batch(states, x, ids, base_key, n_samples, chunk, lpips_fn=lpips_fn)

  done = 0
  first_done = None  # (time, videos) when the first batch was on the host: excludes compilation from the rate.

  def finalize(pending):
    nonlocal done, first_done
    first, res = pending
    res = jax.device_get(res)
    m_real = min(batch_size, n - first)
    sl = slice(first, first + m_real)
    for m in names:
      frames = np.concatenate(res['per_frame'][m], axis=0)[:n_samples, :m_real]  # (S, b, nt_pred)
      entry = res['selection'][m]
      out['best_value'][m][sl] = entry['best_value'][:m_real]
      out['worst_value'][m][sl] = entry['worst_value'][:m_real]
      out['best_index'][m][sl] = entry['best_index'][:m_real]
      out['worst_index'][m][sl] = entry['worst_index'][:m_real]
      out['best'][m][sl] = entry['best_video'][:m_real]
      out['worst'][m][sl] = entry['worst_video'][:m_real]
      out['sample_values'][m][:, sl] = np.concatenate(res['select'][m], axis=0)[:n_samples, :m_real]
      out['per_frame'][m][sl] = frames[entry['best_index'][:m_real], np.arange(m_real)]
    for i, video in enumerate(res['random']):
      out['random'][i][sl] = video[:m_real]
    out['cond_rec'][sl] = res['cond_rec'][:m_real]
    done += m_real
    if first_done is None:
      first_done = (time.perf_counter(), done)

  bar = tqdm(total=n, desc='evaluation', unit='video', ncols=100, disable=not progress, file=sys.stderr)
  start = time.perf_counter()
  pending = None
  for first in range(0, n, batch_size):
    current = dispatch(first)
    if pending is not None:  # Copy the previous batch to the host while this one runs.
      finalize(pending)
      bar.update(min(batch_size, n - pending[0]))
      bar.set_postfix_str(f'{done * n_samples * nt_pred / (time.perf_counter() - start):.1f} frames/s')
    pending = current
  finalize(pending)
  bar.update(min(batch_size, n - pending[0]))
  elapsed = time.perf_counter() - start
  bar.set_postfix_str(f'{n * n_samples * nt_pred / elapsed:.1f} frames/s')
  bar.close()
  out['sampling_time_s'] = elapsed
  out['predicted_frames'] = n * n_samples * nt_pred
  steady = elapsed - (first_done[0] - start)
  out['steady_frames_per_s'] = (n - first_done[1]) * n_samples * nt_pred / steady if n > first_done[1] else None
  return out
