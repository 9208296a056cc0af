"""The one best-of-N core: predict S samples of every video of a batch, score them, keep the best.

Training validation and ``python -m srvp_jax.evaluate`` both run it (``predictions`` ->
``BestOfN.run_batch``); only what they select on differs:

* evaluation (official ``test.py``): each metric separately, on its mean over the predicted frames;
* validation (official ``train.py``): PSNR over all frames (conditioning reconstruction included),
  reporting the PSNR of the kept sample over the predicted frames.

Samples are predicted by chunks of K in one compiled function (the padding of the last chunk never
competes: exactly ``n_samples`` samples are drawn). Sample s of video v has its own key (``SRVP.
sample_pred_noise_per_sample``), so no result depends on the chunk or batch size. Batches are sharded
over the mesh's 'data' axis (padded to a multiple of its size), the model replicated.

The chunk size comes from the compiled program's own memory analysis and the device's free memory
(``auto_chunk``; on CPU a cache-friendly working set, see ``CPU_CHUNK_BYTES``), not from a formula.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from srvp_jax import sharding
from srvp_jax.metrics import image, selection

FRAME_METRICS = {'psnr': image.psnr, 'ssim': image.ssim}  # Computed inside the compiled function.
DEVICE_MEMORY_FRACTION = 0.5  # Of the accelerator's free memory, for one chunk's temporaries and outputs.
HOST_MEMORY_FRACTION = 0.25  # Of the host's available memory, on CPU ...
# ... and at most this working set per chunk: CPU throughput falls once a chunk outgrows the caches (measured,
# Moving MNIST model, batch 4, 2 cores: chunks of 1 / 2 / 5 / 20 samples (43 MiB each) ran 360 / 390 / 333 / 297
# predicted frames/s; with the oneDNN convolutions, batch 16, PSNR + SSIM: chunks of 1 / 2 / 4 / 8 samples ran
# 0.65 / 0.65 / 0.62 / 0.66 s per sample, flat within the host's noise, so the rule stands).
CPU_CHUNK_BYTES = 128 << 20
PROBE_SAMPLES = 4  # Samples per chunk of the program whose memory analysis sizes the chunks.


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What to predict and how to score it (hashable: compiled functions are cached on it).

  ``select_on``: 'pred' selects each metric on its mean over the predicted frames (official test);
  'all' selects on PSNR over all frames and reports the kept sample's PSNR over the predicted frames
  (official validation; ``metrics`` must then be ('psnr',)). ``keep_videos``: also return the uint8
  predictions (best / worst videos, random samples); ``keep_float``: the float predictions (LPIPS).
  """
  nt_cond: int
  nt_pred: int
  n_euler_steps: int
  cond_euler_steps: int
  metrics: tuple[str, ...] = ('psnr',)
  select_on: str = 'pred'
  keep_videos: bool = True
  keep_float: bool = False

  def __post_init__(self):
    unknown = [m for m in self.metrics if m not in FRAME_METRICS]
    if unknown:
      raise ValueError(f'metrics computed while sampling are {sorted(FRAME_METRICS)}, got {unknown}')
    if self.select_on not in ('pred', 'all'):
      raise ValueError(f"select_on is 'pred' or 'all', got {self.select_on!r}")
    if self.select_on == 'all' and self.metrics != ('psnr',):
      raise ValueError("select_on='all' (validation) scores PSNR only")


def to_byte(x: jax.Array) -> jax.Array:
  """Official ``.mul(255).byte()``: truncation of 255 x, x clamped to [0, 1]."""
  return (jnp.clip(x, 0., 1.) * 255.).astype(jnp.uint8)


