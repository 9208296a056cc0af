"""Conversion between official PyTorch SRVP checkpoints and our model.

The official ``state_dict`` names are produced by walking our model (``SRVP.torch_tensors``),
so every tensor of the architecture is accounted for in both directions. Conversion is lossless:
float32 arrays are only transposed, BatchNorm counters keep their values.

Only ``srvp_jax.convert.load_torch_file``/``save_torch_file`` import torch (when called: ``import_order``), and
they load with ``weights_only=True``: a checkpoint from the internet cannot run code.
"""

from __future__ import annotations

import collections
import os
import re
import warnings
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from srvp_jax import import_order
from srvp_jax.model import SRVP, build_model
from srvp_jax.model.layers import ours_to_torch, torch_to_ours


class CheckpointError(ValueError):
  """A checkpoint that does not match the model its config describes."""


def _shape_hint(cfg: Mapping[str, Any]) -> str:
  keys = ('archi', 'nc', 'nf', 'nhx', 'ny', 'nz', 'skipco', 'nt_inf', 'nh_inf', 'nlayers_inf', 'nh_res',
          'nlayers_res')
  return ', '.join(f'{k}={cfg[k]}' for k in keys)


def expected_shapes(model: SRVP) -> dict[str, tuple[int, ...]]:
  """Official tensor name -> shape, for the architecture of ``model``."""
  out = {}
  for t in model.torch_tensors():
    shape = np.shape(t.variable[...])
    out[t.name] = tuple(ours_to_torch(np.zeros(shape, np.int8), t.layout).shape)
  return out


def load_state_dict(model: SRVP, state_dict: Mapping[str, Any], cfg: Mapping[str, Any] | None = None) -> SRVP:
  """Copies an official ``state_dict`` (name -> array-like) into ``model`` in place.

  Raises ``CheckpointError`` naming missing or unexpected keys, or a shape that contradicts the
  configuration.
  """
  tensors = list(model.torch_tensors())
  names = [t.name for t in tensors]
  missing = [n for n in names if n not in state_dict]
  unexpected = [n for n in state_dict if n not in set(names)]
  hint = f' (config: {_shape_hint(cfg)})' if cfg is not None else ''
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f'missing keys {missing[:8]}' + (f' and {len(missing) - 8} more' if len(missing) > 8 else ''))
    if unexpected:
      parts.append(f'unexpected keys {unexpected[:8]}' +
                   (f' and {len(unexpected) - 8} more' if len(unexpected) > 8 else ''))
    raise CheckpointError(f"checkpoint does not match the model{hint}: {'; '.join(parts)}")
  for t in tensors:
    value = np.asarray(state_dict[t.name])
    current = t.variable[...]
    expected = tuple(ours_to_torch(np.zeros(current.shape, np.int8), t.layout).shape)
    if tuple(value.shape) != expected:  # Checked before any transposition: a wrong rank is one line too.
      raise CheckpointError(f'{t.name} has shape {tuple(value.shape)} but the config implies {expected}{hint}')
    ours = torch_to_ours(value, t.layout) if value.ndim else value
    if np.issubdtype(current.dtype, np.integer) and ours.size and not (
        np.iinfo(current.dtype).min <= ours.min() and ours.max() <= np.iinfo(current.dtype).max):
      raise CheckpointError(f'{t.name} = {ours.max()} does not fit in {current.dtype}')
    t.variable[...] = jnp.asarray(ours, dtype=current.dtype)
  return model


def state_dict_from_model(model: SRVP) -> collections.OrderedDict[str, np.ndarray]:
  """Our model as an official ``state_dict`` of NumPy arrays (official names, layouts, order)."""
  out = collections.OrderedDict()
  for t in model.torch_tensors():
    value = np.asarray(t.variable[...])
    if t.name.endswith('num_batches_tracked'):
      value = value.astype(np.int64)
    # np.array, not np.ascontiguousarray: the latter turns 0-d arrays (num_batches_tracked) into shape (1,).
    out[t.name] = np.array(ours_to_torch(value, t.layout), order='C')
  return out


def model_from_state_dict(state_dict: Mapping[str, Any], cfg: Mapping[str, Any]) -> SRVP:
  """A new model for ``cfg`` holding the official ``state_dict``'s values."""
  return load_state_dict(build_model(cfg), state_dict, cfg)


# ------------------------------------------------------------------------------------------------
# PyTorch files.
def load_torch_file(path: str) -> dict[str, np.ndarray]:
  """Reads an official ``model.pt`` (a ``state_dict``) safely into NumPy arrays."""
  if not os.path.isfile(path):
    raise CheckpointError(f'checkpoint file not found: {path}')
  torch = import_order.import_torch()
  try:
    with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all, on one line.
      warnings.simplefilter('ignore')
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    if 'weights_only' in str(e):  # The weights-only unpickler refused it: never repeat torch's unsafe advice.
      found = re.search(r'GLOBAL (\S+)', str(e))
      raise CheckpointError(f'{path} is not a loadable PyTorch checkpoint: it holds objects other than tensors'
                            f'{f" ({found.group(1)})" if found else ""}, which loading could run as code; refused '
                            '(a checkpoint must be a state_dict of tensors)') from None
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(f'{path} is not a loadable PyTorch checkpoint: {first}') from None
  if isinstance(obj, Mapping) and 'state_dict' in obj and isinstance(obj['state_dict'], Mapping):
    obj = obj['state_dict']
  if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    raise CheckpointError(f'{path} does not hold a state_dict (a mapping of names to tensors)')
  out = {}
  for k, v in obj.items():
    k = k[len('module.'):] if k.startswith('module.') else k  # Saved from DistributedDataParallel.
    out[k] = v.detach().cpu().numpy()
  return out


def save_torch_file(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  """Writes a ``state_dict`` of NumPy arrays as the official code saves it (``torch.save``)."""
  torch = import_order.import_torch()
  torch.save(collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state_dict.items()), path)
