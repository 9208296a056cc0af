"""Your own videos: the VGG SRVP with skip connections (as for KTH / BAIR), sized for a first run on one GPU.

    python -m srvp_jax.data prepare videos --data_dir DIR      # the clips of DIR/raw/ -> DIR/store/
    python launch.py --config configs/videos.py --workdir runs/videos --config.data_dir=DIR
    python -m srvp_jax.data make_test_set videos --data_dir DIR
    python -m srvp_jax.evaluate runs/videos --data_dir DIR

Training clips of 20 frames (5 conditioning, 15 predicted), 2 Euler steps per frame, batch 16; 60k steps
(40k + 20k learning-rate decay), validation every 2000 steps. ``nc=0`` takes the channel count of the
prepared store (grey or RGB). The test protocol: 20-frame extracts, 5 conditioning frames, best of 100
samples, the best validation checkpoint.
"""
from srvp_jax import config as config_lib


def get_config():
  return config_lib.preset(
      dataset='videos', nc=0, ny=50, nz=50, archi='vgg', skipco=True, n_euler_steps=2, nt_inf=3, nt_cond=5,
      obs_scale=0.2, res_gain=1.2, batch_size=16, seq_len=20, seq_len_test=20, lr_scheduling_burnin=40_000,
      lr_scheduling_n_iter=20_000, val_interval=2_000)
