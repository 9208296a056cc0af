"""Stochastic Moving MNIST, the paper's setup (docs/srvp.md section 1).

    python launch.py --config configs/smmnist.py --workdir runs/smmnist --config.data_dir=DIR

DIR holds the MNIST IDX files (train-images-idx3-ubyte[.gz], ...); without them TFDS 'mnist' is
used when online. Evaluation: 25 frames (5 conditioning), 100 samples.
"""
from srvp_jax import config as config_lib


def get_config():
  return config_lib.preset(dataset='smmnist', beta_z=2.0)
