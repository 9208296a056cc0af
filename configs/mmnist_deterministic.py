"""Deterministic Moving MNIST, the paper's setup (900k steps: 800k constant lr + 100k decay).

    python launch.py --config configs/mmnist_deterministic.py --workdir runs/mmnist --config.data_dir=DIR

Evaluation: 100 frames (5 conditioning), 1 sample.
"""
from srvp_jax import config as config_lib


def get_config():
  return config_lib.preset(dataset='mmnist', deterministic=True, beta_z=2.0, lr_scheduling_burnin=800_000)
