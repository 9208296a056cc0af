"""KTH actions: the dataset (training / validation clips, official test set); preparation: ``preparation.kth``.

Inputs, any of:
- the video store ``DIR/store/{train,test}`` written by ``python -m srvp_jax.data prepare kth --data_dir DIR``
  (fast: memory-mapped uint8 videos);
- the official PNG layout ``DIR/processed_64/<action>/person<PP>_<action>_d<S>/image-<NNN>.png`` (what the
  official ``preprocessing/kth/convert.py`` writes: ffmpeg at 25 fps, 64x64, grey stored as RGB, first
  channel used), read directly (slower) or packed into the store by ``prepare``;
- the original class archives ``<action>.zip`` / AVI files (``download kth``), which ``prepare`` decodes
  with the official ffmpeg scaling (``srvp_jax.preparation.kth``).

Subjects 1-20 are the training videos (official 95/5 train / validation folds), 21-25 the test videos.
Videos are ordered by action (``CLASSES`` order) then name, as the official dataset lists them (sorted;
the official code uses ``os.listdir`` order, which depends on the file system). The official test set for
extracts of N frames is ``DIR/svg_test_set_N.npz`` (``sequences`` (1000, N, 64, 64) uint8, ``persons``,
``actions``), made by ``make_test_set kth`` with the official draws (docs/srvp.md section 6).
"""

from __future__ import annotations

import os

import numpy as np

from srvp_jax.data import DataError, base, store

CLASSES = ('boxing', 'handclapping', 'handwaving', 'jogging', 'running', 'walking')
NX = base.NX
TEST_LEN = 40


def processed_dir(data_dir: str) -> str:
  """Folder of the official 64x64 PNG frames."""
  return os.path.join(data_dir, f'processed_{NX}')


def person_of(name: str) -> int:
  """Subject number of a video name ``person<PP>_<action>_d<S>``."""
  return int(name.split('_')[0][-2:])


def index_videos(data_dir: str, *, train: bool = True) -> tuple[list[str], list[list[str]]] | None:
  """Names and frame paths (in frame order) of the training (subjects 1-20) or test (21-25) PNG videos.

  None when the official PNG layout is absent.
  """
  root = processed_dir(data_dir)
  if not all(os.path.isdir(os.path.join(root, c)) for c in CLASSES):
    return None
  names, frames = [], []
  for action in CLASSES:
    for video in sorted(os.listdir(os.path.join(root, action))):
      video_dir = os.path.join(root, action, video)
      if not os.path.isdir(video_dir) or (person_of(video) <= 20) != train:
        continue
      pngs = sorted((f for f in os.listdir(video_dir) if os.path.splitext(f)[1] == '.png'), key=base.natural_key)
      names.append(video)
      frames.append([os.path.join(video_dir, f) for f in pngs])
  return (names, frames) if names else None


def video_meta(name: str) -> dict:
  person, action, setting = name.split('_')[:3]
  return {'person': int(person[-2:]), 'action': action, 'setting': setting}


def official_test_file(data_dir: str, test_len: int = TEST_LEN) -> str:
  """Path of the official test file for extracts of ``test_len`` frames."""
  return os.path.join(data_dir, f'svg_test_set_{test_len}.npz')


class KTH(base.ClipDataset):
  """KTH: grey 64x64 videos; random clips of ``seq_len`` frames; test extracts of ``nt_gen`` frames."""

  name = 'kth'
  title = 'KTH'
  nc = 1
  paper = dict(batch_size=100, seq_len=20, steps_per_s=10.0)
  official_layout = 'processed_64/<action>/person<PP>_<action>_d<S>/image-<NNN>.png'

  def official_videos(self, split):
    found = index_videos(self.data_dir, train=split == 'train')
    if found is None:
      return None
    names, frames = found
    return base.PngVideos(frames, nc=1, names=names, meta=[video_meta(n) for n in names])

  def missing(self, split):
    return (f'KTH {split} videos not found in {self.data_dir}: neither the video store ({store.STORE_DIR}/{split}) nor '
            f'the official frames ({self.official_layout}); make the store with '
            f'`{base.command("download", "kth", self.data_dir)}` then '
            f'`{base.command("prepare", "kth", self.data_dir)}`')

  # Test set. -------------------------------------------------------------------------------------------------

  def test_set(self, seq_len=None):
    """The official extracts of ``seq_len`` frames (default 40), uint8 (N, seq_len, 64, 64, 1)."""
    seq_len = TEST_LEN if seq_len is None else int(seq_len)
    path = official_test_file(self.data_dir, seq_len)
    make = base.command('make_test_set', 'kth', self.data_dir, f' --seq_len {seq_len}')
    sequences = base.read_test_sequences(path, make, f'KTH test set for {seq_len} frames not found', 'KTH test file',
                                         allow_pickle=True)
    if sequences.ndim != 4 or sequences.shape[1:] != (seq_len, NX, NX) or sequences.dtype != np.uint8:
      raise DataError(f'{path}: sequences is {sequences.dtype} {sequences.shape}, expected uint8 '
                      f'(N, {seq_len}, 64, 64)')
    return sequences[..., None]
