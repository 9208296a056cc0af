"""KTH actions: the dataset (training / validation clips, official test set), download and preparation.

Inputs, any of:
- the video store ``DIR/store/{train,test}`` written by ``python -m srvp_jax.data prepare kth --data_dir DIR``
  (fast: memory-mapped uint8 videos);
- the official PNG layout ``DIR/processed_64/<action>/person<PP>_<action>_d<S>/image-<NNN>.png`` (what the
  official ``preprocessing/kth/convert.py`` writes: ffmpeg at 25 fps, 64x64, grey stored as RGB, first
  channel used), read directly (slower) or packed into the store by ``prepare``;
- the original class archives ``<action>.zip`` / AVI files (``download kth``), which ``prepare`` decodes
  with the official ffmpeg scaling (``srvp_jax.data.raw``).

Subjects 1-20 are the training videos (official 95/5 train / validation folds), 21-25 the test videos.
Videos are ordered by action (``CLASSES`` order) then name, as the official dataset lists them (sorted;
the official code uses ``os.listdir`` order, which depends on the file system). The official test set for
extracts of N frames is ``DIR/svg_test_set_N.npz`` (``sequences`` (1000, N, 64, 64) uint8, ``persons``,
``actions``), made by ``make_test_set kth`` with the official draws (docs/srvp.md section 6).
"""

from __future__ import annotations

import os
import zipfile
from typing import Iterator, Sequence

import numpy as np

from srvp_jax.data import DataError, base, store

CLASSES = ('boxing', 'handclapping', 'handwaving', 'jogging', 'running', 'walking')
NX = base.NX
TEST_LEN = 40
# Official download script (edenton/svg data/download_kth.sh, called by srvp preprocessing/kth/download.sh).
RAW_URL = 'http://www.nada.kth.se/cvap/actions/{action}.zip'


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


