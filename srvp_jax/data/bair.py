"""BAIR robot pushing: training/validation streams and the test set, from the official preprocessed data.

On-disk format (what the official ``preprocessing/bair/convert.py`` writes, reproduced by ``convert``):
``DATA_DIR/processed_data/{train,test}/<tfrecord name>/<k:03d>/<i:03d>.png``, one folder per video (k counts
from 001 within each tfrecord file) with its 30 RGB 64x64 frames 000.png .. 029.png (camera ``image_aux1``).
The original archive, ``DATA_DIR/softmotion30_44k/{train,test}/*.tfrecords``, holds 43,264 training and
256 test videos. Videos are ordered by (tfrecord name, k), sorted, as the official dataset lists them.
"""

from __future__ import annotations

import glob
import os
import tarfile
from typing import Iterator, Mapping

import numpy as np
from PIL import Image

from srvp_jax import config
from srvp_jax.data import pipeline
from srvp_jax.data.kth import (CLI, DEFAULT_CACHE_BYTES, NX, PngVideos, check_nc, download_file, fold_indices,
                               random_clips, read_frame)

# Official download script (edenton/svg data/download_bair.sh, called by srvp preprocessing/bair/download.sh).
URL = 'http://rail.eecs.berkeley.edu/datasets/bair_robot_pushing_dataset_v0.tar'
N_FRAMES = 30


def _missing(data_dir: str, fold: str) -> FileNotFoundError:
  return FileNotFoundError(
      f'BAIR {fold} videos not found: expected {os.path.join(data_dir, "processed_data", fold)}/<tfrecord>/<k>/'
      f'000.png..029.png; create them with `{CLI} download bair --data_dir {data_dir}` then '
      f'`{CLI} convert bair --data_dir {data_dir}`')


def download(data_dir: str) -> None:
  """Downloads and unpacks the original archive into ``DATA_DIR/softmotion30_44k/`` (official URL, ~30 GB)."""
  os.makedirs(data_dir, exist_ok=True)
  archive = os.path.join(data_dir, os.path.basename(URL))
  download_file(URL, archive)
  with tarfile.open(archive) as tar:
    tar.extractall(data_dir, filter='data')
  os.remove(archive)


def convert(data_dir: str) -> None:
  """Writes the official per-video PNG folders from the tfrecords (camera ``image_aux1``, 30 frames)."""
  from srvp_jax.data import tf_utils  # pylint: disable=import-outside-toplevel
  for fold in ('train', 'test'):
    files = sorted(glob.glob(os.path.join(data_dir, 'softmotion30_44k', fold, '*')))
    if not files:
      raise FileNotFoundError(f'BAIR tfrecords not found: expected {data_dir}/softmotion30_44k/{fold}/*.tfrecords; '
                              f'get them with `{CLI} download bair --data_dir {data_dir}`')
    tf = tf_utils.import_tensorflow()
    for path in files:
      name = os.path.splitext(os.path.basename(path))[0]
      for k, record in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator(), start=1):
        example = tf.train.Example.FromString(record)
        video_dir = os.path.join(data_dir, 'processed_data', fold, name, f'{k:03d}')
        os.makedirs(video_dir, exist_ok=True)
        for i in range(N_FRAMES):
          raw = example.features.feature[f'{i}/image_aux1/encoded'].bytes_list.value[0]
          Image.frombytes('RGB', (NX, NX), raw).save(os.path.join(video_dir, f'{i:03d}.png'), 'PNG')


def index_videos(data_dir: str, fold: str) -> list[list[str]]:
  """Frame paths of every ``fold`` ('train' or 'test') video, in the official (sorted) order."""
  root = os.path.join(data_dir, 'processed_data', fold)
  if not os.path.isdir(root):
    raise _missing(data_dir, fold)
  videos = []
  for d1 in sorted(os.listdir(root)):
    if not os.path.isdir(os.path.join(root, d1)):
      continue
    for d2 in sorted(os.listdir(os.path.join(root, d1))):
      video_dir = os.path.join(root, d1, d2)
      if os.path.isdir(video_dir):
        videos.append([os.path.join(video_dir, f'{i:03d}.png') for i in range(N_FRAMES)])
  if not videos:
    raise _missing(data_dir, fold)
  return videos


