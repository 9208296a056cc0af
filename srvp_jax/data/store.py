"""The video store: whole videos as uint8 frames in a few large ``.npy`` shards with a JSON index.

Layout, written by ``python -m srvp_jax.data prepare DATASET --data_dir DIR`` (``srvp_jax.preparation.store_writer``)::

    DIR/store/<split>/index.json          {"dataset", "split", "nc", "shards": [...], "videos": [...]}
    DIR/store/<split>/frames_<k>.npy      uint8 (frames, 64, 64, nc): the frames of consecutive videos

Each index entry of ``videos`` is ``{"name", "shard", "offset", "length", "meta"}``: the video is
``frames_<shard>[offset:offset + length]``, in the dataset's official video order. Shards are opened
memory-mapped, so a clip (video, start, length, one frame in ``step``) is one slice of one shard: no
image decoding and no read of the frames it does not keep; the OS page cache does the caching.

Why npy shards and not ArrayRecord (measured on this machine, 2 CPU cores, one thread, page cache
warm): random 20-frame clips of 300-700-frame grey videos (KTH-like) read at 81,000 clips/s from a
memory-mapped shard, 1,000 clips/s from ArrayRecord with one record per video (the whole video is
read and copied to cut a clip) and 740 clips/s with one record per frame (20 record reads per clip);
random 12-frame clips of 30-frame RGB videos (BAIR-like): 73,000, 7,700 and 830 clips/s. A clip of a
memory-mapped array costs one copy of the bytes it keeps, whatever the video's length.

A split is written to a hidden folder and renamed when complete, so an interrupted ``prepare`` never
leaves a store that looks whole.
"""

from __future__ import annotations

import json
import os

import numpy as np

from srvp_jax.config import FRAME_SIZE as NX
from srvp_jax.data import DataError

STORE_DIR = 'store'
INDEX = 'index.json'
FORMAT_VERSION = 1


class StoreError(DataError):
  """A store file is missing, truncated or inconsistent with its index (the message names the file)."""


def split_dir(data_dir: str, split: str) -> str:
  """Folder of one split of the store."""
  return os.path.join(data_dir, STORE_DIR, split)


def has_split(data_dir: str, split: str) -> bool:
  """Whether a complete split (its index written last) is in ``data_dir``."""
  return os.path.isfile(os.path.join(split_dir(data_dir, split), INDEX))


def prepare_command(dataset: str, data_dir: str) -> str:
  """The command that rebuilds the store of ``data_dir`` (the data CLI's ``prepare --force``)."""
  return f'python -m srvp_jax.data prepare {dataset or "DATASET"} --data_dir {data_dir} --force'


class StoreVideos:
  """One split of the store, memory-mapped: ``clip(i, start, length, step)`` slices video ``i``.

  Opening checks the whole index against its shards (a video in a shard that is not listed or too short, no
  video, a field of the wrong kind): a broken store is one StoreError naming the file and the command that
  rebuilds it, never an IndexError later. ``dataset`` names the dataset in that command (default: the index's).
  """

  def __init__(self, data_dir: str, split: str, dataset: str | None = None):
    self.root = split_dir(data_dir, split)
    path = os.path.join(self.root, INDEX)
    fix = lambda name: f're-run `{prepare_command(dataset or name, data_dir)}`'
    try:
      with open(path, encoding='utf-8') as f:
        index = json.load(f)
      self.dataset = str(index.get('dataset', ''))
      self.nc = int(index['nc'])
      videos = index['videos']
      self.names = [str(v['name']) for v in videos]
      self.meta = [dict(v['meta']) for v in videos]
      self.lengths, self.offsets, self.shard_ids = (_integers(videos, field) for field in ('length', 'offset', 'shard'))
      shard_names = [str(name) for name in index['shards']]
    except FileNotFoundError:
      raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
      raise StoreError(f'{path} is not a valid store index ({type(e).__name__}: {e}); {fix("")}') from None
    if self.nc not in (1, 3):
      raise StoreError(f'{path} says nc={self.nc}, expected 1 or 3; {fix(self.dataset)}')
    if not self.names:
      raise StoreError(f'{path} lists no video (an empty {split} split); {fix(self.dataset)}')
    bad = np.flatnonzero((self.shard_ids < 0) | (self.shard_ids >= len(shard_names)) | (self.offsets < 0) |
                         (self.lengths < 1))
    if len(bad):
      i = int(bad[0])
      raise StoreError(f'{path} is inconsistent: video {self.names[i]} has shard {self.shard_ids[i]}, offset '
                       f'{self.offsets[i]}, length {self.lengths[i]} (shards: {len(shard_names)}); {fix(self.dataset)}')
    self.shards = [self._open(os.path.join(self.root, name), fix(self.dataset)) for name in shard_names]
    for i in range(len(self.names)):
      shard = self.shards[self.shard_ids[i]]
      if self.offsets[i] + self.lengths[i] > len(shard):
        raise StoreError(f'{self.root}/{shard_names[self.shard_ids[i]]} is shorter than its index says (video '
                         f'{self.names[i]}); {fix(self.dataset)}')

  def _open(self, path: str, fix: str) -> np.ndarray:
    try:
      array = np.load(path, mmap_mode='r')
    except FileNotFoundError:
      raise StoreError(f'store shard {path} is missing; {fix}') from None
    except (OSError, ValueError) as e:
      raise StoreError(f'store shard {path} is corrupt or truncated ({e}); {fix}') from None
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (NX, NX, self.nc):
      raise StoreError(f'store shard {path} holds {array.dtype} {array.shape}, expected uint8 (frames, 64, 64, '
                       f'{self.nc}); {fix}')
    return array

  def __len__(self) -> int:
    return len(self.names)

  def clip(self, index: int, start: int, length: int, step: int = 1) -> np.ndarray:
    """Frames start, start + step, ... (``length`` of them) of video ``index``: a view into the shard."""
    begin = int(self.offsets[index]) + int(start)
    return self.shards[self.shard_ids[index]][begin:begin + (length - 1) * step + 1:step]

  def video(self, index: int) -> np.ndarray:
    """All frames of video ``index`` (a view)."""
    return self.clip(index, 0, int(self.lengths[index]))

  def nbytes(self) -> int:
    return int(sum(s.nbytes for s in self.shards))


def _integers(videos: list, field: str) -> np.ndarray:
  """The integer ``field`` of every index entry (ValueError for a missing, fractional or non-numeric one)."""
  values = [v[field] for v in videos]
  if not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
    raise ValueError(f"video field '{field}' must be an integer in every entry")
  return np.array(values, dtype=np.int64).reshape(len(values))
