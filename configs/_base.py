"""Shared helper of the paper configs: our defaults overridden by a setup's values, validated, then locked."""

from srvp_jax import config as config_lib


def make(**overrides):
  return config_lib.lock(config_lib.with_overrides(**overrides))
