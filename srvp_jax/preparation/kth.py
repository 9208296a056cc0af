"""KTH's preparation: download, the original AVI reader, the store, the official test set, inspection.

The original videos are the class archives ``<action>.zip`` or their ``person<PP>_<action>_d<S>_uncomp.avi``
files, one video per AVI file, decoded by ``ffmpeg -i AVI -r 25 -s 64x64`` to PNG and the first channel
kept (official ``preprocessing/kth/convert.py`` and loader), with the ffmpeg binary of the ``imageio-ffmpeg``
wheel. ``prepare`` packs them, or the official PNG layout, into the video store.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
import zipfile
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from srvp_jax import video_headers
from srvp_jax.data import DataError, base, kth, store
from srvp_jax.data.base import NX
from srvp_jax.data.kth import CLASSES, TEST_LEN, index_videos, official_test_file, processed_dir, video_meta
from srvp_jax.preparation import raw, steps

# Official download script (edenton/svg data/download_kth.sh, called by srvp preprocessing/kth/download.sh).
RAW_URL = 'http://www.nada.kth.se/cvap/actions/{action}.zip'
KTH_FRAME_RATE = 25
KTH_AVI = re.compile(r'^person(\d{2})_([a-z]+)_(d\d)_uncomp\.avi$')


def _kth_meta(file_name: str) -> dict | None:
  match = KTH_AVI.match(file_name)
  if match is None:
    return None
  person, action, setting = match.groups()
  return {'person': int(person), 'action': action, 'setting': setting, 'name': file_name[:-len('_uncomp.avi')]}


def _kth_sources(root: str, classes: Sequence[str]) -> list[tuple[dict, str, str | None]]:
  """(meta, path, zip member or None) per video, by class (``classes`` order) then name; extracted files first."""
  if not os.path.isdir(root):
    raise raw.RawDataMissingError(f'KTH data folder {root} not found; get the videos with '
                                  f'`{base.CLI} download kth --data_dir {root}`')
  found: dict[str, tuple[dict, str, str | None]] = {}
  for folder in (root, *(os.path.join(root, a) for a in classes), *(os.path.join(root, 'raw', a) for a in classes)):
    if os.path.isdir(folder):
      for file_name in sorted(os.listdir(folder)):
        meta = _kth_meta(file_name)
        if meta is not None and meta['action'] in classes:
          found.setdefault(meta['name'], (meta, os.path.join(folder, file_name), None))
  for action in classes:
    for archive in (os.path.join(root, f'{action}.zip'), os.path.join(root, 'raw', f'{action}.zip')):
      if not os.path.isfile(archive):
        continue
      try:
        with zipfile.ZipFile(archive) as z:
          members = z.namelist()
      except (zipfile.BadZipFile, OSError) as e:
        raise raw.CorruptRawFileError(f'KTH archive {archive} is unreadable ({e}); download it again') from None
      for member in members:
        meta = _kth_meta(os.path.basename(member))
        if meta is not None and meta['action'] == action:
          found.setdefault(meta['name'], (meta, archive, member))
  missing = [a for a in classes if not any(m['action'] == a for m, _, _ in found.values())]
  if missing:
    raise raw.RawDataMissingError(
        f'KTH videos of {", ".join(missing)} not found under {root}: expected <action>.zip or '
        f'[raw/]<action>/person<PP>_<action>_d<S>_uncomp.avi; get them with '
        f'`{base.CLI} download kth --data_dir {root}`')
  rank = {a: i for i, a in enumerate(classes)}
  return sorted(found.values(), key=lambda s: (rank[s[0]['action']], s[0]['name']))


def kth_avi_index(root: str, *, classes: Sequence[str] = CLASSES) -> list[dict]:
  """Metadata of the videos ``kth_avi_videos`` yields, in the same order (nothing decoded)."""
  return [meta for meta, _, _ in _kth_sources(root, classes)]


def kth_decode_avi(path: str, *, source: str | None = None, frame_rate: int = KTH_FRAME_RATE) -> np.ndarray:
  """Frames of a KTH AVI as the official conversion stores them, uint8 (T, 64, 64, 1).

  Runs the official ``ffmpeg -i AVI -r 25 -f image2 -s 64x64 image-%03d.png`` with the PNG images piped
  instead of written (same encoder, so the same pixel format and scaling), then keeps the first channel as
  the official loader does. ``source`` names the file in errors (e.g. ``walking.zip:person01_..avi``). A file
  that decodes to fewer frames than its AVI header declares (truncated) is an error (``video_headers``).
  """
  source = source or path
  cmd = [raw.ffmpeg_exe(), '-nostdin', '-loglevel', 'error', '-i', path, '-r', str(frame_rate),
         '-s', f'{NX}x{NX}', '-f', 'image2pipe', '-c:v', 'png', 'pipe:1']
  result = subprocess.run(cmd, check=False, capture_output=True)
  if result.returncode != 0:
    raise raw.CorruptRawFileError(f'KTH video {source} cannot be decoded '
                                  f'({raw.first_line(result.stderr.decode(errors="replace"))}); download it again')
  frames = []
  for png in raw.split_png_stream(result.stdout, source):
    with Image.open(io.BytesIO(png)) as img:
      frame = np.asarray(img)
    frames.append(frame if frame.ndim == 2 else frame[:, :, 0])
  if not frames:
    raise raw.CorruptRawFileError(f'KTH video {source} holds no frame; download it again')
  missing = video_headers.missing_frames(path, len(frames), rate=frame_rate)
  if missing is not None:
    raise raw.CorruptRawFileError(f'KTH video {source} is truncated: it decodes to {missing}; download it again')
  video = np.stack(frames)[..., None]
  if video.shape[1:] != (NX, NX, 1) or video.dtype != np.uint8:
    raise raw.CorruptRawFileError(f'KTH video {source} decodes to {video.dtype} {video.shape[1:]} frames, expected '
                                  'uint8 64x64')
  return video


def kth_png_listing_order(n_frames: int) -> np.ndarray:
  """Frame indices in the order ``sorted(os.listdir())`` lists the official ``image-%03d.png`` files (1..n).

  The official loader and test-set script read a video's PNG frames in that plain string order, which
  differs from time order past frame 999 (``image-1000.png`` sorts before ``image-101.png``);
  ``video[kth_png_listing_order(len(video))]`` is the frame sequence they see.
  """
  return np.array(sorted(range(n_frames), key=lambda i: f'image-{i + 1:03d}.png'), dtype=np.int64)


def _kth_read(entry: tuple[dict, str, str | None]) -> tuple[dict, np.ndarray]:
  meta, path, member = entry
  if member is None:
    return dict(meta), kth_decode_avi(path)
  source = f'{path}:{member}'
  with tempfile.TemporaryDirectory(prefix='srvp_kth_') as tmp:
    avi = os.path.join(tmp, os.path.basename(member))
    try:
      with zipfile.ZipFile(path) as z, z.open(member) as src, open(avi, 'wb') as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise raw.CorruptRawFileError(f'KTH archive member {source} is unreadable ({e}); download {path} again') from None
    return dict(meta), kth_decode_avi(avi, source=source)


def kth_avi_videos(root: str, *, classes: Sequence[str] = CLASSES,
                   workers: int = 1) -> Iterator[tuple[dict, np.ndarray]]:
  """KTH videos from the class archives or AVI files under ``root``: (meta, uint8 (T, 64, 64, 1)).

  Looked up: ``root/[raw/]<action>.zip`` (members ``person<PP>_<action>_d<S>_uncomp.avi``) and AVI files
  in ``root``, ``root/<action>/`` and ``root/raw/<action>/`` (the ``download`` layout); an extracted file
  wins over the same video in an archive. One video per AVI file, as the official PNG layout
  ``processed_64/<action>/<name>/`` holds (the ``00sequences.txt`` ranges are not used by SRVP). Yields in
  class order then name order (the order of ``kth.index_videos``), meta ``{'person': int, 'action': str,
  'setting': 'd1'..'d4', 'name': 'person01_boxing_d1'}``. Every class of ``classes`` must have a video.
  ``workers`` decodes that many videos at once (order kept).
  """
  yield from base.ordered_map(_kth_read, _kth_sources(root, classes), workers)


class KTH(steps.ClipPreparation, kth.KTH):
  """KTH with the data CLI's steps."""

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
      videos = store.StoreVideos(self.data_dir, 'test', self.name)
      by_name = {n: (int(length), i) for i, (n, length) in enumerate(zip(videos.names, videos.lengths))}

      def extract(name, t0):
        length, i = by_name[name]
        return videos.video(i)[kth_png_listing_order(length)[t0:t0 + seq_len], :, :, 0]
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
    lines.extend(steps.test_set_line(self.data_dir, f, allow_pickle=True) for f in files)
    if f'svg_test_set_{TEST_LEN}.npz' not in files:
      lines.append(f'test set svg_test_set_{TEST_LEN}.npz: missing; make it with '
                   f'`{base.command("make_test_set", "kth", self.data_dir)}`')
    try:
      lines.append(f'original videos: {len(kth_avi_index(self.data_dir))} AVI files / archive members')
    except (FileNotFoundError, ValueError):
      lines.append('original videos: not found (<action>.zip or raw/<action>/*.avi; '
                   f'`{base.command("download", "kth", self.data_dir)}`)')
    return lines

  def download(self, classes: Sequence[str] = CLASSES) -> None:
    """Downloads the original KTH videos into ``DIR/raw/<action>/*.avi`` (official URLs).

    The official script also fetches SVG's own preprocessed archive, which SRVP never reads; it is skipped.
    """
    for action in classes:
      target = os.path.join(self.data_dir, 'raw', action)
      archive = os.path.join(self.data_dir, 'raw', f'{action}.zip')
      steps.download_file(RAW_URL.format(action=action), archive)
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
        yield split, name, video_meta(name), video

  def _raw_items(self) -> Iterator[tuple]:
    for meta, video in kth_avi_videos(self.data_dir, workers=2):
      split = 'train' if meta['person'] <= 20 else 'test'
      yield split, meta['name'], {k: meta[k] for k in ('person', 'action', 'setting')}, video
