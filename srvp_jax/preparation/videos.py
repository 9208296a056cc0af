"""Your own videos' preparation: the clips of ``DIR/raw/`` -> the video store, the fixed test set, inspection.

Clips are found recursively under ``DIR/raw/``: video files (``.mp4 .avi .mov .mkv .webm .m4v``), GIFs,
``.npy`` / ``.npz`` arrays and folders of images, read by ``srvp_jax.clips`` (the readers of the predict
tools). Each clip is optionally resampled in time (``fps``: to that frame rate, from the rate the file
gives; ``stride``: one frame in K), fitted to 64x64 (centred square crop or stretch, Lanczos) and kept
grey or RGB (``channels``; by default 3 unless every clip is grey; a mix of grey and colour clips is
stored as RGB, the grey clips repeated on the three channels, with a note naming them).

Split: ``DIR/raw/train/`` and ``DIR/raw/test/``, when either exists, fix it (every clip must be in one of
them); otherwise a clip is a test clip when the SHA-256 of its path relative to ``DIR/raw/`` (with '/')
maps below ``test_fraction``, so adding clips never moves the others. With 2 or more usable clips and
none drawn for the test split, the clip of smallest hash is taken for it (and with every clip drawn for
it, the largest goes to training). Clips shorter than ``min_frames`` (the training length) are skipped,
one line each. Everything is read and checked before the store is written: a bad clip stops ``prepare``
with one line naming the file, and nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from typing import Iterator

import numpy as np
from PIL import Image

from srvp_jax import clips
from srvp_jax.data import DataError, base, store, videos
from srvp_jax.data.videos import RAW_DIR, TEST_LEN, test_file
from srvp_jax.preparation import steps, store_writer

CLIP_FILES = clips.VIDEO_EXTENSIONS + ('.gif',) + clips.ARRAY_EXTENSIONS
MIN_FRAMES = 20  # configs/videos.py trains on 20-frame clips.
REPORT = 'videos_prepare.json'  # In DIR/store/: the channels, options and skipped clips of the last prepare.
TEST_SIZE = 100


def find_clips(root: str) -> list[str]:
  """Paths (relative to ``root``, '/'-separated, sorted) of the clips under ``root``: clip files, image folders.

  Hidden files and folders (a leading dot) are ignored.
  """
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]  # Hidden folders (.git, editors' caches).
    filenames = [f for f in filenames if not f.startswith('.')]
    rel = os.path.relpath(dirpath, root).replace(os.sep, '/')
    if any(f.lower().endswith(clips.IMAGE_EXTENSIONS) for f in filenames):
      if rel == '.':
        raise DataError(f'{root} holds image files directly: put the frames of each clip in a folder of its own '
                        f'({root}/CLIP/frame_0001.png, ...)')
      found.append(rel)
    found.extend(f if rel == '.' else f'{rel}/{f}' for f in filenames if f.lower().endswith(CLIP_FILES))
  return sorted(found, key=base.natural_key)


def path_hash(name: str) -> float:
  """A number in [0, 1) fixed by the clip's relative path (SHA-256): the split rule's draw."""
  return int.from_bytes(hashlib.sha256(name.encode('utf-8')).digest()[:8], 'big') / 2.0 ** 64


def assign_splits(names: list[str], test_fraction: float, fixed: bool) -> dict[str, str]:
  """Clip name -> 'train' or 'test' (the module's rule); ``fixed``: the first folder of the name says it."""
  if fixed:
    return {n: n.split('/', 1)[0] for n in names}
  split = {n: 'test' if path_hash(n) < test_fraction else 'train' for n in names}
  if len(names) >= 2:
    if 'test' not in split.values():
      split[min(names, key=path_hash)] = 'test'
    if 'train' not in split.values():
      split[max(names, key=path_hash)] = 'train'
  return split


def resample(n_frames: int, source_fps: float, fps: float) -> np.ndarray:
  """Indices of the frames shown at ``fps`` by a clip of ``n_frames`` at ``source_fps`` (the last one at or before)."""
  count = max(1, math.ceil(n_frames * fps / source_fps - 1e-9))
  return np.minimum(np.floor(np.arange(count) * source_fps / fps + 1e-9).astype(np.int64), n_frames - 1)


def to_grey(frames: np.ndarray) -> np.ndarray:
  """uint8 (T, 64, 64, 3) -> (T, 64, 64, 1): ITU-R 601 luminance (Pillow 'L', as ``clips.fit`` with nc=1)."""
  return np.stack([np.asarray(Image.fromarray(f).convert('L')) for f in frames])[..., None]


class Videos(steps.ClipPreparation, videos.Videos):
  """Your own videos with the data CLI's steps."""

  def download(self):
    raise FileNotFoundError(f'videos are your own: put your clips in {os.path.join(self.data_dir, RAW_DIR)}/ then run '
                            f'`{base.command("prepare", self.name, self.data_dir)}`')

  def missing_data_dir(self) -> str:
    return (f'data folder {self.data_dir} not found; put your clips in {os.path.join(self.data_dir, RAW_DIR)}/ then '
            f'run `{base.command("prepare", self.name, self.data_dir)}`')

  def sources(self):
    return {'raw': f'the clips under {RAW_DIR}/'}

  def auto_source(self, **options):
    return 'raw'

  def items(self, source, **options) -> Iterator[tuple]:
    """(split, name, meta, uint8 (T, 64, 64, nc)) of the clips ``read_clips`` kept (``options``: its arguments)."""
    kept, _, _, nc = self.read_clips(**options)
    for split, name, meta, frames in kept:
      yield split, name, meta, (to_grey(frames) if nc == 1 and frames.shape[-1] == 3 else frames)

  # Reading. --------------------------------------------------------------------------------------------------

  def read_clips(self, channels: int | None = None, fit: str = 'crop', fps: float | None = None,
                 stride: int | None = None, test_fraction: float = 0.1, min_frames: int = MIN_FRAMES):
    """Reads every clip: (kept [(split, name, meta, uint8 RGB or grey 64x64 frames)], skipped, notes, nc)."""
    root = os.path.join(self.data_dir, RAW_DIR)
    if not os.path.isdir(root):
      raise FileNotFoundError(f'no folder {root}: put your clips there (video files, GIFs, folders of images, .npy / '
                              f'.npz arrays) then run `{base.command("prepare", self.name, self.data_dir)}`')
    names = find_clips(root)
    if not names:
      raise FileNotFoundError(f'no clip found under {root}: put {clips.supported()} there (sub-folders are searched)')
    fixed = any(os.path.isdir(os.path.join(root, s)) for s in self.splits)
    if fixed:
      stray = [n for n in names if n.split('/', 1)[0] not in self.splits or '/' not in n]
      if stray:
        raise DataError(f'{root}/train/ and {root}/test/ fix the split, but {root}/{stray[0]} is in neither: move it '
                        'into one of them')
    read, notes, skipped = [], [], []
    for name in names:
      path = os.path.join(root, name)
      try:
        clip = clips.read(path)
      except clips.ClipError as e:
        raise DataError(f'{e}; repair or remove {path}, then run prepare again') from None
      frames, rate = clip.frames, clip.fps
      if fps is not None:
        if rate is None:
          notes.append(f'note: {name} gives no frame rate: its frames are kept as they are (--stride K resamples '
                       'every clip)')
        else:
          frames, rate = frames[resample(len(frames), rate, fps)], float(fps)
      elif stride is not None:
        frames, rate = frames[::stride], None if rate is None else rate / stride
      meta = {'fps': rate, 'source_fps': clip.fps, 'source_frames': int(len(clip.frames))}
      if len(frames) < min_frames:
        skipped.append({'name': name, 'frames': int(len(frames))})
        continue
      fitted = clips.fit(frames, 3, fit)
      read.append((name, {**meta, 'grey': clips.is_grey(fitted)}, fitted))
    if not read:
      raise DataError(f'no usable clip under {root}: all {len(names)} clip(s) have fewer than the {min_frames} frames '
                      'of a training clip; add longer clips (or lower --min_frames)')
    grey = [name for name, meta, _ in read if meta['grey']]
    nc = int(channels) if channels else (1 if len(grey) == len(read) else 3)
    if not channels and grey and nc == 3:
      notes.append(f'note: {len(grey)} grey clip(s) among colour ones (first: {grey[0]}) are stored as RGB (rule: '
                   '3 channels unless every clip is grey); --channels 1 stores every clip grey')
    split = assign_splits([name for name, _, _ in read], test_fraction, fixed)
    kept = [(split[name], name, meta, frames if nc == 3 else frames[..., :1] if meta['grey'] else to_grey(frames))
            for name, meta, frames in read]
    return kept, skipped, notes, nc

  def prepare(self, source='auto', force=False, progress=True, min_frames=MIN_FRAMES, **options):
    """Reads and checks every clip, then writes the store; returns the lines to print."""
    if not force and self.has_store('train'):
      return [f'store already in {os.path.join(self.data_dir, store.STORE_DIR)} (--force rebuilds it)']
    kept, skipped, notes, nc = self.read_clips(min_frames=min_frames, **options)
    present = [s for s in self.splits if any(k[0] == s for k in kept)]
    if 'train' not in present:
      raise DataError(f'no usable training clip in {os.path.join(self.data_dir, RAW_DIR, "train")}/: put clips there')
    with steps.progress_bar(len(kept), 'videos', progress) as bar:
      paths = store_writer.write_splits(self.data_dir, self.name, nc, present, iter(kept), progress=bar.update)
    for split in set(self.splits) - set(present):
      shutil.rmtree(store.split_dir(self.data_dir, split), ignore_errors=True)
    for old in os.listdir(self.data_dir):  # Test extracts of a previous store.
      if old.startswith('videos_test_set_') and old.endswith('.npz'):
        os.remove(os.path.join(self.data_dir, old))
    report = {'nc': nc, 'min_frames': int(min_frames), 'options': {k: v for k, v in options.items() if v is not None},
              'skipped': skipped}
    with open(os.path.join(self.data_dir, store.STORE_DIR, REPORT), 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=1)
    self.nc = nc
    lines = [f'skipped {s["name"]}: {s["frames"]} frame(s), fewer than the {min_frames} of a training clip'
             for s in skipped] + notes
    for split, path in paths.items():
      n = sum(1 for k in kept if k[0] == split)
      lines.append(f'videos {split}: {n} clip(s), {sum(len(k[3]) for k in kept if k[0] == split)} frames of '
                   f'64x64x{nc} -> {path}')
    if 'test' not in present:
      lines.append('note: no test clip (a single usable clip): add clips to evaluate')
    return lines

  # Test set. -------------------------------------------------------------------------------------------------

  def make_test_set(self, size: int = TEST_SIZE, seq_len: int = TEST_LEN, seed: int = 42) -> str:
    """Writes ``videos_test_set_<seq_len>.npz``: ``size`` extracts of the test clips, legacy NumPy draws.

    With ``np.random.RandomState(seed)``, each extract draws a clip index randint(n) among the test clips of
    at least ``seq_len`` frames (store order), then a start randint(n_frames - seq_len + 1).
    """
    if not self.has_store('test'):
      raise FileNotFoundError(f'no test clips in {self.data_dir} ({store.STORE_DIR}/test is missing): run '
                              f'`{base.command("prepare", self.name, self.data_dir)}` on 2 or more clips')
    source = store.StoreVideos(self.data_dir, 'test', self.name)
    eligible = np.flatnonzero(source.lengths >= seq_len)
    if len(eligible) == 0:
      raise DataError(f'no test clip has {seq_len} frames (longest: {int(source.lengths.max())}); use a smaller '
                      '--seq_len or add longer clips')
    rng = np.random.RandomState(seed)
    sequences, names, starts = [], [], []
    for _ in range(size):
      i = int(eligible[rng.randint(len(eligible))])
      t0 = rng.randint(int(source.lengths[i]) - seq_len + 1)
      sequences.append(np.asarray(source.clip(i, t0, seq_len)))
      names.append(source.names[i])
      starts.append(t0)
    path = test_file(self.data_dir, seq_len)
    tmp = path + '.partial.npz'
    np.savez_compressed(tmp, sequences=np.stack(sequences), names=np.array(names), starts=np.array(starts))
    os.replace(tmp, path)
    return path

  def inspect(self):
    lines = []
    for split in self.splits:
      if not self.has_store(split):
        lines.append(f'store {split}: missing; make it with `{base.command("prepare", self.name, self.data_dir)}`')
        continue
      try:
        v = store.StoreVideos(self.data_dir, split, self.name)
      except (store.StoreError, FileNotFoundError) as e:
        lines.append(f'store {split}: BROKEN: {e}')
        continue
      rates = sorted({m.get('fps') for m in v.meta if m.get('fps')})
      no_rate = sum(1 for m in v.meta if not m.get('fps'))
      lines.append(f'store {split}: {len(v)} clips, {int(v.lengths.sum())} frames (min {v.lengths.min()}, max '
                   f'{v.lengths.max()}) of 64x64x{v.nc}; frame rates: '
                   + (', '.join(f'{r:g}' for r in rates) or 'none') + (f' ({no_rate} without)' if no_rate else ''))
    report = os.path.join(self.data_dir, store.STORE_DIR, REPORT)
    if os.path.isfile(report):
      with open(report, encoding='utf-8') as f:
        skipped = json.load(f).get('skipped', [])
      lines.append(f'skipped clips: {len(skipped)}')
      lines.extend(f'  {s["name"]}: {s["frames"]} frame(s)' for s in skipped)
    for name in sorted(os.listdir(self.data_dir)):
      if name.startswith('videos_test_set_') and name.endswith('.npz'):
        lines.append(steps.test_set_line(self.data_dir, name))
    root = os.path.join(self.data_dir, RAW_DIR)
    try:
      lines.append(f'raw clips: {len(find_clips(root))} under {root}' if os.path.isdir(root) else
                   f'raw clips: no folder {root}')
    except DataError as e:
      lines.append(f'raw clips: {e}')
    return lines
