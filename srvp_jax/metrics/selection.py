"""Best / worst sample selection per video, on device, with the official tie and NaN rules.

The official `test.py` scans samples in order: sample 0 initialises best and worst, and a later
sample replaces them only when it is strictly better (worse), so the first sample wins ties and a NaN
never replaces (nor is replaced by a comparison that involves it). We fold samples with the same
rule, either all at once from an (S, B) array or chunk by chunk while sampling, so that only the
kept payload of each video stays in memory: the uint8 predicted videos (evaluation), or any other per-sample
quantity (validation keeps the chosen sample's PSNR over the predicted frames).

Metric direction: psnr and ssim are higher-is-better, lpips (and mse) lower-is-better.
"""

import jax
import jax.numpy as jnp

HIGHER_IS_BETTER = {'psnr': True, 'ssim': True, 'lpips': False, 'mse': False}


def _direction(name):
  """Returns True when a higher value of metric `name` is better."""
  if name not in HIGHER_IS_BETTER:
    raise ValueError(f'unknown metric {name!r}: expected one of {sorted(HIGHER_IS_BETTER)}')
  return HIGHER_IS_BETTER[name]


def _fold(best_value, best_index, worst_value, worst_index, values, offset, higher):
  """Folds samples values[s] (index offset + s) into running best / worst values and indices."""

  def step(carry, inp):
    b_val, b_idx, w_val, w_idx = carry
    value, idx = inp
    fresh = b_idx < 0
    better = fresh | ((value > b_val) if higher else (value < b_val))
    worse = fresh | ((value < w_val) if higher else (value > w_val))
    b_val = jnp.where(better, value, b_val)
    b_idx = jnp.where(better, idx, b_idx)
    w_val = jnp.where(worse, value, w_val)
    w_idx = jnp.where(worse, idx, w_idx)
    return (b_val, b_idx, w_val, w_idx), None

  indices = offset + jnp.arange(values.shape[0], dtype=jnp.int32)
  carry, _ = jax.lax.scan(step, (best_value, best_index, worst_value, worst_index), (values, indices))
  return carry


def select_best_worst(values, name):
  """Best and worst sample per video of values (S, B) for metric `name`.

  Returns a dict of (B,) arrays: best_value, best_index, worst_value, worst_index.
  """
  values = jnp.asarray(values, jnp.float32)
  if values.ndim != 2 or values.shape[0] == 0:
    raise ValueError(f'expected metric values shaped (S, B) with S >= 1, got {values.shape}')
  batch = values.shape[1]
  start_val = jnp.zeros((batch,), jnp.float32)
  start_idx = jnp.full((batch,), -1, jnp.int32)
  b_val, b_idx, w_val, w_idx = _fold(start_val, start_idx, start_val, start_idx, values, 0,
                                     _direction(name))
  return {'best_value': b_val, 'best_index': b_idx, 'worst_value': w_val, 'worst_index': w_idx}


def init_state(names, batch_size, video_shape, dtype=jnp.uint8):
  """Empty streaming state for metrics `names`, `batch_size` payloads of shape `video_shape` and `dtype`.

  The state maps each name to a dict: best_value, best_index, best_video, worst_value, worst_index,
  worst_video; indices are -1 until the first sample is folded in.
  """
  state = {}
  for name in names:
    _direction(name)
    value = jnp.zeros((batch_size,), jnp.float32)
    index = jnp.full((batch_size,), -1, jnp.int32)
    video = jnp.zeros((batch_size,) + tuple(video_shape), dtype)
    state[name] = {'best_value': value, 'best_index': index, 'best_video': video,
                   'worst_value': value, 'worst_index': index, 'worst_video': video}
  return state


@jax.jit
def update(state, values_chunk, samples_chunk, chunk_offset):
  """Folds a chunk of s samples into the state; samples are numbered from `chunk_offset`.

  values_chunk maps each metric name of the state to an (s, B) array; samples_chunk is the (s, B, ...)
  payload of the samples (uint8 predicted videos, or any array of the state's dtype). Chunks must be folded
  in sample order.
  """
  if set(values_chunk) != set(state):
    raise ValueError(f'metric names {sorted(values_chunk)} do not match the state {sorted(state)}')
  samples = jnp.asarray(samples_chunk)
  kept = next(iter(state.values()))['best_video'].dtype
  if samples.dtype != kept:
    raise ValueError(f'samples must be {kept} as the state, got {samples.dtype}')
  offset = jnp.asarray(chunk_offset, jnp.int32)
  batch_index = jnp.arange(samples.shape[1])
  new_state = {}
  for name, entry in state.items():
    values = jnp.asarray(values_chunk[name], jnp.float32)
    if values.shape != samples.shape[:2]:
      raise ValueError(f'{name} values shape {values.shape} does not match samples {samples.shape[:2]}')
    b_val, b_idx, w_val, w_idx = _fold(entry['best_value'], entry['best_index'], entry['worst_value'],
                                       entry['worst_index'], values, offset, _direction(name))
    # An index from this chunk is >= offset: take that sample's video, else keep the stored one.
    mask_shape = (-1,) + (1,) * (samples.ndim - 2)
    from_chunk = (b_idx >= offset).reshape(mask_shape)
    local = jnp.clip(b_idx - offset, 0, samples.shape[0] - 1)
    best_video = jnp.where(from_chunk, samples[local, batch_index], entry['best_video'])
    from_chunk = (w_idx >= offset).reshape(mask_shape)
    local = jnp.clip(w_idx - offset, 0, samples.shape[0] - 1)
    worst_video = jnp.where(from_chunk, samples[local, batch_index], entry['worst_video'])
    new_state[name] = {'best_value': b_val, 'best_index': b_idx, 'best_video': best_video,
                       'worst_value': w_val, 'worst_index': w_idx, 'worst_video': worst_video}
  return new_state
