"""The dataset interface every dataset implements, and what the video datasets share.

``Dataset`` (one per config, from ``srvp_jax.data.get_dataset``):
- ``train_batches(batch_size, seed, start_step, process_index, process_count)``: the endless training
  stream, float32 (B, seq_len, 64, 64, nc) in [0, 1]; batch k on process p is a pure function of
  (seed, k, p) (grain, ``pipeline.step_indexed``), so resuming at step k is exact.
- ``val_batches(batch_size, seed, n_batches)``: validation batches (official 95/5 fold), fixed by seed.
- ``test_set(seq_len)``: the official test videos, uint8 (N, seq_len, 64, 64, nc).
The steps that make the data (download, prepare, make_test_set, inspect) are added to each dataset by
``srvp_jax.preparation``, which imports this package, never the reverse.

``ClipDataset`` is the shared implementation of KTH, Human3.6M and BAIR: videos come from the video
store (``store.py``) when ``prepare`` made it, else from the official on-disk layout (read, slower, with
a one-line hint); a clip is a random video of a fold then a random start, one frame in ``step``.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import functools
import os
import re
import sys
import threading
import zipfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from srvp_jax import config as config_lib
from srvp_jax.data import DataError, pipeline, store

NX = config_lib.FRAME_SIZE
CLI = 'python -m srvp_jax.data'
DEFAULT_CACHE_BYTES = 4 << 30
_EPOCH_TAG = 0x5EB0C4  # Seeds the epoch permutations apart from the per-step generators.


def command(step: str, dataset: str, data_dir: str, extra: str = '') -> str:
  """The data CLI command line of ``step`` for ``dataset`` on ``data_dir``."""
  return f'{CLI} {step} {dataset} --data_dir {data_dir}{extra}'


class Dataset(abc.ABC):
  """One dataset bound to a config (``cfg`` may be None for the data CLI's steps that need none)."""

  name = ''  # CLI / config name.
  title = ''  # For people.
  nc = 1
  # Paper setup of the training stream (configs/*.py) and the GPU target speed of its train step (throughput).
  paper: dict = {}

  def __init__(self, cfg: Mapping[str, Any] | None, data_dir: str | None = None):
    self.cfg = cfg
    self.data_dir = str(data_dir if data_dir is not None else (cfg or {}).get('data_dir', '')) or '.'
    self._lock = threading.Lock()

  def __getstate__(self):
    """Pickles as (config, folder): a worker process reopens the data itself (memory maps are not copied)."""
    return {'cfg': self.cfg, 'data_dir': self.data_dir}

  def __setstate__(self, state):
    self.__init__(state['cfg'], state['data_dir'])  # pylint: disable=unnecessary-dunder-call

  # The part each dataset implements. -------------------------------------------------------------------------

  @abc.abstractmethod
  def batch(self, rng: np.random.Generator, batch_size: int, split: str) -> np.ndarray:
    """A batch of ``split`` ('train' or 'val') drawn from ``rng``: uint8, or float32 in [0, 1]."""

  @abc.abstractmethod
  def test_set(self, seq_len: int | None = None) -> np.ndarray:
    """The official test videos, uint8 (N, seq_len, 64, 64, nc)."""

  def describe_source(self) -> str:
    """Where the training videos come from (one line, for ``throughput``)."""
    return self.data_dir

  # Shared streams. -------------------------------------------------------------------------------------------

  def seq_len(self, split: str) -> int:
    return int(self.cfg['seq_len']) if split == 'train' else config_lib.seq_len_test(self.cfg)

  def train_batch(self, seed: int, step: int, process_index: int, process_count: int, batch_size: int) -> np.ndarray:
    """The training batch of ``step`` on ``process_index`` (float32)."""
    del process_count
    return pipeline.to_float(self.batch(pipeline.step_rng(seed, step, process_index), batch_size, 'train'))

  def val_batch(self, seed: int, k: int, batch_size: int) -> np.ndarray:
    """Validation batch ``k`` (float32)."""
    return pipeline.to_float(self.batch(pipeline.step_rng(seed, k), batch_size, 'val'))

  def train_batches(self, batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
                    process_count: int = 1) -> Iterator[np.ndarray]:
    """Endless training batches from ``start_step``; batch k is a pure function of (seed, k, process_index)."""
    self.check_train()
    workers = int(self.cfg.get('num_data_workers', 4))
    return pipeline.step_indexed(
        functools.partial(_train_batch, self, seed, process_index, process_count, batch_size), start_step=start_step,
        num_threads=workers, prefetch=max(2, workers), num_processes=int(self.cfg.get('num_data_processes', 0)))

  def val_batches(self, batch_size: int, seed: int, n_batches: int) -> Iterator[np.ndarray]:
    """``n_batches`` validation batches, the same ones for the same seed."""
    self.check_train()
    return (self.val_batch(seed, k, batch_size) for k in range(n_batches))

  def check_train(self) -> None:
    """Raises the one-line error of missing or unusable training data (before any thread starts)."""
    check_nc(self.cfg, self.nc, self.title)


def _train_batch(dataset: Dataset, seed: int, process_index: int, process_count: int, batch_size: int,
                 step: int) -> np.ndarray:
  """``dataset.train_batch`` with the step last (a picklable map function for grain worker processes)."""
  return dataset.train_batch(seed, step, process_index, process_count, batch_size)


def check_nc(cfg: Mapping[str, Any], nc: int, name: str) -> None:
  """One-line error when the config's channel count does not match the dataset's."""
  if int(cfg['nc']) != nc:
    raise DataError(f"{name} videos have {nc} channel(s) but the config has nc={cfg['nc']}; set nc={nc}")


# ---------------------------------------------------------------------------------------------------------------------
# Video sources: the store (store.StoreVideos) or an official layout (PNG frames, npz files).
# ---------------------------------------------------------------------------------------------------------------------

def read_test_sequences(path: str, make: str, missing: str, label: str = 'test file',
                        allow_pickle: bool = False) -> np.ndarray:
  """The ``sequences`` array of the test-set file ``path``, else one line with the command that makes it (``make``):
  FileNotFoundError "``missing``: expected ``path``", or DataError "``label`` ``path`` is unreadable"."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{missing}: expected {path}; create it with `{make}`')
  try:
    with np.load(path, allow_pickle=allow_pickle) as f:
      return f['sequences']
  except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f'{label} {path} is unreadable ({type(e).__name__}: {e}); create it again with `{make}`') \
        from None


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
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f'video frame {path} is corrupt ({e}); re-run the conversion that wrote this folder') from None
  if frame.ndim == 2:
    frame = frame[:, :, None]
  frame = frame[:, :, :1] if nc == 1 else frame[:, :, :3]
  if frame.shape != (NX, NX, nc):
    raise DataError(f'frame {path} has shape {frame.shape}, expected {(NX, NX, nc)} (convert with image size 64)')
  return frame


class PngVideos:
  """Videos stored as folders of PNG frames (official layouts), decoded lazily and cached up to a byte budget.

  Thread-safe (grain worker threads). ``names`` / ``meta`` describe the videos as the store does.
  """

  def __init__(self, frames: Sequence[Sequence[str]], nc: int, names: Sequence[str] | None = None,
               meta: Sequence[Mapping[str, Any]] | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES):
    self.frames = [list(f) for f in frames]
    self.lengths = np.array([len(f) for f in self.frames], dtype=np.int64)
    self.names = list(names) if names is not None else [str(i) for i in range(len(self.frames))]
    self.meta = [dict(m) for m in meta] if meta is not None else [{} for _ in self.frames]
    self.nc = nc
    self.cache_bytes = int(cache_bytes)
    self._cache: dict[int, np.ndarray] = {}
    self._cached_bytes = 0
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.frames)

  def video(self, index: int) -> np.ndarray:
    return self.clip(index, 0, int(self.lengths[index]))

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


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 2) -> Iterator[Any]:
  """``map(fn, items)`` on ``workers`` threads, in order, at most 2 * workers results ahead of the consumer."""
  if workers <= 1:
    yield from map(fn, items)
    return
  pool = concurrent.futures.ThreadPoolExecutor(workers)
  pending = collections.deque()
  try:
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 2 * workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------------------------
# Video datasets (KTH, Human3.6M, BAIR).
# ---------------------------------------------------------------------------------------------------------------------

class ClipDataset(Dataset):
  """A dataset of whole videos cut into random clips; subclasses give the official layout and test set."""

  splits = ('train', 'test')
  shuffled_epochs = False  # BAIR: videos visited in shuffled epochs (official loader), else uniform draws.
  official_layout = ''  # What the official layout is, for messages.

  def __init__(self, cfg, data_dir=None):
    super().__init__(cfg, data_dir)
    self._sources: dict[str, Any] = {}
    self._eligible: dict[tuple[str, int], np.ndarray] = {}
    self._perms: dict[tuple, np.ndarray] = {}
    self._hinted = False

  # Per dataset. ----------------------------------------------------------------------------------------------

  @abc.abstractmethod
  def official_videos(self, split: str):
    """The videos of ``split`` in the official layout (PngVideos, NpzVideos), or None when absent."""

  @abc.abstractmethod
  def missing(self, split: str) -> str:
    """One line: what is missing for ``split`` and the commands that make it."""

  @property
  def step(self) -> int:
    """One frame in ``step`` is kept (Human3.6M subsampling)."""
    return 1

  # Shared. ---------------------------------------------------------------------------------------------------

  def has_store(self, split: str) -> bool:
    return store.has_split(self.data_dir, split)

  def videos(self, split: str):
    """The videos of ``split`` ('train' holds both official folds): the store if prepared, else the official layout."""
    with self._lock:
      if split not in self._sources:
        if self.has_store(split):
          source = store.StoreVideos(self.data_dir, split, self.name)
          if source.nc != self.nc or source.dataset not in ('', self.name):
            what = f'{source.dataset} videos' if source.dataset not in ('', self.name) else \
                f'{source.nc}-channel videos'
            raise store.StoreError(f'{source.root} holds {what}, not {self.name} ones; '
                                   f're-run `{command("prepare", self.name, self.data_dir, " --force")}`')
        else:
          source = self.official_videos(split)
          if source is None:
            raise FileNotFoundError(self.missing(split))
        self._sources[split] = source
      return self._sources[split]

  def hint_if_slow(self) -> None:
    """One line on stderr when training reads an official layout instead of the store."""
    if not self._hinted and not self.has_store('train') and isinstance(self.videos('train'), PngVideos):
      print(f'note: training decodes the {self.title} PNG frames in {self.data_dir}; '
            f'`{command("prepare", self.name, self.data_dir)}` makes the fast video store', file=sys.stderr)
    self._hinted = True

  def describe_source(self) -> str:
    if self.has_store('train'):
      return f'video store {store.split_dir(self.data_dir, "train")}'
    return f'official layout in {self.data_dir} ({self.official_layout})'

  def check_train(self) -> None:
    super().check_train()
    self.eligible('train', self.seq_len('train'))
    self.eligible('val', self.seq_len('val'))  # At start-up, not at the first validation.
    self.hint_if_slow()

  def eligible(self, fold: str, seq_len: int) -> np.ndarray:
    """Indices (in the 'train' split) of the ``fold`` videos long enough for ``seq_len`` frames."""
    key = (fold, seq_len)
    if key not in self._eligible:
      videos = self.videos('train')
      span = (seq_len - 1) * self.step + 1
      idx = pipeline.fold_indices(len(videos), fold)
      eligible = idx[videos.lengths[idx] >= span]
      if len(eligible) == 0:
        what = f'{seq_len} frames' if self.step == 1 else f'the {span} frames that seq_len={seq_len} with ' \
            f'subsampling {self.step} needs'
        raise DataError(f'no {self.title} {fold} video has {what} (videos in {self.data_dir}: {len(videos)}); '
                        'use a shorter seq_len')
      self._eligible[key] = eligible
    return self._eligible[key]

  def clips(self, rng: np.random.Generator, picks: np.ndarray, seq_len: int) -> np.ndarray:
    """uint8 (B, seq_len, 64, 64, nc): for each picked video a uniform start (``rng``), one frame in ``step``."""
    videos = self.videos('train')
    span = (seq_len - 1) * self.step + 1
    starts = rng.integers(videos.lengths[picks] - span + 1)
    out = np.empty((len(picks), seq_len, NX, NX, self.nc), dtype=np.uint8)
    for j, (v, t) in enumerate(zip(picks, starts)):
      out[j] = videos.clip(int(v), int(t), seq_len, self.step)
    return out

  def batch(self, rng, batch_size, split):
    """Uniform videos among the fold's long enough ones (the official redraw loop), uniform starts."""
    seq_len = self.seq_len(split)
    eligible = self.eligible(split, seq_len)
    return self.clips(rng, eligible[rng.integers(len(eligible), size=batch_size)], seq_len)

  def epoch_picks(self, key: tuple, eligible: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Videos at stream ``positions`` when ``eligible`` is visited in shuffled epochs (a permutation per epoch)."""
    n = len(eligible)
    out = np.empty(len(positions), dtype=np.int64)
    for epoch in np.unique(positions // n):
      perm_key = (*key, int(epoch))
      with self._lock:
        perm = self._perms.get(perm_key)
        if perm is None:
          if len(self._perms) > 64:
            self._perms.clear()
          perm = np.random.default_rng([_EPOCH_TAG, *key[1:], int(epoch)]).permutation(eligible)
          self._perms[perm_key] = perm
      sel = positions // n == epoch
      out[sel] = perm[positions[sel] % n]
    return out

  def train_batch(self, seed, step, process_index, process_count, batch_size):
    if not self.shuffled_epochs:
      return super().train_batch(seed, step, process_index, process_count, batch_size)
    seq_len = self.seq_len('train')
    first = (int(step) * int(process_count) + int(process_index)) * batch_size
    picks = self.epoch_picks(('train', int(seed), 0), self.eligible('train', seq_len),
                             np.arange(first, first + batch_size))
    return pipeline.to_float(self.clips(pipeline.step_rng(seed, step, process_index), picks, seq_len))

  def val_batch(self, seed, k, batch_size):
    if not self.shuffled_epochs:
      return super().val_batch(seed, k, batch_size)
    seq_len = self.seq_len('val')
    picks = self.epoch_picks(('val', int(seed), 1), self.eligible('val', seq_len),
                             np.arange(k * batch_size, (k + 1) * batch_size))
    return pipeline.to_float(self.clips(pipeline.step_rng(seed, k), picks, seq_len))