def predictions(model, protocol: Protocol, base_key: jax.Array, x: jax.Array, video_ids: jax.Array,
                sample_ids: jax.Array, n_samples: jax.Array) -> dict[str, jax.Array]:
  """Predicts samples ``sample_ids`` (K,) of videos x (B, T, H, W, C) in [0, 1] and scores them (traceable).

  Returns per-frame metrics (K, B, nt_pred) and the selection score 'select_<metric>' (K, B), NaN
  for sample ids >= n_samples; 'x_byte' (K, B, nt_pred, H, W, C) uint8 and 'x_pred' (float) when the
  protocol keeps them. The conditioning frames are reconstructed only where the selection needs them
  (validation); evaluation gets sample 0's reconstruction once per batch (``cond_reconstruction``).
  """
  nt_cond, nt_pred = protocol.nt_cond, protocol.nt_pred
  x_cond, x_target = x[:, :nt_cond], x[:, nt_cond:nt_cond + nt_pred]
  noise = model.sample_pred_noise_per_sample(base_key, video_ids, sample_ids, nt_cond, nt_pred)
  pred = model.predict(x_cond, noise, n_euler_steps=protocol.n_euler_steps,
                       cond_euler_steps=protocol.cond_euler_steps, reconstruct_cond=protocol.select_on == 'all')
  valid = (sample_ids < n_samples)[:, None]
  out = {}
  for name in protocol.metrics:
    frames = FRAME_METRICS[name](pred.x_pred, jnp.broadcast_to(x_target[None], pred.x_pred.shape))
    out[name] = jnp.where(valid[..., None], frames, jnp.nan)
    if protocol.select_on == 'pred':
      score = frames.mean(-1)
    else:  # Validation: over every frame, the conditioning reconstruction included.
      cond = FRAME_METRICS[name](pred.x_cond_rec, jnp.broadcast_to(x_cond[None], pred.x_cond_rec.shape))
      score = jnp.concatenate([cond, frames], axis=-1).mean(-1)
    out[f'select_{name}'] = jnp.where(valid, score, jnp.nan)
  if protocol.keep_videos:
    out['x_byte'] = to_byte(pred.x_pred)
  if protocol.keep_float:
    out['x_pred'] = pred.x_pred
  return out


@functools.lru_cache(maxsize=16)
def chunk_function(graphdef, protocol: Protocol, mesh: Mesh) -> Callable:
  """``predictions`` compiled with the model replicated and the batch sharded over 'data'.

  Arguments: (states, key_data (the raw data of the base key), x, video_ids, sample_ids, n_samples).
  """
  rep, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)

  def fn(states, key_data, x, video_ids, sample_ids, n_samples):
    model = nnx.merge(graphdef, *states, copy=True)
    return predictions(model, protocol, jax.random.wrap_key_data(key_data), x, video_ids, sample_ids, n_samples)

  return jax.jit(fn, in_shardings=(rep, rep, batch, batch, rep, rep))


def cond_reconstruction(model, protocol: Protocol, base_key: jax.Array, x: jax.Array,
                        video_ids: jax.Array) -> jax.Array:
  """Sample 0's reconstruction of the conditioning frames, uint8 (B, nt_cond, H, W, C) (traceable).

  The noise of the conditioning frames does not depend on the number of predicted frames, so one
  predicted frame is enough.
  """
  x_cond = x[:, :protocol.nt_cond]
  noise = model.sample_pred_noise_per_sample(base_key, video_ids, jnp.zeros((1,), jnp.int32), protocol.nt_cond, 1)
  rec = model.predict(x_cond, noise, n_euler_steps=protocol.cond_euler_steps, reconstruct_cond=True).x_cond_rec
  return to_byte(rec[0])


@functools.lru_cache(maxsize=16)
def cond_reconstruction_function(graphdef, protocol: Protocol, mesh: Mesh) -> Callable:
  """``cond_reconstruction`` compiled as ``chunk_function`` (states, key_data, x, video_ids)."""
  rep, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)

  def fn(states, key_data, x, video_ids):
    model = nnx.merge(graphdef, *states, copy=True)
    return cond_reconstruction(model, protocol, jax.random.wrap_key_data(key_data), x, video_ids)

  return jax.jit(fn, in_shardings=(rep, rep, batch, batch))


def memory_stats(device) -> dict | None:
  """``device.memory_stats()``, or None where the backend keeps none (CPU)."""
  try:
    return device.memory_stats()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None


def _chunk_budget_bytes(device) -> int:
  """Bytes one chunk may use on ``device`` (accelerators: a share of the free memory; CPU: see CPU_CHUNK_BYTES)."""
  stats = memory_stats(device)
  if stats and 'bytes_limit' in stats:
    return int(DEVICE_MEMORY_FRACTION * (stats['bytes_limit'] - stats.get('bytes_in_use', 0)))
  try:
    available = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError, AttributeError):
    available = 8 << 30
  return int(min(HOST_MEMORY_FRACTION * available, CPU_CHUNK_BYTES))


