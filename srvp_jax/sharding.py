"""Device placement: the one 1-D 'data' mesh and how host arrays become global arrays on it.

Training, validation and evaluation are data-parallel the same way: videos are sharded over the
'data' axis of a ``jax.sharding.Mesh``, everything else (model, optimizer state, keys) is
replicated. Multi-host runs are covered: a process's slice of a batch, or a host array that every
process holds whole, becomes one global array (``jax.make_array_from_process_local_data`` /
``jax.make_array_from_callback``), never an array committed to one local device first.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from srvp_jax import config as config_lib

DATA_AXIS = 'data'


def make_mesh(cfg: Mapping[str, Any] | None = None) -> Mesh:
  """A 1-D mesh over the 'data' axis: all devices, or the first ``cfg.mesh_data_axis`` of them."""
  devices = jax.devices()
  n = int(cfg.get('mesh_data_axis', -1)) if cfg is not None else -1
  if n > 0:
    if n > len(devices):
      raise config_lib.ConfigError(f'mesh_data_axis={n} but only {len(devices)} devices are visible')
    devices = devices[:n]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of values every device holds whole (model, optimizer state, keys)."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The sharding of batches: the leading (video) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise config_lib.ConfigError(f'batch size {global_batch} is not divisible by the {n} devices of the data axis; '
                                 f'use a multiple of {n}')


def padded_size(n: int, mesh: Mesh) -> int:
  """``n`` rounded up to a multiple of the 'data' axis size (a batch that can be sharded)."""
  size = mesh.devices.size
  return -(-n // size) * size


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host or local values (the same on every process) -> arrays replicated over ``mesh``."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(jax.device_get(x))),
                      tree)


def shard_local_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """This process's slice of a batch -> a global array sharded over 'data' (training batches)."""
  return jax.make_array_from_process_local_data(batch_sharded(mesh), local)


def shard_host_batch(a: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host batch that every process holds whole -> a global array sharded over 'data' (validation, evaluation)."""
  a = np.asarray(a)
  return jax.make_array_from_callback(a.shape, batch_sharded(mesh), lambda index: a[index])
