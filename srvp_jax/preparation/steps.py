"""The preparation steps every dataset offers, and what the datasets' preparations share.

``Preparation`` is the interface of the steps of ``python -m srvp_jax.data``: ``download()``,
``prepare(source, force)``, ``make_test_set(**options)`` and ``inspect()``. Each dataset's preparation


class (``kth.KTH``, ``human.Human``, ``bair.BAIR``, ``mmnist.MovingMnist`` of this package) is its
streaming class of ``srvp_jax.data`` with these steps added. ``ClipPreparation`` implements ``prepare``
(raw data or an official layout -> the video store, in one pass) and ``inspect`` for the video
datasets, from their ``sources``, ``auto_source`` and ``items``.
"""

from __future__ import annotations

import abc
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from typing import Iterator

import numpy as np

from tqdm import tqdm

from srvp_jax.data import store
from srvp_jax.data.base import command
from srvp_jax.preparation import store_writer


def download_file(url: str, dest: str) -> None:
  """Streams ``url`` to ``dest`` (kept if already there, e.g. copied by hand); one clear line when offline."""
  if os.path.isfile(dest):
    return
  os.makedirs(os.path.dirname(dest) or '.', exist_ok=True)
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


def test_set_line(data_dir: str, name: str, allow_pickle: bool = False) -> str:
  """``inspect``'s line for the test-set file ``name`` of ``data_dir``: its extracts and frames, or BROKEN."""
  try:
    with np.load(os.path.join(data_dir, name), allow_pickle=allow_pickle) as data:
      shape = data['sequences'].shape
    return f'test set {name}: {shape[0]} extracts of {shape[1]} frames'
  except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
    return f'test set {name}: BROKEN: {e}'


def progress_bar(total: int | None, desc: str, enabled: bool = True):
  """A tqdm bar on stderr, shown after a second (a quick failure prints only its error line)."""
  return tqdm(total=total, desc=desc, unit='video', disable=not enabled, dynamic_ncols=True, file=sys.stderr, delay=1)


def format_bytes(n: float) -> str:
  for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
    if n < 1000 or unit == 'TB':
      return f'{n:.1f} {unit}' if unit != 'B' else f'{int(n)} B'
    n /= 1000
  return f'{n:.1f} TB'


class Preparation(abc.ABC):
  """The steps of the data CLI (a mix-in of a dataset class of ``srvp_jax.data``)."""

  @abc.abstractmethod
  def download(self) -> None:
    """Fetches the raw data from the official URLs (one line naming the URL and the file when offline)."""

  @abc.abstractmethod
  def prepare(self, source: str = 'auto', force: bool = False, progress: bool = True) -> list[str]:
    """Turns raw data or an official layout into what training reads; returns the lines to print."""

  def missing_data_dir(self) -> str:
    """One line: ``data_dir`` does not exist, and how to fill it."""
    return f'data folder {self.data_dir} not found; get the data with `{command("download", self.name, self.data_dir)}`'

  @abc.abstractmethod
  def make_test_set(self, **options) -> str:
    """Writes the official test file(s) with the official draws; returns the path."""

  @abc.abstractmethod
  def inspect(self) -> list[str]:
    """What ``data_dir`` holds and what is missing, with the command that makes it."""


class ClipPreparation(Preparation):
  """``prepare`` and ``inspect`` of the video datasets (KTH, Human3.6M, BAIR) through the video store."""

  @abc.abstractmethod
  def sources(self) -> dict[str, str]:
    """``prepare``'s inputs: name -> description."""

  @abc.abstractmethod
  def auto_source(self, **options) -> str:
    """The input ``prepare`` reads by default (the first one present)."""

  @abc.abstractmethod
  def items(self, source: str, **options) -> Iterator[tuple]:
    """``(split, name, meta, video uint8 (T, 64, 64, nc))`` of every video of ``source``, in the official order."""

  def prepare(self, source='auto', force=False, progress=True, **options):
    """Writes the store's train and test splits from ``source`` in one pass; returns the lines to print."""
    if not force and all(self.has_store(s) for s in self.splits):
      return [f'{self.title} store already in {os.path.join(self.data_dir, store.STORE_DIR)} (--force rebuilds it)']
    source = self.auto_source(**options) if source == 'auto' else source
    with progress_bar(None, f'{self.title} videos', progress) as bar:
      paths = store_writer.write_splits(self.data_dir, self.name, self.nc, self.splits, self.items(source, **options),
                                 progress=bar.update)
    return [f'{self.title} {split}: {len(store.StoreVideos(self.data_dir, split, self.name))} videos from '
            f'{self.sources()[source]} -> {path}' for split, path in paths.items()]

  def inspect(self) -> list[str]:
    lines = []
    for split in self.splits:
      if self.has_store(split):
        try:
          v = store.StoreVideos(self.data_dir, split, self.name)
          lines.append(f'store {split}: {len(v)} videos, {int(v.lengths.sum())} frames (min {v.lengths.min()}, max '
                       f'{v.lengths.max()}) of 64x64x{v.nc}, {format_bytes(v.nbytes())} in {v.root}')
        except (store.StoreError, FileNotFoundError) as e:
          lines.append(f'store {split}: BROKEN: {e}')
      else:
        lines.append(f'store {split}: missing; make it with `{command("prepare", self.name, self.data_dir)}`')
    for split in self.splits:
      try:
        v = self.official_videos(split)
      except (FileNotFoundError, ValueError) as e:
        v, err = None, str(e)
      else:
        err = ''
      if v is not None:
        lines.append(f'official layout {split}: {len(v)} videos, {int(v.lengths.sum())} frames '
                     f'({self.official_layout})')
      elif err:
        lines.append(f'official layout {split}: unreadable: {err}')
      else:
        lines.append(f'official layout {split}: not found ({self.official_layout})')
    return lines
