"""Human3.6M, the paper's setup (350k steps: 325k + 25k decay; validation every 20000 steps).

    python launch.py --config configs/human.py --workdir runs/human --config.data_dir=DIR

DIR holds the Human3.6M video store (``python -m srvp_jax.data prepare human --data_dir DIR``).
Evaluation: 53 frames, 8 conditioning, 100 samples.
"""
from srvp_jax import config as config_lib


def get_config():
  return config_lib.preset(
      dataset='human', nc=3, ny=50, nz=50, archi='vgg', skipco=True, n_euler_steps=2, nt_inf=3, nt_cond=8,
      obs_scale=0.2, res_gain=1.2, batch_size=100, seq_len=16, seq_len_test=53, batch_size_test=8,
      lr_scheduling_burnin=325_000, lr_scheduling_n_iter=25_000)
