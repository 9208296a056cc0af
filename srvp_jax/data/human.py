"""Human3.6M: the dataset (training / validation clips, official test set); preparation: ``srvp_jax.preparation.human``.

Inputs, any of:
- the video store ``DIR/store/{train,test}`` (``python -m srvp_jax.data prepare human --data_dir DIR``);
- the official layout ``DIR/train/S<subject>-<video>.npz`` (subjects 1, 5, 6, 7, 8) and ``DIR/test/...npz``
  (9, 11): what the official ``preprocessing/human/convert.py`` writes, uncompressed ``np.savez`` files
  with ``image`` uint8 (frames, 64, 64, 3) at the original 50 fps, ``filename`` and ``subject``. Read
  memory-mapped (as fast as the store), or packed into the store by ``prepare``;
- the extracted original videos ``DIR/S<n>/Videos/*.mp4``, which ``prepare`` converts as the official
  script does (``srvp_jax.preparation.human``).

Videos are in sorted file-name order (``S<n>-<video>``), as the official dataset lists them. Clips keep
one frame in ``subsampling`` (8). The official test set is the folder ``DIR/test_set_53_8/`` of
``test_<i>.npz`` files (i = 0..999) holding the source's keys plus ``frame`` (start in the source video),
``image`` the un-subsampled extract of (53 - 1) * 8 + 1 = 417 frames; made by ``make_test_set human``.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile

import numpy as np

from srvp_jax.data import DataError, base, store

TRAIN_SUBJECTS = (1, 5, 6, 7, 8)
TEST_SUBJECTS = (9, 11)
CROP_BOX = (100, 100, 900, 900)
TEST_LEN = 53
SUBSAMPLING = 8
NX = base.NX


def load_npz_array(path: str, key: str = 'image') -> np.ndarray:
  """Array ``key`` of an ``.npz`` file, memory-mapped when stored uncompressed (``np.savez``), else loaded."""
  member = f'{key}.npy'
  try:
    with zipfile.ZipFile(path) as z:
      info = z.getinfo(member)
      stored = info.compress_type == zipfile.ZIP_STORED
    if stored:
      with open(path, 'rb') as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = struct.unpack('<HH', local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
          shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
          shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
      if not dtype.hasobject:
        return np.memmap(path, dtype=dtype, mode='r', offset=offset, shape=shape, order='F' if fortran else 'C')
    with np.load(path) as f:
      return f[key]
  except FileNotFoundError:
    raise
  except (OSError, ValueError, KeyError, zipfile.BadZipFile, struct.error, EOFError) as e:
    raise DataError(f'{path} is not a readable npz video with an {key!r} array ({type(e).__name__}: {e}); '
                    'convert it again') from None


def _check_video(path: str, video: np.ndarray) -> None:
  if video.ndim != 4 or video.shape[1:] != (NX, NX, 3) or video.dtype != np.uint8:
    raise DataError(f'{path}: image is {video.dtype} {video.shape}, expected uint8 (frames, 64, 64, 3)')


def npz_files(folder: str) -> list[str]:
  return sorted(f for f in os.listdir(folder) if f.endswith('.npz')) if os.path.isdir(folder) else []


def _name_meta(name: str) -> dict:
  """``{'subject', 'filename'}`` of an official video name ``S<subject>-<filename>``."""
  match = re.match(r'^S(\d+)-(.*)$', name)
  return {'subject': int(match.group(1)), 'filename': match.group(2)} if match else {'subject': -1, 'filename': name}


class NpzVideos:
  """Memory-mapped ``image`` arrays of the official npz videos (opened once; frames read on demand)."""

  def __init__(self, paths):
    self.paths = list(paths)
    self.videos = [load_npz_array(p) for p in self.paths]
    for path, video in zip(self.paths, self.videos):
      _check_video(path, video)
    self.lengths = np.array([len(v) for v in self.videos], dtype=np.int64)
    self.names = [os.path.splitext(os.path.basename(p))[0] for p in self.paths]
    self.meta = [_name_meta(n) for n in self.names]

  def __len__(self) -> int:
    return len(self.videos)

  def clip(self, index: int, start: int, length: int, step: int = 1) -> np.ndarray:
    return self.videos[index][start:start + (length - 1) * step + 1:step]

  def video(self, index: int) -> np.ndarray:
    return self.videos[index]


def official_test_dir(data_dir: str, test_len: int = TEST_LEN, subsampling: int = SUBSAMPLING) -> str:
  """Folder of the official test extracts (``test_set_53_8`` by default)."""
  return os.path.join(data_dir, f'test_set_{test_len}_{subsampling}')


class Human(base.ClipDataset):
  """Human3.6M: RGB 64x64 videos at 50 fps; clips keep one frame in ``subsampling``."""

  name = 'human'
  title = 'Human3.6M'
  nc = 3
  paper = dict(batch_size=100, seq_len=16, steps_per_s=10.0)
  official_layout = 'train/S<subject>-<video>.npz, test/S<subject>-<video>.npz'

  @property
  def step(self):
    return int(self.cfg['subsampling']) if self.cfg is not None else SUBSAMPLING

  def official_videos(self, split):
    folder = os.path.join(self.data_dir, split)
    files = npz_files(folder)
    return NpzVideos([os.path.join(folder, f) for f in files]) if files else None

  def missing(self, split):
    return (f'Human3.6M {split} videos not found in {self.data_dir}: neither the video store '
            f'({store.STORE_DIR}/{split}) '
            f'nor the official {split}/S<subject>-<video>.npz files; extract the original S<n>/Videos archives '
            f'(licensed download from http://vision.imar.ro/human3.6m) into {self.data_dir} and run '
            f'`{base.command("prepare", "human", self.data_dir)}`')

  def describe_source(self):
    if not self.has_store('train') and self.official_videos('train') is not None:
      return f'official npz files in {self.data_dir}/train (memory-mapped)'
    return super().describe_source()

  # Test set. -------------------------------------------------------------------------------------------------

  def test_set(self, seq_len=None, test_len: int | None = None):
    """The official test videos, uint8 (N, seq_len, 64, 64, 3): one frame in ``subsampling`` of each extract.

    The extracts of ``test_set_<test_len>_<subsampling>`` (``test_len`` defaults to ``seq_len``, else 53) are
    read in sorted name order (test_0, test_1, test_10, ...), the official test loader's order, so per-video
    results line up with the official ones.
    """
    test_len = int(test_len or seq_len or TEST_LEN)
    seq_len = test_len if seq_len is None else int(seq_len)
    sub = self.step
    folder = official_test_dir(self.data_dir, test_len, sub)
    files = npz_files(folder)
    if not files:
      raise FileNotFoundError(
          f'Human3.6M test set for {test_len} frames (subsampling {sub}) not found: expected {folder}/test_<i>.npz; '
          'create it with '
          f'`{base.command("make_test_set", "human", self.data_dir, f" --seq_len {test_len} --subsampling {sub}")}`')
    if seq_len > test_len:
      raise DataError(f'seq_len={seq_len} exceeds the {test_len} frames of the Human3.6M test extracts in {folder}')
    span = (test_len - 1) * sub + 1
    out = np.empty((len(files), seq_len, NX, NX, 3), dtype=np.uint8)
    for i, name in enumerate(files):
      path = os.path.join(folder, name)
      video = load_npz_array(path)
      _check_video(path, video)
      if len(video) < span:
        raise DataError(f'{path} holds {len(video)} frames, fewer than the {span} of a {test_len}-frame extract '
                        f'with subsampling {sub}')
      out[i] = video[:(seq_len - 1) * sub + 1:sub]
    return out
