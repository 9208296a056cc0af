"""The training objective of docs/srvp.md section 4: NLL + beta_y KL_y + beta_z KL_z + l2_res L2.

Everything is computed in the model's parameter dtype (float32, or float64 for the reference replay)
whatever its compute dtype, and averaged over the batch.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from srvp_jax.model.srvp import Latents, acc_dtype, gaussian

Array = jax.Array


def gaussian_nll(x: Array, mean: Array, scale: float) -> Array:
  """-log N(x | mean, scale^2) per element, constants included (the logged values need them)."""
  dtype = acc_dtype(mean)
  d = (x.astype(dtype) - mean.astype(dtype)) / scale
  return 0.5 * jnp.square(d) + math.log(scale) + 0.5 * math.log(2 * math.pi)


def kl_normal(mean_q: Array, std_q: Array, mean_p: Array, std_p: Array) -> Array:
  """KL(N(mean_q, std_q^2) || N(mean_p, std_p^2)) per element (torch.distributions' formula)."""
  var_ratio = jnp.square(std_q / std_p)
  t1 = jnp.square((mean_q - mean_p) / std_p)
  return 0.5 * (var_ratio + t1 - 1 - jnp.log(var_ratio))


def safe_norm(v: Array) -> Array:
  """Euclidean norm over the last axis with gradient 0 (not NaN) at 0, as ``torch.norm``."""
  sq = jnp.sum(jnp.square(v), axis=-1)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def loss_terms(x: Array, out: Latents, *, obs_scale: float, beta_y: float, beta_z: float,
               l2_res: float) -> dict[str, Array]:
  """The four terms and the total, each summed per video then averaged over the batch."""
  batch = x.shape[0]
  nll = jnp.sum(gaussian_nll(x, out.x_rec, obs_scale)) / batch
  mean_y, std_y = gaussian(out.q_y0)
  kl_y = jnp.sum(kl_normal(mean_y, std_y, 0.0, 1.0)) / batch
  mean_q, std_q = gaussian(out.q_z)
  mean_p, std_p = gaussian(out.p_z)
  kl_z = jnp.sum(kl_normal(mean_q, std_q, mean_p, std_p)) / batch
  l2 = jnp.sum(safe_norm(out.res)) / batch
  loss = nll + beta_y * kl_y + beta_z * kl_z + l2_res * l2
  return {'loss': loss, 'nll': nll, 'kl_y_0': kl_y, 'kl_z': kl_z, 'l2_res': l2}


def loss_weights(cfg: Mapping[str, Any]) -> dict[str, float]:
  """The objective's hyper-parameters taken from a config."""
  return {k: float(cfg[k]) for k in ('obs_scale', 'beta_y', 'beta_z', 'l2_res')}
