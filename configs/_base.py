"""Shared helper of the paper configs: our defaults overridden by a setup's values, then locked."""

from srvp_jax import config as config_lib


def make(**overrides):
  cfg = config_lib.default_config()
  unknown = sorted(set(overrides) - set(cfg.keys()))
  if unknown:
    raise config_lib.ConfigError(f'unknown config key(s) {unknown}')
  cfg.update(overrides)
  return config_lib.lock(cfg)