def _meta(name: str) -> dict:
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
    return base.PngVideos(frames, nc=1, names=names, meta=[_meta(n) for n in names])

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
    if not os.path.isfile(path):
      raise FileNotFoundError(f'KTH test set for {seq_len} frames not found: expected {path}; create it with '
                              f'`{base.command("make_test_set", "kth", self.data_dir, f" --seq_len {seq_len}")}`')
    try:
      with np.load(path, allow_pickle=True) as f:
        sequences = f['sequences']
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
      raise DataError(f'KTH test file {path} is unreadable ({type(e).__name__}: {e}); create it again with '
                      f'`{base.command("make_test_set", "kth", self.data_dir, f" --seq_len {seq_len}")}`') from None
    if sequences.ndim != 4 or sequences.shape[1:] != (seq_len, NX, NX) or sequences.dtype != np.uint8:
      raise DataError(f'{path}: sequences is {sequences.dtype} {sequences.shape}, expected uint8 '
                      f'(N, {seq_len}, 64, 64)')
    return sequences[..., None]

  def make_test_set(self, size: int = 1000, seq_len: int = TEST_LEN, seed: int = 42) -> str:
    """Writes ``svg_test_set_<seq_len>.npz`` with the official draws (official make_test_set.py).

    With NumPy's legacy generator seeded ``seed``, each extract draws an action index randint(6), a subject
    randint(21, 26), a scenario randint(1, 5), then a start randint(n_frames - seq_len + 1) in the video's
    frames sorted by file name (plain string order, as the official script, so files stay identical). Reads
    the official PNG frames when present, else the store's test split.
    """
    png = index_videos(self.data_dir, train=False)
    if png is not None:
      by_name = {n: (len(f), sorted(f, key=os.path.basename)) for n, f in zip(*png)}

      def extract(name, t0):
        return np.stack([base.read_frame(p, 1)[:, :, 0] for p in by_name[name][1][t0:t0 + seq_len]])
    elif self.has_store('test'):
      from srvp_jax.data import raw  # pylint: disable=import-outside-toplevel
      videos = store.StoreVideos(self.data_dir, 'test')
      by_name = {n: (int(length), i) for i, (n, length) in enumerate(zip(videos.names, videos.lengths))}

      def extract(name, t0):
        length, i = by_name[name]
        return videos.video(i)[raw.kth_png_listing_order(length)[t0:t0 + seq_len], :, :, 0]
    else:
      raise FileNotFoundError(self.missing('test'))
    rng = np.random.RandomState(seed)
    sequences, persons, actions = [], [], []
    for _ in range(size):
      action = CLASSES[rng.randint(len(CLASSES))]
      person = rng.randint(21, 26)
      trial = rng.randint(1, 5)
      name = f'person{person:02d}_{action}_d{trial}'
      if name not in by_name:
        raise FileNotFoundError(f'KTH test video {name} is missing in {self.data_dir}; prepare the complete dataset '
                                f'(`{base.command("prepare", "kth", self.data_dir, " --force")}`)')
      n_frames = by_name[name][0]
      if n_frames < seq_len:
        raise DataError(f'KTH test video {name} has {n_frames} frames, fewer than the {seq_len} of a test extract')
      sequences.append(extract(name, rng.randint(n_frames - seq_len + 1)))
      persons.append(person)
      actions.append(action)
    path = official_test_file(self.data_dir, seq_len)
    np.savez_compressed(path, sequences=np.array(sequences), persons=persons, actions=actions)
    return path

  def inspect(self):
    lines = super().inspect()
    files = sorted(f for f in os.listdir(self.data_dir) if f.startswith('svg_test_set_') and f.endswith('.npz'))
    for f in files:
      try:
        with np.load(os.path.join(self.data_dir, f), allow_pickle=True) as data:
          shape = data['sequences'].shape
        lines.append(f'test set {f}: {shape[0]} extracts of {shape[1]} frames')
      except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        lines.append(f'test set {f}: BROKEN: {e}')
    if f'svg_test_set_{TEST_LEN}.npz' not in files:
      lines.append(f'test set svg_test_set_{TEST_LEN}.npz: missing; make it with '
                   f'`{base.command("make_test_set", "kth", self.data_dir)}`')
    try:
      from srvp_jax.data import raw  # pylint: disable=import-outside-toplevel
      lines.append(f'original videos: {len(raw.kth_avi_index(self.data_dir))} AVI files / archive members')
    except (FileNotFoundError, ValueError):
      lines.append('original videos: not found (<action>.zip or raw/<action>/*.avi; '
                   f'`{base.command("download", "kth", self.data_dir)}`)')
    return lines

  # Download and preparation. ---------------------------------------------------------------------------------

  def download(self, classes: Sequence[str] = CLASSES) -> None:
    """Downloads the original KTH videos into ``DIR/raw/<action>/*.avi`` (official URLs).

    The official script also fetches SVG's own preprocessed archive, which SRVP never reads; it is skipped.
    """
    for action in classes:
      target = os.path.join(self.data_dir, 'raw', action)
      archive = os.path.join(self.data_dir, 'raw', f'{action}.zip')
      base.download_file(RAW_URL.format(action=action), archive)
      os.makedirs(target, exist_ok=True)
      try:
        with zipfile.ZipFile(archive) as z:
          z.extractall(target)
      except zipfile.BadZipFile:
        raise DataError(f'{archive} is not a zip archive (interrupted download?); delete it and download again') \
            from None
      os.remove(archive)

  def sources(self) -> dict:
    return {'png': 'official PNG frames (processed_64/)', 'raw': 'original AVI files / class zip archives'}

  def auto_source(self, **options):
    return 'png' if index_videos(self.data_dir) is not None else 'raw'

  def items(self, source, **options):
    return self._png_items() if source == 'png' else self._raw_items()

  def _png_items(self) -> Iterator[tuple]:
    for split in self.splits:
      found = index_videos(self.data_dir, train=split == 'train')
      if found is None:
        raise FileNotFoundError(f'KTH {split} PNG frames not found: expected {processed_dir(self.data_dir)}/'
                                f'{self.official_layout.split("/", 1)[1]}')
      read = lambda frames: np.stack([base.read_frame(p, 1) for p in frames])
      for name, video in zip(found[0], base.ordered_map(read, found[1])):
        yield split, name, _meta(name), video

  def _raw_items(self) -> Iterator[tuple]:
    from srvp_jax.data import raw  # pylint: disable=import-outside-toplevel
    for meta, video in raw.kth_avi_videos(self.data_dir, workers=2):
      split = 'train' if meta['person'] <= 20 else 'test'
      yield split, meta['name'], {k: meta[k] for k in ('person', 'action', 'setting')}, video
