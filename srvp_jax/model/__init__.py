"""Flax NNX modules of SRVP and the helpers to build them from a config."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from srvp_jax import config as config_lib
from srvp_jax.model.srvp import (SRVP, Conditioning, Latents, PredNoise, Prediction, TrainNoise, gaussian, param_count,
                                  rsample)

__all__ = ['SRVP', 'Conditioning', 'Latents', 'PredNoise', 'Prediction', 'TrainNoise', 'abstract_model', 'build_model',
           'gaussian', 'param_count', 'rsample', 'COMPUTE_DTYPES', 'PARAM_DTYPES']

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
PARAM_DTYPES = {'float32': jnp.float32, 'float64': jnp.float64}


def init_key(key: jax.Array | int) -> jax.Array:
  """The initialisation key: an 'rbg' key derived from an int seed or any key.

  Initialisation draws ~100 tensors; with threefry keys XLA's CPU compiler needs ~50 s for that
  program, with the RngBitGenerator ('rbg') ~7 s. Values depend only on the seed (per backend).
  """
  if isinstance(key, int):
    return jax.random.key(key, impl='rbg')
  if jax.random.key_impl(key) == jax.random.key_impl(jax.random.key(0, impl='rbg')):
    return key
  return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl='rbg')


def build_model(cfg: Mapping[str, Any], key: jax.Array | int = 0) -> SRVP:
  """An SRVP model initialised as the official code does (docs/srvp.md section 3), from a config.

  ``param_dtype`` 'float64' (parameters, statistics and accumulations in float64: the reference
  replay of ``srvp_jax.parity``) needs ``jax_enable_x64``.
  """
  key = init_key(key)
  make = _constructor(cfg)
  # One compiled initialiser: eager construction compiles each layer's initialiser separately,
  # which takes over a minute on a CPU.
  graphdef, _ = nnx.split(_shapes(make))
  return nnx.merge(graphdef, jax.jit(lambda k: nnx.state(make(k)))(key))


def abstract_model(cfg: Mapping[str, Any]) -> SRVP:
  """The model of ``build_model(cfg)`` without values (every variable a ``jax.ShapeDtypeStruct``): what
  restoring a checkpoint into it, or compiling for it, needs. The construction is traced once, nothing runs
  (``nnx.eval_shape`` of ``build_model`` traces it twice: half the time).
  """
  return _shapes(_constructor(cfg))


def _shapes(make: Callable[[jax.Array], SRVP]) -> SRVP:
  """The model ``make`` constructs, traced: shapes and dtypes only."""
  return nnx.eval_shape(lambda: make(jax.random.key(0)))


def _constructor(cfg: Mapping[str, Any]) -> Callable[[jax.Array], SRVP]:
  """key -> the SRVP of ``cfg`` initialised from ``key``."""
  dtype = COMPUTE_DTYPES[cfg.get('compute_dtype', 'float32')]
  param_dtype = PARAM_DTYPES[cfg.get('param_dtype', 'float32')]
  if param_dtype == jnp.float64:
    if not jax.config.read('jax_enable_x64'):
      raise config_lib.ConfigError("param_dtype='float64' needs 64-bit JAX (jax_enable_x64): set JAX_ENABLE_X64=1 "
                                   '(or use `with jax.enable_x64():`)')
    dtype = jnp.float64  # A float64 model computes in float64 throughout.
  kwargs = dict(config_lib.model_kwargs(cfg), res_gain=float(cfg.get('res_gain', 1.41)), dtype=dtype,
                param_dtype=param_dtype, precision=str(cfg.get('precision', 'float32')),
                scan_unroll=cfg.get('scan_unroll', 0) or None)  # 0: the target platform's.
  return lambda k: SRVP(**kwargs, rngs=nnx.Rngs(params=k))