_STORES: dict[tuple[str, int], PngVideos] = {}


def _training_videos(data_dir: str, cache_bytes: int) -> PngVideos:
  """The training videos (both folds), indexed once per process and sharing one decoded-frame cache."""
  key = (os.path.abspath(data_dir), int(cache_bytes))
  if key not in _STORES:
    _STORES[key] = PngVideos(index_videos(data_dir, 'train'), nc=3, cache_bytes=cache_bytes)
  return _STORES[key]


def _check_len(seq_len: int) -> None:
  if not 1 <= seq_len <= N_FRAMES:
    raise ValueError(f'BAIR videos have {N_FRAMES} frames; seq_len={seq_len} must be between 1 and {N_FRAMES}')


def train_batches(cfg: Mapping, *, batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
                  cache_bytes: int = DEFAULT_CACHE_BYTES) -> Iterator[np.ndarray]:
  """Training stream, float32 (B, seq_len, 64, 64, 3) in [0, 1]: random video, random start within its 30 frames.

  Videos are drawn uniformly with replacement (the official loader shuffles epochs); batch k is a pure
  function of (seed, k, process).
  """
  check_nc(cfg, 3, 'BAIR')
  seq_len = int(cfg['seq_len'])
  _check_len(seq_len)
  videos = _training_videos(cfg['data_dir'], cache_bytes)
  train_ids = fold_indices(len(videos), 'train')

  def make_batch(rng, b):
    return random_clips(rng, videos, train_ids, b, seq_len)

  return pipeline.step_indexed_batches(make_batch, batch_size=batch_size, seed=seed, start_step=start_step,
                                       process_index=process_index,
                                       num_parallel=int(cfg.get('num_data_workers', 4)))


def val_batches(cfg: Mapping, *, batch_size: int, seed: int, n_batches: int,
                cache_bytes: int = DEFAULT_CACHE_BYTES) -> Iterator[np.ndarray]:
  """Validation batches fixed by ``seed``: the 5% fold shuffled (as the official loader), random starts.

  Each video appears once before any appears twice (a new permutation starts when the fold is exhausted).
  """
  check_nc(cfg, 3, 'BAIR')
  seq_len = config.seq_len_test(cfg)
  _check_len(seq_len)
  videos = _training_videos(cfg['data_dir'], cache_bytes)
  val_ids = fold_indices(len(videos), 'val')
  if len(val_ids) == 0:
    raise ValueError(f"BAIR validation fold is empty: {cfg['data_dir']} holds only {len(videos)} training videos")
  rng = np.random.default_rng(seed)
  n = batch_size * n_batches
  order = np.concatenate([rng.permutation(val_ids) for _ in range(-(-n // len(val_ids)))])[:n]
  starts = rng.integers(N_FRAMES - seq_len + 1, size=n)

  def batch(i):
    sl = slice(i * batch_size, (i + 1) * batch_size)
    clips = [videos.clip(int(v), int(t), seq_len) for v, t in zip(order[sl], starts[sl])]
    return np.stack(clips).astype(np.float32) / 255

  return (batch(i) for i in range(n_batches))


def load_test_set(data_dir: str, seq_len: int | None = None) -> np.ndarray:
  """The 256 official test videos, uint8 (N, T, 64, 64, 3): the first ``seq_len`` frames (default all 30)."""
  seq_len = N_FRAMES if seq_len is None else int(seq_len)
  _check_len(seq_len)
  videos = index_videos(data_dir, 'test')
  return np.stack([np.stack([read_frame(p, 3) for p in frames[:seq_len]]) for frames in videos])
