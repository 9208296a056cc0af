"""BAIR robot pushing, the paper's setup (1.5M steps: 1M + 500k decay).

    python launch.py --config configs/bair.py --workdir runs/bair --config.data_dir=DIR

DIR holds the BAIR video store (``python -m srvp_jax.data download bair --data_dir DIR`` then ``prepare bair``).
Evaluation: 30 frames, 2 conditioning, 100 samples.
"""
from srvp_jax import config as config_lib


def get_config():
  return config_lib.preset(
      dataset='bair', nc=3, ny=50, nz=50, archi='vgg', skipco=True, n_euler_steps=2, nt_inf=2, nt_cond=2,
      obs_scale=0.71, batch_size=192, seq_len=12, lr_scheduling_n_iter=500_000)
