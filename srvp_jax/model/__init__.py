"""Flax NNX modules of SRVP and the helpers to build them from a config."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from srvp_jax.model.srvp import SRVP, Latents, PredNoise, Prediction, TrainNoise, gaussian, param_count, rsample

__all__ = ['SRVP', 'Latents', 'PredNoise', 'Prediction', 'TrainNoise', 'build_model', 'gaussian', 'param_count',
           'rsample', 'COMPUTE_DTYPES']

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def build_model(cfg: Mapping[str, Any], key: jax.Array | int = 0) -> SRVP:
  """An SRVP model initialised as the official code does (SPEC section 3), from a config."""
  from srvp_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  if isinstance(key, int):
    key = jax.random.key(key)
  dtype = COMPUTE_DTYPES[cfg.get('compute_dtype', 'float32')]
  return SRVP(**config_lib.model_kwargs(cfg), res_gain=float(cfg.get('res_gain', 1.41)), dtype=dtype,
              rngs=nnx.Rngs(params=key))
