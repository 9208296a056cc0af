"""A run's validation (the official protocol): best-of-N PSNR over the validation batches, and its media.

Each validation predicts ``n_samples_test`` samples of every validation video from its first
``nt_cond`` frames (the one best-of-N core, ``srvp_jax.evaluation.BestOfN``), keeps the sample with
the best PSNR over all frames (reconstruction of the conditioning frames included) and reports the mean
over videos of that sample's PSNR over the predicted frames. Which videos and which noise
(``val_resample``): by default the same videos and the same noise at every validation, so that two
validations differ only by the weights; with ``val_resample=True``, as the official code (which
reshuffles its validation loader and draws fresh noise), other videos and noise at each validation.
The first batch's predictions are also written as a GIF/PNG (``write_validation_media``). A stop request
(SIGINT/SIGTERM) abandons a validation between its sample chunks, batches and parts (``Abandoned``).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from srvp_jax import evaluation, sharding, visualize
from srvp_jax.model import SRVP

MEDIA_SAMPLES = 3  # Predicted samples per video in the validation GIF/PNG.


class Abandoned(Exception):
  """A validation given up part-way because training is stopping (SIGINT/SIGTERM): none of it is kept."""


def validation_seed(cfg: Mapping[str, Any], step: int) -> int:
  """The data seed of the validation at ``step``: the run's seed, or with ``val_resample`` one of its own."""
  if not cfg.get('val_resample', False):
    return int(cfg['seed'])
  return int(np.random.SeedSequence([int(cfg['seed']), int(step)]).generate_state(1)[0])


def noise_key(cfg: Mapping[str, Any], step: int) -> jax.Array:
  """The base noise key of the validation at ``step`` (the same at every step unless ``val_resample``)."""
  return jax.random.fold_in(jax.random.key(int(cfg['seed']) + 2), int(step) if cfg.get('val_resample', False) else 0)


def make_batch_psnr(graphdef, cfg: Mapping[str, Any], n_samples: int, mesh: Mesh | None = None):
  """``(params, stats, x, key) -> per-video PSNR`` of the best of ``n_samples`` samples of one batch.

  The one best-of-N core of the evaluation with the official validation's selection (see the module
  docstring). Exactly ``n_samples`` samples compete, by chunks of ``val_sample_chunk``; sample s of
  video v has its own key, so the result does not depend on the chunk. Videos are sharded over the
  mesh's 'data' axis like training batches. The states are expected replicated over ``mesh``; without
  a mesh, one over all devices is used and the states are replicated there on each call.
  """
  place = mesh is None
  mesh = sharding.make_mesh() if mesh is None else mesh
  nt_cond, n_euler = int(cfg['nt_cond']), int(cfg['n_euler_steps'])
  chunk = max(1, min(int(cfg['val_sample_chunk']), n_samples))

  @functools.lru_cache(maxsize=2)
  def scorer(nt: int):
    protocol = evaluation.Protocol(nt_cond=nt_cond, nt_pred=nt - nt_cond, n_euler_steps=n_euler,
                                   cond_euler_steps=n_euler, metrics=('psnr',), select_on='all', keep_videos=False)
    return evaluation.BestOfN(graphdef, protocol, mesh=mesh)

  def batch_psnr(params, stats, x, key, between_chunks=None):
    states = sharding.replicate((params, stats), mesh) if place else (params, stats)
    return evaluation.validation_psnr(scorer(int(x.shape[1])), states, x, key, n_samples, chunk, between_chunks)

  return batch_psnr


def mean_validation_psnr(batch_psnr: Callable, state: Any, batches: Iterator[np.ndarray], cfg, step: int,
                         media: Callable[[np.ndarray], None] | None = None, stop=None) -> float:
  """Mean over the validation videos of the kept sample's PSNR; ``media`` gets the first batch.

  ``stop`` (the run's ``StopRequest``) is read between sample chunks, batches and before the media: once a
  stop is requested the validation raises ``Abandoned``.
  """
  total, n = 0.0, 0
  key = noise_key(cfg, step)
  check = None if stop is None else functools.partial(_check_stop, stop)
  for i, x in enumerate(batches):
    if check is not None:
      check()
    x = np.asarray(x, np.float32)
    psnr = np.asarray(batch_psnr(state.params, state.batch_stats, x, jax.random.fold_in(key, i), check))
    total += float(psnr.sum())
    n += len(psnr)
    if i == 0 and media is not None:
      if stop is not None and stop.signum is not None:  # Local flag: only process 0 writes media (no collective).
        raise Abandoned(step)
      media(x)
  return total / max(n, 1)


def _check_stop(stop, pending: Any = None) -> None:
  """Raises ``Abandoned`` once a stop is requested; waits for ``pending`` (a chunk's arrays) first.

  One process polls while the chunk runs (a signal is seen within 50 ms, not after the chunk); several
  processes wait for it and then agree on the flag (a collective, at the same point on every process).
  """
  if pending is not None:
    if jax.process_count() == 1:
      leaves = [x for x in jax.tree.leaves(pending) if isinstance(x, jax.Array)]
      while not all(x.is_ready() for x in leaves):
        if stop.signum is not None:
          raise Abandoned()
        time.sleep(0.05)
    else:
      jax.block_until_ready(pending)
  if stop.requested():
    raise Abandoned()


@functools.partial(jax.jit, static_argnames=('nt_pred', 'n_euler_steps'))
def _media_predict(model: SRVP, x_cond: jax.Array, key: jax.Array, *, nt_pred: int, n_euler_steps: int):
  """MEDIA_SAMPLES predictions of every video (compiled once per run, not once per validation)."""
  noise = model.sample_pred_noise(key, MEDIA_SAMPLES, x_cond.shape[0], x_cond.shape[1], nt_pred)
  return model.predict(x_cond, noise, n_euler_steps=n_euler_steps)


def write_validation_media(graphdef, state: Any, x: np.ndarray, cfg, workdir: str, step: int) -> None:
  """A GIF/PNG of conditioning frames, ground truth and a few predicted samples."""
  nt_cond = int(cfg.nt_cond)
  n_videos = min(int(cfg.n_val_videos_gif), len(x))
  model = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.batch_stats), copy=True)
  x = x[:n_videos]
  pred = _media_predict(model, x[:, :nt_cond], jax.random.key(step), nt_pred=x.shape[1] - nt_cond,
                        n_euler_steps=int(cfg.n_euler_steps))
  to_uint8 = lambda a: (np.clip(np.asarray(a, np.float32), 0., 1.) * 255.).astype(np.uint8)
  samples, videos = to_uint8(pred.x_pred), to_uint8(x)  # (S, B, nt_pred, H, W, C), (B, T, H, W, C)
  out = os.path.join(workdir, 'samples')
  os.makedirs(out, exist_ok=True)
  preds = {f'sample {i + 1}': samples[i] for i in range(len(samples))}
  visualize.save_comparison(os.path.join(out, f'val_{step:08d}.png'), os.path.join(out, f'val_{step:08d}.gif'),
                            videos[:, :nt_cond], videos[:, nt_cond:], preds, n_videos)