"""A small stochastic Moving MNIST run for a CPU: trains, validates, checkpoints and writes GIFs in minutes.

    python launch.py --config configs/quickstart.py --workdir runs/quickstart

Offline by default: digits come from scikit-learn's bundled handwritten digits, a stand-in for
MNIST (``digits_source='standin'``). With MNIST IDX files use ``--config.digits_source=idx
--config.data_dir=DIR``. The model is the paper's DCGAN SRVP, narrower, on shorter videos, and with skip connections
(the decoder sees the conditioning frame's encoder features, so digits look sharp after minutes).
"""
from srvp_jax import config as config_lib


def get_config():
  return config_lib.preset(
      digits_source='standin', skipco=True, nf=16, nhx=64, ny=10, nz=10, nh_inf=64, nh_res=64, nlayers_res=3,
      nt_inf=3, nt_cond=4, seq_len=10, beta_z=2.0, batch_size=8, lr=1e-3, lr_scheduling_burnin=400,
      lr_scheduling_n_iter=100, val_interval=125, n_iter_test=1, n_samples_test=8, val_sample_chunk=8,
      log_interval=20, num_data_workers=2)
