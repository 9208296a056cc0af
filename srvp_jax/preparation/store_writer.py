"""Writes the video store that ``srvp_jax.data.store`` reads (``prepare`` and synthetic stores).

Each split's shards are written first with a blank fixed-size ``.npy`` header (the frame count is known
at the end), into a hidden folder renamed when the split is complete, so an interrupted ``prepare``
never leaves a store that looks whole.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from typing import Any, Iterable, Mapping

import numpy as np

from srvp_jax.data import DataError
from srvp_jax.data.store import FORMAT_VERSION, INDEX, NX, STORE_DIR, split_dir

SHARD_BYTES = 1 << 30  # A new shard starts once a shard holds this many bytes.
HEADER_BYTES = 128  # Fixed .npy header size: frames are written first, the header (shape) at the end.


def _npy_header(shape: tuple[int, ...]) -> bytes:
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(buf, {'descr': '|u1', 'fortran_order': False, 'shape': shape})
  header = buf.getvalue()
  if len(header) > HEADER_BYTES:
    raise ValueError(f'shard shape {shape} does not fit a {HEADER_BYTES}-byte .npy header')
  # Pad the header dict with spaces (before its final newline) to exactly HEADER_BYTES, keeping it valid.
  pad = HEADER_BYTES - len(header)
  magic_len = 10  # Magic string (6), version (2), header length (2).
  body = header[magic_len:-1] + b' ' * pad + b'\n'
  return header[:8] + len(body).to_bytes(2, 'little') + body


class StoreWriter:
  """Appends whole videos (uint8 (T, 64, 64, nc)) to one split; ``close()`` makes it visible."""

  def __init__(self, data_dir: str, dataset: str, split: str, nc: int, shard_bytes: int = SHARD_BYTES):
    self.final = split_dir(data_dir, split)
    self.tmp = os.path.join(data_dir, STORE_DIR, f'.{split}.partial')
    shutil.rmtree(self.tmp, ignore_errors=True)
    os.makedirs(self.tmp)
    self.dataset, self.split, self.nc, self.shard_bytes = dataset, split, int(nc), int(shard_bytes)
    self.videos: list[dict[str, Any]] = []
    self.shards: list[str] = []
    self._file = None
    self._frames = 0

  def _open_shard(self) -> None:
    name = f'frames_{len(self.shards):04d}.npy'
    self.shards.append(name)
    self._file = open(os.path.join(self.tmp, name), 'wb')  # pylint: disable=consider-using-with
    self._file.write(b'\0' * HEADER_BYTES)
    self._frames = 0

  def _close_shard(self) -> None:
    if self._file is not None:
      self._file.seek(0)
      self._file.write(_npy_header((self._frames, NX, NX, self.nc)))
      self._file.close()
      self._file = None

  def add(self, video: np.ndarray, name: str, meta: Mapping[str, Any] | None = None) -> None:
    """Appends one video; frames must be uint8 (T, 64, 64, nc)."""
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[1:] != (NX, NX, self.nc):
      raise DataError(f'video {name}: {video.dtype} {video.shape}, expected uint8 (frames, {NX}, {NX}, {self.nc})')
    frame_bytes = NX * NX * self.nc
    if self._file is None or (self._frames and (self._frames + len(video)) * frame_bytes > self.shard_bytes):
      self._close_shard()
      self._open_shard()
    self._file.write(np.ascontiguousarray(video).tobytes())
    self.videos.append({'name': str(name), 'shard': len(self.shards) - 1, 'offset': self._frames,
                        'length': int(len(video)), 'meta': dict(meta or {})})
    self._frames += len(video)

  def close(self) -> str:
    """Finishes the last shard, writes the index and moves the split into place; returns its folder."""
    self._close_shard()
    index = {'format': FORMAT_VERSION, 'dataset': self.dataset, 'split': self.split, 'nc': self.nc,
             'shards': self.shards, 'videos': self.videos}
    with open(os.path.join(self.tmp, INDEX), 'w', encoding='utf-8') as f:
      json.dump(index, f)
    shutil.rmtree(self.final, ignore_errors=True)
    os.replace(self.tmp, self.final)
    return self.final

  def abort(self) -> None:
    """Drops what was written (the previous complete split, if any, is kept)."""
    if self._file is not None:
      self._file.close()
      self._file = None
    shutil.rmtree(self.tmp, ignore_errors=True)


def write_splits(data_dir: str, dataset: str, nc: int, splits: Iterable[str],
                 videos: Iterable[tuple[str, str, Mapping[str, Any], np.ndarray]], shard_bytes: int = SHARD_BYTES,
                 progress=None) -> dict[str, str]:
  """Writes ``(split, name, meta, video)`` items, one pass over the source, into the store's ``splits``.

  Every split must receive a video; on any failure nothing new is left behind (complete splits stay).
  Returns the folder of each split.
  """
  writers = {s: StoreWriter(data_dir, dataset, s, nc, shard_bytes) for s in splits}
  try:
    for split, name, meta, video in videos:
      writers[split].add(video, name, meta)
      if progress is not None:
        progress(1)
    empty = [s for s, w in writers.items() if not w.videos]
    if empty:
      raise FileNotFoundError(f'no {dataset} {" / ".join(empty)} video found to write into the store')
  except BaseException:
    for w in writers.values():
      w.abort()
    raise
  return {s: w.close() for s, w in writers.items()}
