"""Stochastic Moving MNIST, the paper's setup (docs/srvp.md section 1).

    python launch.py --config configs/smmnist.py --workdir runs/smmnist --config.data_dir=DIR

DIR holds the MNIST IDX files (train-images-idx3-ubyte[.gz], ...); without them TFDS 'mnist' is
used when online. Evaluation: 25 frames (5 conditioning), 100 samples.
"""
from srvp_jax import config as config_lib


def get_config():
  return config_lib.preset(
      dataset='smmnist', nc=1, ny=20, nz=20, archi='dcgan', skipco=False, n_euler_steps=1, nt_inf=5, nt_cond=5,
      obs_scale=1.0, beta_z=2.0, res_gain=1.41, batch_size=128, seq_len=15, lr_scheduling_burnin=1_000_000,
      lr_scheduling_n_iter=100_000, val_interval=20_000, deterministic=False,
      # Test protocol (python -m srvp_jax.evaluate defaults): the paper's.
      test_nt_gen=25, test_n_samples=100, test_checkpoint='latest')
