"""Your own videos: the dataset of a folder of clips (training / validation clips, a fixed test set).

``python -m srvp_jax.data prepare videos --data_dir DIR`` (``srvp_jax.preparation.videos``) reads every clip
under ``DIR/raw/`` and writes the video store ``DIR/store/{train,test}``: 64x64 frames, grey or RGB (the
store's channel count is the dataset's), one video per clip named by its path relative to ``DIR/raw/``.
Training draws random clips of the training split (the official 95/5 train / validation folds, as for the
paper's datasets); ``make_test_set videos`` cuts the fixed test extracts ``DIR/videos_test_set_<N>.npz``
(``sequences`` uint8 (size, N, 64, 64, nc), ``names``, ``starts``) from the test split.
"""

from __future__ import annotations

import json
import os

import numpy as np

from srvp_jax.data import DataError, base, store

NX = base.NX
TEST_LEN = 20  # Frames per test extract (configs/videos.py: 5 conditioning + 15 predicted).
RAW_DIR = 'raw'


def test_file(data_dir: str, seq_len: int = TEST_LEN) -> str:
  """Path of the test extracts of ``seq_len`` frames."""
  return os.path.join(data_dir, f'videos_test_set_{seq_len}.npz')


def store_channels(data_dir: str) -> int | None:
  """The channel count of the prepared store's index (None when absent or unreadable: reading it says why)."""
  try:
    with open(os.path.join(store.split_dir(data_dir, 'train'), store.INDEX), encoding='utf-8') as f:
      return int(json.load(f)['nc'])
  except (OSError, ValueError, KeyError, TypeError):
    return None


class Videos(base.ClipDataset):
  """A folder of the user's clips: 64x64 grey or RGB videos (``nc`` is the prepared store's); random clips."""

  name = 'videos'
  title = 'user'
  nc = 3  # Until a store is prepared; then the store's.
  paper = dict(batch_size=16, seq_len=20, steps_per_s=10.0)
  official_layout = f'clips under {RAW_DIR}/, packed into the store by prepare'

  def __init__(self, cfg, data_dir=None):
    super().__init__(cfg, data_dir)
    nc = store_channels(self.data_dir)
    if nc is not None:
      self.nc = nc

  def official_videos(self, split):
    return None  # Only the store: the clips are read once, by prepare.

  def missing(self, split):
    return (f'no prepared {split} videos in {self.data_dir} ({store.STORE_DIR}/{split} is missing): put your clips in '
            f'{os.path.join(self.data_dir, RAW_DIR)}/ then run `{base.command("prepare", self.name, self.data_dir)}`')

  def check_train(self):
    self.videos('train')  # No store: say how to make it before comparing channel counts.
    super().check_train()

  def test_set(self, seq_len=None):
    """The fixed test extracts of ``seq_len`` frames (default 20), uint8 (N, seq_len, 64, 64, nc)."""
    seq_len = TEST_LEN if seq_len is None else int(seq_len)
    path = test_file(self.data_dir, seq_len)
    make = base.command('make_test_set', self.name, self.data_dir, f' --seq_len {seq_len}')
    sequences = base.read_test_sequences(path, make, f'test set of {seq_len}-frame extracts not found')
    if sequences.ndim != 5 or sequences.shape[1:] != (seq_len, NX, NX, self.nc) or sequences.dtype != np.uint8:
      raise DataError(f'{path}: sequences is {sequences.dtype} {sequences.shape}, expected uint8 '
                      f'(N, {seq_len}, 64, 64, {self.nc}); create it again with `{make}`')
    return sequences
