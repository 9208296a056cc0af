"""KTH, the paper's setup (200k steps: 150k + 50k decay; validation every 5000 steps on 30 frames).

    python launch.py --config configs/kth.py --workdir runs/kth --config.data_dir=DIR

DIR holds the KTH video store (``python -m srvp_jax.data download kth --data_dir DIR`` then ``prepare kth``).
Evaluation: 40 frames, 10 conditioning, 100 samples.
"""
from srvp_jax import config as config_lib


def get_config():
  return config_lib.preset(
      dataset='kth', ny=50, nz=50, archi='vgg', skipco=True, n_euler_steps=2, nt_inf=3, nt_cond=10, obs_scale=0.2,
      res_gain=1.2, batch_size=100, seq_len=20, seq_len_test=30, lr_scheduling_burnin=150_000,
      lr_scheduling_n_iter=50_000, val_interval=5_000)
