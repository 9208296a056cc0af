"""KTH actions: training/validation streams and the official test set, from the official preprocessed data.

On-disk format (what the official ``preprocessing/kth/convert.py`` writes, reproduced by ``convert``):
``DATA_DIR/processed_64/<action>/person<PP>_<action>_d<S>/image-<NNN>.png``, one 64x64 PNG per frame
(ffmpeg output at 25 fps; grey content stored as RGB, only the first channel is used). Subjects 1-20
are the training videos, 21-25 the test videos. The official test set is
``DATA_DIR/svg_test_set_40.npz`` with ``sequences`` (N, 40, 64, 64) uint8, ``persons`` (N,) and
``actions`` (N,) strings, made by ``make_test_set``.

This module also holds the frame-folder helpers that BAIR (same PNG-per-frame layout) reuses.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
import zipfile
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from srvp_jax import config
from srvp_jax.data import pipeline

CLASSES = ('boxing', 'handclapping', 'handwaving', 'jogging', 'running', 'walking')
NX = 64
TEST_LEN = 40
# Official download script (edenton/svg data/download_kth.sh, called by srvp preprocessing/kth/download.sh).
RAW_URL = 'http://www.nada.kth.se/cvap/actions/{action}.zip'
DEFAULT_CACHE_BYTES = 4 << 30

CLI = 'python -m srvp_jax.data.video_datasets_cli'
MAKE_TEST_SET_CLI = 'python -m srvp_jax.data.make_test_set'


# ---------------------------------------------------------------------------------------------------------------------
# Frame-folder videos (shared with BAIR).
# ---------------------------------------------------------------------------------------------------------------------

def natural_key(name: str) -> list:
  """Sort key ordering 'image-999.png' before 'image-1000.png' (frame order, unlike plain sorting)."""
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


def read_frame(path: str, nc: int) -> np.ndarray:
  """One 64x64 PNG frame as uint8 (64, 64, nc); grey videos keep the first channel as the official code does."""
  try:
    with Image.open(path) as img:
      frame = np.asarray(img)
  except FileNotFoundError:
    raise FileNotFoundError(f'missing video frame {path}; re-run the conversion that wrote this folder') from None
  if frame.ndim == 2:
    frame = frame[:, :, None]
  frame = frame[:, :, :1] if nc == 1 else frame[:, :, :3]
  if frame.shape != (NX, NX, nc):
    raise ValueError(f'frame {path} has shape {frame.shape}, expected {(NX, NX, nc)} (convert with image size 64)')
  return frame


class PngVideos:
  """Videos stored as folders of PNG frames, decoded lazily; whole videos are cached up to a byte budget.

  Why: decoding every frame of a large dataset up front is slow and may not fit in memory, while decoding
  the same small PNGs again at every step wastes the input pipeline's time. Thread-safe (tf.data workers).
  """

  def __init__(self, frames: Sequence[Sequence[str]], nc: int, cache_bytes: int = DEFAULT_CACHE_BYTES):
    self.frames = [list(f) for f in frames]
    self.lengths = np.array([len(f) for f in self.frames], dtype=np.int64)
    self.nc = nc
    self.cache_bytes = int(cache_bytes)
    self._cache: dict[int, np.ndarray] = {}
    self._cached_bytes = 0
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.frames)

  def clip(self, index: int, start: int, length: int, step: int = 1) -> np.ndarray:
    """Frames start, start + step, ... (``length`` of them) of video ``index``, uint8 (length, 64, 64, nc)."""
    video = self._cache.get(index)
    if video is None:
      video_bytes = int(self.lengths[index]) * NX * NX * self.nc
      if self._cached_bytes + video_bytes <= self.cache_bytes:
        video = np.stack([read_frame(p, self.nc) for p in self.frames[index]])
        with self._lock:
          if index not in self._cache:
            self._cache[index] = video
            self._cached_bytes += video_bytes
      else:
        paths = self.frames[index][start:start + (length - 1) * step + 1:step]
        return np.stack([read_frame(p, self.nc) for p in paths])
    return video[start:start + (length - 1) * step + 1:step]


def random_clips(rng: np.random.Generator, videos: PngVideos, eligible: np.ndarray, batch_size: int,
                 seq_len: int) -> np.ndarray:
  """A batch of random clips: a uniform video among ``eligible`` then a uniform start (official sampling).

  The official loop redraws a video until it is long enough, i.e. a uniform draw among the long enough ones.
  Returns float32 (B, seq_len, 64, 64, nc) in [0, 1].
  """
  picks = eligible[rng.integers(len(eligible), size=batch_size)]
  starts = rng.integers(videos.lengths[picks] - seq_len + 1)
  batch = np.stack([videos.clip(int(v), int(t), seq_len) for v, t in zip(picks, starts)])
  return batch.astype(np.float32) / 255


def fold_indices(n: int, fold: str) -> np.ndarray:
  """Video indices of the official 'train' or 'val' fold, in dataset order as the official ``get_fold`` keeps them."""
  return np.sort(pipeline.official_val_split(n, train=fold == 'train'))


def check_nc(cfg: Mapping, nc: int, name: str) -> None:
  """One-line error when the config's channel count does not match the dataset's."""
  if int(cfg['nc']) != nc:
    raise ValueError(f"{name} videos have {nc} channel(s) but the config has nc={cfg['nc']}; set nc={nc}")


def download_file(url: str, dest: str) -> None:
  """Streams ``url`` to ``dest`` (kept if already there, e.g. copied by hand); one clear line when offline."""
  if os.path.isfile(dest):
    return
  tmp = dest + '.part'
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, 'wb') as f:
      shutil.copyfileobj(response, f, length=1 << 20)
  except (urllib.error.URLError, OSError) as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise RuntimeError(f'cannot download {url} ({e}); get it on a machine with internet access and put it at {dest}') \
        from None
  os.replace(tmp, dest)


# ---------------------------------------------------------------------------------------------------------------------
# KTH.
# ---------------------------------------------------------------------------------------------------------------------

def processed_dir(data_dir: str) -> str:
  """Folder of the official 64x64 frames."""
  return os.path.join(data_dir, f'processed_{NX}')


def _missing_processed(data_dir: str) -> FileNotFoundError:
  return FileNotFoundError(
      f'KTH frames not found: expected {processed_dir(data_dir)}/<action>/person<PP>_<action>_d<S>/image-<NNN>.png; '
      f'create them with `{CLI} download kth --data_dir {data_dir}` then `{CLI} convert kth --data_dir {data_dir}`')


def download(data_dir: str, *, classes: Sequence[str] = CLASSES) -> None:
  """Downloads the original KTH videos into ``DATA_DIR/raw/<action>/*.avi`` (official URLs).

  The official script also fetches SVG's own preprocessed archive, which SRVP never reads; it is skipped.
  """
  for action in classes:
    target = os.path.join(data_dir, 'raw', action)
    os.makedirs(target, exist_ok=True)
    archive = os.path.join(data_dir, 'raw', f'{action}.zip')
    download_file(RAW_URL.format(action=action), archive)
    with zipfile.ZipFile(archive) as z:
      z.extractall(target)
    os.remove(archive)


def convert(data_dir: str, *, frame_rate: int = 25) -> None:
  """Writes ``processed_64/<action>/<video>/image-%03d.png`` with ffmpeg, as the official convert.py does."""
  if shutil.which('ffmpeg') is None:
    raise RuntimeError('KTH conversion needs the ffmpeg executable on PATH (e.g. apt-get install ffmpeg)')
  raw = os.path.join(data_dir, 'raw')
  if not all(os.path.isdir(os.path.join(raw, c)) for c in CLASSES):
    raise FileNotFoundError(f'KTH videos not found: expected {raw}/<action>/*_uncomp.avi for actions {CLASSES}; '
                            f'get them with `{CLI} download kth --data_dir {data_dir}`')
  for action in CLASSES:
    for video in sorted(os.listdir(os.path.join(raw, action))):
      if os.path.splitext(video)[1] != '.avi':
        continue
      name = video[:-len('_uncomp.avi')]
      out_dir = os.path.join(processed_dir(data_dir), action, name)
      os.makedirs(out_dir, exist_ok=True)
      cmd = ['ffmpeg', '-loglevel', 'error', '-y', '-i', os.path.join(raw, action, video), '-r', str(frame_rate),
             '-f', 'image2', '-s', f'{NX}x{NX}', os.path.join(out_dir, 'image-%03d.png')]
      result = subprocess.run(cmd, check=False, capture_output=True, text=True)
      if result.returncode != 0:
        raise RuntimeError(f'ffmpeg failed on {video}: {result.stderr.strip().splitlines()[-1:]}')


def index_videos(data_dir: str, *, train: bool = True) -> tuple[list[str], list[list[str]]]:
  """Names and frame paths (in frame order) of the training (subjects 1-20) or test (21-25) videos.

  Videos are listed in sorted order per action (the official code uses ``os.listdir`` order, which depends
  on the file system and makes its 95/5 split machine-dependent; sorting makes ours reproducible).
  """
  root = processed_dir(data_dir)
  if not all(os.path.isdir(os.path.join(root, c)) for c in CLASSES):
    raise _missing_processed(data_dir)
  names, frames = [], []
  for action in CLASSES:
    for video in sorted(os.listdir(os.path.join(root, action))):
      video_dir = os.path.join(root, action, video)
      if not os.path.isdir(video_dir):
        continue
      if (int(video.split('_')[0][-2:]) <= 20) != train:
        continue
      pngs = sorted((f for f in os.listdir(video_dir) if os.path.splitext(f)[1] == '.png'), key=natural_key)
      names.append(f'{action}/{video}')
      frames.append([os.path.join(video_dir, f) for f in pngs])
  if not names:
    raise _missing_processed(data_dir)
  return names, frames


_STORES: dict[tuple[str, int], PngVideos] = {}


def _training_videos(data_dir: str, cache_bytes: int) -> PngVideos:
  """The training videos (both folds), indexed once per process and sharing one decoded-frame cache."""
  key = (os.path.abspath(data_dir), int(cache_bytes))
  if key not in _STORES:
    _STORES[key] = PngVideos(index_videos(data_dir, train=True)[1], nc=1, cache_bytes=cache_bytes)
  return _STORES[key]


def _eligible(videos: PngVideos, fold: str, seq_len: int) -> np.ndarray:
  idx = fold_indices(len(videos), fold)
  eligible = idx[videos.lengths[idx] >= seq_len]
  if len(eligible) == 0:
    raise ValueError(f'no KTH {fold} video has at least {seq_len} frames; use a shorter seq_len')
  return eligible


def train_batches(cfg: Mapping, *, batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
                  cache_bytes: int = DEFAULT_CACHE_BYTES) -> Iterator[np.ndarray]:
  """Training stream, float32 (B, seq_len, 64, 64, 1) in [0, 1]; batch k is a pure function of (seed, k, process)."""
  check_nc(cfg, 1, 'KTH')
  videos = _training_videos(cfg['data_dir'], cache_bytes)
  seq_len = int(cfg['seq_len'])
  eligible = _eligible(videos, 'train', seq_len)

  def make_batch(rng, b):
    return random_clips(rng, videos, eligible, b, seq_len)

  return pipeline.step_indexed_batches(make_batch, batch_size=batch_size, seed=seed, start_step=start_step,
                                       process_index=process_index,
                                       num_parallel=int(cfg.get('num_data_workers', 4)))


def val_batches(cfg: Mapping, *, batch_size: int, seed: int, n_batches: int,
                cache_bytes: int = DEFAULT_CACHE_BYTES) -> Iterator[np.ndarray]:
  """Validation batches (random video and start among the 5% fold, as the official loader), fixed by ``seed``."""
  check_nc(cfg, 1, 'KTH')
  videos = _training_videos(cfg['data_dir'], cache_bytes)
  seq_len = config.seq_len_test(cfg)
  eligible = _eligible(videos, 'val', seq_len)
  rng = np.random.default_rng(seed)
  return (random_clips(rng, videos, eligible, batch_size, seq_len) for _ in range(n_batches))


def official_test_file(data_dir: str, test_len: int = TEST_LEN) -> str:
  """Path of the official test file for extracts of ``test_len`` frames."""
  return os.path.join(data_dir, f'svg_test_set_{test_len}.npz')


def load_test_set(data_dir: str, seq_len: int | None = None, *, test_len: int = TEST_LEN) -> np.ndarray:
  """The official test videos, uint8 (N, T, 64, 64, 1), from ``svg_test_set_<test_len>.npz``.

  ``seq_len`` keeps the first frames of each extract (the protocol uses all 40).
  """
  path = official_test_file(data_dir, test_len)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'KTH test set not found: expected {path}; create it with '
                            f'`{MAKE_TEST_SET_CLI} kth --data_dir {data_dir}` (needs {processed_dir(data_dir)})')
  with np.load(path, allow_pickle=True) as f:
    sequences = f['sequences']
  if sequences.ndim != 4 or sequences.shape[2:] != (NX, NX) or sequences.dtype != np.uint8:
    raise ValueError(f'{path}: sequences is {sequences.dtype} {sequences.shape}, expected uint8 (N, T, 64, 64)')
  if seq_len is not None:
    if seq_len > sequences.shape[1]:
      raise ValueError(f'seq_len={seq_len} exceeds the {sequences.shape[1]} frames of the KTH test extracts in {path}')
    sequences = sequences[:, :seq_len]
  return sequences[..., None]


def make_test_set(data_dir: str, *, size: int = 1000, seq_len: int = TEST_LEN, seed: int = 42) -> str:
  """Writes the official ``svg_test_set_<seq_len>.npz`` (official make_test_set.py procedure, same draws).

  With NumPy's legacy generator seeded ``seed``, each extract draws an action index randint(6), a subject
  randint(21, 26), a scenario randint(1, 5), then a start randint(n_frames - seq_len + 1) in the video's
  frames sorted by name (plain string order, as the official script, so files stay identical).
  """
  root = processed_dir(data_dir)
  if not os.path.isdir(root):
    raise _missing_processed(data_dir)
  rng = np.random.RandomState(seed)
  sequences, persons, actions = [], [], []
  for _ in range(size):
    action = CLASSES[rng.randint(len(CLASSES))]
    person = rng.randint(21, 26)
    trial = rng.randint(1, 5)
    video_dir = os.path.join(root, action, f'person{person:02d}_{action}_d{trial}')
    if not os.path.isdir(video_dir):
      raise FileNotFoundError(f'KTH test video folder {video_dir} is missing; re-run `{CLI} convert kth --data_dir '
                              f'{data_dir}` on the complete raw dataset')
    names = sorted(os.listdir(video_dir))
    if len(names) < seq_len:
      raise ValueError(f'{video_dir} has {len(names)} frames, fewer than the {seq_len} of a test extract')
    t0 = rng.randint(len(names) - seq_len + 1)
    frames = [read_frame(os.path.join(video_dir, n), 1)[:, :, 0] for n in names[t0:t0 + seq_len]]
    sequences.append(np.array(frames))
    persons.append(person)
    actions.append(action)
  path = os.path.join(data_dir, f'svg_test_set_{seq_len}.npz')
  np.savez_compressed(path, sequences=np.array(sequences), persons=persons, actions=actions)
  return path