def auto_chunk(graphdef, states: tuple, protocol: Protocol, x_shape: Sequence[int], n_samples: int, mesh: Mesh,
               free_bytes: int | None = None) -> int:
  """Samples per chunk that fit the free memory, from the compiled program's memory analysis.

  The program for ``PROBE_SAMPLES`` samples is compiled (not run); its temporaries and outputs per
  device, divided by its sample count, bound the memory of one sample (a slight over-estimate: the
  conditioning frames' encoding is shared by the samples). The chunk is then balanced so the last one
  wastes little padding.
  """
  k0 = max(1, min(PROBE_SAMPLES, n_samples))
  fn = chunk_function(graphdef, protocol, mesh)
  key_data = jax.random.key_data(jax.random.key(0))
  args = (states, jax.ShapeDtypeStruct(key_data.shape, key_data.dtype),
          jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32),
          jax.ShapeDtypeStruct((x_shape[0],), jnp.int32), jax.ShapeDtypeStruct((k0,), jnp.int32),
          jax.ShapeDtypeStruct((), jnp.int32))
  analysis = fn.lower(*args).compile().memory_analysis()
  per_chunk = 0
  if analysis is not None:
    per_chunk = int(analysis.temp_size_in_bytes) + int(analysis.output_size_in_bytes)
  if per_chunk <= 0:
    return k0
  free = _chunk_budget_bytes(mesh.devices.flat[0]) if free_bytes is None else int(free_bytes)
  k = int(np.clip(free * k0 // per_chunk, 1, n_samples))
  n_chunks = -(-n_samples // k)
  return -(-n_samples // n_chunks)


class BestOfN:
  """Best-of-N sampling of batches of videos under a ``Protocol`` (see the module docstring).

  ``states`` (the model's ``nnx.split`` states after ``graphdef``, as a tuple) are passed to each call, so
  one instance serves every validation of a run.
  """

  def __init__(self, graphdef, protocol: Protocol, *, mesh: Mesh | None = None):
    self.protocol = protocol
    self.mesh = mesh or sharding.make_mesh()
    self.graphdef = graphdef
    self.fn = chunk_function(graphdef, protocol, self.mesh)

  def chunk_size(self, states: tuple, batch_size: int, frame_shape: Sequence[int], n_samples: int,
                 free_bytes: int | None = None) -> int:
    """``auto_chunk`` for batches of ``batch_size`` videos of frames ``frame_shape`` (H, W, C)."""
    nt = self.protocol.nt_cond + self.protocol.nt_pred
    shape = (sharding.padded_size(batch_size, self.mesh), nt) + tuple(frame_shape)
    return auto_chunk(self.graphdef, tuple(states), self.protocol, shape, n_samples, self.mesh, free_bytes)

  def run_batch(self, states: tuple, x: np.ndarray | jax.Array, video_ids: np.ndarray, base_key: jax.Array,
                n_samples: int, chunk: int, lpips_fn: Callable | None = None,
                between_chunks: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Queues the best-of-``n_samples`` work of one batch; returns device arrays (nothing waits).

    x: (B, T, H, W, C) float in [0, 1] (at least nt_cond + nt_pred frames), host array; video_ids (B,). Returns
    'selection' {metric: selection state, whose 'best_video' / 'worst_video' are the uint8 predictions,
    or for select_on='all' the kept sample's PSNR over the predicted frames}, 'per_frame' {metric: list
    of (K, B, nt_pred) per chunk}, 'select' {metric: list of (K, B)}, 'random' (the first 5 samples'
    uint8 videos) and 'cond_rec'. The batch is padded to the mesh (results keep the padding rows).
    ``lpips_fn(pred, target)``: per-frame LPIPS; when it has ``features(frames)`` (``hooks.LpipsOnFrames``),
    the target frames' side is computed once per batch and passed as ``target``. ``between_chunks(arrays)``,
    when given, is called with each chunk's results once the next chunk is queued (it may wait for them and
    raise to abandon the batch, e.g. training's validation on SIGTERM).
    """
    p = self.protocol
    b = len(video_ids)
    pad = sharding.padded_size(b, self.mesh) - b
    # Host arrays (the same on every process) go to the compiled function, which places them on the mesh:
    # nothing is committed to one local device first, so this also runs with several processes.
    x = np.asarray(x, np.float32)[:, :p.nt_cond + p.nt_pred]
    ids = np.asarray(video_ids, np.int32)
    if pad:
      x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
      ids = np.concatenate([ids, np.repeat(ids[-1:], pad)])
    host_x = x
    x, ids = (sharding.shard_host_batch(a, self.mesh) for a in (x, ids))
    key_data = np.asarray(jax.random.key_data(base_key))
    names = list(p.metrics) + (['lpips'] if lpips_fn is not None else [])
    if p.select_on == 'all':
      payload_shape, payload_dtype = (), jnp.float32
    else:
      payload_shape, payload_dtype = (p.nt_pred,) + tuple(x.shape[2:]), jnp.uint8
    sel = None
    if p.keep_videos or p.select_on == 'all':
      sel = jax.tree.map(lambda a: sharding.shard_host_batch(np.asarray(a), self.mesh),
                         selection.init_state(names, len(ids), payload_shape, payload_dtype))
    out = {'per_frame': {m: [] for m in names}, 'select': {m: [] for m in names}, 'random': []}
    n_random = min(5, n_samples)
    n_chunks = -(-n_samples // chunk)
    launch = lambda c: self.fn(tuple(states), key_data, x, ids, np.arange(c * chunk, (c + 1) * chunk, dtype=np.int32),
                               np.int32(n_samples))
    lpips_target = None
    if lpips_fn is not None:
      # The target frames' side of LPIPS once per batch when the metric can keep it (every sample shares it).
      lpips_target = host_x[:, p.nt_cond:]
      lpips_target = lpips_fn.features(lpips_target) if hasattr(lpips_fn, 'features') else lpips_target
    pending = launch(0)
    for c in range(n_chunks):
      res = pending
      if c + 1 < n_chunks:  # Queued before LPIPS (torch) waits on this chunk, so both run at once.
        pending = launch(c + 1)
      if lpips_fn is not None:
        n_valid = min(chunk, n_samples - c * chunk)
        pred = res['x_pred'][:n_valid]
        target = lpips_target if hasattr(lpips_fn, 'features') else jnp.broadcast_to(lpips_target[None], pred.shape)
        values = jnp.asarray(lpips_fn(pred, target), jnp.float32)
        res['lpips'] = jnp.pad(values, ((0, chunk - n_valid), (0, 0), (0, 0)), constant_values=jnp.nan)
        res['select_lpips'] = jnp.mean(res['lpips'], axis=-1)
      for m in names:
        out['per_frame'][m].append(res[m])
        out['select'][m].append(res[f'select_{m}'])
      if sel is not None:
        if p.select_on == 'all':
          payload = jnp.mean(res['psnr'], axis=-1)
        else:
          payload = res['x_byte']
        sel = selection.update(sel, {m: res[f'select_{m}'] for m in names}, payload, c * chunk)
      if p.keep_videos:
        out['random'].extend(res['x_byte'][i] for i in range(max(0, min(chunk, n_random - c * chunk))))
      if between_chunks is not None:
        between_chunks(res)
    if p.keep_videos:
      out['cond_rec'] = cond_reconstruction_function(self.graphdef, p, self.mesh)(tuple(states), key_data, x, ids)
    out['selection'] = sel
    return out


def validation_psnr(scorer: BestOfN, states: tuple, x: np.ndarray, key: jax.Array, n_samples: int,
                    chunk: int, between_chunks: Callable[[Any], None] | None = None) -> jax.Array:
  """Official validation of one batch: PSNR over the predicted frames of each video's best sample (B,).

  The best of ``n_samples`` samples is chosen on PSNR over all frames (reconstruction included).
  ``between_chunks``: see ``BestOfN.run_batch``.
  """
  if scorer.protocol.select_on != 'all':
    raise ValueError("validation_psnr needs a Protocol with select_on='all'")
  b = len(x)
  res = scorer.run_batch(states, x, np.arange(b), key, n_samples, chunk, between_chunks=between_chunks)
  # Replicated, so that every process can read it (the batch was sharded over all processes' devices).
  return _replicated_head(res['selection']['psnr']['best_video'], b, scorer.mesh)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _replicated_head(values: jax.Array, n: int, mesh: Mesh) -> jax.Array:
  return jax.lax.with_sharding_constraint(values[:n], sharding.replicated(mesh))
