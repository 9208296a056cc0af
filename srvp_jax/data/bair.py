"""BAIR robot pushing: the dataset (training / validation clips, test set); preparation: ``srvp_jax.preparation.bair``.

Inputs, any of:
- the video store ``DIR/store/{train,test}`` (``python -m srvp_jax.data prepare bair --data_dir DIR``);
- the original archive ``DIR/softmotion30_44k/{train,test}/*.tfrecords`` (43,264 training and 256 test
  videos; camera ``image_aux1``, 30 frames), which ``prepare`` reads directly (``srvp_jax.preparation.bair``);
- a prepared TFDS ``bair_robot_pushing_small`` (``prepare bair --source tfds --tfds_data_dir D``; TFDS
  orders videos by its own hash, so the validation fold and the test order differ from the official ones);
- the official PNG layout ``DIR/processed_data/{train,test}/<tfrecord name>/<k:03d>/<i:03d>.png`` (what
  the official ``preprocessing/bair/convert.py`` writes), read directly (slow: one PNG per frame) or packed
  into the store by ``prepare``.

Videos are ordered by (tfrecord name, k), as the official dataset lists them. Training visits the
training fold in shuffled epochs (a new permutation per epoch, as the official loader's shuffled
DataLoader), with a random start per clip; the test set is the first frames of the 256 test videos.
"""

from __future__ import annotations

import os

import numpy as np

from srvp_jax.data import DataError, base, store

N_FRAMES = 30
NX = base.NX


def index_videos(data_dir: str, split: str) -> tuple[list[str], list[list[str]]] | None:
  """Names ``<tfrecord>/<k>`` and frame paths of the ``split`` PNG videos in the official order, or None."""
  root = os.path.join(data_dir, 'processed_data', split)
  if not os.path.isdir(root):
    return None
  names, videos = [], []
  for d1 in sorted(os.listdir(root)):
    if not os.path.isdir(os.path.join(root, d1)):
      continue
    for d2 in sorted(os.listdir(os.path.join(root, d1))):
      video_dir = os.path.join(root, d1, d2)
      if os.path.isdir(video_dir):
        names.append(f'{d1}/{d2}')
        videos.append([os.path.join(video_dir, f'{i:03d}.png') for i in range(N_FRAMES)])
  return (names, videos) if names else None


class BAIR(base.ClipDataset):
  """BAIR: RGB 64x64 videos of 30 frames; training in shuffled epochs with random starts."""

  name = 'bair'
  title = 'BAIR'
  nc = 3
  paper = dict(batch_size=192, seq_len=12, steps_per_s=10.0)
  shuffled_epochs = True
  official_layout = 'processed_data/<split>/<tfrecord>/<k>/000.png..029.png'

  def official_videos(self, split):
    found = index_videos(self.data_dir, split)
    return None if found is None else base.PngVideos(found[1], nc=3, names=found[0])

  def missing(self, split):
    return (f'BAIR {split} videos not found in {self.data_dir}: neither the video store '
            f'({store.STORE_DIR}/{split}) nor '
            f'the official PNG frames (processed_data/{split}); make the store with '
            f'`{base.command("download", "bair", self.data_dir)}` then '
            f'`{base.command("prepare", "bair", self.data_dir)}`')

  def check_train(self):
    seq_len = self.seq_len('train')
    if not 1 <= seq_len <= N_FRAMES or not 1 <= self.seq_len('val') <= N_FRAMES:
      raise DataError(f'BAIR videos have {N_FRAMES} frames; seq_len={seq_len} and seq_len_test='
                      f'{self.seq_len("val")} must be between 1 and {N_FRAMES}')
    super().check_train()

  def test_set(self, seq_len=None):
    """The 256 official test videos, uint8 (N, seq_len, 64, 64, 3): their first ``seq_len`` frames (default 30)."""
    seq_len = N_FRAMES if seq_len is None else int(seq_len)
    if not 1 <= seq_len <= N_FRAMES:
      raise DataError(f'BAIR videos have {N_FRAMES} frames; seq_len={seq_len} must be between 1 and {N_FRAMES}')
    videos = self.videos('test')
    return np.stack([np.asarray(videos.clip(i, 0, seq_len)) for i in range(len(videos))])
