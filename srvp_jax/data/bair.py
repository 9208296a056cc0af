"""BAIR robot pushing: the dataset (training / validation clips, test set), download and preparation.

Inputs, any of:
- the video store ``DIR/store/{train,test}`` (``python -m srvp_jax.data prepare bair --data_dir DIR``);
- the original archive ``DIR/softmotion30_44k/{train,test}/*.tfrecords`` (43,264 training and 256 test
  videos; camera ``image_aux1``, 30 frames), which ``prepare`` reads directly (``srvp_jax.data.raw``);
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
import tarfile
from typing import Iterator

import numpy as np

from srvp_jax.data import DataError, base, store

# Official download script (edenton/svg data/download_bair.sh, called by srvp preprocessing/bair/download.sh).
URL = 'http://rail.eecs.berkeley.edu/datasets/bair_robot_pushing_dataset_v0.tar'
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

  def make_test_set(self, **options) -> str:
    raise DataError('the BAIR test set is the first frames of the test split: nothing to make '
                    f'(`{base.command("prepare", "bair", self.data_dir)}` makes the test split)')

  def inspect(self):
    lines = super().inspect()
    from srvp_jax.data import raw  # pylint: disable=import-outside-toplevel
    for split in self.splits:
      if self.has_store(split):
        n = len(store.StoreVideos(self.data_dir, split))
        if n != raw.BAIR_VIDEOS[split]:
          lines.append(f'store {split} is incomplete: {n} of the {raw.BAIR_VIDEOS[split]:,} official videos; '
                       f'download the whole archive (`{base.command("download", "bair", self.data_dir)}`) and run '
                       f'`{base.command("prepare", "bair", self.data_dir, " --force")}`')
    root = os.path.join(self.data_dir, 'softmotion30_44k')
    for split in self.splits:
      try:
        lines.append(f'original TFRecords {split}: {len(raw.bair_tfrecord_files(root, split))} files in {root}/{split}')
      except (FileNotFoundError, ValueError):
        lines.append(f'original TFRecords {split}: not found (`{base.command("download", "bair", self.data_dir)}`)')
    return lines

  # Download and preparation. ---------------------------------------------------------------------------------

  def download(self) -> None:
    """Downloads and unpacks the original archive into ``DIR/softmotion30_44k/`` (official URL, ~30 GB)."""
    os.makedirs(self.data_dir, exist_ok=True)
    archive = os.path.join(self.data_dir, os.path.basename(URL))
    base.download_file(URL, archive)
    try:
      with tarfile.open(archive) as tar:
        tar.extractall(self.data_dir, filter='data')
    except tarfile.TarError as e:
      raise DataError(f'{archive} is not a readable tar archive ({e}); delete it and download again') from None
    os.remove(archive)

  def sources(self) -> dict:
    return {'tfrecords': 'original TFRecords (softmotion30_44k/)', 'png': 'official PNG frames (processed_data/)',
            'tfds': 'TFDS bair_robot_pushing_small (TFDS order, not the official one)'}

  def auto_source(self, tfds_data_dir: str | None = None):
    if os.path.isdir(os.path.join(self.data_dir, 'softmotion30_44k')):
      return 'tfrecords'
    if index_videos(self.data_dir, 'train') is not None:
      return 'png'
    if tfds_data_dir:
      return 'tfds'
    raise FileNotFoundError(f'BAIR data not found in {self.data_dir}: expected softmotion30_44k/{{train,test}}/'
                            f'*.tfrecords (or processed_data/ PNG frames); get them with '
                            f'`{base.command("download", "bair", self.data_dir)}`')

  def items(self, source, tfds_data_dir: str | None = None):
    if source == 'tfds':
      return self._tfds_items(tfds_data_dir)
    return self._tfrecord_items() if source == 'tfrecords' else self._png_items()

  def _tfrecord_items(self) -> Iterator[tuple]:
    from srvp_jax.data import raw  # pylint: disable=import-outside-toplevel
    root = os.path.join(self.data_dir, 'softmotion30_44k')
    for split in self.splits:
      names = [f'{record}/{k:03d}' for record, k in raw.bair_tfrecord_index(root, split)]
      for name, video in zip(names, raw.bair_tfrecord_videos(root, split)):
        yield split, name, {}, video

  def _png_items(self) -> Iterator[tuple]:
    for split in self.splits:
      found = index_videos(self.data_dir, split)
      if found is None:
        raise FileNotFoundError(f'BAIR {split} PNG frames not found: expected {self.data_dir}/processed_data/{split}/'
                                '<tfrecord>/<k>/000.png..029.png')
      read = lambda frames: np.stack([base.read_frame(p, 3) for p in frames])
      for name, video in zip(found[0], base.ordered_map(read, found[1])):
        yield split, name, {}, video

  def _tfds_items(self, tfds_data_dir: str | None) -> Iterator[tuple]:
    from srvp_jax.data import raw  # pylint: disable=import-outside-toplevel
    if not tfds_data_dir:
      raise DataError('--source tfds needs --tfds_data_dir (the folder where bair_robot_pushing_small is prepared)')
    for split in self.splits:
      for i, video in enumerate(raw.bair_tfds_videos(tfds_data_dir, split)):
        yield split, f'tfds/{i:05d}', {}, video
