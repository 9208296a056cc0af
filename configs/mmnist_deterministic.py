"""Deterministic Moving MNIST, the paper's setup (900k steps: 800k constant lr + 100k decay).

    python launch.py --config configs/mmnist_deterministic.py --workdir runs/mmnist --config.data_dir=DIR

Evaluation: 100 frames (5 conditioning), 1 sample.
"""
from srvp_jax import config as config_lib


def get_config():
  return config_lib.preset(
      dataset='mmnist', deterministic=True, nc=1, ny=20, nz=20, archi='dcgan', skipco=False, n_euler_steps=1,
      nt_inf=5, nt_cond=5, obs_scale=1.0, beta_z=2.0, res_gain=1.41, batch_size=128, seq_len=15,
      lr_scheduling_burnin=800_000, lr_scheduling_n_iter=100_000, val_interval=20_000,
      # Test protocol (python -m srvp_jax.evaluate defaults): the paper's.
      test_nt_gen=100, test_n_samples=1, test_checkpoint='latest')
